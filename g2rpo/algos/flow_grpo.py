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
   (:func:`g2rpo.sampling.transition_kl`); the reference is the model with LoRA disabled
   (:class:`g2rpo.algos.stepwise.StepwiseGRPO`).
5. **Initial noise.** Independent per sample by default; ``same_latent`` (official option added 2025-07-28,
   True in its ``clipscore_sd3`` config) gives every member of a group one ``x_1``, so rewards within a
   group differ only through the SDE noise of its steps. The official code shares it among copies of a prompt
   drawn in the same sampling batch; here the group is the unit, as in DanceGRPO's ``init_same_noise``.
6. **Updates.** One pass over the rollout split into 2 minibatches (official sizing
   ``grad_accum = batches // 2``): the first is exactly on-policy, the second slightly off-policy.

Flow-CPS (``sde_type: cps``, ``noise_level: 0.8``) swaps in the coefficients-preserving step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g2rpo.algos.stepwise import StepwiseGRPO
from g2rpo.policies.base import FlowPolicy
from g2rpo.types import PromptBatch, SDERollout


@dataclass
class FlowGRPO(StepwiseGRPO):
    """Defaults: the official SD3.5-M GenEval config (``config/grpo.py`` + ``config/base.py``)."""

    timestep_fraction: float = 0.99  # trains the first int(T * fraction) steps, in order
    same_latent: bool = False  # one x_1 per group (official config.sample.same_latent)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_train_steps <= self.num_steps - 1:
            raise ValueError(
                f"algo.timestep_fraction={self.timestep_fraction} trains {self.num_train_steps} of "
                f"{self.num_steps} steps; it must train at least one and never the last step, whose "
                f"near-deterministic Gaussian overflows (use a fraction in [1/T, (T-1)/T])"
            )

    @property
    def num_train_steps(self) -> int:
        return int(self.num_steps * self.timestep_fraction)

    def rollout(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> SDERollout:
        train_steps = torch.arange(self.num_train_steps).expand(len(batch), -1)
        initial = self.group_initial_noise(policy, batch, generator) if self.same_latent else None
        return self.sample(
            policy, batch, generator, noise_levels=torch.full((self.num_steps,), self.noise_level),
            train_steps=train_steps, initial_noise=initial,
        )  # fmt: skip
