"""Stochastic rollouts: trajectories through the SDE with the per-step log-probabilities of the sampler."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from g2rpo.policies.base import FlowPolicy
from g2rpo.sampling import euler_step, sde_step
from g2rpo.types import PromptBatch, SDERollout


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
) -> SDERollout:
    """Sample ``len(batch)`` trajectories, ``batch_size`` at a time, keeping every latent and log-prob.

    ``noise_levels[i]`` is the SDE noise of step ``i`` (0 makes it a deterministic ODE step with a NaN
    log-prob), so full-SDE (Flow-GRPO), constant-eta (DanceGRPO) and windowed (MixGRPO) rollouts share
    this loop. Each prompt is encoded once and shared by its group. ``initial_noise`` (``[B, ...]``)
    replaces the independent ``x_1`` draws, e.g. with one draw shared by each group (DanceGRPO).
    """
    prompts, cond_index = batch.unique()
    cond = policy.encode(prompts, negative=guidance_scale > 1)
    sigmas = policy.sigmas(num_steps).to(policy.device)
    latents, log_probs, images = [], [], []
    for chunk in torch.arange(len(batch)).split(batch_size):
        chunk_cond = cond.select(cond_index[chunk])
        x = policy.initial_noise(len(chunk), generator) if initial_noise is None else initial_noise[chunk]
        trajectory, chunk_log_probs = [x], []
        for i in range(num_steps):
            v = policy.velocity(x, sigmas[i], chunk_cond, guidance_scale)
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            step = sde_step(
                x, v, sigmas[i], sigmas[i + 1], float(noise_levels[i]), noise=noise, sde_type=sde_type
            )
            x = step.prev_sample
            trajectory.append(x)
            chunk_log_probs.append(step.log_prob)
        latents.append(torch.stack(trajectory, dim=1))
        log_probs.append(torch.stack(chunk_log_probs, dim=1))
        images.append(policy.decode(x))
    return SDERollout(
        images=torch.cat(images),
        latents=torch.cat(latents),
        log_probs=torch.cat(log_probs),
        sigmas=sigmas,
        train_steps=train_steps.to(policy.device),
        cond=cond,
        cond_index=cond_index.to(policy.device),
    )


@torch.no_grad()
def ode_sample(
    policy: FlowPolicy,
    prompts: list[str],
    *,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    generator: torch.Generator,
) -> Tensor:
    """Deterministic Euler (probability-flow ODE) samples, as evaluation uses: images ``[B, 3, H, W]``."""
    order: dict[str, int] = {}
    index = torch.tensor([order.setdefault(p, len(order)) for p in prompts])  # each prompt encoded once
    unique = list(order)
    cond = policy.encode(unique, negative=guidance_scale > 1)
    sigmas = policy.sigmas(num_steps).to(policy.device)
    images = []
    for chunk in torch.arange(len(prompts)).split(batch_size):
        chunk_cond = cond.select(index[chunk])
        x = policy.initial_noise(len(chunk), generator)
        for i in range(num_steps):
            x = euler_step(
                x, policy.velocity(x, sigmas[i], chunk_cond, guidance_scale), sigmas[i], sigmas[i + 1]
            )
        images.append(policy.decode(x))
    return torch.cat(images)
