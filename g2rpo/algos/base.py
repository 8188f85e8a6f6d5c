"""What every algorithm provides to the training loop, and helpers shared by the policy-gradient family."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from g2rpo.advantages import Advantages, GroupNormalization, compute_advantages
from g2rpo.policies.base import Policy
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.types import LossOutput, PromptBatch, RewardOutput, Rollout, TrainingUnit

R = TypeVar("R", bound=Rollout)


class Algorithm(Generic[R]):
    """An RL algorithm is a rollout procedure, an advantage rule and a loss, typed by its rollout ``R``.

    The module calls, per iteration: ``rollout`` (under ``no_grad``) -> ``score`` -> ``advantages`` -> for
    each step of ``minibatches``: ``loss`` per unit, backward, one optimiser step -> ``on_optimizer_step``.
    Only ``rollout``, ``minibatches`` and ``loss`` must be written; the rest defaults to one image per sample
    scored by the reward ensemble and normalised in the sample's group.
    """

    normalization: GroupNormalization

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # An algorithm is also its Hydra schema, and OmegaConf reads the type arguments of a structured
        # config's first generic base as a Dict[K, V]'s (omegaconf._utils.get_dict_key_value_types): the
        # rollout type, needed only by type checkers, is hidden from it once the class is made.
        super().__init_subclass__(**kwargs)
        cls.__orig_bases__ = ()

    @property
    def uses_reference(self) -> bool:
        """Whether ``loss`` queries the frozen reference model (the policy then keeps one)."""
        return False

    def rollout(
        self, policy: Policy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> R:
        """Sample for ``batch``; ``iteration`` lets a schedule move with training (MixGRPO's window)."""
        raise NotImplementedError

    def score(self, reward: RewardEnsemble, rollout: R) -> RewardOutput:
        """The rewards of ``rollout.scored``: the ensemble over ``rollout.images``, unless an algorithm scores
        other outputs too (Pair-GRPO's text answers)."""
        scored = rollout.scored
        return reward(rollout.images, scored.prompts, scored.metadata)

    def advantages(self, rewards: RewardOutput, rollout: R) -> Advantages:
        """Advantages per trained sample, from the rewards of ``rollout.scored`` in its groups."""
        return compute_advantages(rewards, rollout.scored.groups, self.normalization)

    def rollout_metrics(self, rollout: R, rewards: RewardOutput) -> dict[str, float]:
        """Algorithm-specific diagnostics of an iteration, logged with the others."""
        return {}

    def minibatches(
        self, rollout: R, advantages: Advantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        """Training units grouped by optimiser step (outer list: one entry per step)."""
        raise NotImplementedError

    def loss(self, policy: Policy, rollout: R, advantages: Advantages, unit: TrainingUnit) -> LossOutput:
        raise NotImplementedError

    def on_optimizer_step(self, policy: Policy) -> None:
        """Called after every optimiser step, e.g. to move an EMA copy of the weights (DGPO's theta^-)."""

    def state_dict(self) -> dict:
        """Training state the algorithm keeps beyond the weights; saved in checkpoints for resuming."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


def as_normalization(value: GroupNormalization | Mapping[str, Any]) -> GroupNormalization:
    """``algo.normalization`` as Hydra passes it (a mapping of overrides) or as code does (the dataclass)."""
    return GroupNormalization(**value) if isinstance(value, Mapping) else value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"algo.{name}={value!r} is not valid; choose one of {', '.join(choices)}")


def check_num_steps(value: int, minimum: int, why: str) -> None:
    """``algo.num_steps >= minimum``, checked before any field derived from the steps, so that a bad step count
    is blamed on itself rather than on what it makes impossible (``timestep_fraction``, a window)."""
    if value < minimum:
        raise ValueError(f"algo.num_steps={value} is too few rollout steps: the minimum is {minimum} ({why})")


def check_positive(config: object, *names: str, allow_zero: bool = False) -> None:
    """``algo.<name> > 0`` (``>= 0`` with ``allow_zero``) for each of ``names``."""
    for name in names:
        value = getattr(config, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"algo.{name} must be {'>=' if allow_zero else '>'} 0, got {value}")


#: how kept samples are cut into micro-batches (``algo.micro_batches``)
MICRO_BATCHES = ("exact", "padded")


def training_samples(train_mask: Tensor, multiple: int, generator: torch.Generator) -> Tensor:
    """Indices of the samples to train on, padded to a multiple of the micro-batch size.

    ``algo.micro_batches=padded``: randomly chosen filtered-out samples are re-added so every micro-batch has
    the rollout's batch shape (kernels give batch-size-dependent results, which would show up as a ratio
    != 1 on-policy). Re-added samples have advantage 0 in the surrogate: at beta = 0 each costs a forward
    and a backward for no gradient (docs/performance.md).
    """
    kept = train_mask.nonzero().flatten().cpu()
    if kept.numel() == 0:
        return kept
    dropped = (~train_mask).nonzero().flatten().cpu()
    missing = min(-kept.numel() % multiple, dropped.numel())
    refill = dropped[torch.randperm(dropped.numel(), generator=generator)[:missing]]
    return torch.cat([kept, refill])


def shuffled_minibatches(
    train_mask: Tensor,
    batch_size: int,
    num_minibatches: int,
    num_inner_epochs: int,
    generator: torch.Generator,
    micro_batches: str = "exact",
) -> list[list[Tensor]]:
    """Sample indices per optimiser step, as micro-batches: each pass over the trained samples is shuffled,
    cut into micro-batches and split into ``num_minibatches`` steps (Flow-GRPO's and GRPO's updates).

    ``exact``: only the kept samples, in ``ceil(n / batch_size)`` micro-batches of near-equal size (weigh
    each loss by :func:`micro_batch_weight`); ``padded``: whole micro-batches of ``batch_size``, refilled
    with zero-advantage samples (:func:`training_samples`)."""
    padded = micro_batches == "padded"
    if padded:
        samples = training_samples(train_mask, batch_size, generator)
    else:
        samples = train_mask.nonzero().flatten().cpu()
    if samples.numel() == 0:
        return []
    steps = []
    for _ in range(num_inner_epochs):
        order = samples[torch.randperm(samples.numel(), generator=generator)]
        if padded:
            chunks = order.split(batch_size)
        else:
            chunks = order.tensor_split(math.ceil(order.numel() / batch_size))
        steps.extend(split_evenly(list(chunks), num_minibatches))
    return steps


def micro_batch_weight(samples: Tensor, batch_size: int, micro_batches: str) -> float:
    """The weight of a micro-batch's mean loss: ``exact`` micro-batches of ``b <= batch_size`` samples weigh
    ``b / batch_size``, so every sample weighs ``1 / batch_size`` as in a padded micro-batch, whose padding
    samples add nothing at beta = 0: the two modes take the same gradient from the same samples."""
    return 1.0 if micro_batches == "padded" else samples.numel() / batch_size


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` cut into at most ``parts`` consecutive chunks whose sizes differ by at most one."""
    parts = min(parts, len(items))
    bounds = [round(k * len(items) / parts) for k in range(parts + 1)] if parts else [0]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]
