"""Flow-GRPO: online RL for flow-matching models (Liu et al. 2025, arXiv 2505.05470).

1. **ODE-to-SDE.** Sampling is turned into an MDP by the reverse SDE with the ODE's marginals
   (paper eq. 9, :func:`g2rpo.sampling.sde_step`), noise ``sigma_t = a sqrt(t / (1 - t))``, ``a = 0.7``;
   each step is a Gaussian policy whose log-probability is averaged over latent dims.
2. **Denoising reduction.** Rollouts use ``T = 10`` steps (evaluation 40); every step but the last
   (``sigma 0.0089 -> 0``, whose Gaussian is too peaked) is trained: ``timestep_fraction = 0.99``.
3. **Group-relative advantages** (paper eq. 4): ``(R - mean_group) / (std + 1e-4)``, with the std of the
   whole batch (official ``global_std``), clipped to +-5; groups with equal rewards are filtered.
4. **Objective** (paper eq. 5): per trained step, PPO-clip on ``r = pi_theta / pi_old`` with ``eps = 1e-4``
   plus ``beta KL(pi_theta || pi_ref)``, ``beta = 0.04``, in the official mean-difference form
   (:func:`g2rpo.sampling.transition_kl`); the reference is the model with LoRA disabled.
5. **Updates.** One pass over the rollout split into 2 minibatches (official sizing
   ``grad_accum = batches // 2``): the first is exactly on-policy, the second slightly off-policy.

Flow-CPS (``sde_type: cps``, ``noise_level: 0.8``) swaps in the coefficients-preserving step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from g2rpo.advantages import Advantages, GroupNormalization
from g2rpo.algos.base import Algorithm, split_evenly, training_samples
from g2rpo.losses import clipped_surrogate
from g2rpo.policies.base import FlowPolicy
from g2rpo.rollout import sde_rollout
from g2rpo.sampling import SDE_TYPES, sde_step, transition_kl
from g2rpo.types import LossOutput, PromptBatch, SDERollout, TrainingUnit


@dataclass
class FlowGRPO(Algorithm):
    """Defaults: the official SD3.5-M GenEval config (``config/grpo.py`` + ``config/base.py``)."""

    num_steps: int = 10  # T in rollouts
    guidance_scale: float = 4.5  # CFG in rollouts (and in training when train_cfg)
    noise_level: float = 0.7  # a of the Flow-SDE; eta for CPS (0.8 in the official CPS configs)
    sde_type: str = "sde"  # sde (Flow-SDE) | cps (Flow-CPS)
    timestep_fraction: float = 0.99  # trains the first int(T * fraction) steps, in order
    clip_range: float = 1e-4  # PPO ratio clip (1e-5 in the Fast / CPS configs)
    beta: float = 0.04  # KL coefficient (0.01 for PickScore, 0 in the Fast configs)
    train_cfg: bool = True  # recompute the guided velocity in training (2x batch), as sampled
    detach_uncond: bool = False  # stop the gradient through the unconditional CFG branch (2025-07 code)
    rollout_batch_size: int = 8  # images per sampling forward; also the training micro-batch
    num_inner_epochs: int = 1  # passes over each rollout
    num_minibatches: int = 2  # optimiser steps per pass
    advantage: GroupNormalization = field(default_factory=GroupNormalization)

    def __post_init__(self) -> None:
        if isinstance(self.advantage, Mapping):
            self.advantage = GroupNormalization(**self.advantage)
        if self.sde_type not in SDE_TYPES:
            raise ValueError(
                f"algo.sde_type={self.sde_type!r} is not valid; choose one of {', '.join(SDE_TYPES)}"
            )
        if not 1 <= self.num_train_steps <= self.num_steps - 1:
            raise ValueError(
                f"algo.timestep_fraction={self.timestep_fraction} trains {self.num_train_steps} of "
                f"{self.num_steps} steps; it must train at least one and never the last step, whose "
                f"near-deterministic Gaussian overflows (use a fraction in [1/T, (T-1)/T])"
            )
        for name in ("noise_level", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"algo.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip_range", "rollout_batch_size", "num_inner_epochs", "num_minibatches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"algo.{name} must be > 0, got {getattr(self, name)}")
        if self.noise_level == 0:
            raise ValueError("algo.noise_level=0 makes rollouts deterministic: there is no policy to improve")
        if self.guidance_scale > 1 and not self.train_cfg:
            warnings.warn(
                "algo.train_cfg=false with guidance_scale > 1 trains the unguided velocity on guided samples: "
                "the ratio is not 1 on-policy (the official no-CFG configs set guidance_scale=1)",
                stacklevel=2,
            )

    @property
    def num_train_steps(self) -> int:
        return int(self.num_steps * self.timestep_fraction)

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    def rollout(self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator) -> SDERollout:
        train_steps = torch.arange(self.num_train_steps).expand(len(batch), -1)
        return sde_rollout(
            policy,
            batch,
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            noise_levels=torch.full((self.num_steps,), self.noise_level),
            sde_type=self.sde_type,
            batch_size=self.rollout_batch_size,
            train_steps=train_steps,
            generator=generator,
        )

    def minibatches(
        self, rollout: SDERollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        """Shuffle samples, cut rollout-sized micro-batches, train each on every step in order."""
        samples = training_samples(advantages.train_mask, self.rollout_batch_size, generator)
        if samples.numel() == 0:
            return []
        steps = []
        for _ in range(self.num_inner_epochs):
            order = samples[torch.randperm(samples.numel(), generator=generator)]
            micro_batches = list(order.split(self.rollout_batch_size))
            for chunk in split_evenly(micro_batches, self.num_minibatches):
                steps.append([TrainingUnit(m, j) for m in chunk for j in range(self.num_train_steps)])
        return steps

    def loss(
        self, policy: FlowPolicy, rollout: SDERollout, advantages: Advantages, unit: TrainingUnit
    ) -> LossOutput:
        samples = unit.samples.to(rollout.latents.device)
        step = rollout.train_steps[samples, unit.column]
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
        return LossOutput(loss=loss, metrics=metrics)
