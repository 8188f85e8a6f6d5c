"""DGPO invariants (brief g2rpo_dgpo.md section 3.4, items 6-9), its samplers and theta^-."""

import pytest
import torch
from conftest import make_policy, perturb_lora

from g2rpo.advantages import Advantages, GroupNormalization, compute_advantages
from g2rpo.algos import DGPO
from g2rpo.algos.dgpo import dsm_clip_mask, group_preference_logit
from g2rpo.ema import swapped_in
from g2rpo.randomness import iteration_generator, keyed
from g2rpo.rollout import flow_dpm_solver, ode_rollout
from g2rpo.sampling import euler_step, mean_over_dims
from g2rpo.types import Groups, PromptBatch, RewardOutput


def _batch(groups=2, size=4):
    prompts = ["a cat", "a dog", "a fox"][:groups]
    return PromptBatch.from_groups(prompts, [{}] * groups, torch.arange(groups), torch.full((groups,), size))


def _algo(**overrides):
    settings = dict(num_steps=4, max_timestep_index=2, num_train_timesteps=2, guidance_scale=1.0)
    return DGPO(**{**settings, **overrides})


def _advantages(values: torch.Tensor) -> Advantages:
    ones = torch.ones_like(values, dtype=torch.bool)
    return Advantages(values, ones, ~ones, ones, num_groups=2, num_zero_std_groups=0)


@pytest.mark.parametrize("std", ["group", "global"])
def test_advantages_sum_to_zero_and_balance_positive_and_negative_mass(std):
    rewards = torch.rand(5 * 6, generator=torch.Generator().manual_seed(0))
    group_ids = torch.arange(5).repeat_interleave(6)
    norm = GroupNormalization(std=std, clip=1e9)  # before clamping
    advantages = compute_advantages(
        RewardOutput({"r": rewards}, {"r": 1.0}), Groups.of(group_ids), norm
    ).values
    for g in range(5):
        a = advantages[group_ids == g].double()
        assert abs(a.sum()) < 1e-5
        assert torch.isclose(a[a > 0].abs().sum(), a[a <= 0].abs().sum(), atol=1e-5)


def test_group_difference_form_equals_the_signed_single_sum():
    generator = torch.Generator().manual_seed(0)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    advantages = torch.randn(7, generator=generator)
    for g in (0, 1):  # zero-mean within groups, as normalised advantages are
        advantages[group_ids == g] -= advantages[group_ids == g].mean()
    loss_theta, loss_ref = torch.rand(7, generator=generator), torch.rand(7, generator=generator)
    logit = group_preference_logit(advantages, loss_theta, loss_ref, Groups.of(group_ids), beta=100.0)
    for g in (0, 1):
        a, diff = advantages[group_ids == g], (loss_theta - loss_ref)[group_ids == g]
        positive, negative = a > 0, a <= 0
        two_groups = (a[positive].abs() * diff[positive]).sum() - (a[negative].abs() * diff[negative]).sum()
        expected = 100.0 / len(a) * two_groups
        assert torch.allclose(logit[group_ids == g], expected.expand(len(a)), atol=1e-5)


def test_the_gate_divides_by_each_groups_size_or_by_the_configured_one():
    """Unequal groups (CurES, or a member dropped for a NaN reward): a group of 3 and a group of 2.
    Sums of A_i (L_theta_i - L_ref_i): 1(0.2) - 0.5(0.1) - 0.5(-0.3) = 0.3 and 0.8(0.5) - 0.8(0.25) = 0.2.
    beta 10: each group's own size gives 10 * 0.3 / 3 = 1 and 10 * 0.2 / 2 = 1; the official divisor, the
    configured group size 4, gives 10 * 0.3 / 4 = 0.75 and 10 * 0.2 / 4 = 0.5."""
    groups = Groups.of(torch.tensor([0, 0, 0, 1, 1]))
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.8, -0.8])
    loss_ref = torch.tensor([0.5, 0.5, 0.5, 0.25, 0.5])
    loss_theta = loss_ref + torch.tensor([0.2, 0.1, -0.3, 0.5, 0.25])
    own = group_preference_logit(advantages, loss_theta, loss_ref, groups, beta=10.0)
    configured = group_preference_logit(advantages, loss_theta, loss_ref, groups, beta=10.0, group_size=4)
    torch.testing.assert_close(own, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(configured, torch.tensor([0.75, 0.75, 0.75, 0.5, 0.5]))


def test_the_loss_gates_with_the_configured_group_size(policy):
    """Two complete groups of 4: dividing by the configured 4 is the same gate as by each group's size
    (the official setting), and by 8 halves the logit."""
    perturb_lora(policy)
    batch, advantages = _batch(), _advantages(torch.tensor([1.2, -0.4, 0.5, -1.3, 0.9, 0.1, -0.6, -0.4]))
    logits = {}
    for size in (None, 4, 8):
        algo = _algo(
            clip_dsm=False, kl_beta=0.0, text_dropout=0.0, groups_per_forward=2, gate_group_size=size
        )
        rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
        ((unit, *_),) = algo.minibatches(rollout, advantages, torch.Generator().manual_seed(1))
        logits[size] = algo.loss(policy, rollout, advantages, unit).metrics["preference_logit"]
    assert logits[None] != 0
    torch.testing.assert_close(logits[4], logits[None], rtol=0, atol=0)
    torch.testing.assert_close(logits[8], logits[None] / 2)


def test_surrogate_gradient_is_the_bradley_terry_gradient_over_beta_b_over_g(policy):
    """Eq. 17's gradient: d/dtheta sum_g -log sigmoid(-s_g) = beta * B / G * (the surrogate's gradient)."""
    perturb_lora(policy)
    algo, batch = _algo(clip_dsm=False, kl_beta=0.0, text_dropout=0.0, groups_per_forward=2), _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    advantages = torch.tensor([1.2, -0.4, 0.5, -1.3, 0.9, 0.1, -0.6, -0.4])
    ((unit, *_),) = algo.minibatches(rollout, _advantages(advantages), torch.Generator().manual_seed(1))
    assert len(unit.samples) == 8  # both groups of 4 in one forward
    parameters = policy.trainable_parameters()
    surrogate = torch.autograd.grad(
        algo.loss(policy, rollout, _advantages(advantages), unit).loss, parameters
    )

    samples = unit.samples
    x0, t = rollout.samples[samples], unit.sigma
    x_t, target = (1 - t) * x0 + t * unit.noise, unit.noise - x0
    cond = rollout.cond.select(rollout.cond_index[samples])
    with torch.no_grad(), policy.reference():
        loss_ref = mean_over_dims((policy.velocity(x_t, t, cond) - target) ** 2)
    loss_theta = mean_over_dims((policy.velocity(x_t, t, cond) - target) ** 2)
    a, groups = advantages[samples], rollout.scored.group_ids[samples]
    s = torch.stack([algo.beta / 4 * (a * (loss_theta - loss_ref))[groups == g].sum() for g in (0, 1)])
    bradley_terry = torch.autograd.grad(-torch.nn.functional.logsigmoid(-s).sum(), parameters)
    for exact, approx in zip(bradley_terry, surrogate):
        torch.testing.assert_close(
            exact, algo.beta * 8 / 4 * approx, rtol=1e-3, atol=1e-6 * exact.abs().max().item()
        )


def test_dsm_clip_fires_only_on_the_side_of_the_advantage():
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0, 0.0])
    ratio = torch.tensor([1.02, 0.98, 1.005, 0.98, 1.02, 0.995, 0.98, 1.02])
    clipped = dsm_clip_mask(advantages, ratio, clip_range=0.01)
    assert clipped.tolist() == [True, False, False, True, False, False, True, False]


def test_a_clipped_sample_gets_no_gradient(policy):
    algo, batch = _algo(clip_range=1e-6, kl_beta=0.0, text_dropout=0.0), _batch(groups=1)
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    algo.theta_minus(policy)  # theta^-: a copy of the weights now
    perturb_lora(policy)  # theta moves away from it
    ((unit, *_),) = algo.minibatches(rollout, _advantages(torch.ones(4)), torch.Generator().manual_seed(1))
    x0, t = rollout.samples[unit.samples], unit.sigma
    x_t, target = (1 - t) * x0 + t * unit.noise, unit.noise - x0
    cond = rollout.cond.select(rollout.cond_index[unit.samples])
    with torch.no_grad():
        loss_theta = mean_over_dims((policy.velocity(x_t, t, cond) - target) ** 2)
        with algo_theta_minus(algo, policy):
            loss_old = mean_over_dims((policy.velocity(x_t, t, cond) - target) ** 2)
    pushed_past = torch.where(loss_old > loss_theta, 1.0, -1.0)  # A > 0 where the ratio is already > 1
    for advantages, clipfrac in [(pushed_past, 1.0), (-pushed_past, 0.0)]:
        out = algo.loss(policy, rollout, _advantages(advantages), unit)
        grads = torch.autograd.grad(out.loss, policy.trainable_parameters(), allow_unused=True)
        assert out.metrics["dsm_clipfrac"] == clipfrac
        assert all(g is None or not g.any() for g in grads) == (clipfrac == 1.0)


def algo_theta_minus(algo, policy):
    return swapped_in(algo.theta_minus(policy), policy.trainable_parameters())


@pytest.mark.parametrize("t_min", [None, 0.6])
def test_training_noise_levels_respect_t_min_and_are_shared_within_a_group(policy, t_min):
    algo = _algo(t_min=t_min, groups_per_forward=1, num_minibatches=1)
    rollout = algo.rollout(policy, _batch(groups=3, size=3), iteration_generator(0, 0))
    lowest = t_min if t_min is not None else float(rollout.sigmas[algo.max_timestep_index])
    advantages = _advantages(torch.randn(9))
    for seed in range(20):
        (units,) = algo.minibatches(rollout, advantages, torch.Generator().manual_seed(seed))
        assert len(units) == 2 * 3  # K noise levels x 3 single-group forwards
        sigmas = sorted({u.sigma for u in units})
        assert len(sigmas) == 2 and min(sigmas) >= lowest - 1e-6
        if t_min is None:
            allowed = rollout.sigmas[: algo.max_timestep_index + 1].tolist()
            assert all(any(abs(s - a) < 1e-6 for a in allowed) for s in sigmas)
        for unit in units:
            groups = rollout.scored.group_ids[unit.samples]
            assert groups.unique().numel() == 1 and len(unit.samples) == 3  # a whole group
            assert (unit.noise == unit.noise[0]).all()  # one eps per group
        first_level = [u for u in units if u.sigma == units[0].sigma]
        assert not torch.equal(first_level[0].noise[0], first_level[1].noise[0])  # groups differ


def test_dpm_solver_is_the_official_flow_schedule():
    scheduler = flow_dpm_solver(3.0)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [999, 963, 922, 874, 817, 749, 666, 562, 428, 249]
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2


@pytest.mark.parametrize("sampler", ["euler", "dpm_solver"])
def test_ode_samplers_are_exact_on_a_straight_flow(policy, monkeypatch, sampler):
    """With ``v = (x - c) / sigma`` (every path is straight to ``c``) both samplers must land on ``c``.

    DPM-Solver is exact up to the model seeing the integer timestep (999 for sigma 0.9997), as in the
    official code, while the solver steps with the exact sigma."""
    target = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    monkeypatch.setattr(policy, "velocity", lambda x, sigma, cond, *args: (x - target) / sigma)
    rollout = _algo(sampler=sampler, num_steps=6).rollout(policy, _batch(), iteration_generator(0, 0))
    tolerance = 1e-4 if sampler == "euler" else 1e-2
    torch.testing.assert_close(rollout.samples, target.expand_as(rollout.samples), rtol=0, atol=tolerance)


def test_euler_rollouts_are_a_plain_ode_solve(policy):
    batch = _batch()
    rollout = ode_rollout(
        policy, batch, num_steps=4, guidance_scale=1.0, batch_size=4, generator=iteration_generator(0, 0)
    )
    generators, sigmas = keyed(iteration_generator(0, 0), batch.sample_ids), policy.sigmas(4)
    for chunk in torch.arange(len(batch)).split(4):
        x = policy.initial_noise(
            len(chunk), [generators[i] for i in chunk.tolist()]
        )  # each sample's own stream
        cond = policy.encode([batch.prompts[i] for i in chunk.tolist()], negative=False)
        for i in range(4):
            x = euler_step(x, policy.velocity(x, sigmas[i], cond), sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(rollout.samples[chunk], x, rtol=0, atol=1e-5)
    assert not torch.equal(rollout.samples[0], rollout.samples[1])  # members have their own noise


def test_theta_minus_decay_ramps_and_samples_after_the_switch(policy):
    algo, batch = _algo(switch_step=1), _batch(groups=1)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    algo.theta_minus(policy)
    perturb_lora(policy)
    algo.on_optimizer_step(policy)  # decay min(0.3, 0.001 * 1)
    for shadow, old, new in zip(
        algo.theta_minus(policy).shadow_params, before, policy.trainable_parameters()
    ):
        torch.testing.assert_close(shadow, 0.001 * old + 0.999 * new.detach())
    own = algo.rollout(policy, batch, iteration_generator(0, 0)).samples  # 1 update: not yet switched
    algo.on_optimizer_step(policy)
    with torch.no_grad():  # make theta^- clearly different from theta
        for shadow in algo.theta_minus(policy).shadow_params:
            shadow.zero_()
    trained = [p.detach().clone() for p in policy.trainable_parameters()]
    switched = algo.rollout(policy, batch, iteration_generator(0, 0)).samples
    assert not torch.allclose(own, switched)
    assert all(torch.equal(p, q) for p, q in zip(policy.trainable_parameters(), trained))  # swapped back

    resumed = _algo(switch_step=1)
    resumed.load_state_dict(algo.state_dict())
    assert resumed.updates == 2
    for a, b in zip(resumed.theta_minus(policy).shadow_params, algo.theta_minus(policy).shadow_params):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sampler", "ddim", "dpm_solver, euler, sde"),
        ("max_timestep_index", 4, "must index the 4-step"),
        ("num_train_timesteps", 5, "distinct indices"),
        ("t_min", 1.0, "algo.t_min"),
        ("reference", "ema", "base, theta_minus"),
        ("gate_group_size", 0, "algo.gate_group_size"),
    ],
)
def test_invalid_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        _algo(**{field: value})


def test_text_dropout_replaces_the_prompt_with_the_empty_one(policy):
    algo, batch = _algo(text_dropout=0.5), _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    assert rollout.cond.negative_prompt_embeds is not None  # encoded although the rollout has no CFG
    units = [
        u for step in algo.minibatches(rollout, _advantages(torch.randn(8)), torch.Generator()) for u in step
    ]
    dropped = torch.cat([u.text_dropped for u in units])
    assert 0 < dropped.float().mean() < 1


def test_dgpo_uses_the_base_model_as_reference():
    assert DGPO().uses_reference
    policy = make_policy()
    assert policy.scheduler_config["shift"] == 3.0  # the DPM-Solver's default flow shift follows the model


def test_theta_minus_can_be_the_reference(policy):
    algo, batch = _algo(reference="theta_minus", clip_dsm=False, text_dropout=0.0), _batch(groups=1)
    assert not algo.uses_reference  # no frozen copy is needed
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    algo.theta_minus(policy)
    perturb_lora(policy)
    advantages = _advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    ((unit, *_),) = algo.minibatches(rollout, advantages, torch.Generator().manual_seed(1))
    x0, t = rollout.samples[unit.samples], unit.sigma
    x_t, target = (1 - t) * x0 + t * unit.noise, unit.noise - x0
    cond = rollout.cond.select(rollout.cond_index[unit.samples])
    with torch.no_grad(), algo_theta_minus(algo, policy):
        expected = mean_over_dims((policy.velocity(x_t, t, cond) - target) ** 2).mean()
    out = algo.loss(policy, rollout, advantages, unit)
    torch.testing.assert_close(out.metrics["denoising_loss_ref"], expected)
    assert out.metrics["denoising_loss"] != out.metrics["denoising_loss_ref"]
