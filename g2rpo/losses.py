"""Policy-gradient surrogate shared by the GRPO family (Flow-GRPO, DanceGRPO, MixGRPO, G2RPO)."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log_prob - old)``.

    Returns the scalar loss and detached diagnostics: the ratio, the fraction of clipped ratios,
    ``approx_kl = 1/2 mean((log_prob - old)^2)`` (as logged by DDPO / Flow-GRPO) and the mean absolute
    log-prob gap, which before the first update measures rollout/training numerical consistency.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "ratio": ratio.mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "logprob_gap": log_ratio.abs().mean(),
        }
    return loss, metrics
