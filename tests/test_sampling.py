"""Invariants of the sigma schedule and the SDE / CPS transition kernels (brief sections 2.1, 2.2, 5, 11)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from g2rpo.sampling import euler_step, mean_over_dims, sde_step, sigma_schedule, transition_kl

SD35 = {"shift": 3.0, "num_train_timesteps": 1000}
# The SD3.5-M T = 10 schedule tabulated in the brief (section 2.1).
SD35_T10 = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]


def test_schedule_matches_the_sd35_table():
    sigmas = sigma_schedule(SD35, 10)
    assert sigmas.dtype == torch.float32
    assert sigmas.tolist() == pytest.approx(SD35_T10, abs=1e-4)


def test_schedule_uses_dynamic_shift_when_the_model_does():
    flux_like = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    low, high = sigma_schedule(flux_like, 6, mu=0.5), sigma_schedule(flux_like, 6, mu=1.15)
    assert low[0] == high[0] == 1.0 and low[-1] == high[-1] == 0.0
    assert (high[1:-1] > low[1:-1]).all()  # a larger shift keeps more noise at every step


def _state(batch=3, shape=(4, 8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=generator)
    v = torch.randn(batch, *shape, generator=generator)
    noise = torch.randn(batch, *shape, generator=generator)
    return x, v, noise


@pytest.mark.parametrize("sde_type", ["sde", "dance", "cps"])
def test_zero_noise_level_is_the_euler_step(sde_type):
    x, v, noise = _state()
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.0])
    step = sde_step(x, v, sigma, sigma_next, 0.0, noise=noise, sde_type=sde_type)
    torch.testing.assert_close(step.prev_sample, euler_step(x, v, sigma, sigma_next), rtol=0, atol=1e-6)
    assert torch.isnan(step.log_prob).all()  # no density without noise: must never be trained on


def test_log_prob_is_the_diagonal_normal_density_averaged_over_dims():
    x, v, noise = _state()
    sigma, sigma_next = torch.tensor([0.96, 0.7, 0.28]), torch.tensor([0.91, 0.6, 0.0089])
    step = sde_step(x, v, sigma, sigma_next, 0.7, noise=noise)
    expected = torch.distributions.Normal(step.mean, step.std.view(-1, 1, 1, 1)).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob, mean_over_dims(expected), rtol=1e-5, atol=1e-5)
    rescored = sde_step(x, v, sigma, sigma_next, 0.7, prev_sample=step.prev_sample)
    torch.testing.assert_close(rescored.log_prob, step.log_prob, rtol=0, atol=0)


def test_dance_sde_is_danceGRPO_score_form_with_constant_eta():
    """DanceGRPO's ``flux_step``: mean = x + v dt - eta^2/2 score dt, score = -(x - (1 - s) x0_hat) / s^2."""
    x, v, noise = _state()
    sigma, sigma_next, eta = 0.7, 0.55, 0.3
    step = sde_step(x, v, sigma, sigma_next, eta, noise=noise, sde_type="dance")
    dt = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    torch.testing.assert_close(step.mean, x + v * dt - 0.5 * eta**2 * score * dt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.std, torch.full((3,), eta * math.sqrt(sigma - sigma_next)))
    torch.testing.assert_close(step.prev_sample, step.mean + step.std.view(-1, 1, 1, 1) * noise)


def test_mean_is_the_euler_maruyama_drift_of_the_flow_sde():
    x, v, _ = _state()
    sigma, sigma_next, a = 0.6022, 0.4649, 0.7
    step = sde_step(x, v, sigma, sigma_next, a, prev_sample=x)
    sigma_t = a * math.sqrt(sigma / (1 - sigma))
    drift = v + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v)
    torch.testing.assert_close(step.mean, x + drift * (sigma_next - sigma), rtol=1e-5, atol=1e-6)
    assert step.std == pytest.approx(sigma_t * math.sqrt(sigma - sigma_next), rel=1e-5)


@pytest.mark.parametrize("a", [0.3, 0.7, 1.2])
def test_first_step_from_sigma_one_has_noise_exactly_a(a):
    sigmas = sigma_schedule(SD35, 10)
    x, v, noise = _state(batch=1)
    step = sde_step(x, v, sigmas[0], sigmas[1], a, noise=noise)
    assert step.std.item() == pytest.approx(a, rel=1e-6)
    torch.testing.assert_close(step.prev_sample - step.mean, a * noise, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(step.log_prob).all()


def test_noise_grows_with_the_noise_level_and_matches_the_brief_table():
    sigmas = sigma_schedule(SD35, 10)
    x, v, noise = _state(batch=1)
    per_step = [sde_step(x, v, sigmas[i], sigmas[i + 1], 0.7, noise=noise).std.item() for i in range(10)]
    brief = [0.700, 0.743, 0.536, 0.446, 0.392, 0.353, 0.319, 0.282, 0.225, 0.0063]
    assert per_step == pytest.approx(brief, abs=2e-3)


def test_per_sample_sigmas_match_separate_calls():
    x, v, noise = _state()
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.1])
    batched = sde_step(x, v, sigma, sigma_next, 0.7, noise=noise)
    for i in range(3):
        single = sde_step(x[i : i + 1], v[i : i + 1], sigma[i], sigma_next[i], 0.7, noise=noise[i : i + 1])
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


def test_cps_preserves_signal_coefficient_and_noise_variance():
    """With the exact velocity of a point mass at x0, a CPS step lands on (1 - s') x0 + s' N(0, I)."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 200_000), 0.5)
    eps = torch.randn(x0.shape, generator=generator)
    sigma, sigma_next = 0.7073, 0.6022
    x = (1 - sigma) * x0 + sigma * eps
    v = eps - x0  # the true velocity for this sample
    noise = torch.randn(x0.shape, generator=generator)
    step = sde_step(x, v, sigma, sigma_next, 0.8, noise=noise, sde_type="cps")
    residual = step.prev_sample - (1 - sigma_next) * x0
    assert residual.mean().item() == pytest.approx(0.0, abs=5e-3)
    assert residual.var().item() == pytest.approx(sigma_next**2, rel=2e-2)
    assert step.std.item() == pytest.approx(sigma_next * math.sin(0.8 * math.pi / 2), rel=1e-6)


def test_cps_log_prob_is_the_official_unnormalised_mse():
    x, v, noise = _state()
    step = sde_step(x, v, 0.7, 0.5, 0.8, noise=noise, sde_type="cps")
    torch.testing.assert_close(step.log_prob, -mean_over_dims((step.prev_sample - step.mean) ** 2))


def test_kl_is_zero_for_equal_means_and_scales_with_the_squared_gap():
    x, v, _ = _state()
    step = sde_step(x, v, 0.7, 0.5, 0.7, prev_sample=x)
    assert transition_kl(step.mean, step.mean, step.std_dev_t).abs().max() == 0
    gap = 0.1 * torch.ones_like(step.mean)
    kl = transition_kl(step.mean + gap, step.mean, step.std_dev_t)
    torch.testing.assert_close(kl, 0.01 / (2 * step.std_dev_t**2))
    torch.testing.assert_close(
        transition_kl(step.mean + gap, step.mean, step.std_dev_t, "cps"), torch.full((3,), 0.01)
    )


def test_bad_arguments_fail_clearly():
    x, v, noise = _state()
    with pytest.raises(ValueError, match="valid: sde, dance, cps"):
        sde_step(x, v, 0.7, 0.5, 0.7, noise=noise, sde_type="ddim")
    with pytest.raises(ValueError, match="exactly one"):
        sde_step(x, v, 0.7, 0.5, 0.7)


def test_schedule_equals_the_scheduler_of_the_model_config():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(40)
    torch.testing.assert_close(sigma_schedule(scheduler.config, 40), scheduler.sigmas.float())
