"""Group-relative advantages over group_ids (brief sections 2.4, 3.2, 3.3)."""

import math

import pytest
import torch

from g2rpo.advantages import GroupNormalization, compute_advantages
from g2rpo.types import Groups, RewardOutput


def advantages_of(values, groups, aggregate="reward", **norm):
    scores = values if isinstance(values, dict) else {"r": torch.tensor(values, dtype=torch.float32)}
    rewards = RewardOutput(scores=scores, weights={k: 1.0 for k in scores}, aggregate=aggregate)
    return compute_advantages(rewards, Groups.of(torch.tensor(groups)), GroupNormalization(**norm))


def test_group_std_matches_hand_computation():
    out = advantages_of([1.0, 2.0, 3.0, 5.0], [0, 0, 1, 1], std="group", eps=0.0)
    assert out.values.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])


def test_global_std_uses_the_whole_batch():
    rewards = [1.0, 2.0, 3.0, 5.0]
    out = advantages_of(rewards, [0, 0, 1, 1], std="global", eps=1e-4)
    batch_std = torch.tensor(rewards).std(correction=0).item()
    expected = [-0.5, 0.5, -1.0, 1.0]
    assert out.values.tolist() == pytest.approx([e / (batch_std + 1e-4) for e in expected], rel=1e-6)


def test_unbiased_std_divides_by_n_minus_one():
    out = advantages_of([1.0, 3.0], [0, 0], std="group", eps=0.0, unbiased=True)
    assert out.values.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_zero_std_group_gets_zero_advantage_and_is_reported(std):
    out = advantages_of([0.3, 0.3, 0.3, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1, 1], std=std, eps=0.0)
    assert not torch.isnan(out.values).any()
    assert out.values[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.zero_std.tolist() == [True] * 3 + [False] * 3
    assert out.num_zero_std_groups == 1 and out.metrics()["advantage/zero_std_frac"] == 0.5
    assert out.train_mask.tolist() == [False] * 3 + [True] * 3


def test_zero_std_groups_are_kept_when_not_dropping():
    out = advantages_of([0.3, 0.3, 0.0, 1.0], [0, 0, 1, 1], drop_zero_std=False)
    assert out.train_mask.all()


def test_group_advantages_sum_to_zero_for_variable_group_sizes():
    generator = torch.Generator().manual_seed(0)
    groups = torch.repeat_interleave(torch.arange(4), torch.tensor([2, 3, 5, 7]))
    rewards = torch.randn(len(groups), generator=generator).tolist()
    out = advantages_of(rewards, groups.tolist(), std="group", clip=100.0)
    sums = torch.zeros(4).index_add_(0, groups, out.values)
    assert sums.abs().max() < 1e-5


def test_nan_rewards_are_left_out_of_the_statistics():
    out = advantages_of([1.0, 3.0, float("nan"), 5.0, 7.0], [0, 0, 0, 1, 1], std="group", eps=0.0)
    assert out.valid.tolist() == [True, True, False, True, True]
    assert out.values.tolist() == pytest.approx([-1.0, 1.0, 0.0, -1.0, 1.0])
    assert not out.train_mask[2]
    assert out.metrics()["reward/invalid_count"] == 1


def test_advantages_are_clipped():
    rewards = [0.0] * 9 + [1.0]
    out = advantages_of(rewards, [0] * 10, std="group", eps=0.0, clip=2.0)
    assert out.values.max().item() == 2.0  # unclipped it would be 3.0


def test_group_ids_need_not_be_contiguous():
    a = advantages_of([1.0, 2.0, 3.0, 5.0], [7, 7, 3, 3], std="group", eps=0.0)
    b = advantages_of([1.0, 2.0, 3.0, 5.0], [0, 0, 1, 1], std="group", eps=0.0)
    torch.testing.assert_close(a.values, b.values)


def test_advantage_aggregation_normalises_each_reward_then_sums():
    big = torch.tensor([0.0, 100.0, 0.0, 100.0])  # a reward on a large scale
    small = torch.tensor([1.0, 0.0, 0.0, 1.0])  # and one on a small scale, disagreeing in group 0
    summed_rewards = advantages_of({"big": big, "small": small}, [0, 0, 1, 1], std="group", eps=0.0)
    summed_advantages = advantages_of(
        {"big": big, "small": small}, [0, 0, 1, 1], aggregate="advantage", std="group", eps=0.0
    )
    assert summed_rewards.values.tolist() == pytest.approx([-1, 1, -1, 1])  # the big reward dominates
    assert summed_advantages.values.tolist() == pytest.approx([0, 0, -2, 2])  # equal say per reward


def test_advantage_aggregation_flags_groups_flat_in_every_reward():
    flat_in_one = {"a": torch.tensor([1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 2.0, 2.0])}
    out = advantages_of(flat_in_one, [0, 0, 1, 1], aggregate="advantage")
    assert out.zero_std.tolist() == [False, False, True, True]


def test_invalid_std_mode_lists_the_choices():
    with pytest.raises(ValueError, match="group, global, none"):
        GroupNormalization(std="batch")
