"""The few collectives the RL loop needs across data-parallel ranks, each a no-op on one process.

Lightning's strategies (DDP, FSDP2) own the process group and the gradient all-reduce; what they cannot
know is that an RL iteration's batch is drawn *once* for all ranks and split by whole groups, that
advantage statistics over the whole batch need the other ranks' rewards, and that every rank must take
the same number of optimiser steps and backward syncs. Every function here must be called on every rank
the same number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from g2rpo.types import PromptBatch, RewardOutput


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: Tensor) -> Tensor:
    """``values`` summed over ranks (a copy; float64 on the CPU for the gloo backend)."""
    _, size = world()
    if size == 1:
        return values
    total = values.detach().to(torch.float64).cpu().clone()
    dist.all_reduce(total)
    return total.to(values.device, values.dtype)


def all_max(value: int) -> int:
    _, size = world()
    if size == 1:
        return value
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total)


def full_tensors(state: Any) -> Any:
    """``state`` (nested dicts, lists, tuples) with every FSDP-sharded ``DTensor`` gathered into a whole CPU
    tensor: what a single checkpoint file or an export must hold. Collective when there are DTensors."""
    if isinstance(state, DTensor):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {key: full_tensors(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_tensors(value) for value in state)
    return state


def sharded_like(tensors: Sequence[Tensor], parameters: Sequence[Tensor]) -> list[Tensor]:
    """Whole tensors (an EMA's weights read from a checkpoint) sharded as the FSDP ``parameters`` they
    shadow; tensors whose parameter is not sharded are returned as they are."""
    return [
        distribute_tensor(tensor.to(parameter.device), parameter.device_mesh, parameter.placements)
        if isinstance(parameter, DTensor) and not isinstance(tensor, DTensor)
        else tensor
        for tensor, parameter in zip(tensors, parameters, strict=True)
    ]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (pickled), in rank order."""
    _, size = world()
    if size == 1:
        return [value]
    values: list[Any] = [None] * size
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that logged it (every rank logs the same keys, except algorithm
    metrics of a rank that had nothing to train); ``.../max`` and ``.../min`` are the extremes over ranks."""
    gathered = gather_objects(metrics)
    if len(gathered) == 1:
        return metrics
    keys = dict.fromkeys(key for part in gathered for key in part)
    reduce = {"max": np.max, "min": np.min}
    return {
        key: float(
            reduce.get(key.rsplit("/", 1)[-1], np.mean)([part[key] for part in gathered if key in part])
        )
        for key in keys
    }


def rank_slice(batch: PromptBatch) -> PromptBatch:
    """This rank's share of the iteration's batch: a contiguous block of whole groups (groups never span
    ranks, so group statistics stay local), keeping each sample's ``sample_ids`` so that its noise is
    what it would be on one rank."""
    rank, size = world()
    if size == 1:
        return batch
    groups = batch.groups
    if groups.count % size:
        raise ValueError(
            f"the iteration draws {groups.count} groups, which do not split over {size} ranks: make "
            "curriculum.prompts_per_iteration a multiple of the number of ranks (each rank rolls out whole groups)"
        )
    mine = torch.arange(groups.count).chunk(size)[rank]
    return batch.select(torch.isin(groups.ids, mine).nonzero().flatten())


def gather_scored(batch: PromptBatch, rewards: RewardOutput) -> tuple[PromptBatch, RewardOutput]:
    """The whole iteration's scored prompts and rewards on every rank, in rank order (for the curriculum's
    update and the logged reward statistics); each rank's groups stay distinct (:meth:`PromptBatch.concat`)."""
    _, size = world()
    if size == 1:
        return batch, rewards
    local = (batch, {name: score.detach().cpu() for name, score in rewards.scores.items()})
    parts = gather_objects(local)
    merged = PromptBatch.concat([part for part, _ in parts])
    scores = {name: torch.cat([scores[name] for _, scores in parts]) for name in rewards.scores}
    return merged, RewardOutput(scores=scores, weights=rewards.weights, aggregate=rewards.aggregate)
