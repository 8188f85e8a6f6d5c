"""RL algorithms: each one file that reads like its paper's method section."""

from g2rpo.algos.base import Algorithm
from g2rpo.algos.dance_grpo import DanceGRPO
from g2rpo.algos.dgpo import DGPO
from g2rpo.algos.flow_grpo import FlowGRPO
from g2rpo.algos.g2rpo import G2RPO
from g2rpo.algos.mix_grpo import MixGRPO
from g2rpo.algos.pair_grpo import PairGRPO
from g2rpo.algos.rft import RFT
from g2rpo.algos.rpp import REINFORCEPlusPlus
from g2rpo.algos.stepwise import StepwiseGRPO
from g2rpo.algos.token_grpo import TokenGRPO

__all__ = [
    "Algorithm",
    "DGPO",
    "DanceGRPO",
    "FlowGRPO",
    "G2RPO",
    "MixGRPO",
    "PairGRPO",
    "REINFORCEPlusPlus",
    "RFT",
    "StepwiseGRPO",
    "TokenGRPO",
]
