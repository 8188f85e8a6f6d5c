"""Sigma schedules and flow-matching transition kernels: pure functions, fp32.

Convention (diffusers ``FlowMatchEulerDiscreteScheduler``): ``x_sigma = (1 - sigma) x0 + sigma eps``,
the network predicts the velocity ``v = eps - x0``, and sampling runs ``sigma_0 = 1 > ... > sigma_T = 0``.
Step ``i`` maps ``x_i`` to ``x_{i+1}`` with ``dt = sigma_{i+1} - sigma_i < 0``.

Each stochastic step is a Gaussian policy ``pi(x_{i+1} | x_i) = N(mean, std^2 I)``; its log-probability is
averaged (not summed) over the latent dimensions, as in every official code base (DDPO, Flow-GRPO,
DanceGRPO, MixGRPO). That is why clip ranges of 1e-4 are sensible: see ``shared/research`` section 1.

All arithmetic here is fp32 whatever the model dtype: bf16 overflows in these expressions and the
rollout/training log-prob consistency check would show it first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

SDE_TYPES = ("sde", "dance", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sigma_schedule(
    scheduler_config: Mapping[str, Any],
    num_steps: int,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    """The model's shifted sigma grid ``[sigma_0 = 1, ..., sigma_{T-1}, 0]`` (``T + 1`` entries, fp32).

    Delegates to diffusers so that the grid is exactly what the model's own pipeline samples with (shift,
    dynamic shifting through ``mu`` and the pipeline's unshifted ``sigmas`` for FLUX, terminal zero). For
    SD3.5-M (shift 3) and ``T = 10`` this is ``1.0, 0.9601, 0.9133, ..., 0.2780, 0.0089, 0``.
    """
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    scheduler.set_timesteps(None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.to(torch.float32).clone()


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` tensor as fp32 ``[B, 1, ..., 1]`` broadcastable against ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.dim() == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def mean_over_dims(x: Tensor) -> Tensor:
    """Mean over every non-batch dimension: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Deterministic probability-flow ODE step ``x + v (sigma_next - sigma)``."""
    x = x.float()
    return x + v.float() * (per_sample(sigma_next, x) - per_sample(sigma, x))


@dataclass
class Transition:
    """One stochastic step ``x_i -> x_{i+1}`` and its Gaussian.

    ``log_prob`` is NaN where ``std == 0`` (the density is undefined there: noise level 0, or the final
    CPS step), so a caller that trains on such a step fails loudly instead of silently.
    """

    prev_sample: Tensor  # x_{i+1} (diffusers' name)
    log_prob: Tensor  # [B], mean over latent dims
    mean: Tensor  # mu_theta(x_i), same shape as the sample
    std: Tensor  # [B] per-step noise std s_i
    std_dev_t: Tensor  # [B] diffusion coefficient sigma_t of the SDE (KL denominator); equals std for CPS


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    sde_type: str = "sde",
) -> Transition:
    """One reverse-SDE step with its log-probability.

    Give ``noise`` to sample ``x_{i+1} = mean + std * noise`` (rollout), or ``prev_sample`` to score a
    stored ``x_{i+1}`` under the current model (training).

    ``sde_type="sde"`` is the Flow-GRPO SDE (Liu et al. 2025, eq. 9; official ``sde_step_with_logprob``)::

        dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw,   sigma_t = a sqrt(t / (1 - t))
        mean = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
        std  = sigma_t sqrt(-dt)

    At ``sigma == 1`` the official code replaces the ``1 - sigma`` denominator with ``1 - sigma_1``
    (``scheduler.sigmas[1]``, i.e. ``sigma_next`` of the first step), which makes the first step's noise
    exactly ``a``. ``a = 0`` gives the Euler step.

    ``sde_type="dance"`` is DanceGRPO's SDE (official ``flux_step``): a constant diffusion coefficient
    ``sigma_t = eta``. Its drift ``v dt - eta^2/2 score dt`` with ``score = -(x - (1 - sigma) x0_hat) / sigma^2``
    is the Flow-SDE drift above with ``sigma_t`` replaced by ``eta``, and ``std = eta sqrt(-dt)``.

    ``sde_type="cps"`` is Flow-CPS (Wang et al. 2025, coefficients-preserving sampling)::

        std  = sigma_next sin(a pi / 2)
        mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat
        log_prob = -mean((x_next - mean)^2)        (the official form: no constants, no 1/(2 std^2))
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; valid: {', '.join(SDE_TYPES)}")
    if (noise is None) == (prev_sample is None):
        raise ValueError("give exactly one of `noise` (to sample) or `prev_sample` (to score)")
    x, v = x.float(), v.float()
    sigma, sigma_next = per_sample(sigma, x), per_sample(sigma_next, x)

    if sde_type in ("sde", "dance"):
        dt = sigma_next - sigma
        if sde_type == "sde":
            sigma_denominator = torch.where(sigma == 1, sigma_next, sigma)
            std_dev_t = noise_level * torch.sqrt(sigma / (1 - sigma_denominator))
        else:
            std_dev_t = torch.full_like(sigma, noise_level)
        x_coefficient = 1 + std_dev_t**2 / (2 * sigma) * dt
        v_coefficient = (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_dev_t * torch.sqrt(-dt)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        # (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat with x0_hat = x - s v and x1_hat = x + (1 - s) v
        noise_coefficient = torch.sqrt((sigma_next**2 - std**2).clamp_min(0))
        x_coefficient = 1 - sigma_next + noise_coefficient
        v_coefficient = noise_coefficient * (1 - sigma) - (1 - sigma_next) * sigma
        std_dev_t = std
    mean = torch.addcmul(x * x_coefficient, v, v_coefficient)  # per-sample scalars times full tensors

    if prev_sample is None:
        prev_sample = torch.addcmul(mean, noise.float(), std)
    prev_sample = prev_sample.float()

    # The per-sample constants come out of the mean over dims: two full-tensor ops instead of six.
    squared_error = mean_over_dims((prev_sample - mean) ** 2)
    std, std_dev_t = std.flatten(), std_dev_t.flatten()
    if sde_type != "cps":
        log_prob = -squared_error / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    else:
        log_prob = -squared_error
    log_prob = torch.where(std > 0, log_prob, torch.full_like(log_prob, float("nan")))
    return Transition(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, std_dev_t=std_dev_t)


def transition_kl(mean: Tensor, ref_mean: Tensor, std_dev_t: Tensor, sde_type: str = "sde") -> Tensor:
    """Per-sample KL term between the policy's and the reference's step Gaussians, ``[B]``.

    Flow-GRPO's official mean-difference form ``mean_dims (mean - ref_mean)^2 / (2 sigma_t^2)``: it omits the
    ``|dt|`` of the exact equal-variance Gaussian KL and averages over dims (brief section 2.5), which
    reweights steps and rescales beta; we keep it for parity with the published beta values. Flow-CPS
    uses the plain ``mean_dims (mean - ref_mean)^2``.
    """
    squared = mean_over_dims((mean.float() - ref_mean.float()) ** 2)
    if sde_type == "cps":
        return squared
    return squared / (2 * std_dev_t.float() ** 2)
