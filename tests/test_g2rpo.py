"""G2RPO invariants (brief g2rpo_dgpo.md section 3.4, items 1-5) on the tiny random SD3 policy."""

import pytest
import torch
from conftest import make_policy, perturb_lora

from g2rpo.algos import G2RPO
from g2rpo.algos.g2rpo import continuation_grid
from g2rpo.randomness import GROUP, iteration_generator, keyed
from g2rpo.rollout import ode_continue
from g2rpo.sampling import euler_step, sde_step
from g2rpo.types import PromptBatch, RewardOutput, TrainingUnit


def _batch(groups=2, size=3):
    prompts = ["a cat", "a dog", "a fox"][:groups]
    return PromptBatch.from_groups(prompts, [{}] * groups, torch.arange(groups), torch.full((groups,), size))


def _algo(**overrides):
    settings = dict(num_steps=6, stochastic_steps=[0, 1, 2], granularities=[1, 2], guidance_scale=1.0)
    return G2RPO(**{**settings, **overrides})


@pytest.fixture(scope="module")
def shared():
    """One rollout of the default setting, for the tests that only read it."""
    torch.manual_seed(0)
    policy, algo, batch = make_policy(), _algo(), _batch()
    return policy, algo, batch, algo.rollout(policy, batch, iteration_generator(0, 0))


def test_anchor_is_a_plain_ode_solve_from_one_noise_per_group(shared):
    policy, algo, batch, rollout = shared
    assert rollout.anchors.shape == (2, 7, 3, 32, 32)  # one trajectory per group, not per member
    x = policy.initial_noise(2, keyed(iteration_generator(0, 0), [0, 1], GROUP))  # each group's own stream
    cond, sigmas = policy.encode(["a cat", "a dog"], negative=False), policy.sigmas(6)
    for i in range(6):
        torch.testing.assert_close(rollout.anchors[:, i], x, rtol=0, atol=1e-6)
        x = euler_step(x, policy.velocity(x, sigmas[i], cond), sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(rollout.anchors[:, 6], x, rtol=0, atol=1e-6)


def test_members_share_the_anchor_up_to_sigma_k_and_differ_only_after(shared):
    policy, algo, batch, rollout = shared
    for index, k in enumerate(algo.stochastic_steps):
        # Every branch is one SDE step from its group's anchor latent at sigma_k ...
        x_k = rollout.anchors[rollout.batch.groups.ids, k]
        v = policy.velocity(x_k, rollout.sigmas[k], rollout.cond.select(rollout.batch.groups.ids))
        step = sde_step(
            x_k,
            v,
            rollout.sigmas[k],
            rollout.sigmas[k + 1],
            algo.noise_level,
            prev_sample=rollout.branches[index],
        )
        torch.testing.assert_close(step.log_prob, rollout.log_probs[index], rtol=0, atol=1e-5)
        # ... and the members of a group differ at sigma_{k+1}.
        branches = rollout.branches[index]
        assert all((branches[i] - branches[j]).abs().max() > 1e-3 for i, j in [(0, 1), (0, 2), (1, 2)])


def test_without_step_noise_every_continuation_reproduces_the_anchor_image(policy):
    algo, batch = _algo(noise_level=1e-9, granularities=[1]), _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    anchor_images = policy.decode(rollout.anchors[:, -1])[rollout.batch.groups.ids]
    for block in rollout.images.split(len(batch)):  # one block of B images per stochastic step
        torch.testing.assert_close(block, anchor_images, rtol=0, atol=1e-4)


def test_strided_grids_reproduce_the_official_nfe_counts():
    """Brief section 1.6: T = 16, k = 0..7 -> 100 NFE per member with lambda 1 (SDE step included), +48, +33."""
    nfe = {s: sum(len(continuation_grid(k, s, 16)) - 1 for k in range(8)) for s in (1, 2, 3)}
    assert (nfe[1] + 8, nfe[2], nfe[3]) == (100, 48, 33)
    assert continuation_grid(0, 2, 16) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert continuation_grid(1, 2, 16) == [2, 3, 5, 7, 9, 11, 13, 15]  # misses sigma = 0 ...
    assert continuation_grid(1, 2, 16, "append_zero") == [
        2,
        3,
        5,
        7,
        9,
        11,
        13,
        15,
        16,
    ]  # ... unless appended


class _LinearVelocity:
    """v(x, sigma) = 0.5 x + sigma, to follow the continuation by hand."""

    nfe = 0

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        self.nfe += x.shape[0]
        return 0.5 * x + sigma


def test_final_image_is_x0_hat_at_the_last_evaluated_point():
    sigmas = torch.linspace(1, 0, 17)
    x = torch.randn(2, 3, 4, 4)
    model = _LinearVelocity()
    points = continuation_grid(1, 2, 16)  # ends at index 15: the last evaluated point is 13
    expected = x.clone()
    for here, there in zip(points[:-2], points[1:-1]):
        expected = euler_step(
            expected, model.velocity(expected, sigmas[here], None), sigmas[here], sigmas[there]
        )
    expected = expected - sigmas[13] * model.velocity(expected, sigmas[13], None)
    model.nfe = 0
    torch.testing.assert_close(ode_continue(model, x, points, sigmas, None, 1.0), expected)
    assert model.nfe == 2 * (len(points) - 1)
    # On a grid that reaches sigma = 0, x0_hat at the last point is exactly the final Euler step.
    full = continuation_grid(0, 1, 16)
    out = ode_continue(model, x, full, sigmas, None, 1.0)
    y = x.clone()
    for here, there in zip(full, full[1:]):
        y = euler_step(y, model.velocity(y, sigmas[here], None), sigmas[here], sigmas[there])
    torch.testing.assert_close(out, y)


def test_rollout_nfe_is_anchor_plus_continuations(policy):
    algo, batch = _algo(), _batch()
    policy.nfe = 0
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    per_member = sum(len(continuation_grid(k, s, 6)) - 1 for k in (0, 1, 2) for s in (1, 2))
    assert policy.nfe == 2 * 6 + len(batch) * per_member  # the SDE step reuses the anchor's velocity
    assert rollout.images.shape[0] == 3 * 2 * len(batch)


def _rewards(values: dict[str, torch.Tensor], weights=None) -> RewardOutput:
    return RewardOutput(values, weights or dict.fromkeys(values, 1.0), aggregate="advantage")


def test_advantages_are_normalised_per_step_stride_and_reward_then_summed_then_clamped(policy):
    algo, batch = _algo(num_steps=4), _batch(groups=2, size=8)  # steps 0, 1, 2: all but the last
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    shape = (3, 2, 16)  # (k, lambda, member)
    generator = torch.Generator().manual_seed(0)
    first, second = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator) * 10
    # No clamp in reach: each (k, lambda, reward) term has zero mean over every group; so has the sum.
    loose = G2RPO(**{**algo.__dict__, "normalization": {**algo.normalization.__dict__, "clip": 100.0}})
    summed = loose.advantages(_rewards({"a": first.flatten(), "b": second.flatten()}), rollout)
    values = summed.values.view(3, 2, 8)
    torch.testing.assert_close(values.mean(dim=2), torch.zeros(3, 2), rtol=0, atol=1e-5)
    expected = torch.zeros(3, 16)
    for reward in (first, second):
        grouped = reward.view(3, 2, 2, 8)
        normalised = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-8)
        expected += normalised.sum(dim=1).reshape(3, 16)
    torch.testing.assert_close(summed.values, expected.flatten(), rtol=1e-5, atol=1e-5)

    # One outlier per group in every (k, lambda, reward): each term is 2.47 < 5, the sum 9.9 is clamped to 5.
    outlier = torch.zeros(shape)
    outlier[..., 0] = outlier[..., 8] = 1.0
    clamped = algo.advantages(_rewards({"a": outlier.flatten(), "b": outlier.flatten()}), rollout)
    assert clamped.values.view(3, 16)[:, [0, 8]].eq(5.0).all()
    term = 0.875 / (1 / 8) ** 0.5
    torch.testing.assert_close(clamped.values.view(3, 16)[:, 1], torch.full((3,), -4 * term / 7))


def test_flat_groups_and_nan_rewards_are_counted_and_get_zero_advantage(shared):
    policy, algo, batch, rollout = shared
    rewards = torch.rand(3, 2, 6, generator=torch.Generator().manual_seed(0))
    rewards[0, :, :3] = 1.0  # group 0 is flat at k = 0 for both strides
    rewards[1, 1, 4] = float("nan")  # member 4 has one unscorable image at k = 1
    advantages = algo.advantages(_rewards({"r": rewards.flatten()}), rollout)
    assert advantages.num_groups == 6 and advantages.num_zero_std_groups == 1
    assert advantages.values.view(3, 6)[0, :3].eq(0).all()
    assert not advantages.valid.view(3, 6)[1, 4] and advantages.values.view(3, 6)[1, 4] == 0


@pytest.mark.parametrize("update_per", ["stochastic_step", "iteration"])
def test_minibatches_follow_the_update_schedule(shared, update_per):
    _, _, batch, rollout = shared
    algo = _algo(update_per=update_per, rollout_batch_size=4)
    rewards = torch.rand(len(rollout.images), generator=torch.Generator().manual_seed(0))
    advantages = algo.advantages(_rewards({"r": rewards}), rollout)
    steps = algo.minibatches(rollout, advantages, torch.Generator())
    assert len(steps) == (3 if update_per == "stochastic_step" else 1)
    units = [u for step in steps for u in step]
    assert sorted((u.index, m) for u in units for m in u.samples.tolist()) == [
        (k, m) for k in range(3) for m in range(6)
    ]


def test_broadcast_forward_equals_the_per_member_forward(policy):
    batch = _batch()
    algo, per_member = _algo(), _algo(broadcast_forward=False)
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    rewards = torch.rand(len(rollout.images), generator=torch.Generator().manual_seed(0))
    advantages = algo.advantages(_rewards({"r": rewards}), rollout)
    unit = TrainingUnit(torch.arange(6), 1)
    before = algo.loss(policy, rollout, advantages, unit)
    assert before.metrics["logprob_gap"] < 1e-5 and before.metrics["clipfrac"] == 0  # on-policy: ratio 1
    perturb_lora(policy, scale=0.01)  # off-policy, so that the ratio and its clip matter
    results = []
    for variant in (algo, per_member):
        policy.zero_grad()
        policy.nfe = 0
        out = variant.loss(policy, rollout, advantages, unit)
        out.loss.backward()
        grads = [p.grad.clone() for p in policy.trainable_parameters()]
        results.append((out.loss.detach(), grads, policy.nfe))
    (loss_b, grads_b, nfe_b), (loss_m, grads_m, nfe_m) = results
    torch.testing.assert_close(loss_b, loss_m, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_b, grads_m):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert (nfe_b, nfe_m) == (2, 6)  # one forward per group instead of one per member


def test_broadcast_refuses_a_policy_with_active_dropout(shared):
    _, algo, batch, rollout = shared
    policy = make_policy()
    advantages = algo.advantages(_rewards({"r": torch.rand(len(rollout.images))}), rollout)
    policy.transformer.add_module("noisy", torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        algo.loss(policy, rollout, advantages, TrainingUnit(torch.arange(3), 0))


def test_groups_must_have_one_prompt(policy):
    batch = _batch()
    batch.prompts[1] = "a fox"
    with pytest.raises(ValueError, match="one prompt per group"):
        _algo().rollout(policy, batch, iteration_generator(0, 0))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stochastic_steps", [0, 5], "num_steps - 2"),
        ("granularities", [0], "strides >= 1"),
        ("final_image", "x0", "last_x0_pred, append_zero"),
        ("update_per", "epoch", "stochastic_step, iteration"),
    ],
)
def test_invalid_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        _algo(**{field: value})


def test_default_stochastic_steps_are_the_high_noise_half():
    assert G2RPO().stochastic_steps == list(range(8)) and G2RPO(num_steps=10).stochastic_steps == list(
        range(5)
    )


def test_the_hps_preset_is_the_papers_hps_row_and_the_joint_one_the_official_advantage_sum(compose_config):
    """paper_g2rpo_flux_hps trains on HPS-v2.1 alone (the paper's Table 1 HPS row); paper_g2rpo_flux_hps_clip
    sums the HPS and DFN5B-CLIP advantages with weights 1 : 1, as the official ``hps_advantages +
    clip_advantages`` (train_g2rpo_hps_clip.py, and train_g2rpo_hps.py at 04ee954)."""
    hps = compose_config("experiment=paper_g2rpo_flux_hps").reward
    assert set(hps.rewards) == {"hps"} and dict(hps.weights) == {"hps": 1.0}
    joint = compose_config("experiment=paper_g2rpo_flux_hps_clip").reward
    assert set(joint.rewards) == {"hps", "clip"} and dict(joint.weights) == {"hps": 1.0, "clip": 1.0}
    assert hps.aggregate == joint.aggregate == "advantage"
    assert joint.rewards.clip.path.endswith("DFN5B-CLIP-ViT-H-14-hf")
