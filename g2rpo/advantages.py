"""Group-relative advantages over a batch's :class:`~g2rpo.types.Groups`.

A group is the set of samples drawn for one prompt. Group membership is an index tensor, so groups of
different sizes (CurES allocation) and groups split across micro-batches need no special case: every
statistic here is a segment reduction (``index_add`` / ``scatter_reduce``).

    A_i = clip((R_i - mean_group(R)) / (std + eps), -clip, +clip)

with ``std`` the group's std (GRPO, DanceGRPO), the std of the whole batch (Flow-GRPO's ``global_std``,
its published default; all-reduced over data-parallel ranks, whose groups are whole) or none. Unscorable samples (NaN reward) are left out of every statistic and get
advantage 0; groups whose rewards are all equal carry no signal, get advantage exactly 0, and are
reported (and dropped from training when ``drop_zero_std``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from g2rpo.distributed import all_sum
from g2rpo.types import Groups, RewardOutput

STD_MODES = ("group", "global", "none")


@dataclass
class GroupNormalization:
    """How rewards become advantages; defaults are Flow-GRPO's published ones (``config/base.py``)."""

    std: str = "global"  # group | global | none
    eps: float = 1e-4  # Flow-GRPO 1e-4, DanceGRPO 1e-8
    unbiased: bool = False  # torch.std (DanceGRPO) vs the population std (Flow-GRPO uses numpy's)
    clip: float = 5.0  # |A| <= clip, applied after summing per-reward advantages
    drop_zero_std: bool = True  # train only on groups whose rewards differ (Flow-GRPO's filtering)

    def __post_init__(self) -> None:
        if self.std not in STD_MODES:
            raise ValueError(
                f"normalization.std={self.std!r} is not valid; choose one of {', '.join(STD_MODES)}"
            )
        if self.eps < 0 or self.clip <= 0:
            raise ValueError(
                f"normalization.eps must be >= 0 and normalization.clip > 0 (got {self.eps}, {self.clip})"
            )


@dataclass
class Advantages:
    values: Tensor  # [B] clipped advantages, 0 for invalid samples and zero-std groups
    valid: Tensor  # [B] bool: every reward of the sample is finite
    zero_std: Tensor  # [B] bool: the sample's group has no reward variation (in every reward)
    train_mask: Tensor  # [B] bool: samples worth a gradient (valid, and not zero-std if dropping)
    num_groups: int
    num_zero_std_groups: int

    def metrics(self) -> dict[str, float]:
        values = self.values[self.valid]
        return {
            "advantage/abs_mean": values.abs().mean().item() if values.numel() else 0.0,
            "advantage/max": values.max().item() if values.numel() else 0.0,
            "advantage/min": values.min().item() if values.numel() else 0.0,
            "advantage/zero_std_frac": self.num_zero_std_groups / max(self.num_groups, 1),
            "advantage/train_frac": self.train_mask.float().mean().item(),
            "reward/invalid_count": float((~self.valid).sum().item()),
        }


def segment_mean(values: Tensor, segments: Tensor, num_segments: int, weights: Tensor) -> Tensor:
    """Weighted mean of ``values`` per segment, ``[num_segments]`` (0 for an empty segment)."""
    totals = values.new_zeros(num_segments).index_add_(0, segments, values * weights)
    counts = weights.new_zeros(num_segments).index_add_(0, segments, weights)
    return totals / counts.clamp_min(1)


def normalize_in_groups(
    rewards: Tensor, groups: Groups, valid: Tensor, norm: GroupNormalization
) -> tuple[Tensor, Tensor]:
    """Unclipped advantages ``[B]`` and a ``[B]`` mask of samples in groups with all-equal rewards; invalid
    samples count nowhere."""
    group_ids, num_groups = groups.ids, groups.count
    weights = valid.to(torch.float64)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards)).to(torch.float64)
    group_mean = segment_mean(filled, group_ids, num_groups, weights)
    deviation = filled - group_mean[group_ids]

    counts = weights.new_zeros(num_groups).index_add_(0, group_ids, weights)
    high = filled.new_full((num_groups,), -torch.inf).scatter_reduce(
        0, group_ids[valid], filled[valid], reduce="amax"
    )
    low = filled.new_full((num_groups,), torch.inf).scatter_reduce(
        0, group_ids[valid], filled[valid], reduce="amin"
    )
    group_is_flat = (high <= low) | (counts == 0)
    zero_std = group_is_flat[group_ids]

    if norm.std == "none":
        scale = torch.ones_like(filled)
    elif norm.std == "group":
        squares = weights.new_zeros(num_groups).index_add_(0, group_ids, deviation**2 * weights)
        dof = (counts - 1).clamp_min(1) if norm.unbiased else counts.clamp_min(1)
        scale = (squares / dof).sqrt()[group_ids] + norm.eps
    else:  # the std of the whole batch, over every rank's samples (two passes: mean, then squares)
        batch = filled[valid]
        count, total = all_sum(torch.stack([batch.new_tensor(batch.numel()), batch.sum()]))
        squares = all_sum(((batch - total / count.clamp_min(1)) ** 2).sum().reshape(1))[0]
        dof = count - 1 if norm.unbiased else count
        batch_std = (squares / dof).sqrt() if count > 1 else batch.new_zeros(())
        scale = (batch_std + norm.eps).expand_as(filled)

    advantages = torch.where(zero_std | ~valid, torch.zeros_like(deviation), deviation / scale)
    return advantages.to(rewards.dtype), zero_std


def compute_advantages(rewards: RewardOutput, groups: Groups, norm: GroupNormalization) -> Advantages:
    """Group-normalised advantages for a batch of rewards.

    ``rewards.aggregate == "reward"``: normalise the weighted reward sum (Flow-GRPO's ``avg``).
    ``rewards.aggregate == "advantage"``: normalise each reward on its own, then take the weighted sum of
    the advantages (DanceGRPO's multi-reward form, MixGRPO's ``advantage_aggr``, G2RPO). The clip is
    applied after the sum in both cases.
    """
    scores = torch.stack([s.float() for s in rewards.scores.values()])  # [K, B]
    valid = torch.isfinite(scores).all(dim=0)
    if rewards.aggregate == "reward":
        advantages, zero_std = normalize_in_groups(rewards.total, groups, valid, norm)
    else:
        advantages = torch.zeros_like(scores[0])
        zero_std = torch.ones_like(valid)
        for name, score in rewards.scores.items():
            per_reward, flat = normalize_in_groups(score.float(), groups, valid, norm)
            advantages = advantages + rewards.weights[name] * per_reward
            zero_std = zero_std & flat
    advantages = advantages.clamp(-norm.clip, norm.clip)
    train_mask = valid & ~zero_std if norm.drop_zero_std else valid
    zero_std_groups = torch.zeros(groups.count, dtype=torch.bool).index_fill_(
        0, groups.ids[zero_std].cpu(), True
    )
    return Advantages(
        values=advantages,
        valid=valid,
        zero_std=zero_std,
        train_mask=train_mask,
        num_groups=groups.count,
        num_zero_std_groups=int(zero_std_groups.sum().item()),
    )
