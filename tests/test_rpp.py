"""REINFORCE++ (algo=rpp): token returns with the KL in the reward, batch whitening and the dual clip, against
hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from g2rpo.algos.rpp import REINFORCEPlusPlus, token_returns, whiten
from g2rpo.algos.token_grpo import clipped_token_loss
from g2rpo.types import PromptBatch, RewardOutput, TokenRollout

MASK = torch.tensor([[True, True, True], [True, True, False]])
KL = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 9.0]])  # 9.0 sits after the second sequence's end


def test_returns_subtract_the_kl_still_to_come():
    returns = token_returns(torch.tensor([1.0, 0.0]), KL, MASK, kl_coef=0.5)
    # r - 0.5 * sum_{s >= t} KL_s: 1 - 0.5*0.6, 1 - 0.5*0.5, 1 - 0.5*0.3 | 0 - 0.5*0.5, 0 - 0, (after the end)
    expected = torch.tensor([[0.7, 0.75, 0.85], [-0.25, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(returns, expected)


def test_whitening_is_over_every_generated_token_of_the_batch():
    returns = torch.tensor([[0.7, 0.75, 0.85], [-0.25, 0.0, 123.0]], dtype=torch.float64)
    values = [0.7, 0.75, 0.85, -0.25, 0.0]
    mean = sum(values) / 5  # 0.41
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4 + 1e-8)  # unbiased, as verl's masked_whiten
    expected = torch.tensor(
        [[(v - mean) / std for v in values[:3]], [(v - mean) / std for v in values[3:]] + [0]]
    )
    assert torch.allclose(whiten(returns, MASK), expected.double())


def test_dual_clip_bounds_a_negative_advantage():
    ratio = torch.tensor([[5.0, 5.0, 2.0]])
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[-1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    per_token = []
    for t in range(3):  # one token at a time, so the token mean is the token's own loss
        loss, _ = clipped_token_loss(
            ratio.log()[:, t : t + 1], old[:, t : t + 1], advantages[:, t : t + 1], mask[:, t : t + 1], 0.2,
            dual_clip=3.0,
        )  # fmt: skip
        per_token.append(float(loss))
    # A<0, rho=5: max(5, 1.2) = 5, bounded by c=3; A>0: min(rho A, 1.2 A) as PPO; A<0, rho=2: 2 < 3 stays
    assert per_token == pytest.approx([3.0, -1.2, 2.0])
    unbounded, _ = clipped_token_loss(ratio.log()[:, :1], old[:, :1], advantages[:, :1], mask[:, :1], 0.2)
    assert float(unbounded) == pytest.approx(5.0)


def rollout(rewards_per_group: list[list[float]]) -> tuple[TokenRollout, RewardOutput]:
    sizes = torch.tensor([len(g) for g in rewards_per_group])
    batch = PromptBatch.from_groups(
        [f"q{i}" for i in range(len(sizes))], [{} for _ in sizes], torch.arange(len(sizes)), sizes
    )
    n = int(sizes.sum())
    log_probs = torch.full((n, 2), -1.0)
    result = TokenRollout(
        task="text",
        inputs={"questions": batch.prompts},
        tokens=torch.zeros(n, 2, dtype=torch.long),
        mask=torch.ones(n, 2, dtype=torch.bool),
        log_probs=log_probs,
        extras={"ref_log_probs": log_probs - 0.25},  # KL_t = 0.25 on every token
        scored=batch,
    )
    total = torch.tensor([r for g in rewards_per_group for r in g])
    return result, RewardOutput(scores={"math_verify": total}, weights={"math_verify": 1.0})


def test_advantages_end_to_end_and_the_group_baseline():
    sampled, rewards = rollout([[1.0, 1.0], [0.0, 1.0]])
    algo = REINFORCEPlusPlus(kl_reward_coef=0.4)
    advantages = algo.advantages(rewards, sampled)
    # returns: r - 0.4 * 0.25 * (tokens to go) -> [r - 0.2, r - 0.1] per sequence
    returns = torch.tensor([[0.8, 0.9], [0.8, 0.9], [-0.2, -0.1], [0.8, 0.9]], dtype=torch.float64)
    assert torch.allclose(advantages.values.double(), whiten(returns, sampled.mask), atol=1e-6)
    # an all-correct group still trains: its advantage is against the batch, not the group
    assert advantages.train_mask.all() and advantages.values[:2].abs().sum() > 0
    grouped = REINFORCEPlusPlus(kl_reward_coef=0.0, baseline="group").advantages(rewards, sampled)
    # the all-correct group's returns are 0 after its mean, and stay near 0 after the batch whitening
    assert torch.allclose(grouped.values[:2], torch.zeros(2, 2))
    assert grouped.values[2, 0] < 0 < grouped.values[3, 0]


def test_nan_rewards_are_left_out_of_the_statistics():
    sampled, rewards = rollout([[1.0, float("nan")], [0.0, 1.0]])
    advantages = REINFORCEPlusPlus(kl_reward_coef=0.0).advantages(rewards, sampled)
    assert not advantages.valid[1] and not advantages.train_mask[1]
    assert torch.equal(advantages.values[1], torch.zeros(2))
    kept = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(
        advantages.values[[0, 2, 3]].double(), whiten(kept, torch.ones(3, 2, dtype=torch.bool))
    )


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match="algo.baseline"):
        REINFORCEPlusPlus(baseline="mean")
    with pytest.raises(ValueError, match="algo.dual_clip"):
        REINFORCEPlusPlus(dual_clip=0.5)
    assert REINFORCEPlusPlus().uses_reference and not REINFORCEPlusPlus(kl_reward_coef=0).uses_reference
