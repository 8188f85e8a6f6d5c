"""Flow-GRPO: rollout bookkeeping, on-policy consistency, KL, minibatching, and that it learns."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import fit_quietly, make_policy, perturb_lora

from g2rpo.algos import FlowGRPO
from g2rpo.curriculum import UniformCurriculum
from g2rpo.data import PromptDataset
from g2rpo.module import RLModule
from g2rpo.randomness import iteration_generator
from g2rpo.rewards import RewardEnsemble
from g2rpo.types import PromptBatch, RewardOutput, TrainingUnit


def _batch(groups=2, size=4):
    prompts = ["a cat", "a dog", "a fox", "a cow"][:groups]
    return PromptBatch.from_groups(prompts, [{}] * groups, torch.arange(groups), torch.full((groups,), size))


def _advantages(algo, batch, rewards):
    return algo.advantages(RewardOutput({"r": rewards}, {"r": 1.0}), SimpleNamespace(scored=batch))


def _trained_steps(algo, batch):
    """What ``minibatches`` reads of a rollout: the trained steps of each sample."""
    return SimpleNamespace(train_steps=torch.zeros(len(batch), algo.num_train_steps, dtype=torch.long))


@pytest.fixture
def algo():
    return FlowGRPO(num_steps=6, rollout_batch_size=4)


def test_rollout_records_trajectories_and_log_probs(policy, algo):
    batch = _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    assert rollout.latents.shape == (8, 7, 3, 32, 32) and rollout.log_probs.shape == (8, 6)
    assert rollout.images.shape == (8, 3, 32, 32)
    assert rollout.train_steps.tolist() == [list(range(5))] * 8  # int(6 * 0.99) = 5: all but the last step
    assert torch.isfinite(rollout.log_probs).all()
    assert rollout.cond.prompt_embeds.shape[0] == 2  # one encoding per prompt, shared by its group
    assert rollout.sigmas[0] == 1 and rollout.sigmas[-1] == 0
    again = algo.rollout(policy, batch, iteration_generator(0, 0))
    torch.testing.assert_close(rollout.latents, again.latents, rtol=0, atol=0)


def test_same_latent_shares_the_initial_noise_within_each_group_only(policy, algo):
    batch = _batch()
    start = algo.rollout(policy, batch, iteration_generator(0, 0)).latents[:, 0]
    assert len({tuple(x.flatten()[:8].tolist()) for x in start}) == 8  # default: independent per sample
    shared = FlowGRPO(num_steps=6, rollout_batch_size=4, same_latent=True)
    rollout = shared.rollout(policy, batch, iteration_generator(0, 0))
    start = rollout.latents[:, 0]
    assert (start[:4] == start[0]).all() and (start[4:] == start[4]).all() and (start[0] != start[4]).any()
    assert (rollout.latents[:4, 1] != rollout.latents[0, 1]).flatten(1).any(1)[1:].all()  # then they branch


def test_ratio_is_one_and_clipped_loss_equals_unclipped_before_an_update(policy, algo):
    batch = _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    advantages = _advantages(algo, batch, torch.arange(8.0))
    for column in range(algo.num_train_steps):
        out = algo.loss(policy, rollout, advantages, TrainingUnit(torch.arange(4), column))
        assert out.metrics["logprob_gap"] == 0.0  # same batch shape, same dtype path: bit-identical
        assert out.metrics["ratio"] == 1.0 and out.metrics["clipfrac"] == 0.0
        unclipped = -advantages.values[:4].mean()
        torch.testing.assert_close(out.metrics["policy_loss"], unclipped)


def test_kl_is_zero_at_the_reference_and_positive_with_gradient_after_it(policy, algo):
    batch = _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    advantages = _advantages(algo, batch, torch.arange(8.0))
    unit = TrainingUnit(torch.arange(4), 2)
    assert algo.loss(policy, rollout, advantages, unit).metrics["kl"] == 0.0
    perturb_lora(policy)
    out = algo.loss(policy, rollout, advantages, unit)
    assert out.metrics["kl"] > 0
    out.loss.backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in policy.parameters() if not p.requires_grad)


@pytest.mark.parametrize("micro_batches", ["exact", "padded"])
def test_minibatches_cover_the_kept_samples_once_per_step(micro_batches):
    algo = FlowGRPO(num_steps=6, rollout_batch_size=4, micro_batches=micro_batches)
    batch = _batch(groups=3, size=4)
    flat_group = torch.tensor([1.0, 2, 3, 4, 0, 0, 0, 0, 5, 6, 7, 9])
    advantages = _advantages(algo, batch, flat_group)
    assert advantages.train_mask.sum() == 8
    steps = algo.minibatches(_trained_steps(algo, batch), advantages, torch.Generator().manual_seed(0))
    assert len(steps) == algo.num_minibatches
    units = [u for step in steps for u in step]
    assert len(units) == 2 * algo.num_train_steps  # 8 kept samples = 2 micro-batches of 4
    assert all(len(u.samples) == 4 for u in units)
    assert set(torch.cat([u.samples for u in units]).tolist()) == set(
        advantages.train_mask.nonzero().flatten().tolist()
    )


def _units(algo, batch, advantages):
    steps = algo.minibatches(_trained_steps(algo, batch), advantages, torch.Generator().manual_seed(0))
    return [u for step in steps for u in step]


def test_padded_micro_batches_refill_with_filtered_samples_and_exact_ones_train_only_the_kept():
    batch = _batch(groups=3, size=3)
    rewards = torch.tensor([1.0, 2, 3, 0, 0, 0, 5, 6, 9])  # 6 kept
    padded = FlowGRPO(num_steps=6, rollout_batch_size=4, micro_batches="padded")
    advantages = _advantages(padded, batch, rewards)
    units = _units(padded, batch, advantages)
    assert all(len(u.samples) == 4 for u in units)  # 6 kept + 2 re-added from the filtered group
    assert len({i for u in units for i in u.samples.tolist()} & {3, 4, 5}) == 2
    exact = FlowGRPO(num_steps=6, rollout_batch_size=4)
    units = _units(exact, batch, advantages)
    assert [len(u.samples) for u in units[:: exact.num_train_steps]] == [3, 3]  # ceil(6 / 4) near-equal
    for column in range(exact.num_train_steps):
        trained = torch.cat([u.samples for u in units if u.index == column])
        assert sorted(trained.tolist()) == advantages.train_mask.nonzero().flatten().tolist()


def test_exact_and_padded_micro_batches_take_the_same_loss_from_the_kept_samples(policy):
    """At beta = 0 padding samples have advantage 0: each exact micro-batch's mean loss is weighted by its
    size / rollout_batch_size, so the summed loss (and gradient) of an iteration is the padded one."""
    batch = _batch(groups=3, size=3)
    rewards = torch.tensor([1.0, 2, 3, 0, 0, 0, 5, 6, 9])
    totals = {}
    for mode in ("exact", "padded"):
        algo = FlowGRPO(num_steps=6, rollout_batch_size=4, beta=0.0, micro_batches=mode)
        rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
        advantages = _advantages(algo, batch, rewards)
        totals[mode] = sum(
            algo.loss(policy, rollout, advantages, u).loss for u in _units(algo, batch, advantages)
        )
        kept = advantages.values[advantages.train_mask]
        torch.testing.assert_close(totals[mode], -kept.sum() * algo.num_train_steps / 4)  # ratio 1, unclipped
    torch.testing.assert_close(totals["exact"], totals["padded"])


def test_everything_filtered_means_no_update(algo):
    batch = _batch()
    advantages = _advantages(algo, batch, torch.ones(8))
    assert algo.minibatches(_trained_steps(algo, batch), advantages, torch.Generator()) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timestep_fraction", 1.0, "never the last step"),
        ("sde_type", "ode", "sde, dance, cps"),
        ("clip_range", 0.0, "clip_range must be > 0"),
        ("noise_level", 0.0, "deterministic"),
        ("micro_batches", "pad", "exact, padded"),
    ],
)
def test_invalid_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        FlowGRPO(**{field: value})


def test_cps_variant_rolls_out_and_trains(policy):
    algo = FlowGRPO(num_steps=6, rollout_batch_size=4, sde_type="cps", noise_level=0.8, clip_range=1e-5)
    batch = _batch()
    rollout = algo.rollout(policy, batch, iteration_generator(0, 0))
    assert torch.isnan(rollout.log_probs[:, -1]).all()  # the last CPS step is deterministic
    assert torch.isfinite(rollout.log_probs[:, :-1]).all()
    out = algo.loss(
        policy, rollout, _advantages(algo, batch, torch.arange(8.0)), TrainingUnit(torch.arange(4), 0)
    )
    assert out.metrics["logprob_gap"] == 0.0 and torch.isfinite(out.loss)


class Brightness:
    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


def test_flow_grpo_increases_a_learnable_reward(tmp_path):
    """Ten iterations on mean brightness: the reward must go up, well beyond its iteration-to-iteration noise."""
    torch.manual_seed(0)
    module = RLModule(
        policy=make_policy(),
        algorithm=FlowGRPO(num_steps=6, rollout_batch_size=8, beta=0.0, clip_range=5e-3),
        reward=RewardEnsemble({"brightness": Brightness()}),
        dataset=PromptDataset(["a cat", "a dog", "a fox", "a cow"]),
        curriculum=UniformCurriculum(prompts_per_iteration=2, group_size=8),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            history.append(trainer.callback_metrics["reward"].item())

    fit_quietly(module, tmp_path, max_epochs=12, callbacks=[Record()])
    start, end = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert end - start > 0.02, history  # brightness std within a batch is about 0.01
