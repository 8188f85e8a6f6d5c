"""Keyed randomness: a sample's (and a group's) noise depends on its index in the iteration's batch only,
not on the forward chunk or the rank that draws it, so a slice of the batch rolls out exactly as it does
inside the whole batch (what a rank of a distributed run sees)."""

import pytest
import torch

from g2rpo.advantages import Advantages
from g2rpo.algos import DGPO, G2RPO, DanceGRPO
from g2rpo.randomness import GROUP, SAMPLE, keyed
from g2rpo.rollout import ode_rollout, sde_rollout
from g2rpo.types import PromptBatch


def batch_of(groups: int = 2, size: int = 3) -> PromptBatch:
    prompts = ["a cat", "a dog", "a red cube"][:groups]
    return PromptBatch.from_groups(prompts, [{}] * groups, torch.arange(groups), torch.full((groups,), size))


def second_group(batch: PromptBatch) -> tuple[PromptBatch, torch.Tensor]:
    """The samples of group 1, as the rank holding it sees them."""
    rows = (batch.group_ids == 1).nonzero().flatten()
    return (
        PromptBatch(
            [batch.prompts[i] for i in rows.tolist()],
            [batch.metadata[i] for i in rows.tolist()],
            group_ids=batch.group_ids[rows],
            prompt_ids=batch.prompt_ids[rows],
            sample_ids=batch.sample_ids[rows],
        ),
        rows,
    )


def test_keyed_streams_depend_on_seed_stream_and_key_only():
    generator = torch.Generator().manual_seed(7)
    first = [torch.randn(3, generator=g) for g in keyed(generator, [0, 1, 2])]
    torch.rand(100, generator=generator)  # consuming the parent does not move its keyed streams
    again = [torch.randn(3, generator=g) for g in keyed(generator, [2, 1, 0])]
    assert torch.equal(first[0], again[2]) and torch.equal(first[2], again[0])
    assert not torch.equal(first[0], first[1])
    other_stream = torch.randn(3, generator=keyed(generator, [0], GROUP)[0])
    other_seed = torch.randn(3, generator=keyed(torch.Generator().manual_seed(8), [0], SAMPLE)[0])
    assert not torch.equal(first[0], other_stream) and not torch.equal(first[0], other_seed)


def test_sde_rollouts_do_not_depend_on_chunking_or_on_the_rest_of_the_batch(policy):
    batch = batch_of()
    settings = dict(
        num_steps=3, guidance_scale=1.0, noise_levels=torch.full((3,), 0.7), sde_type="sde",
        train_steps=torch.zeros(len(batch), 0, dtype=torch.long),
    )  # fmt: skip
    whole = sde_rollout(policy, batch, batch_size=6, generator=torch.Generator().manual_seed(0), **settings)
    chunked = sde_rollout(policy, batch, batch_size=2, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(chunked.latents, whole.latents, atol=1e-5, rtol=1e-5)
    part, rows = second_group(batch)
    settings["train_steps"] = settings["train_steps"][rows]
    alone = sde_rollout(policy, part, batch_size=4, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(alone.latents, whole.latents[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.log_probs, whole.log_probs[rows], atol=1e-4, rtol=1e-4)


def test_ode_rollouts_of_a_slice_match_the_whole_batch(policy):
    batch = batch_of()
    settings = dict(num_steps=3, guidance_scale=1.0, batch_size=4)
    whole = ode_rollout(policy, batch, generator=torch.Generator().manual_seed(0), **settings)
    part, rows = second_group(batch)
    alone = ode_rollout(policy, part, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(alone.samples, whole.samples[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm", [DanceGRPO(num_steps=3, rollout_batch_size=2), G2RPO(num_steps=4)])
def test_group_noise_and_choices_follow_the_group_not_the_batch(policy, algorithm):
    """DanceGRPO's shared initial noise and trained steps, G2RPO's anchors and branch noise."""
    batch = batch_of()
    whole = algorithm.rollout(policy, batch, torch.Generator().manual_seed(0))
    part, rows = second_group(batch)
    alone = algorithm.rollout(policy, part, torch.Generator().manual_seed(0))
    if isinstance(algorithm, DanceGRPO):
        torch.testing.assert_close(alone.latents, whole.latents[rows], atol=1e-5, rtol=1e-5)
        assert torch.equal(alone.train_steps, whole.train_steps[rows])
    else:
        torch.testing.assert_close(alone.anchors[0], whole.anchors[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.branches[:, :], whole.branches[:, rows], atol=1e-5, rtol=1e-5)


def test_dgpo_training_noise_follows_the_group(policy):
    algorithm = DGPO(num_steps=3, max_timestep_index=2, num_train_timesteps=2, text_dropout=0.5)
    batch = batch_of()
    whole = algorithm.rollout(policy, batch, torch.Generator().manual_seed(0))
    part, rows = second_group(batch)
    alone = algorithm.rollout(policy, part, torch.Generator().manual_seed(0))

    def units(rollout):
        n = len(rollout)
        advantages = Advantages(
            values=torch.linspace(-1, 1, n), valid=torch.ones(n, dtype=torch.bool),
            zero_std=torch.zeros(n, dtype=torch.bool), train_mask=torch.ones(n, dtype=torch.bool),
            num_groups=2, num_zero_std_groups=0,
        )  # fmt: skip
        steps = algorithm.minibatches(rollout, advantages, torch.Generator().manual_seed(1))
        return {(unit.sigma, int(rollout.scored.sample_ids[i])): (unit.noise[j], bool(unit.text_dropped[j]))
                for step in steps for unit in step for j, i in enumerate(unit.samples.tolist())}  # fmt: skip

    expected, got = units(whole), units(alone)
    assert got.keys() <= expected.keys() and len(got) == 2 * len(rows)
    for key, (noise, dropped) in got.items():
        assert torch.equal(noise, expected[key][0]) and dropped == expected[key][1]
