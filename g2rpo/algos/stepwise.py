"""What the per-step GRPO family shares: a PPO-clip surrogate on every trained SDE step of a trajectory.

Flow-GRPO, DanceGRPO and MixGRPO differ in how they sample (which SDE, which steps are stochastic, whether
a group shares its initial noise) and in which steps they train; once a rollout is an ``SDERollout``
with ``train_steps`` per sample, the loss below (Flow-GRPO eq. 5 / DanceGRPO's clipped objective) and the
minibatching are the same. Each subclass is one file that reads like its paper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from g2rpo.advantages import Advantages, GroupNormalization
from g2rpo.algos.base import (
    MICRO_BATCHES,
    Algorithm,
    as_normalization,
    check_choice,
    check_num_steps,
    check_positive,
    micro_batch_weight,
    shuffled_minibatches,
)
from g2rpo.losses import clipped_surrogate
from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import GROUP, keyed
from g2rpo.rollout import sde_rollout
from g2rpo.sampling import SDE_TYPES, sde_step, transition_kl
from g2rpo.types import LossOutput, PromptBatch, SDERollout, TrainingUnit


@dataclass
class StepwiseGRPO(Algorithm[SDERollout]):
    """Fields every per-step GRPO variant has; defaults are Flow-GRPO's (subclasses restate their own)."""

    num_steps: int = 10  # T in rollouts
    guidance_scale: float = 4.5  # CFG in rollouts (and in training when train_cfg)
    noise_level: float = 0.7  # a of the Flow-SDE, eta of DanceGRPO's SDE, eta of CPS
    sde_type: str = "sde"  # sde (Flow-SDE) | dance (constant eta) | cps (Flow-CPS)
    clip_range: float = 1e-4  # PPO ratio clip
    beta: float = 0.04  # KL coefficient to the LoRA-disabled reference
    train_cfg: bool = True  # recompute the guided velocity in training (2x batch), as sampled
    detach_uncond: bool = False  # stop the gradient through the unconditional CFG branch (2025-07 code)
    rollout_batch_size: int = 8  # images per sampling forward; also the training micro-batch
    num_inner_epochs: int = 1  # passes over each rollout
    num_minibatches: int = 2  # optimiser steps per pass
    micro_batches: str = "exact"  # exact (kept samples only) | padded (whole rollout-shaped micro-batches)
    normalization: GroupNormalization = field(default_factory=GroupNormalization)
    #: the fewest rollout steps the variant can train, and why (not fields: each variant's own rule)
    MIN_NUM_STEPS: ClassVar[int] = 2
    MIN_NUM_STEPS_WHY: ClassVar[str] = "a trained step and the untrained last step"

    def __post_init__(self) -> None:
        check_num_steps(self.num_steps, self.MIN_NUM_STEPS, self.MIN_NUM_STEPS_WHY)
        self.normalization = as_normalization(self.normalization)
        check_choice("sde_type", self.sde_type, SDE_TYPES)
        check_choice("micro_batches", self.micro_batches, MICRO_BATCHES)
        check_positive(self, "noise_level", "beta", allow_zero=True)
        check_positive(self, "clip_range", "rollout_batch_size", "num_inner_epochs", "num_minibatches")
        if self.noise_level == 0:
            raise ValueError("algo.noise_level=0 makes rollouts deterministic: there is no policy to improve")
        if self.guidance_scale > 1 and not self.train_cfg:
            warnings.warn(
                "algo.train_cfg=false with guidance_scale > 1 trains the unguided velocity on guided samples: "
                "the ratio is not 1 on-policy (the official no-CFG configs set guidance_scale=1)",
                stacklevel=2,
            )

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    def sample(
        self,
        policy: FlowPolicy,
        batch: PromptBatch,
        generator: torch.Generator,
        *,
        noise_levels: Tensor,
        train_steps: Tensor,
        initial_noise: Tensor | None = None,
    ) -> SDERollout:
        """:func:`g2rpo.rollout.sde_rollout` with this algorithm's steps, CFG, SDE and batch size."""
        return sde_rollout(
            policy,
            batch,
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            noise_levels=noise_levels,
            sde_type=self.sde_type,
            batch_size=self.rollout_batch_size,
            train_steps=train_steps,
            generator=generator,
            initial_noise=initial_noise,
        )

    def group_initial_noise(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator
    ) -> Tensor:
        """One ``x_1`` per group, repeated for its members (DanceGRPO's ``init_same_noise``); each group's
        draw is keyed by its id, so it does not depend on the rank that samples it."""
        groups = batch.groups
        return policy.initial_noise(groups.count, keyed(generator, groups.keys, GROUP))[
            groups.ids.to(policy.device)
        ]

    def minibatches(
        self, rollout: SDERollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        """Shuffle samples, cut rollout-sized micro-batches, train each on every trained step in order. A
        rollout without a trained step (MixGRPO's empty window) has no minibatch: an optimiser step on zero
        gradients would still move the weights (AdamW's moments, weight decay)."""
        columns = rollout.train_steps.shape[1]
        if columns == 0:
            return []
        return [
            [TrainingUnit(m, j) for m in step for j in range(columns)]
            for step in shuffled_minibatches(
                advantages.train_mask,
                self.rollout_batch_size,
                self.num_minibatches,
                self.num_inner_epochs,
                generator,
                self.micro_batches,
            )  # fmt: skip
        ]

    def loss(
        self, policy: FlowPolicy, rollout: SDERollout, advantages: Advantages, unit: TrainingUnit
    ) -> LossOutput:
        samples = unit.samples.to(rollout.latents.device)
        step = rollout.train_steps[samples, unit.index]
        x, x_next = rollout.latents[samples, step], rollout.latents[samples, step + 1]
        sigma, sigma_next = rollout.sigmas[step], rollout.sigmas[step + 1]
        cond = rollout.cond.select(rollout.cond_index[samples])
        guidance = self.guidance_scale if self.train_cfg else 1.0

        v = policy.velocity(x, sigma, cond, guidance, self.detach_uncond)
        transition = sde_step(
            x, v, sigma, sigma_next, self.noise_level, prev_sample=x_next, sde_type=self.sde_type
        )
        policy_loss, metrics = clipped_surrogate(
            transition.log_prob, rollout.log_probs[samples, step], advantages.values[samples], self.clip_range
        )
        loss = policy_loss
        metrics["policy_loss"] = policy_loss.detach()
        if self.beta > 0:
            with torch.no_grad(), policy.reference():
                v_ref = policy.velocity(x, sigma, cond, guidance)
            ref_mean = sde_step(
                x, v_ref, sigma, sigma_next, self.noise_level, prev_sample=x_next, sde_type=self.sde_type
            ).mean
            kl = transition_kl(transition.mean, ref_mean, transition.std_dev_t, self.sde_type).mean()
            loss = loss + self.beta * kl
            metrics["kl"] = kl.detach()
        weight = micro_batch_weight(samples, self.rollout_batch_size, self.micro_batches)
        return LossOutput(loss=loss * weight, metrics=metrics)
