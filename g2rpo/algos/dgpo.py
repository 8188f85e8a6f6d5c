"""DGPO: Direct Group Preference Optimization (Luo, Hu, Tang 2025, arXiv 2510.08425).

GRPO's gain is credited to the relative information *within* a group, not to the policy gradient. DGPO
keeps the groups and drops the stochastic policy:

1. **ODE rollouts.** ``G`` images per prompt from a deterministic sampler: diffusers' DPM-Solver++ on
   flow sigmas, 10 steps, CFG 4.5 (official; Euler and, as the paper's ablation, Flow-SDE rollouts are
   options). No trajectory and no log-probability is kept: training touches only the clean ``x_0``.
2. **Advantages** (paper Eq. 12): ``A_i = (r_i - mean_group r) / std``; ``G+ = {A > 0}``,
   ``G- = {A <= 0}``, weights ``w_i = |A_i|``. Normalised advantages sum to zero in a group, so
   ``sum_{G+} |A| = sum_{G-} |A|`` and the intractable ``beta log Z(c)`` of the two group rewards cancels.
3. **Group preference** (Eqs. 8-16). Bradley-Terry on group rewards ``R(G) = sum_{x in G} w(x) r(c, x)``
   with Diffusion-DPO's implicit reward; with ``w = |A|``, ``R(G+) - R(G-)`` is the signed sum
   ``sum_i A_i r_i``, and Jensen moves the expectation over ``(t, eps)`` outside (Eq. 17):

       L = -E_{c, t, eps} log sigmoid(-beta * sum_i A_i [L_theta_i - L_ref_i])

   with ``L_i = mean (v(x^i_t, t, c) - (eps - x^i_0))^2`` the velocity-MSE denoising loss (the code's
   flow-matching form) at **one ``t`` and one ``eps`` shared by every member of the group**.
4. **Official surrogate.** ``loss = mean_i sg(sigmoid(s_g)) A_i L_theta_i`` with
   ``s_g = beta / G sum_{i in g} A_i (L_theta_i - L_ref_i)``: an advantage-weighted denoising loss gated
   by how well the group is already separated. Its gradient is Eq. 17's divided by ``beta * B / G``.
   ``G`` (``gate_group_size``): the official code divides every group's sum by the configured group size
   (``train_sd3_dgpo.py:176``, ``group_size=config.sample.num_image_per_prompt`` at ``:1148``), which keeps
   Eq. 17's sum with ``beta`` rescaled by one constant; ``null`` (our default) divides by each group's own
   size, making ``s_g`` the group's mean. They agree whenever groups are complete and equal (the official
   setting); they differ with CurES's unequal groups or samples dropped for a NaN reward, where the mean
   gates every group on one scale, while the constant divisor closes a group's gate faster the more members
   it has (a group twice the size acts as if ``beta`` were doubled).
5. **Timestep Clip.** Train only at ``t >= t_min``, never near the clean end, so the policy does not
   learn the blur of few-step samples. The code draws ``K = 4`` distinct indices of the rollout schedule
   among its first ``max_timestep_index + 1`` (shared by every sample of the iteration); ``t_min`` sets
   the bound directly (``t ~ U[t_min, 1]``).
6. **theta^-** (paper: identity for 200 steps, then EMA 0.3): a fast EMA of the trained weights, decay
   ``min(0.3, 0.001 n)``, samples the rollouts once ``switch_step`` updates are done.

Added by the official code after the paper (defaults follow the code's GenEval config and the
research brief's config sketch): a PPO-style clip on the denoising-loss ratio
``exp(L_old - L_theta)`` against theta^- (``clip_dsm``), a velocity KL to the reference (``kl_beta``) and a
guided reference for CFG-free training (``reference_guidance_scale``). Text dropout (5%) is the paper's
and absent from the released code. The reference is the model with LoRA disabled, or theta^- (the code's
``use_ema_ref``, credited to TDM-R1, which needs beta 2000-5000). Groups are never split across training
forwards (nor across ranks: every rank rolls out whole groups), so ``s_g`` always sums a whole group.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from g2rpo.advantages import Advantages, GroupNormalization
from g2rpo.algos.base import (
    Algorithm,
    as_normalization,
    check_choice,
    check_num_steps,
    check_positive,
    split_evenly,
)
from g2rpo.ema import RampedEMA, restore, swapped_in
from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import CHOICE, GROUP, keyed, rand_per_key
from g2rpo.rollout import clean_samples
from g2rpo.sampling import mean_over_dims
from g2rpo.types import Conditioning, Groups, LossOutput, ODERollout, PromptBatch, TrainingUnit

SAMPLERS = ("dpm_solver", "euler", "sde")
REFERENCES = ("base", "theta_minus")


def dgpo_normalization() -> GroupNormalization:
    """The brief's config sketch: the std of the whole batch (OCR/PickScore; GenEval uses the group's),
    population std + 1e-4, clamp 5. All-equal groups carry no preference and are not trained."""
    return GroupNormalization(std="global", eps=1e-4, unbiased=False, clip=5.0)


def group_preference_logit(
    advantages: Tensor,
    loss_theta: Tensor,
    loss_ref: Tensor,
    groups: Groups,
    beta: float,
    group_size: int | None = None,
) -> Tensor:
    """``s_g = beta / G sum_{i in g} A_i (L_theta_i - L_ref_i)`` for each sample's group, ``[b]``; ``G`` is
    ``group_size`` for every group (the official code), or each group's own size when None."""
    ids = groups.ids.to(advantages.device)
    sums = advantages.new_zeros(groups.count).index_add_(0, ids, advantages * (loss_theta - loss_ref))
    if group_size is None:
        sizes = advantages.new_zeros(groups.count).index_add_(0, ids, torch.ones_like(advantages))
        return (beta * sums / sizes)[ids]
    return (beta * sums / group_size)[ids]


def dsm_clip_mask(advantages: Tensor, ratio: Tensor, clip_range: float) -> Tensor:
    """Samples whose denoising loss stops getting a gradient: the ratio ``exp(L_old - L_theta)`` already
    left ``[1 - c, 1 + c]`` on the side the advantage pushes it to (up for ``A > 0``, down otherwise)."""
    return ((advantages > 0) & (ratio > 1 + clip_range)) | ((advantages <= 0) & (ratio < 1 - clip_range))


def drop_text(cond: Conditioning, dropped: Tensor) -> Conditioning:
    """``cond`` with the rows ``dropped`` replaced by the empty prompt (the paper's 5% text dropout)."""
    if not bool(dropped.any()):
        return cond
    if cond.negative_prompt_embeds is None:
        raise ValueError("text dropout needs the empty-prompt embeddings: encode(prompts, negative=True)")
    rows = dropped.to(cond.device)

    def swap(negative: Tensor | None, positive: Tensor | None) -> Tensor | None:
        if positive is None:
            return None
        return torch.where(rows.view(-1, *[1] * (positive.dim() - 1)), negative, positive)

    return replace(  # an edit keeps its source image: only the instruction is dropped
        cond,
        prompt_embeds=swap(cond.negative_prompt_embeds, cond.prompt_embeds),
        pooled_prompt_embeds=swap(cond.negative_pooled_prompt_embeds, cond.pooled_prompt_embeds),
        prompt_mask=swap(cond.negative_prompt_mask, cond.prompt_mask),
    )


@dataclass
class DGPOUnit(TrainingUnit):
    """Whole groups at one training noise level, with the noise each group shares."""

    sigma: float = 1.0  # the noise level of x_sigma = (1 - sigma) x_0 + sigma eps (the paper's t)
    noise: Tensor | None = None  # [b, C, h, w]: one eps per group, repeated for its members
    text_dropped: Tensor | None = None  # [b] bool


@dataclass
class DGPO(Algorithm[ODERollout]):
    """Defaults: the official code's GenEval/OCR config and the research brief's config sketch."""

    num_steps: int = 10  # rollout steps
    sampler: str = "dpm_solver"  # dpm_solver (official) | euler | sde (the paper's ODE-vs-SDE ablation)
    flow_shift: float | None = None  # DPM-Solver's flow shift; null: the model's own (SD3.5: 3 = official)
    guidance_scale: float = 4.5  # CFG in rollouts; training runs the conditional branch only (code)
    sde_noise_level: float = 0.7  # Flow-SDE noise a, for sampler=sde only
    beta: float = 100.0  # beta_dpo: how fast the group gate sigmoid(s_g) closes
    # G of s_g = beta / G sum_{i in g} ...: null, each group's own size; an integer, that size for every
    # group, as the official code (/ num_image_per_prompt; the presets set ${curriculum.group_size})
    gate_group_size: int | None = None
    num_train_timesteps: int = 4  # K noise levels per update, shared by all samples
    max_timestep_index: int = 6  # Timestep Clip as in the code: indices 0..6 of the rollout schedule
    t_min: float | None = None  # Timestep Clip as in the paper: t ~ U[t_min, 1] (replaces the index rule)
    clip_dsm: bool = True  # PPO-style clip of the denoising-loss ratio against theta^- (code)
    clip_range: float = 1e-2  # its c
    kl_beta: float = 0.02  # velocity MSE to the reference (code; not in the paper)
    reference: str = (
        "base"  # base (LoRA disabled) | theta_minus (the code's use_ema_ref; needs beta 2000-5000)
    )
    reference_guidance_scale: float = 1.0  # CFG of the reference (4.5 for the README's CFG-free mode 2a)
    text_dropout: float = 0.05  # paper; the released code has none (0)
    switch_step: int = 200  # rollouts use theta^- after this many updates (code: 500 for GenEval)
    theta_minus_max_decay: float = 0.3
    theta_minus_ramp: float = 1e-3  # theta^- decay min(max_decay, ramp * n)
    rollout_batch_size: int = 8  # images per sampling forward
    groups_per_forward: int = 1  # whole groups per training forward (a group is never split)
    num_minibatches: int = 1  # optimiser steps per iteration (code: one, accumulating everything)
    normalization: GroupNormalization = field(default_factory=dgpo_normalization)

    def __post_init__(self) -> None:
        check_num_steps(self.num_steps, 1, "a rollout needs a step")
        self.normalization = as_normalization(self.normalization)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_positive(self, "beta", "num_train_timesteps", "clip_range", "rollout_batch_size",
                       "groups_per_forward", "num_minibatches")  # fmt: skip
        if not 0 <= self.max_timestep_index < self.num_steps:
            raise ValueError(
                f"algo.max_timestep_index={self.max_timestep_index} must index the {self.num_steps}-step "
                f"rollout schedule (0 .. {self.num_steps - 1})"
            )
        if self.t_min is None and self.num_train_timesteps > self.max_timestep_index + 1:
            raise ValueError(
                f"algo.num_train_timesteps={self.num_train_timesteps} distinct indices cannot be drawn from "
                f"0 .. {self.max_timestep_index} (algo.max_timestep_index)"
            )
        if self.t_min is not None and not 0 <= self.t_min < 1:
            raise ValueError(f"algo.t_min={self.t_min} must be in [0, 1)")
        if self.gate_group_size is not None and self.gate_group_size < 1:
            raise ValueError(
                f"algo.gate_group_size={self.gate_group_size} must be >= 1, or null (each group's own size)"
            )
        if not 0 <= self.text_dropout < 1 or self.kl_beta < 0:
            raise ValueError("algo.text_dropout must be in [0, 1) and algo.kl_beta >= 0")
        self.updates = 0  # optimiser steps so far (theta^-'s switch and decay ramp)
        self._theta_minus: RampedEMA | None = None
        self._theta_minus_state: dict | None = None  # from a checkpoint, until the weights are known

    @property
    def uses_reference(self) -> bool:
        return self.reference == "base"

    # ---- rollout ------------------------------------------------------------------------------------

    def theta_minus(self, policy: FlowPolicy) -> RampedEMA:
        """The fast EMA of the trained weights (created from them on first use, i.e. equal to theta)."""
        if self._theta_minus is None:
            self._theta_minus = RampedEMA(
                policy.trainable_parameters(), self.theta_minus_max_decay, self.theta_minus_ramp
            )
            if self._theta_minus_state is not None:
                restore(
                    self._theta_minus, self._theta_minus_state, policy.trainable_parameters(), policy.device
                )
        return self._theta_minus

    def _theta_minus_weights(self, policy: FlowPolicy):
        return swapped_in(self.theta_minus(policy), policy.trainable_parameters())

    def rollout(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> ODERollout:
        if self.updates <= self.switch_step:
            return self._sample(policy, batch, generator)
        with self._theta_minus_weights(policy):
            return self._sample(policy, batch, generator)

    def _sample(self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator) -> ODERollout:
        return clean_samples(
            policy, batch, sampler=self.sampler, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
            batch_size=self.rollout_batch_size, generator=generator, flow_shift=self.flow_shift,
            sde_noise_level=self.sde_noise_level,
            negative=self.text_dropout > 0 or self.reference_guidance_scale > 1,
        )  # fmt: skip

    # ---- training units -----------------------------------------------------------------------------

    def train_sigmas(self, rollout_sigmas: Tensor, generator: torch.Generator) -> Tensor:
        """The ``K`` noise levels of this update, all ``>= t_min`` (Timestep Clip)."""
        if self.t_min is not None:
            u = torch.rand(self.num_train_timesteps, generator=generator)
            return self.t_min + (1 - self.t_min) * u
        allowed = rollout_sigmas[: self.max_timestep_index + 1].cpu()
        return allowed[torch.randperm(allowed.numel(), generator=generator)[: self.num_train_timesteps]]

    def minibatches(
        self, rollout: ODERollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[DGPOUnit]]:
        """Whole groups, each at the same ``K`` noise levels with one shared ``eps`` per (level, group)."""
        train_mask = advantages.train_mask.cpu()
        groups = rollout.scored.groups
        group_ids = groups.ids.cpu()
        trained_groups = torch.unique(group_ids[train_mask])
        if trained_groups.numel() == 0:
            return []
        sigmas = self.train_sigmas(rollout.sigmas, generator)
        # eps per (level, group) and text dropout per (level, sample) come from streams keyed by the group
        # and the sample, so a group trains on the same noise whichever rank holds it
        noise = torch.zeros(len(sigmas), groups.count, *rollout.samples.shape[1:])
        keys = groups.keys.cpu()[trained_groups]
        for group, group_generator in zip(trained_groups.tolist(), keyed(generator, keys, GROUP)):
            noise[:, group] = randn_tensor(
                (len(sigmas), *rollout.samples.shape[1:]), generator=group_generator
            )
        dropped = (
            self.text_dropout
            > rand_per_key(keyed(generator, rollout.scored.sample_ids, CHOICE), len(sigmas)).T
        )
        order = trained_groups[torch.randperm(trained_groups.numel(), generator=generator)]
        members = [(train_mask & (group_ids == g)).nonzero().flatten() for g in order.tolist()]
        steps = []
        for chunk in split_evenly(members, self.num_minibatches):
            forwards = [torch.cat(chunk[i : i + self.groups_per_forward])
                        for i in range(0, len(chunk), self.groups_per_forward)]  # fmt: skip
            steps.append(
                [
                    DGPOUnit(samples, k, float(sigmas[k]), noise[k, group_ids[samples]], dropped[k, samples])
                    for k in range(len(sigmas))
                    for samples in forwards
                ]
            )
        return steps

    # ---- loss ---------------------------------------------------------------------------------------

    def loss(
        self, policy: FlowPolicy, rollout: ODERollout, advantages: Advantages, unit: DGPOUnit
    ) -> LossOutput:
        samples = unit.samples.to(rollout.samples.device)
        x0, eps, sigma = rollout.samples[samples], unit.noise.to(rollout.samples.device), unit.sigma
        x_t = (1 - sigma) * x0 + sigma * eps
        target = eps - x0
        cond = drop_text(rollout.cond.select(rollout.cond_index[samples]), unit.text_dropped)
        adv = advantages.values[samples].float()
        metrics = {}

        # theta^- and the reference first: swapping weights must not happen under a live graph.
        with torch.no_grad():
            if self.clip_dsm:
                with self._theta_minus_weights(policy):
                    loss_old = mean_over_dims((policy.velocity(x_t, sigma, cond) - target) ** 2)
            theta_minus = self.reference == "theta_minus"
            with self._theta_minus_weights(policy) if theta_minus else policy.reference():
                v_ref = policy.velocity(x_t, sigma, cond, self.reference_guidance_scale)
            loss_ref = mean_over_dims((v_ref - target) ** 2)

        v = policy.velocity(x_t, sigma, cond)
        loss_theta = mean_over_dims((v - target) ** 2)
        logit = group_preference_logit(
            adv,
            loss_theta.detach(),
            loss_ref,
            rollout.scored.groups.select(unit.samples),
            self.beta,
            self.gate_group_size,
        )
        gate = torch.sigmoid(logit)
        trained = loss_theta
        if self.clip_dsm:
            clipped = dsm_clip_mask(adv, torch.exp(loss_old - loss_theta.detach()), self.clip_range)
            trained = torch.where(clipped, loss_theta.detach(), loss_theta)
            metrics["dsm_clipfrac"] = clipped.float().mean()
        policy_loss = (gate * adv * trained).mean()
        kl = mean_over_dims((v - v_ref) ** 2).mean()
        loss = policy_loss + self.kl_beta * kl if self.kl_beta > 0 else policy_loss
        metrics.update(
            policy_loss=policy_loss.detach(),
            kl=kl.detach(),
            gate=gate.mean(),
            preference_logit=logit.mean(),
            denoising_loss=loss_theta.detach().mean(),
            denoising_loss_ref=loss_ref.mean(),
            sigma=torch.tensor(sigma),
        )
        return LossOutput(loss=loss, metrics=metrics)

    # ---- theta^- bookkeeping ------------------------------------------------------------------------

    def on_optimizer_step(self, policy: FlowPolicy) -> None:
        self.updates += 1
        self.theta_minus(policy).step(policy.trainable_parameters())

    def rollout_metrics(self, rollout, rewards) -> dict[str, float]:
        return {"dgpo/rollout_theta_minus": float(self.updates > self.switch_step)}

    def state_dict(self) -> dict:
        state = {"updates": self.updates}
        if self._theta_minus is not None:
            state["theta_minus"] = self._theta_minus.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.updates = state.get("updates", 0)
        self._theta_minus_state = state.get("theta_minus")
        self._theta_minus = None
