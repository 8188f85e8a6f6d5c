"""The reward protocol and the weighted ensemble every run scores with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from g2rpo.data import source_images
from g2rpo.types import RewardOutput

AGGREGATES = ("reward", "advantage")


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch of images for their prompts.

    ``images`` are ``[B, 3, H, W]`` floats in ``[0, 1]``; ``metadata`` holds one dict per sample (GenEval
    tags, OCR targets, ...). Return a ``Tensor[B]`` (or a sequence of floats / ``None``); NaN or ``None``
    marks a sample that could not be scored: it is left out of the advantage statistics, not zeroed.
    """

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor: ...


def reads_sources(reward: object) -> bool:
    """Whether a reward takes an edit's source images (``sources=``, ``[B, 3, H, W]``): an edit judge does,
    and says so with a ``reads_sources = True`` attribute; other rewards are called as before."""
    return bool(getattr(reward, "reads_sources", False))


class RewardEnsemble:
    """Named rewards with weights; one named reward is the common case.

    ``aggregate="reward"`` trains on the normalised weighted sum of rewards (Flow-GRPO);
    ``aggregate="advantage"`` normalises each reward within its groups and sums the weighted advantages
    (DanceGRPO, MixGRPO ``advantage_aggr``, G2RPO). Every reward is logged on its own either way.
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardFunction],
        weights: Mapping[str, float] | None = None,
        aggregate: str = "reward",
    ) -> None:
        if not rewards:
            raise ValueError("reward.rewards is empty: configure at least one reward function")
        if aggregate not in AGGREGATES:
            raise ValueError(
                f"reward.aggregate={aggregate!r} is not valid; choose one of {', '.join(AGGREGATES)}"
            )
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(
                f"reward.weights names {sorted(unknown)} which are not in reward.rewards {sorted(rewards)}"
            )
        self.rewards = dict(rewards)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.rewards}
        self.aggregate = aggregate

    def __call__(
        self, images: Tensor | Sequence[str], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        """``images`` ``[B, 3, H, W]``, or the decoded texts of a text rollout (token GRPO's answer and compare
        tasks), which its rewards read in their place."""
        scores = {}
        texts = not isinstance(images, Tensor)
        device = "cpu" if texts else images.device
        # an edit's source, from its prompt's metadata, for the rewards that read it (None: text-to-image)
        sources = (
            source_images(metadata, images.shape[-1], images.device)
            if not texts and any(map(reads_sources, self.rewards.values()))
            else None
        )
        for name, fn in self.rewards.items():
            edit = {"sources": sources} if sources is not None and reads_sources(fn) else {}
            score = fn(images, prompts, metadata, **edit)
            if not isinstance(score, Tensor):
                score = torch.tensor([float("nan") if s is None else float(s) for s in score])
            score = score.detach().float().to(device).flatten()
            if score.shape[0] != len(images):
                what = "texts" if texts else "images"
                raise ValueError(f"reward {name!r} returned {score.shape[0]} scores for {len(images)} {what}")
            scores[name] = score
        return RewardOutput(scores=scores, weights=self.weights, aggregate=self.aggregate)
