"""The small dataclasses that flow through one RL iteration.

    PromptBatch -> (rollout) -> Rollout -> (reward) -> RewardOutput -> (advantages) -> Advantages
                -> (loss over TrainingUnits) -> LossOutput -> optimiser step

Every per-sample tensor has the batch as its first dimension; a group is the set of samples that share
a ``group_ids`` value (the samples drawn for one prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class PromptBatch:
    """The prompts of one iteration, one entry per *sample* (a prompt appears once per group member)."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: Tensor  # [B] long, 0 .. G-1
    prompt_ids: Tensor  # [B] long, index of the prompt in its dataset
    # [B] long: the sample's index in the iteration's whole batch, which keys its noise (g2rpo/randomness.py)
    # so that it does not depend on which rank or forward chunk samples it. Default: 0 .. B-1.
    sample_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.sample_ids is None:
            self.sample_ids = torch.arange(len(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_groups(cls, prompts: list[str], metadata: list[dict], prompt_ids: Tensor, group_sizes: Tensor):
        """Repeat prompt ``k`` ``group_sizes[k]`` times; group ``k`` gets ``group_ids == k``."""
        group_ids = torch.repeat_interleave(torch.arange(len(prompt_ids)), group_sizes)
        ids = prompt_ids[group_ids]
        return cls(
            prompts=[prompts[i] for i in ids.tolist()],
            metadata=[metadata[i] for i in ids.tolist()],
            group_ids=group_ids,
            prompt_ids=ids,
        )

    def select(self, rows: Tensor) -> PromptBatch:
        """The samples ``rows`` (e.g. one rank's groups), keeping their ids."""
        index = rows.tolist()
        return PromptBatch(
            prompts=[self.prompts[i] for i in index],
            metadata=[self.metadata[i] for i in index],
            group_ids=self.group_ids[rows],
            prompt_ids=self.prompt_ids[rows],
            sample_ids=self.sample_ids[rows],
        )

    @classmethod
    def concat(cls, batches: list[PromptBatch]) -> PromptBatch:
        """The batches one after the other; each batch's groups keep their own ids, offset past the previous
        batches' (so equal ids in two batches stay two groups)."""
        offsets = [0]
        for batch in batches[:-1]:
            offsets.append(offsets[-1] + (int(batch.group_ids.max()) + 1 if len(batch) else 0))
        return cls(
            prompts=[p for batch in batches for p in batch.prompts],
            metadata=[m for batch in batches for m in batch.metadata],
            group_ids=torch.cat([batch.group_ids + offset for batch, offset in zip(batches, offsets)]),
            prompt_ids=torch.cat([batch.prompt_ids for batch in batches]),
            sample_ids=torch.cat([batch.sample_ids for batch in batches]),
        )

    def unique(self) -> tuple[list[str], Tensor]:
        """The distinct prompts, and for each sample the index of its prompt among them."""
        order: dict[str, int] = {}
        index = [order.setdefault(p, len(order)) for p in self.prompts]
        return list(order), torch.tensor(index, dtype=torch.long)


@dataclass
class Conditioning:
    """SD3-style text conditioning: token embeddings and pooled embeddings, with the CFG negatives."""

    prompt_embeds: Tensor  # [N, L, D]
    pooled_prompt_embeds: Tensor  # [N, P]
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None

    def select(self, index: Tensor) -> Conditioning:
        """Rows ``index`` of every field (a group's members share one encoded prompt)."""
        return Conditioning(
            **{
                f.name: None
                if getattr(self, f.name) is None
                else getattr(self, f.name)[index.to(self.device)]
                for f in fields(self)
            }
        )

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    @cached_property
    def guided(self) -> tuple[Tensor, Tensor]:
        """``[negatives; prompts]`` token and pooled embeddings for a CFG forward, built once per selection
        (a rollout reuses them for every step)."""
        if self.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative embeddings: encode(prompts, negative=True)")
        return (
            torch.cat([self.negative_prompt_embeds, self.prompt_embeds]),
            torch.cat([self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds]),
        )


@dataclass
class RewardOutput:
    """Per-reward scores ``[B]`` (NaN = unscorable) and how they combine into one training signal."""

    scores: dict[str, Tensor]
    weights: dict[str, float]
    aggregate: str = "reward"  # "reward": normalise sum_k w_k r_k; "advantage": sum_k w_k normalise(r_k)

    @property
    def total(self) -> Tensor:
        return sum(self.weights[name] * score.float() for name, score in self.scores.items())

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, score in {**self.scores, "total": self.total}.items():
            finite = score[torch.isfinite(score)].float()
            out[f"reward/{name}/mean"] = finite.mean().item() if finite.numel() else float("nan")
            out[f"reward/{name}/std"] = finite.std(correction=0).item() if finite.numel() else float("nan")
        return out


@dataclass
class SDERollout:
    """Stochastic trajectories with their per-step log-probabilities under the sampling policy.

    The whole trajectory is kept (``latents[:, i]`` is ``x_i``), so the pair ``(x_i, x_{i+1})`` of a
    trained step is two views of one tensor rather than two copies.
    """

    images: Tensor  # [B, 3, H, W] in [0, 1]
    latents: Tensor  # [B, T + 1, C, h, w] fp32
    log_probs: Tensor  # [B, T] log pi_old(x_{i+1} | x_i), NaN where the step is deterministic
    sigmas: Tensor  # [T + 1]
    train_steps: Tensor  # [B, J] long: the step indices trained for each sample, in training order
    cond: Conditioning  # one row per distinct prompt
    cond_index: Tensor  # [B] row of ``cond`` for each sample

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class ODERollout:
    """Deterministic samples: only the clean end points are kept (DGPO trains on ``x_0`` alone)."""

    images: Tensor  # [B, 3, H, W] in [0, 1]
    samples: Tensor  # [B, C, h, w] fp32 final latents x_0
    timesteps: Tensor  # [T] the sampler's noise levels sigma in [0, 1], from 1 down (no terminal 0)
    cond: Conditioning  # one row per distinct prompt
    cond_index: Tensor  # [B] row of ``cond`` for each sample
    group_ids: Tensor  # [B] the sample's group (prompt of this iteration)
    sample_ids: Tensor  # [B] the sample's index in the iteration's batch (keys its training randomness)

    def __len__(self) -> int:
        return self.samples.shape[0]


@dataclass
class TrainingUnit:
    """One forward/backward of the loss: a micro-batch of samples at one column of ``train_steps``."""

    samples: Tensor  # [b] sample indices
    column: int


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, Tensor]  # detached scalars, averaged over units by the module
