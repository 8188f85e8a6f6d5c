"""RL algorithms: each one file that reads like its paper's method section."""

from g2rpo.algos.base import Algorithm
from g2rpo.algos.flow_grpo import FlowGRPO

__all__ = ["Algorithm", "FlowGRPO"]
