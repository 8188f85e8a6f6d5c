"""Rollouts: SDE trajectories with the sampler's per-step log-probabilities, and deterministic ODE samples.

Every sampling loop of every algorithm is here; algorithms choose the grid, the noise and what to keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import keyed
from g2rpo.sampling import euler_step, sde_step
from g2rpo.types import Conditioning, ODERollout, PromptBatch, SDERollout


def sde_trajectory(
    policy: FlowPolicy,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    guidance_scale: float,
    noise_levels: Tensor,
    sde_type: str,
    generators: list[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """One forward chunk through the SDE from ``x``: every latent ``[b, T + 1, ...]`` and the log-prob of every
    step ``[b, T]`` (NaN where ``noise_levels[i] == 0`` makes the step a deterministic ODE step)."""
    trajectory, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        v = policy.velocity(x, sigmas[i], cond, guidance_scale)
        noise = randn_tensor(x.shape, generator=generators, device=x.device, dtype=torch.float32)
        step = sde_step(
            x, v, sigmas[i], sigmas[i + 1], float(noise_levels[i]), noise=noise, sde_type=sde_type
        )
        x = step.prev_sample
        trajectory.append(x)
        log_probs.append(step.log_prob)
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def sde_rollout(
    policy: FlowPolicy,
    batch: PromptBatch,
    *,
    num_steps: int,
    guidance_scale: float,
    noise_levels: Tensor,
    sde_type: str,
    batch_size: int,
    train_steps: Tensor,
    generator: torch.Generator,
    initial_noise: Tensor | None = None,
    negative: bool = False,
) -> SDERollout:
    """Sample ``len(batch)`` trajectories, ``batch_size`` at a time, keeping every latent and log-prob.

    ``noise_levels[i]`` is the SDE noise of step ``i`` (0 makes it a deterministic ODE step with a NaN
    log-prob), so full-SDE (Flow-GRPO), constant-eta (DanceGRPO) and windowed (MixGRPO) rollouts share
    this loop. Each prompt is encoded once and shared by its group (``negative`` also encodes the empty
    prompt when the rollout itself does not need it). ``initial_noise`` (``[B, ...]``) replaces the
    independent ``x_1`` draws, e.g. with one draw shared by each group (DanceGRPO). Sample ``i``'s noise
    comes from its own stream keyed by ``batch.sample_ids[i]`` (``g2rpo.randomness``), so it does not depend
    on ``batch_size`` or on the rank that samples it.
    """
    prompts, cond_index, metadata = batch.unique()
    cond = policy.encode(prompts, negative=negative or guidance_scale > 1, sources=policy.sources(metadata))
    sigmas = policy.sigmas(num_steps).to(policy.device)
    generators = keyed(generator, batch.sample_ids)
    latents, log_probs, images = [], [], []
    for chunk in torch.arange(len(batch)).split(batch_size):
        chunk_generators = [generators[i] for i in chunk.tolist()]
        x = (
            policy.initial_noise(len(chunk), chunk_generators)
            if initial_noise is None
            else initial_noise[chunk]
        )
        trajectory, chunk_log_probs = sde_trajectory(
            policy, x, sigmas, cond.select(cond_index[chunk]), guidance_scale, noise_levels, sde_type,
            chunk_generators,
        )  # fmt: skip
        latents.append(trajectory)
        log_probs.append(chunk_log_probs)
        images.append(policy.decode(trajectory[:, -1].contiguous()))
    return SDERollout(
        images=torch.cat(images),
        latents=torch.cat(latents),
        log_probs=torch.cat(log_probs),
        sigmas=sigmas,
        train_steps=train_steps.to(policy.device),
        cond=cond,
        cond_index=cond_index.to(policy.device),
        scored=batch,
    )


def final_samples(rollout: SDERollout) -> ODERollout:
    """An SDE rollout reduced to its clean end points (DGPO's Flow-SDE ablation trains on ``x_0`` alone)."""
    return ODERollout(
        images=rollout.images,
        samples=rollout.latents[:, -1],
        sigmas=rollout.sigmas,
        cond=rollout.cond,
        cond_index=rollout.cond_index,
        scored=rollout.scored,
    )


@torch.no_grad()
def euler_trajectory(
    policy: FlowPolicy,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    guidance_scale: float,
    batch_size: int,
    velocities_at: Sequence[int] = (),
) -> tuple[Tensor, dict[int, Tensor]]:
    """The Euler ODE from ``x`` through ``sigmas``, ``batch_size`` rows of ``x`` (and of ``cond``) per forward:
    every latent ``[B, T + 1, ...]``, and the velocity at each step in ``velocities_at`` (G2RPO's anchors
    branch from them)."""
    trajectories, velocities = [], {i: [] for i in velocities_at}
    for chunk in torch.arange(len(x)).split(batch_size):
        y, chunk_cond, trajectory = x[chunk], cond.select(chunk), [x[chunk]]
        for i in range(len(sigmas) - 1):
            v = policy.velocity(y, sigmas[i], chunk_cond, guidance_scale)
            if i in velocities:
                velocities[i].append(v)
            y = euler_step(y, v, sigmas[i], sigmas[i + 1])
            trajectory.append(y)
        trajectories.append(torch.stack(trajectory, dim=1))
    return torch.cat(trajectories), {i: torch.cat(v) for i, v in velocities.items()}


@torch.no_grad()
def ode_continue(
    policy: FlowPolicy,
    x: Tensor,
    points: list[int],
    sigmas: Tensor,
    cond: Conditioning,
    guidance_scale: float,
    batch_size: int | None = None,
) -> Tensor:
    """Euler ODE from ``x`` through ``sigmas[points]``, returning ``x0_hat = x - sigma v`` at the last
    evaluated point (the last point is never evaluated); ``batch_size`` rows per forward (default: all)."""
    if batch_size is not None and batch_size < len(x):
        return torch.cat(
            [
                ode_continue(policy, x[chunk], points, sigmas, cond.select(chunk), guidance_scale)
                for chunk in torch.arange(len(x)).split(batch_size)
            ]
        )
    if len(points) < 2:
        raise ValueError(f"a continuation needs at least two grid points, got {points}")
    for here, there in zip(points[:-2], points[1:-1]):
        x = euler_step(x, policy.velocity(x, sigmas[here], cond, guidance_scale), sigmas[here], sigmas[there])
    return x - sigmas[points[-2]] * policy.velocity(x, sigmas[points[-2]], cond, guidance_scale)


def ode_sample(
    policy: FlowPolicy,
    prompts: list[str],
    *,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    generator: torch.Generator,
) -> Tensor:
    """Deterministic Euler (probability-flow ODE) samples, as evaluation uses: images ``[B, 3, H, W]``.

    The initial noise is one draw of the whole batch from ``generator`` (not per-sample streams), so every
    evaluation recorded in this repository keeps its noise."""
    index = torch.arange(len(prompts))
    batch = PromptBatch(list(prompts), [{}] * len(prompts), group_ids=index, prompt_ids=index)
    return ode_rollout(
        policy, batch, num_steps=num_steps, guidance_scale=guidance_scale, batch_size=batch_size,
        generator=generator, initial_noise=policy.initial_noise(len(prompts), generator),
    ).images  # fmt: skip


def flow_dpm_solver(shift: float) -> DPMSolverMultistepScheduler:
    """DGPO's rollout sampler: diffusers' multistep DPM-Solver++ (2nd order) on flow sigmas, with the
    scheduler config the official code loads (``Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers``,
    whose ``flow_shift`` 3 equals SD3.5's shift). For ``T = 10``: timesteps 999, 963, 922, ..., 249."""
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
        lower_order_final=True,
    )


@torch.no_grad()
def ode_rollout(
    policy: FlowPolicy,
    batch: PromptBatch,
    *,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    generator: torch.Generator,
    scheduler: DPMSolverMultistepScheduler | None = None,
    negative: bool = False,
    initial_noise: Tensor | None = None,
) -> ODERollout:
    """Deterministic samples for ``batch``: Euler on the model's own grid, or ``scheduler`` (DPM-Solver++).

    Only the end points are kept. ``negative`` also encodes the empty prompt when the rollout itself does
    not need it (CFG-free rollouts whose training uses text dropout or a guided reference). Initial noise
    is keyed by ``batch.sample_ids`` as in :func:`sde_rollout`, unless ``initial_noise`` (``[B, ...]``) is given.
    """
    prompts, cond_index, metadata = batch.unique()
    cond = policy.encode(prompts, negative=negative or guidance_scale > 1, sources=policy.sources(metadata))
    if scheduler is None:
        sigmas = policy.sigmas(num_steps).to(policy.device)
    else:  # the noise levels the scheduler's model calls see: its integer timesteps / num_train_timesteps
        scheduler.set_timesteps(num_steps, device=policy.device)
        levels = scheduler.timesteps.float() / scheduler.config.num_train_timesteps
        sigmas = torch.cat([levels, levels.new_zeros(1)])
    generators = keyed(generator, batch.sample_ids)
    samples, images = [], []
    for chunk in torch.arange(len(batch)).split(batch_size):
        chunk_cond = cond.select(cond_index[chunk])
        if initial_noise is None:
            x = policy.initial_noise(len(chunk), [generators[i] for i in chunk.tolist()])
        else:
            x = initial_noise[chunk.to(initial_noise.device)].float()
        if scheduler is not None:
            scheduler.set_timesteps(num_steps, device=policy.device)  # a fresh multistep history
        for i in range(num_steps):
            v = policy.velocity(x, sigmas[i], chunk_cond, guidance_scale)
            if scheduler is None:
                x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            else:
                x = scheduler.step(v, scheduler.timesteps[i], x, return_dict=False)[0].float()
        samples.append(x)
        images.append(policy.decode(x))
    return ODERollout(
        images=torch.cat(images),
        samples=torch.cat(samples),
        sigmas=sigmas,
        cond=cond,
        cond_index=cond_index.to(policy.device),
        scored=batch,
    )


def clean_samples(
    policy: FlowPolicy,
    batch: PromptBatch,
    *,
    sampler: str,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    generator: torch.Generator,
    negative: bool,
    flow_shift: float | None = None,
    sde_noise_level: float = 0.7,
) -> ODERollout:
    """The end points of ``dpm_solver`` (DPM-Solver++ at ``flow_shift``, else the model's shift), ``euler`` or
    ``sde`` (Flow-SDE, noise ``sde_noise_level``) rollouts: what DGPO and RFT train on."""
    if sampler == "sde":
        return final_samples(
            sde_rollout(
                policy, batch, num_steps=num_steps, guidance_scale=guidance_scale,
                noise_levels=torch.full((num_steps,), sde_noise_level), sde_type="sde", batch_size=batch_size,
                train_steps=torch.zeros(len(batch), 0, dtype=torch.long), generator=generator, negative=negative,
            )
        )  # fmt: skip
    scheduler = None
    if sampler == "dpm_solver":
        scheduler = flow_dpm_solver(
            flow_shift if flow_shift is not None else policy.scheduler_config.get("shift", 1.0)
        )
    return ode_rollout(
        policy, batch, num_steps=num_steps, guidance_scale=guidance_scale, batch_size=batch_size,
        generator=generator, scheduler=scheduler, negative=negative,
    )  # fmt: skip
