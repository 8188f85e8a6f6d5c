"""The small dataclasses that flow through one RL iteration.

    PromptBatch -> (rollout) -> Rollout -> (reward) -> RewardOutput -> (advantages) -> Advantages
                -> (loss over TrainingUnits) -> LossOutput -> optimiser step

Every per-sample tensor has the batch as its first dimension. A group is the set of samples drawn for one
prompt; :class:`Groups` says which, computed once per batch and carried with it. Every algorithm's rollout
satisfies :class:`Rollout`: its images (if any) and the prompt of each scored output, with its groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Groups:
    """Which samples share a group, as index tensors (groups may differ in size and need not be contiguous).

    ``keys`` are the groups' ids as the curriculum drew them: they key a group's noise stream
    (``g2rpo.randomness.GROUP``), so they stay the same on whichever rank holds the group; ``ids`` number the
    groups ``0 .. count - 1`` in the order of their keys, for segment reductions.
    """

    ids: Tensor  # [B] long, 0 .. count - 1: each sample's group
    keys: Tensor  # [count] long, increasing: each group's id in the iteration's batch

    @classmethod
    def of(cls, group_ids: Tensor) -> Groups:
        keys, ids = torch.unique(group_ids, return_inverse=True)
        return cls(ids=ids, keys=keys)

    @property
    def count(self) -> int:
        return self.keys.numel()

    def __len__(self) -> int:
        return self.ids.numel()

    @cached_property
    def first(self) -> Tensor:
        """``[count]`` the index of each group's first member."""
        return torch.full((self.count,), len(self)).scatter_reduce(
            0, self.ids.cpu(), torch.arange(len(self)), reduce="amin"
        )

    def select(self, rows: Tensor) -> Groups:
        """The groups of the samples ``rows``, renumbered ``0 ..`` among themselves, keeping their keys."""
        present, ids = torch.unique(self.ids[rows.to(self.ids.device)], return_inverse=True)
        return Groups(ids=ids, keys=self.keys[present.to(self.keys.device)])

    def tiled(self, times: int) -> Tensor:
        """Group ids of ``times`` copies of the batch one after another, each copy's groups distinct:
        copy ``c``'s group ``g`` is ``c * count + g`` (G2RPO scores one image per (step, stride, member))."""
        return (torch.arange(times, device=self.ids.device)[:, None] * self.count + self.ids).flatten()


@dataclass
class PromptBatch:
    """The prompts of one iteration, one entry per *sample* (a prompt appears once per group member)."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: Tensor  # [B] long: the sample's group (its key, see Groups)
    prompt_ids: Tensor  # [B] long, index of the prompt in its dataset
    # [B] long: the sample's index in the iteration's whole batch, which keys its noise (g2rpo/randomness.py)
    # so that it does not depend on which rank or forward chunk samples it. Default: 0 .. B-1.
    sample_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.sample_ids is None:
            self.sample_ids = torch.arange(len(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    @cached_property
    def groups(self) -> Groups:
        return Groups.of(self.group_ids)

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
        """The batches one after the other; each batch's groups stay distinct from the others' (group ids
        become each batch's ``groups.ids`` offset past the previous batches' groups)."""
        offsets = [0]
        for batch in batches[:-1]:
            offsets.append(offsets[-1] + batch.groups.count)
        return cls(
            prompts=[p for batch in batches for p in batch.prompts],
            metadata=[m for batch in batches for m in batch.metadata],
            group_ids=torch.cat([batch.groups.ids.cpu() + offset for batch, offset in zip(batches, offsets)]),
            prompt_ids=torch.cat([batch.prompt_ids for batch in batches]),
            sample_ids=torch.cat([batch.sample_ids for batch in batches]),
        )

    def repeat(self, times: int) -> PromptBatch:
        """``times`` copies of the batch one after another, each copy's groups distinct
        (:meth:`Groups.tiled`): the prompts of several outputs scored per sample."""
        return PromptBatch(
            prompts=self.prompts * times,
            metadata=self.metadata * times,
            group_ids=self.groups.tiled(times),
            prompt_ids=self.prompt_ids.repeat(times),
            sample_ids=self.sample_ids.repeat(times),
        )

    def unique(self) -> tuple[list[str], Tensor, list[dict]]:
        """The distinct conditions (the prompt, and an edit's source), and for each sample the index of its
        condition among them; with each condition's metadata, which holds its source."""
        order: dict[tuple[str, str], int] = {}
        first: list[int] = []
        index = []
        for row, (prompt, meta) in enumerate(zip(self.prompts, self.metadata)):
            key = (prompt, json.dumps(source_of(meta), sort_keys=True))
            if key not in order:
                order[key] = len(order)
                first.append(row)
            index.append(order[key])
        return (
            [key[0] for key in order],
            torch.tensor(index, dtype=torch.long),
            [self.metadata[i] for i in first],
        )


def source_of(metadata: dict) -> object:
    """An edit's source in its prompt metadata: a shapes-world scene (``source``, a list of objects) or an
    image file (``source_image``); None for a text-to-image prompt."""
    return metadata.get("source", metadata.get("source_image"))


@dataclass
class Conditioning:
    """Text conditioning: token embeddings, pooled embeddings (SD3, FLUX) or a token mask (models whose prompts
    are padded per batch: Qwen-Image), with the CFG negatives; for an editing model, the source image's
    latents too (``context_latents``), which CFG keeps in both rows: the unconditional row drops the
    instruction, not the image, as the editing pipelines do."""

    prompt_embeds: Tensor  # [N, L, D]
    pooled_prompt_embeds: Tensor | None = None  # [N, P]
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    context_latents: Tensor | None = None  # [N, C, h, w] an edit's source image, in the model's latent space
    prompt_mask: Tensor | None = None  # [N, L] 1 for a prompt token, 0 for padding
    negative_prompt_mask: Tensor | None = None

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

    def unconditional(self) -> Conditioning:
        """The negatives as the conditioning (the source image kept): CFG's unconditional row."""
        if self.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative embeddings: encode(prompts, negative=True)")
        return Conditioning(
            self.negative_prompt_embeds,
            self.negative_pooled_prompt_embeds,
            context_latents=self.context_latents,
            prompt_mask=self.negative_prompt_mask,
        )

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device


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


class Rollout(Protocol):
    """What the training loop reads of every algorithm's rollout (the rest is the algorithm's own).

    ``scored`` holds the prompt of each scored output, in the order of ``images`` (or of the answers a
    text rollout scores), with the groups advantages are normalised in: the sampled batch itself, unless an
    algorithm scores several outputs per sample (G2RPO's continuations, Pair-GRPO's two sides).
    """

    @property
    def images(self) -> Tensor | None: ...  # [N, 3, H, W] in [0, 1], or None for a text-only rollout

    @property
    def scored(self) -> PromptBatch: ...

    def __len__(self) -> int: ...  # samples drawn (not outputs scored)


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
    scored: PromptBatch  # the sampled batch: one image per sample

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class ODERollout:
    """Samples of which only the clean end points are kept (DGPO trains on ``x_0`` alone)."""

    images: Tensor  # [B, 3, H, W] in [0, 1]
    samples: Tensor  # [B, C, h, w] fp32 final latents x_0
    # [T + 1] the noise level of each step, from 1 down to 0. With DPM-Solver these are the scheduler's
    # integer timesteps / num_train_timesteps, the values its model calls see (then 0).
    sigmas: Tensor
    cond: Conditioning  # one row per distinct prompt
    cond_index: Tensor  # [B] row of ``cond`` for each sample
    scored: PromptBatch  # the sampled batch: one image per sample

    def __len__(self) -> int:
        return self.samples.shape[0]


@dataclass
class SingularRollout:
    """G2RPO's rollout: an anchor per group, one SDE branch per (stochastic step, member), and the images
    of the branches' continuations.

    Images, and the prompts in ``scored``, are laid out ``(k, lambda, member)``: :meth:`per_image` views a
    per-image tensor as ``[K, L, B]``; ``scored``'s groups are the ``(k, lambda, group)`` triples
    (:meth:`PromptBatch.repeat`).
    """

    images: Tensor  # [K * L * B, 3, H, W] continuation images
    scored: PromptBatch  # the prompt of each image
    batch: PromptBatch  # the members: ``batch.groups`` gives each one's anchor
    anchors: Tensor  # [P, T + 1, C, h, w] deterministic trajectory of each group
    branches: Tensor  # [K, B, C, h, w] x^i_{k+1}: the SDE step from anchors[group, k]
    log_probs: Tensor  # [K, B] log pi_old(branch | anchor)
    sigmas: Tensor  # [T + 1]
    stochastic_steps: Tensor  # [K] grid indices k
    num_granularities: int  # L
    cond: Conditioning  # one row per group

    def __len__(self) -> int:
        return self.branches.shape[1]

    def per_image(self, values: Tensor) -> Tensor:
        """``values`` (one per image) as ``[K, L, B]``."""
        return values.view(len(self.stochastic_steps), self.num_granularities, len(self))


def _cat(values: list[Any]) -> Any:
    """Per-sample tensors or lists of several rollouts, concatenated (``None`` stays ``None``)."""
    if values[0] is None:
        return None
    if isinstance(values[0], Tensor):
        return torch.cat(values)
    return [item for value in values for item in value]


def _pad(tensor: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]))


def select_rows(value: Any, rows: Tensor) -> Any:
    """Rows of a per-sample tensor, list or prompt batch (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[rows.to(value.device)]
    if isinstance(value, PromptBatch):
        return value.select(rows)
    return [value[i] for i in rows.tolist()]


@dataclass
class TokenRollout:
    """Sampled token sequences with their log-probabilities under the sampling policy
    (:class:`g2rpo.policies.tokens.TokenPolicy` samples them).

    ``inputs`` holds what the policy needs to rebuild each sample's context (``answer``: ``images`` [B, 3, H,
    W] in [0, 1] and ``questions``; ``image``: ``prompts``), one entry per sample.
    """

    task: str  # "answer" | "image"
    inputs: dict[str, Any]
    tokens: Tensor  # [B, T] long, padded after the end token
    mask: Tensor  # [B, T] bool: generated tokens, through the end token
    log_probs: Tensor  # [B, T] fp32 log pi_old(o_t | context, o_<t), 0 where ~mask
    texts: list[str] | None = None  # decoded answers (answer task)
    images: Tensor | None = None  # [B, 3, H, W] in [0, 1] (image task)
    temperature: float = 1.0  # the sampling temperature: log-probs are of the tempered distribution
    guidance_scale: float = 1.0  # CFG of the sampling (image task); log-probs are of the guided distribution
    extras: dict[str, Any] = field(
        default_factory=dict
    )  # policy-specific per-sample tensors (select()ed too)
    scored: PromptBatch | None = None  # the sampled batch (set by the algorithm that sampled it)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def cat(cls, parts: list[TokenRollout]) -> TokenRollout:
        """Rollouts of the same task concatenated along the batch, sequences padded to the longest (chunks of
        one sampling, before the algorithm sets ``scored``)."""
        if len(parts) == 1:
            return parts[0]
        length = max(part.tokens.shape[1] for part in parts)
        first = parts[0]
        return cls(
            task=first.task,
            inputs={key: _cat([part.inputs[key] for part in parts]) for key in first.inputs},
            tokens=torch.cat([_pad(part.tokens, length) for part in parts]),
            mask=torch.cat([_pad(part.mask, length) for part in parts]),
            log_probs=torch.cat([_pad(part.log_probs, length) for part in parts]),
            texts=_cat([part.texts for part in parts]),
            images=_cat([part.images for part in parts]),
            temperature=first.temperature,
            guidance_scale=first.guidance_scale,
            extras={key: _cat([part.extras[key] for part in parts]) for key in first.extras},
        )

    def select(self, rows: Tensor) -> TokenRollout:
        picked = {
            f.name: select_rows(getattr(self, f.name), rows)
            for f in fields(self)
            if f.name not in ("task", "inputs", "extras", "temperature", "guidance_scale")
        }
        return TokenRollout(
            task=self.task,
            temperature=self.temperature,
            guidance_scale=self.guidance_scale,
            inputs={key: select_rows(value, rows) for key, value in self.inputs.items()},
            extras={key: select_rows(value, rows) for key, value in self.extras.items()},
            **picked,
        )


@dataclass
class TrainingUnit:
    """One forward/backward of the loss: a micro-batch of samples at one entry of what the algorithm trains
    per sample (Stepwise GRPO: a column of ``train_steps``; G2RPO: a stochastic step; DGPO: a noise level;
    token GRPO: always 0)."""

    samples: Tensor  # [b] sample indices
    index: int


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, Tensor]  # detached scalars, averaged over units by the module
