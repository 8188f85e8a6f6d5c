"""DanceGRPO and MixGRPO: what each changes in sampling and training (brief flow_grpo_family sections 3-4)."""

import pytest
import torch

from g2rpo.algos import DanceGRPO, MixGRPO
from g2rpo.randomness import iteration_generator
from g2rpo.sampling import euler_step
from g2rpo.types import PromptBatch, RewardOutput, TrainingUnit


def _batch(groups=2, size=4):
    prompts = ["a cat", "a dog", "a fox"][:groups]
    return PromptBatch.from_groups(prompts, [{}] * groups, torch.arange(groups), torch.full((groups,), size))


def _on_policy(algo, policy, rollout, batch):
    rewards = RewardOutput({"r": torch.arange(float(len(batch)))}, {"r": 1.0})
    advantages = algo.advantages(rewards, rollout)
    return [
        algo.loss(policy, rollout, advantages, TrainingUnit(torch.arange(4), column)).metrics
        for column in range(rollout.train_steps.shape[1])
    ]


def test_dance_shares_initial_noise_per_group_and_trains_a_random_subset_of_steps(policy):
    algo, batch = DanceGRPO(num_steps=6, rollout_batch_size=4, guidance_scale=1.0), _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    start = rollout.latents[:, 0]
    assert (start[:4] == start[0]).all() and (start[4:] == start[4]).all() and (start[0] != start[4]).any()
    assert (rollout.latents[:4, 1] != rollout.latents[0, 1]).flatten(1).any(1)[1:].all()  # then they branch
    assert algo.num_train_steps == 3  # int((6 - 1) * 0.6)
    steps = rollout.train_steps
    assert steps.shape == (8, 3) and steps.max() <= 4  # the last step (index 5) is never trained
    assert all(len(set(row)) == 3 for row in steps.tolist())  # distinct steps per sample
    assert len({tuple(row) for row in steps.tolist()}) > 1  # drawn per sample
    for metrics in _on_policy(algo, policy, rollout, batch):
        assert metrics["logprob_gap"] < 1e-6 and metrics["ratio"] == 1.0


def test_dance_defaults_follow_the_official_flux_script():
    algo = DanceGRPO()
    assert (algo.num_steps, algo.noise_level, algo.sde_type, algo.beta) == (16, 0.3, "dance", 0.0)
    assert algo.num_train_steps == 9  # 60% of the 15 trainable steps
    assert (algo.normalization.std, algo.normalization.eps, algo.normalization.unbiased) == (
        "group",
        1e-8,
        True,
    )
    assert not algo.uses_reference


@pytest.mark.parametrize(
    ("iteration", "window"),
    [
        (0, [0, 1, 2, 3]),
        (24, [0, 1, 2, 3]),
        (25, [1, 2, 3, 4]),
        (21 * 25, [21, 22]),
        (22 * 25, [22]),
        (23 * 25, []),  # start T - 2 = 23: the official window range(23, min(27, 23)) is empty
        (24 * 25, [0, 1, 2, 3]),  # wrapped once the start passed 23
    ],
)
def test_mix_window_slides_every_shift_interval_shrinks_at_the_end_and_wraps(iteration, window):
    assert MixGRPO().window(iteration, torch.Generator()).tolist() == window  # T = 25: starts 0 .. 23


def _starts(algo, iterations):
    windows = [algo.window(i, torch.Generator()).tolist() for i in range(iterations)]
    return [w[0] if w else algo.num_steps - 2 for w in windows], windows


def test_mix_progressive_starts_run_over_0_to_t_minus_2_inclusive_then_wrap():
    """The official update (grpo_states.py:85-99): every shift_interval iterations the start moves by the
    stride; it wraps to 0 only once it is past max_timesteps = T - 2, so T - 2 is a start of its own."""
    starts, windows = _starts(MixGRPO(num_steps=8, window_size=2, shift_interval=2), 2 * 7 + 4)
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0, 1, 1]
    assert windows[:14:2] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5], []]  # range(s, min(s + 2, 6))
    starts, _ = _starts(MixGRPO(num_steps=8, window_size=2, shift_interval=1, window_stride=3), 7)
    assert starts == [0, 3, 6, 0, 3, 6, 0]  # 9 > 6 wraps; 6 itself does not
    starts, _ = _starts(MixGRPO(num_steps=8, window_size=2, shift_interval=1, window_stride=4), 4)
    assert starts == [0, 4, 0, 4]  # 8 > 6 wraps


def test_mix_window_without_roll_back_is_clipped_to_t_minus_2_and_random_stays_in_range():
    """Without roll-back the official start is clipped to max_timesteps = T - 2 (even off the stride), where
    the window is empty for good (the official is_training_complete)."""
    assert MixGRPO(roll_back=False).window(1000 * 25, torch.Generator()).tolist() == []
    starts, _ = _starts(
        MixGRPO(num_steps=8, window_size=2, shift_interval=1, window_stride=4, roll_back=False), 5
    )
    assert starts == [0, 4, 6, 6, 6]
    assert MixGRPO(window_stride=4).window(25, torch.Generator()).tolist() == [4, 5, 6, 7]
    random = MixGRPO(window_strategy="random")
    generator = torch.Generator().manual_seed(0)
    starts = {int(random.window(0, generator)[0]) for _ in range(200)}
    assert starts == set(range(0, 23 - 4 + 1))


def assert_euler_steps(policy, rollout, steps) -> None:
    """Steps ``steps`` of the rollout are deterministic Euler (ODE) steps of the policy's velocity."""
    cond = rollout.cond.select(rollout.cond_index)
    for i in steps:
        x = rollout.latents[:, i]
        torch.testing.assert_close(
            rollout.latents[:, i + 1],
            euler_step(
                x, policy.velocity(x, rollout.sigmas[i], cond), rollout.sigmas[i], rollout.sigmas[i + 1]
            ),
            rtol=0,
            atol=1e-5,
        )


def test_mix_rollout_is_ode_outside_the_window_and_trains_only_inside(policy):
    algo = MixGRPO(num_steps=6, window_size=2, shift_interval=1, rollout_batch_size=4, guidance_scale=1.0)
    batch = _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 1), iteration=1)
    assert rollout.train_steps.tolist() == [[1, 2]] * 8
    assert torch.isfinite(rollout.log_probs[:, [1, 2]]).all()
    assert torch.isnan(rollout.log_probs[:, [0, 3, 4, 5]]).all()
    assert_euler_steps(policy, rollout, (0, 3, 4))
    for metrics in _on_policy(algo, policy, rollout, batch):
        assert metrics["logprob_gap"] < 1e-6 and metrics["ratio"] == 1.0


def test_mix_empty_window_samples_by_the_ode_and_trains_nothing(policy):
    """At the last start, T - 2, the rollout is the Euler ODE throughout and no optimiser step is taken."""
    algo = MixGRPO(num_steps=4, window_size=1, shift_interval=1, rollout_batch_size=4, guidance_scale=1.0)
    batch = _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 2), iteration=2)  # start 2 = T - 2
    assert rollout.train_steps.shape == (8, 0)
    assert_euler_steps(policy, rollout, range(4))
    rewards = RewardOutput({"r": torch.arange(float(len(batch)))}, {"r": 1.0})
    assert algo.minibatches(rollout, algo.advantages(rewards, rollout), torch.Generator()) == []
    assert algo.rollout_metrics(rollout, rewards) == {"window/start": 2.0, "window/size": 0.0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("window_strategy", "decay", "progressive, random"),
        ("window_size", 24, "num_steps - 2"),
        ("shift_interval", 0, ">= 1"),
    ],
)
def test_mix_invalid_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        MixGRPO(**{field: value})


def test_dance_invalid_fraction_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        DanceGRPO(num_steps=4, timestep_fraction=0.2)
