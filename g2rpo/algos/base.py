"""What every algorithm provides to the training loop, and helpers shared by the policy-gradient family."""

from __future__ import annotations

import torch
from torch import Tensor

from g2rpo.advantages import Advantages, GroupNormalization, compute_advantages
from g2rpo.policies.base import FlowPolicy
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.types import LossOutput, PromptBatch, RewardOutput, TrainingUnit


class Algorithm:
    """An RL algorithm is a rollout procedure, an advantage rule and a loss.

    The module calls, per iteration: ``rollout`` (under ``no_grad``) -> ``score`` (by default the reward
    ensemble over ``rollout.images`` for ``scored_prompts(...)``) -> ``advantages`` -> for each minibatch
    of ``minibatches(...)``: ``loss`` per unit, backward, one optimiser step.
    """

    advantage: GroupNormalization

    @property
    def uses_reference(self) -> bool:
        """Whether ``loss`` queries the frozen reference model (the policy then keeps one)."""
        return False

    def rollout(self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0):
        """Sample for ``batch``; ``iteration`` lets a schedule move with training (MixGRPO's window)."""
        raise NotImplementedError

    def scored_prompts(self, rollout, batch: PromptBatch) -> PromptBatch:
        """The prompt of each image in ``rollout.images``: the batch itself, one image per sample, unless an
        algorithm scores several images per sample (G2RPO's continuations)."""
        return batch

    def score(self, reward: RewardEnsemble, rollout, scored: PromptBatch) -> RewardOutput:
        """The rewards of ``scored_prompts``: the ensemble over ``rollout.images``, unless an algorithm scores
        other outputs too (Pair-GRPO's text answers)."""
        return reward(rollout.images, scored.prompts, scored.metadata)

    def advantages(self, rewards: RewardOutput, scored: PromptBatch, rollout=None) -> Advantages:
        """Advantages per trained sample from the rewards of ``scored_prompts``."""
        return compute_advantages(rewards, scored.group_ids, self.advantage)

    def rollout_metrics(self, rollout, rewards: RewardOutput) -> dict[str, float]:
        """Algorithm-specific diagnostics of an iteration, logged with the others."""
        return {}

    def minibatches(
        self, rollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        """Training units grouped by optimiser step (outer list: one entry per step)."""
        raise NotImplementedError

    def loss(self, policy: FlowPolicy, rollout, advantages: Advantages, unit: TrainingUnit) -> LossOutput:
        raise NotImplementedError

    def on_optimizer_step(self, policy: FlowPolicy) -> None:
        """Called after every optimiser step, e.g. to move an EMA copy of the weights (DGPO's theta^-)."""

    def state_dict(self) -> dict:
        """Training state the algorithm keeps beyond the weights; saved in checkpoints for resuming."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


def training_samples(train_mask: Tensor, multiple: int, generator: torch.Generator) -> Tensor:
    """Indices of the samples to train on, padded to a multiple of the micro-batch size.

    As Flow-GRPO does after zero-advantage filtering: randomly chosen filtered-out samples are re-added so
    every micro-batch has the rollout's batch shape (kernels give batch-size-dependent results, which
    would show up as a ratio != 1 on-policy). Re-added samples have advantage 0 in the surrogate.
    """
    kept = train_mask.nonzero().flatten().cpu()
    if kept.numel() == 0:
        return kept
    dropped = (~train_mask).nonzero().flatten().cpu()
    missing = min(-kept.numel() % multiple, dropped.numel())
    refill = dropped[torch.randperm(dropped.numel(), generator=generator)[:missing]]
    return torch.cat([kept, refill])


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` cut into at most ``parts`` consecutive chunks whose sizes differ by at most one."""
    parts = min(parts, len(items))
    bounds = [round(k * len(items) / parts) for k in range(parts + 1)] if parts else [0]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]
