"""DanceGRPO (Xue et al. 2025, arXiv 2505.07818; official ``XueZeyue/DanceGRPO``, ``train_grpo_flux.py``).

Flow-GRPO's per-step clipped objective with these sampling and training choices (brief ``flow_grpo_family``
section 3):

1. **Constant-eta SDE** (``sde_type: dance``): the reverse SDE with diffusion coefficient ``eta = 0.3``
   at every step, ``mean = x + v dt - eta^2/2 score dt``, ``std = eta sqrt(-dt)``
   (:func:`g2rpo.sampling.sde_step`), ``T = 16`` steps on the shift-3 grid.
2. **Shared initial noise** (``init_same_noise``): every member of a group starts from the same ``x_1``,
   so rewards differ only through the injected step noise.
3. **Random trained timesteps**: the last step is never trained (``--ignore_last``); of the other
   ``T - 1``, each sample trains a random ``int((T - 1) * timestep_fraction)`` of them (a permutation
   per sample; 0.6 gives 9 of 15), in that random order.
4. **Advantages per group** with the unbiased std: ``(R - mean) / (std + 1e-8)``, clipped to +-5, no
   filtering; several rewards are normalised one by one and summed (``reward.aggregate: advantage``).
5. **No KL** (``beta = 0``), ratio clip 1e-4, AdamW lr 1e-5 (full fine-tune; 3e-4 for LoRA in the
   official LoRA script), optimiser step every 4 of 12 samples: 3 optimiser steps per rollout.

The official code samples one image at a time so that rollout and training see the same batch shape;
here rollout micro-batches equal training micro-batches (``rollout_batch_size``), which gives the same
guarantee (the module checks the log-prob gap before the first update).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from g2rpo.advantages import GroupNormalization
from g2rpo.algos.stepwise import StepwiseGRPO
from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import CHOICE, keyed, rand_per_key
from g2rpo.types import PromptBatch, SDERollout


def dance_normalization() -> GroupNormalization:
    return GroupNormalization(std="group", eps=1e-8, unbiased=True, clip=5.0, drop_zero_std=False)


@dataclass
class DanceGRPO(StepwiseGRPO):
    """Defaults: the official FLUX script ``finetune_flux_grpo.sh`` (CFG is the framework's SD3 setting)."""

    num_steps: int = 16
    noise_level: float = 0.3  # eta
    sde_type: str = "dance"
    beta: float = 0.0
    num_minibatches: int = 3  # 12 samples, an optimiser step every 4
    timestep_fraction: float = 0.6  # of the T - 1 trainable steps, a random subset per sample
    init_same_noise: bool = True  # one x_1 per group
    normalization: GroupNormalization = field(default_factory=dance_normalization)
    MIN_NUM_STEPS_WHY: ClassVar[str] = "at least one of the T - 1 steps before the last is trained"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_train_steps <= self.num_steps - 1:
            raise ValueError(
                f"algo.timestep_fraction={self.timestep_fraction} trains {self.num_train_steps} of the "
                f"{self.num_steps - 1} trainable steps; it must train at least one (use a fraction in "
                f"[1/(T-1), 1])"
            )

    @property
    def num_train_steps(self) -> int:
        return int((self.num_steps - 1) * self.timestep_fraction)

    def rollout(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> SDERollout:
        initial = self.group_initial_noise(policy, batch, generator) if self.init_same_noise else None
        order = rand_per_key(keyed(generator, batch.sample_ids, CHOICE), self.num_steps - 1).argsort(dim=1)
        return self.sample(
            policy, batch, generator, noise_levels=torch.full((self.num_steps,), self.noise_level),
            train_steps=order[:, : self.num_train_steps], initial_noise=initial,
        )  # fmt: skip
