"""CurES: the brief's invariants (part A.9) for sampling, allocation and the Beta posterior, its checkpoint
round trip, and every algorithm training on its variable group sizes."""

import io
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN

from g2rpo.curriculum import CurESCurriculum, PolicyProbe, Probed
from g2rpo.curriculum.cures import allocate, gradient_sigma, sampling_distribution
from g2rpo.data import PromptDataset
from g2rpo.loggers import read_metrics
from g2rpo.rewards import RewardEnsemble
from g2rpo.run import train
from g2rpo.types import PromptBatch, RewardOutput


def bandit(num_prompts: int) -> tuple[PromptDataset, torch.Tensor]:
    """Prompts with known success rates spread over (0, 1)."""
    dataset = PromptDataset(prompts=[f"prompt {i}" for i in range(num_prompts)])
    return dataset, torch.linspace(0.05, 0.95, num_prompts, dtype=torch.float64)


class BernoulliProbe:
    """A policy whose prompt ``i`` succeeds with probability ``truth[i]`` (reward 1) and fails otherwise."""

    def __init__(self, truth: torch.Tensor, seed: int = 0) -> None:
        self.truth = truth
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def rewards(self, batch: PromptBatch) -> torch.Tensor:
        return torch.bernoulli(self.truth[batch.prompt_ids], generator=self.generator).float()

    def __call__(self, batch: PromptBatch, *, grad_norms: bool = False, **settings) -> Probed:
        self.calls += 1
        return Probed(rewards=self.rewards(batch))


def reward_output(values: torch.Tensor) -> RewardOutput:
    return RewardOutput(scores={"success": values}, weights={"success": 1.0})


# ---- allocation (Eqs. 15-21) ----


@pytest.mark.parametrize("budget", [8, 13, 32, 64])
def test_allocation_sums_to_the_budget_within_the_bounds(budget):
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        weights = torch.rand(8, generator=generator) ** 3
        weights[torch.rand(8, generator=generator) < 0.2] = 0.0
        sizes = allocate(weights, budget, n_min=1, n_max=8)
        assert sizes.sum() == budget and sizes.min() >= 1 and sizes.max() <= 8
        sizes = allocate(weights, budget if budget >= 16 else 16, n_min=2, n_max=10)
        assert sizes.min() >= 2 and sizes.max() <= 10


def test_allocation_is_proportional_and_rounds_by_largest_remainder():
    assert allocate(torch.tensor([1.0, 2.0, 3.0, 2.0]), 16, n_min=2, n_max=16).tolist() == [2, 4, 6, 4]
    weights = torch.tensor([0.31, 0.17, 0.52, 0.44, 0.29])
    sizes = allocate(weights, 37, n_min=2, n_max=20)
    exact = 37 * weights.double() / weights.sum()
    assert sizes.sum() == 37 and ((sizes - exact).abs() < 1).all()
    # a clamped prompt's excess goes to the others, in proportion
    assert allocate(torch.tensor([10.0, 1.0, 1.0]), 12, n_min=2, n_max=6).tolist() == [6, 3, 3]
    assert allocate(torch.zeros(4), 12, n_min=2, n_max=6).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="cannot split"):
        allocate(torch.ones(4), 7, n_min=2, n_max=6)


def test_allocation_peaks_near_p_one_half():
    p = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    sizes = allocate(torch.sqrt(p * (1 - p)), 19 * 8, n_min=2, n_max=32)
    middle = len(p) // 2  # p = 0.5
    assert sizes[middle] == sizes.max()
    assert (sizes[: middle + 1].diff() >= 0).all() and (sizes[middle:].diff() <= 0).all()
    assert sizes[0] < sizes[middle]


def test_gradient_sigma_reduces_to_the_bernoulli_proxy_for_equal_norms():
    p = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    moments = torch.tensor([4.0, 4.0, 2.0, 2.0]).expand(9, 4)  # E||g||^2 = 4 and E||g|| = 2 on both sides
    torch.testing.assert_close(gradient_sigma(p, moments), 2 * torch.sqrt(p * (1 - p)))
    # the third term lowers sigma when the two sides' gradients differ; never below 0
    moments = torch.tensor([4.0, 1.0, 2.0, 0.0]).expand(9, 4)
    assert (gradient_sigma(p, moments) >= 0).all()


# ---- sampling (Eq. 14) ----


def test_sampling_tends_to_uniform_as_tau_grows():
    p = torch.linspace(0.02, 0.98, 50, dtype=torch.float64)
    uniform = torch.full_like(p, 1 / 50)
    distances = [
        (sampling_distribution(p, torch.zeros_like(p), tau).sub(uniform).abs().sum() / 2).item()
        for tau in (0.02, 0.1, 1.0, 10.0, 1000.0)
    ]
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-4
    rho = sampling_distribution(p, torch.zeros_like(p), 0.05)
    assert p[rho.argmax()] == pytest.approx(0.5, abs=0.02)


def test_sampling_ratios_match_the_brief():
    """With N' = 4 pre-rollouts, p in {1/6, ..., 1/2}: the paper's rho favours p = 1/2 over 0/4 successes by
    3.6x at tau = 0.1 and 12.8x at tau = 0.05; the released code's temperatures by about 1.003x."""
    successes = torch.arange(5, dtype=torch.float64)
    p = (successes + 1) / 6
    for tau, ratio in ((0.1, 3.6), (0.05, 12.8)):
        rho = sampling_distribution(p, successes, tau)
        assert (rho[2] / rho[0]).item() == pytest.approx(ratio, rel=0.02)
    rho = sampling_distribution(p, successes, tau=0.1, mode="code_compat")
    assert 1.0 < (rho.max() / rho.min()).item() < 1.005
    assert torch.allclose(sampling_distribution(p, successes, 0.1, "uniform"), torch.full_like(p, 0.2))


# ---- the Beta posterior (Eqs. 22-24) ----


def test_posterior_mean_converges_on_a_bernoulli_bandit():
    dataset, truth = bandit(8)
    probe = BernoulliProbe(truth)
    curriculum = CurESCurriculum(
        prompts_per_iteration=4, group_size=8, subset_size=None, steps_per_subset=10_000, tau=1.0
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = curriculum.sample(dataset, generator, probe)
        curriculum.update(batch, reward_output(probe.rewards(batch)))
    assert probe.calls == 1  # pre-rollouts at the start of the subset only
    estimate = curriculum.posterior_mean(torch.arange(8))
    assert (estimate - truth).abs().max() < 0.06
    trials = curriculum.successes + curriculum.failures
    assert trials.sum() == 8 * 4 + 300 * 32  # N' pre-rollouts per prompt plus every rollout, once


def test_the_curriculum_moves_rollouts_to_uncertain_prompts():
    dataset, truth = bandit(8)
    probe = BernoulliProbe(truth)
    curriculum = CurESCurriculum(
        prompts_per_iteration=8, group_size=8, subset_size=None, steps_per_subset=10_000
    )
    generator = torch.Generator().manual_seed(0)
    sizes = torch.zeros(8)
    for _ in range(100):
        batch = curriculum.sample(dataset, generator, probe)
        metrics = curriculum.update(batch, reward_output(probe.rewards(batch)))
        sizes.index_add_(0, batch.prompt_ids, torch.ones(len(batch)))
    assert sizes[3:5].mean() > 1.3 * sizes[[0, 7]].mean()  # p near 1/2 vs p = 0.05 and 0.95
    assert metrics["curriculum/group_size_p_mid"] > metrics["curriculum/group_size_p_extreme"]


def test_fractional_updates_track_a_continuous_reward():
    dataset = PromptDataset(prompts=["a", "b"])
    curriculum = CurESCurriculum(
        prompts_per_iteration=2, group_size=4, subset_size=None, steps_per_subset=10_000,
        posterior_update="fractional", reward_range=[-1.0, 1.0], pre_rollouts=0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = curriculum.sample(dataset, generator)
        rewards = torch.where(batch.prompt_ids == 0, -0.4, 0.6).float()  # r~ = 0.3 and 0.8
        curriculum.update(batch, reward_output(rewards))
    torch.testing.assert_close(
        curriculum.posterior_mean(torch.arange(2)), torch.tensor([0.3, 0.8]).double(), atol=0.01, rtol=0
    )


def test_several_scored_images_per_sample_count_as_the_allocated_trials():
    """G2RPO scores each member's continuations: a prompt's n_i rollouts still count n_i trials."""
    dataset, truth = bandit(4)
    curriculum = CurESCurriculum(prompts_per_iteration=2, group_size=4, subset_size=None, pre_rollouts=0)
    batch = curriculum.sample(dataset, torch.Generator().manual_seed(0))
    repeats = 6
    scored = PromptBatch(
        prompts=batch.prompts * repeats,
        metadata=batch.metadata * repeats,
        group_ids=torch.arange(len(batch) * repeats) // 3,
        prompt_ids=batch.prompt_ids.repeat(repeats),
    )
    rewards = torch.ones(len(scored))
    rewards[: len(batch)] = 0.0  # one continuation set in six fails
    curriculum.update(scored, reward_output(rewards))
    trials = curriculum.successes + curriculum.failures
    assert trials.sum() == len(batch)
    drawn = curriculum.last["prompt_ids"]
    torch.testing.assert_close(curriculum.successes[drawn], curriculum.last["group_size"].double() * 5 / 6)


def test_subsets_partition_the_data_and_reset_their_estimates():
    dataset, truth = bandit(12)
    probe = BernoulliProbe(truth)
    curriculum = CurESCurriculum(prompts_per_iteration=2, group_size=4, subset_size=4, steps_per_subset=3)
    generator = torch.Generator().manual_seed(0)
    subsets = []
    for iteration in range(9):
        batch = curriculum.sample(dataset, generator, probe)
        assert set(batch.prompt_ids.tolist()) <= set(curriculum.subset.tolist())
        if iteration % 3 == 0:
            subsets.append(set(curriculum.subset.tolist()))
            trials = (curriculum.successes + curriculum.failures)[curriculum.subset]
            assert (trials == curriculum.pre_rollouts).all()  # fresh estimates: the pre-rollouts alone
        curriculum.update(batch, reward_output(probe.rewards(batch)))
    assert probe.calls == 3
    assert set.union(*subsets) == set(range(12)) and sum(map(len, subsets)) == 12  # one pass, no overlap


def test_state_survives_a_checkpoint_round_trip():
    dataset, truth = bandit(12)
    settings = dict(prompts_per_iteration=2, group_size=6, subset_size=4, steps_per_subset=3)
    curriculum = CurESCurriculum(**settings)
    probe = BernoulliProbe(truth)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        batch = curriculum.sample(dataset, generator, probe)
        curriculum.update(batch, reward_output(probe.rewards(batch)))
    buffer = io.BytesIO()
    torch.save(curriculum.state_dict(), buffer)
    buffer.seek(0)
    restored = CurESCurriculum(**settings)
    restored.load_state_dict(torch.load(buffer))
    state = generator.get_state()
    for _ in range(5):  # crosses the next subset boundary
        probe_state = probe.generator.get_state()
        expected = curriculum.sample(dataset, generator, probe)
        generator.set_state(state)
        probe.generator.set_state(probe_state)
        again = restored.sample(dataset, generator, probe)
        state = generator.get_state()
        assert again.prompt_ids.tolist() == expected.prompt_ids.tolist()
        rewards = reward_output(probe.rewards(expected))
        curriculum.update(expected, rewards)
        restored.update(again, rewards)
    torch.testing.assert_close(
        restored.posterior_mean(torch.arange(12)), curriculum.posterior_mean(torch.arange(12))
    )


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sampling_mode='softmax'.*paper, code_compat, uniform"):
        CurESCurriculum(sampling_mode="softmax")
    with pytest.raises(ValueError, match="n_min"):
        CurESCurriculum(n_min=1)
    with pytest.raises(ValueError, match="subset_size"):
        CurESCurriculum(prompts_per_iteration=8, subset_size=4)


# ---- the policy probe ----


def test_grad_norm_probe_matches_a_manual_per_sample_gradient(policy):
    from g2rpo.rewards.jpeg import JpegCompressibility
    from g2rpo.sampling import sde_step

    reward = RewardEnsemble({"jpeg": JpegCompressibility()})
    batch = PromptBatch.from_groups(["a cat", "a dog"], [{}, {}], torch.arange(2), torch.tensor([2, 1]))
    settings = dict(num_steps=3, guidance_scale=1.0, batch_size=2, noise_level=0.7)
    probed = PolicyProbe(policy, reward, torch.Generator().manual_seed(0))(batch, grad_norms=True, **settings)
    assert (
        probed.rewards.shape == (3,)
        and torch.isfinite(probed.grad_norms).all()
        and (probed.grad_norms > 0).all()
    )

    from g2rpo.rollout import sde_rollout

    rollout = sde_rollout(
        policy, batch, num_steps=3, guidance_scale=1.0, noise_levels=torch.full((3,), 0.7), sde_type="sde",
        batch_size=2, train_steps=torch.zeros(3, 0, dtype=torch.long), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    cond = rollout.cond.select(rollout.cond_index[2:3])
    log_likelihood = sum(
        sde_step(
            rollout.latents[2:3, i],
            policy.velocity(rollout.latents[2:3, i], rollout.sigmas[i], cond),
            rollout.sigmas[i],
            rollout.sigmas[i + 1],
            0.7,
            prev_sample=rollout.latents[2:3, i + 1],
        ).log_prob.sum()  # fmt: skip
        for i in range(3)
    )
    log_likelihood.backward()
    manual = math.sqrt(
        sum(float(p.grad.pow(2).sum()) for p in policy.trainable_parameters() if p.grad is not None)
    )
    assert probed.grad_norms[2].item() == pytest.approx(manual, rel=1e-4)


# ---- every algorithm trains on CurES's variable group sizes ----

CURES_RUN = [
    "curriculum=cures",
    # The tiny model's JPEG rewards lie around -1.95: this threshold splits its pre-rollouts into successes
    # and failures, and Eq. 21 on their gradient norms then gives the two prompts different group sizes.
    "curriculum.success_threshold=-1.955",
    "curriculum.sigma_mode=grad_norm",
    "curriculum.n_max=6",
    "curriculum.pre_rollouts=2",
    "curriculum.subset_size=2",
    "trainer.max_epochs=1",
    "algo.rollout_batch_size=2",
]


@pytest.mark.parametrize("algo", ["flow_grpo", "dance_grpo", "mix_grpo", "g2rpo", "dgpo"])
def test_every_algorithm_trains_with_cures(compose_config, algo):
    extra = {"mix_grpo": ["algo.window_size=2"], "dgpo": ["algo.max_timestep_index=3"]}.get(algo, [])
    cfg = compose_config(*FAST_RUN, f"algo={algo}", *CURES_RUN, *extra)
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert record["curriculum/group_size_max"] > record["curriculum/group_size_min"]
    assert record["curriculum/pre_rollouts"] == 2 * 2 and record["nfe/curriculum"] > 0
    assert record["train/optimizer_steps"] >= 1 and math.isfinite(record["reward/total/mean"])


def test_a_resumed_run_continues_the_same_curriculum(compose_config):
    """Stop after one iteration, extend the run: the second iteration keeps the subset and its posterior
    (no new pre-rollouts) and logs what the uninterrupted run logs."""
    settings = [*FAST_RUN, "algo=dgpo", "algo.max_timestep_index=3", *CURES_RUN]
    train(compose_config(*settings, "trainer.max_epochs=1", name="resumed"))
    resumed = compose_config(*settings, "trainer.max_epochs=2", name="resumed")
    train(resumed)
    straight = compose_config(*settings, "trainer.max_epochs=2", name="straight")
    train(straight)
    _, second = read_metrics(Path(resumed.run_dir) / "metrics.jsonl")
    _, expected = read_metrics(Path(straight.run_dir) / "metrics.jsonl")
    assert second["curriculum/pre_rollouts"] == 0
    for key in (
        "curriculum/p_mean",
        "curriculum/sampled_p_mean",
        "curriculum/group_size_max",
        "reward/total/mean",
    ):
        assert second[key] == pytest.approx(expected[key], rel=1e-6), key
