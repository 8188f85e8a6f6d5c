"""Token GRPO's math: token log-probs, the clipped per-token surrogate and its two aggregations, the KL."""

import math
from types import SimpleNamespace

import pytest
import torch

from g2rpo.algos.token_grpo import TokenGRPO, aggregate, clipped_token_loss, masked_log_probs, token_kl
from g2rpo.policies.tokens import TokenRollout
from g2rpo.types import PromptBatch, RewardOutput


def test_masked_log_probs_pick_the_tempered_token_probability():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    tokens = torch.tensor([[0, 2]])
    mask = torch.tensor([[True, False]])
    got = masked_log_probs(logits, tokens, mask, temperature=2.0)
    expected = torch.log_softmax(logits[0, 0] / 2.0, dim=-1)[0]
    assert got[0, 0] == pytest.approx(expected.item())
    assert got[0, 1] == 0.0


def test_aggregations_weigh_tokens_or_sequences():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx(8.0 / 5.0)  # every token alike
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx((1.0 + 4.0) / 2.0)


def test_on_policy_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    old = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    log_probs = old.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics = clipped_token_loss(log_probs, old, advantages, mask, clip_range=0.2, aggregation="token")
    assert metrics["ratio"].item() == pytest.approx(1.0)
    assert metrics["logprob_gap"].item() == 0.0 and metrics["clipfrac"].item() == 0.0
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at logp = old is -A, averaged over the 3 generated tokens
    expected = torch.tensor([[-1.0, -1.0, 0.0], [2.0, 0.0, 0.0]]) / 3
    assert torch.allclose(log_probs.grad, expected)


def test_the_clip_stops_the_gradient_once_the_ratio_leaves_the_trust_region():
    old = torch.zeros(1, 2)
    log_probs = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = clipped_token_loss(log_probs, old, torch.tensor([1.0]), mask, clip_range=0.2)
    loss.backward()
    # A > 0: a ratio above 1 + eps is clipped (no gradient); one below 1 - eps keeps pushing up
    assert log_probs.grad[0, 0] == 0.0 and log_probs.grad[0, 1] < 0
    assert metrics["clipfrac"].item() == 1.0


def test_token_kl_is_zero_at_the_reference_and_positive_elsewhere():
    log_probs = torch.tensor([-1.0, -0.2])
    assert torch.allclose(token_kl(log_probs, log_probs), torch.zeros(2))
    assert (token_kl(log_probs, torch.tensor([-0.5, -1.0])) > 0).all()


def test_rollouts_concatenate_with_padding_and_select_rows():
    def part(length, text):
        return TokenRollout(
            task="answer",
            inputs={"images": torch.zeros(1, 3, 2, 2), "questions": [text]},
            tokens=torch.ones(1, length, dtype=torch.long),
            mask=torch.ones(1, length, dtype=torch.bool),
            log_probs=-torch.ones(1, length),
            texts=[text],
        )

    both = TokenRollout.cat([part(1, "a"), part(3, "b")])
    assert both.tokens.shape == (2, 3) and both.mask.sum().item() == 4
    assert both.log_probs[0, 1:].eq(0).all() and both.texts == ["a", "b"]
    picked = both.select(torch.tensor([1]))
    assert picked.inputs["questions"] == ["b"] and picked.tokens.shape == (1, 3)


def test_invalid_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="token, sequence"):
        TokenGRPO(aggregation="mean")
    with pytest.raises(ValueError, match="answer, image"):
        TokenGRPO(task="caption")
    with pytest.raises(ValueError, match="exact, padded"):
        TokenGRPO(micro_batches="pad")


@pytest.mark.parametrize(("mode", "sizes"), [("exact", [3, 3]), ("padded", [4, 4])])
def test_micro_batches_train_the_kept_sequences_or_pad_them_to_the_rollout_shape(mode, sizes):
    """3 groups of 3, one with equal rewards: 6 kept sequences in micro-batches of at most 4."""
    algo = TokenGRPO(rollout_batch_size=4, micro_batches=mode)
    batch = PromptBatch.from_groups(["a", "b", "c"], [{}] * 3, torch.arange(3), torch.full((3,), 3))
    rewards = RewardOutput({"r": torch.tensor([1.0, 0, 1, 1, 1, 1, 0, 0, 1])}, {"r": 1.0})
    advantages = algo.advantages(rewards, SimpleNamespace(scored=batch))
    units = [u for step in algo.minibatches(None, advantages, torch.Generator().manual_seed(0)) for u in step]
    assert sorted(len(u.samples) for u in units) == sizes
    kept = set(advantages.train_mask.nonzero().flatten().tolist())
    assert kept <= {i for u in units for i in u.samples.tolist()}
