"""Rewards: ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> Tensor[B]``; NaN marks unscorable."""

from g2rpo.rewards.base import RewardEnsemble, RewardFunction
from g2rpo.rewards.jpeg import JpegCompressibility, JpegIncompressibility

__all__ = ["JpegCompressibility", "JpegIncompressibility", "RewardEnsemble", "RewardFunction"]
