"""G2RPO: Granular GRPO (Zhou et al. 2025, arXiv 2510.01982; official ``bcmi/Granular-GRPO``).

Brief: ``shared/research/g2rpo_dgpo.md`` part 1. Flow-GRPO and DanceGRPO inject noise at every step and
credit the final reward to all of them; G2RPO makes the credit of each step exact and judges it at
several denoising granularities.

1. **Singular Stochastic Sampling** (sec. 1.2). Each group shares one initial noise and one deterministic
   *anchor* trajectory (Euler ODE, ``eta = 0``) through the shifted grid ``sigma_0 = 1 > ... > sigma_T = 0``.
   For every stochastic step ``k`` in ``M`` (default: the high-noise half, ``k = 0 .. T/2 - 1``; paper
   ``M = {16..9}`` for ``T = 16``), each member takes **one** SDE step ``sigma_k -> sigma_{k+1}`` from the
   shared anchor latent with its own noise (Flow-SDE, ``eta = 0.7``), recording
   ``log pi_old(x^i_{k+1} | x_k)``, and continues deterministically. Members share everything up to
   ``sigma_k``, so the within-group reward spread at ``k`` is caused by step ``k``'s noise alone.
   The anchor's velocity at ``x_k`` is the one the SDE step needs, so branching costs no extra forward.
2. **Multi-Granularity Advantage Integration** (sec. 1.3). Each branch ``x^i_{k+1}`` is completed by the
   ODE with every stride ``lambda`` in ``granularities`` (paper ``{1, 2, 3}``, official scripts
   ``{1, 2}``, our default): grid points ``k+1, k+2, k+2+lambda, k+2+2 lambda, ... <= T``
   (:func:`continuation_grid`). The image is ``x0_hat = x - sigma v`` at the last *evaluated* point
   (``final_image: last_x0_pred``, the official code's rule; it is a normal final Euler step when the
   strided grid ends at ``sigma = 0``), or the grid gets ``sigma = 0`` appended (``append_zero``).
   Advantages are normalised per ``(k, lambda, reward)`` over the group,
   ``A^{i,lambda,m}_k = (R - mean) / (std_unbiased + 1e-8)``, summed over ``lambda`` and rewards (with
   ``reward.aggregate: advantage``; ``reward`` normalises the weighted reward sum instead), then clamped
   to +-5.
3. **Objective** (sec. 1.4): ``(1/G) sum_i (1/|M|) sum_k min(r A, clip(r, 1 +- eps) A)`` at step ``k``
   only, ``eps = 1e-4``, no KL and no reference model. ``update_per: stochastic_step`` takes one
   optimiser step per ``k`` (``train_g2rpo_hps.py``); ``iteration`` averages over ``k`` and steps once
   (another version of ``train_g2rpo_hps_clip.py``).
4. **Batch-1 training forward** (``broadcast_forward``): all members of a group have the same input at
   step ``k`` (its anchor latent and prompt), so the velocity is computed once per group and broadcast;
   members differ only in the recorded ``x^i_{k+1}``. Valid for a deterministic forward: it refuses a
   policy with active dropout.

Costs are logged as ``nfe/rollout`` and ``nfe/train`` (CFG forwards count twice).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from g2rpo.advantages import Advantages, GroupNormalization, compute_advantages
from g2rpo.algos.base import Algorithm, as_normalization, check_choice, check_num_steps
from g2rpo.losses import clipped_surrogate
from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import GROUP, keyed
from g2rpo.rollout import euler_trajectory, ode_continue
from g2rpo.sampling import sde_step
from g2rpo.types import Groups, LossOutput, PromptBatch, RewardOutput, SingularRollout, TrainingUnit

FINAL_IMAGE_RULES = ("last_x0_pred", "append_zero")
UPDATE_PER = ("stochastic_step", "iteration")


def g2rpo_normalization() -> GroupNormalization:
    return GroupNormalization(std="group", eps=1e-8, unbiased=True, clip=5.0, drop_zero_std=False)


def continuation_grid(k: int, stride: int, num_steps: int, final_image: str = "last_x0_pred") -> list[int]:
    """Grid indices a branch created by the SDE step ``k -> k+1`` passes through with stride ``stride``.

    ``[k+1, k+2, k+2+stride, ...]`` up to ``T``; the ODE evaluates the velocity at every point but the last
    (``len - 1`` forwards). With ``append_zero`` a grid that misses ``T`` gets it appended.
    """
    points = [k + 1, *range(k + 2, num_steps + 1, stride)]
    if final_image == "append_zero" and points[-1] != num_steps:
        points.append(num_steps)
    return points


@dataclass
class G2RPO(Algorithm[SingularRollout]):
    """Defaults: the official FLUX launch scripts (``finetune_g2rpo_hps.sh``), paper values in comments."""

    num_steps: int = 16  # T
    guidance_scale: float = 4.5  # CFG (official FLUX: distilled guidance 3.5, no true CFG)
    noise_level: float = 0.7  # eta of the single SDE step (Flow-SDE)
    stochastic_steps: list[int] | None = None  # M as grid indices from sigma = 1; None: the first T/2
    granularities: list[int] = field(default_factory=lambda: [1, 2])  # paper [1, 2, 3]
    final_image: str = "last_x0_pred"  # | append_zero
    clip_range: float = 1e-4  # ratio clip epsilon
    update_per: str = "stochastic_step"  # | iteration
    broadcast_forward: bool = True  # one training forward per group at step k, broadcast to members
    train_cfg: bool = True  # recompute the guided velocity in training, as sampled
    rollout_batch_size: int = 8  # images per sampling forward; groups per training forward
    normalization: GroupNormalization = field(default_factory=g2rpo_normalization)

    def __post_init__(self) -> None:
        self.normalization = as_normalization(self.normalization)
        check_num_steps(self.num_steps, 2, "a branch needs an ODE step after its SDE step")
        if self.stochastic_steps is None:
            self.stochastic_steps = list(range(self.num_steps // 2))
        self.stochastic_steps = list(self.stochastic_steps)
        if not self.stochastic_steps or not all(0 <= k <= self.num_steps - 2 for k in self.stochastic_steps):
            raise ValueError(
                f"algo.stochastic_steps={self.stochastic_steps} must be grid indices in [0, num_steps - 2 = "
                f"{self.num_steps - 2}] (a branch needs at least one ODE step after its SDE step)"
            )
        if len(set(self.stochastic_steps)) != len(self.stochastic_steps):
            raise ValueError(f"algo.stochastic_steps={self.stochastic_steps} repeats a step")
        self.granularities = list(self.granularities)
        if (
            not self.granularities
            or min(self.granularities) < 1
            or len(set(self.granularities)) != len(self.granularities)
        ):
            raise ValueError(f"algo.granularities={self.granularities} must be distinct strides >= 1")
        check_choice("final_image", self.final_image, FINAL_IMAGE_RULES)
        check_choice("update_per", self.update_per, UPDATE_PER)
        if self.noise_level <= 0 or self.clip_range <= 0 or self.rollout_batch_size < 1:
            raise ValueError("algo.noise_level, algo.clip_range and algo.rollout_batch_size must be > 0")

    # -- 1. Singular Stochastic Sampling --------------------------------------------------------------

    @torch.no_grad()
    def rollout(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> SingularRollout:
        groups = batch.groups
        group_prompts = [batch.prompts[i] for i in groups.first.tolist()]
        if any(batch.prompts[i] != group_prompts[g] for i, g in enumerate(groups.ids.tolist())):
            raise ValueError("G2RPO needs one prompt per group: its members share the anchor trajectory")
        group_metadata = [batch.metadata[i] for i in groups.first.tolist()]
        cond = policy.encode(
            group_prompts, negative=self.guidance_scale > 1, sources=policy.sources(group_metadata)
        )
        sigmas = policy.sigmas(self.num_steps).to(policy.device)
        members = groups.ids.to(policy.device)

        # The anchor: one ODE trajectory per group from its shared initial noise; keep the velocities at M.
        anchors, anchor_velocities = euler_trajectory(
            policy, policy.initial_noise(groups.count, keyed(generator, groups.keys, GROUP)), sigmas, cond,
            self.guidance_scale, self.rollout_batch_size, velocities_at=self.stochastic_steps,
        )  # fmt: skip

        # One SDE step per member from its group's anchor at k, then every stride's ODE continuation.
        member_cond = cond.select(members)
        member_generators = keyed(generator, batch.sample_ids)
        branches, log_probs, images = [], [], []
        for k in self.stochastic_steps:
            x_k = anchors[members, k]
            noise = randn_tensor(
                x_k.shape, generator=member_generators, device=x_k.device, dtype=torch.float32
            )
            step = sde_step(
                x_k, anchor_velocities[k][members], sigmas[k], sigmas[k + 1], self.noise_level, noise=noise
            )
            branches.append(step.prev_sample)
            log_probs.append(step.log_prob)
            for stride in self.granularities:
                points = continuation_grid(k, stride, self.num_steps, self.final_image)
                x0 = ode_continue(
                    policy, step.prev_sample, points, sigmas, member_cond, self.guidance_scale,
                    self.rollout_batch_size,
                )  # fmt: skip
                images.append(policy.decode(x0))

        return SingularRollout(
            images=torch.cat(images),
            scored=batch.repeat(len(self.stochastic_steps) * len(self.granularities)),
            batch=batch,
            anchors=anchors,
            branches=torch.stack(branches),
            log_probs=torch.stack(log_probs),
            sigmas=sigmas,
            stochastic_steps=torch.tensor(self.stochastic_steps),
            num_granularities=len(self.granularities),
            cond=cond,
        )

    # -- 2. Multi-Granularity Advantage Integration ---------------------------------------------------

    def advantages(self, rewards: RewardOutput, rollout: SingularRollout) -> Advantages:
        """Normalise per (k, lambda, group) and reward, sum over lambda and rewards, clamp: ``[K * B]``."""
        unclamped = dataclasses.replace(self.normalization, clip=math.inf, drop_zero_std=False)
        per_image = compute_advantages(rewards, rollout.scored.groups, unclamped)
        valid = rollout.per_image(per_image.valid).all(dim=1)
        zero_std = rollout.per_image(per_image.zero_std).all(dim=1)
        values = (
            rollout.per_image(per_image.values)
            .sum(dim=1)
            .clamp(-self.normalization.clip, self.normalization.clip)
        )
        values = torch.where(valid, values, torch.zeros_like(values))
        train_mask = valid & ~zero_std if self.normalization.drop_zero_std else valid
        groups = rollout.batch.groups
        varied = torch.zeros(len(zero_std), groups.count).index_add_(
            1, groups.ids.cpu(), (~zero_std).float().cpu()
        )
        return Advantages(
            values=values.flatten(),
            valid=valid.flatten(),
            zero_std=zero_std.flatten(),
            train_mask=train_mask.flatten(),
            num_groups=varied.numel(),
            num_zero_std_groups=int((varied == 0).sum()),
        )

    def rollout_metrics(self, rollout: SingularRollout, rewards: RewardOutput) -> dict[str, float]:
        """Mean total reward per granularity (coarser continuations usually score lower)."""
        totals = rollout.per_image(rewards.total)
        return {
            f"reward/stride_{stride}/mean": totals[:, level].nanmean().item()
            for level, stride in enumerate(self.granularities)
        }

    # -- 3. Objective ---------------------------------------------------------------------------------

    def minibatches(
        self, rollout: SingularRollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        """Per stochastic step, micro-batches of ``rollout_batch_size`` members (whole groups)."""
        per_step = []
        for index in range(len(self.stochastic_steps)):
            mask = advantages.train_mask.view(len(self.stochastic_steps), -1)[index].cpu()
            members = mask.nonzero().flatten()
            if members.numel():
                units = members.split(self.rollout_batch_size)
                per_step.append([TrainingUnit(m, index) for m in units])
        if self.update_per == "iteration":
            return [[u for units in per_step for u in units]] if per_step else []
        return per_step

    def loss(
        self, policy: FlowPolicy, rollout: SingularRollout, advantages: Advantages, unit: TrainingUnit
    ) -> LossOutput:
        members = unit.samples.to(rollout.branches.device)
        k = int(rollout.stochastic_steps[unit.index])
        sigma, sigma_next = rollout.sigmas[k], rollout.sigmas[k + 1]
        groups = rollout.batch.groups.ids.to(members.device)[members]
        guidance = self.guidance_scale if self.train_cfg else 1.0
        if self.broadcast_forward:
            active = [
                m for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training
            ]
            if active:
                raise ValueError(
                    "algo.broadcast_forward=true needs a deterministic training forward, but the policy has "
                    f"{len(active)} active dropout layer(s): set their p to 0 or algo.broadcast_forward=false"
                )
            local = Groups.of(groups)  # the groups present, each once: keys index the anchors
            x = rollout.anchors[local.keys, k]
            v = policy.velocity(x, sigma, rollout.cond.select(local.keys), guidance)[local.ids]
            x = x[local.ids]
        else:
            x = rollout.anchors[groups, k]
            v = policy.velocity(x, sigma, rollout.cond.select(groups), guidance)
        transition = sde_step(
            x, v, sigma, sigma_next, self.noise_level, prev_sample=rollout.branches[unit.index, members]
        )
        flat = unit.index * len(rollout) + members
        policy_loss, metrics = clipped_surrogate(
            transition.log_prob,
            rollout.log_probs[unit.index, members],
            advantages.values[flat.to(advantages.values.device)],
            self.clip_range,
        )
        metrics["policy_loss"] = policy_loss.detach()
        return LossOutput(loss=policy_loss, metrics=metrics)
