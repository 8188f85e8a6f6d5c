"""The shapes judge (UniPic's Skywork-ImgReward recipe): verdict parsing, the pairwise-to-per-image reward
rule, the compare task's log-probs, its preference data, one GRPO iteration of the judge, the judge as an
image reward under Flow-GRPO, and the unified model's answer and image paths left as they were."""

from pathlib import Path

import pytest
import torch

from g2rpo.loggers import read_metrics
from g2rpo.randomness import TOKEN, keyed
from g2rpo.rewards.preference import (
    PairwiseJudgeReward,
    RankingCorrect,
    VerdictFormat,
    exact_format,
    parse_verdict,
)
from g2rpo.run import train
from g2rpo.shapes.judge_pairs import judge_pairs
from g2rpo.shapes.policy import UnifiedPolicy, heldout_questions
from g2rpo.shapes.prompts import split
from g2rpo.shapes.unified import JUDGE_TOKENS, load_unified_model, unified_model, with_judge_tokens

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
# greedy answers of the shipped unified model to heldout_questions(2, seed=7), recorded with main's code
# before the judge tokens existed (commit c0f16f7)
SHIPPED_GREEDY = ["one", "one", "blue", "blue", "square", "triangle", "above", "left", "yes", "no"]
CAPTIONS = ["a photo of a red circle", "a photo of two squares", "a photo of a circle left of a square"]


@pytest.mark.parametrize(
    "text, verdict, exact",
    [
        ("<answer>A</answer>", "A", True),
        ("<answer>B</answer>", "B", True),
        ("<answer> b </answer>", "B", False),  # read, but not the exact format
        ("I think <answer>A</answer> because", "A", False),
        ("<answer>A</answer><answer>B</answer>", "A", False),  # the first verdict counts
        ("<answer>C</answer>", None, False),
        ("<answer>AB</answer>", None, False),
        ("A", None, False),
        ("<answer>A", None, False),
        ("", None, False),
    ],
)
def test_verdicts_are_parsed_and_the_format_is_exact(text, verdict, exact):
    assert parse_verdict(text) == verdict
    assert exact_format(text) is exact


def test_ranking_and_format_rewards():
    texts = ["<answer>A</answer>", "<answer> B</answer>", "circle", "<answer>B</answer>"]
    metadata = [{"preferred": "A"}, {"preferred": "B"}, {"preferred": "A"}, {}]
    ranking = RankingCorrect()(texts, [""] * 4, metadata)
    assert ranking[:3].tolist() == [1.0, 1.0, 0.0] and ranking[3].isnan()
    assert VerdictFormat()(texts, [""] * 4, metadata).tolist() == [1.0, 0.0, 0.0, 1.0]


class FakeJudge:
    """Each image's quality is its mean pixel; ``P(A) = sigmoid(scale (q_A - q_B) + bias)`` (``bias``: a
    preference for whatever is shown first). Records the pairs it was asked about."""

    def __init__(self, bias: float = 0.0, scale: float = 4.0) -> None:
        self.bias, self.scale, self.calls = bias, scale, []

    def prefer(self, images, others, prompts):
        self.calls.append(len(prompts))
        quality, other = images.mean((1, 2, 3)), others.mean((1, 2, 3))
        return torch.sigmoid(self.scale * (quality - other) + self.bias)


def flat_images(values):
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4).contiguous()


def test_win_rates_within_groups_cancel_the_position_bias():
    values = [0.1, 0.5, 0.9, 0.3, 0.7, 0.2]
    prompts = ["x", "x", "x", "y", "y", "z"]
    images = flat_images(values)
    fair = PairwiseJudgeReward(FakeJudge())(images, prompts, [{}] * 6)

    def q(i, j, bias=0.0):  # the debiased probability that i beats j
        forward = torch.sigmoid(torch.tensor(4.0 * (values[i] - values[j]) + bias))
        backward = torch.sigmoid(torch.tensor(4.0 * (values[j] - values[i]) + bias))
        return float((forward + 1 - backward) / 2)

    expected = [
        (q(0, 1) + q(0, 2)) / 2,
        (q(1, 0) + q(1, 2)) / 2,
        (q(2, 0) + q(2, 1)) / 2,
        q(3, 4),
        q(4, 3),
        0.5,  # alone in its group
    ]
    torch.testing.assert_close(fair, torch.tensor(expected), rtol=0, atol=1e-6)
    assert fair[0] < fair[1] < fair[2] and fair[3] < fair[4]
    # a judge biased towards A: both orders cancel the bias's sign, the ranking within each group is kept
    biased = PairwiseJudgeReward(FakeJudge(bias=2.0))(images, prompts, [{}] * 6)
    assert biased[0] < biased[1] < biased[2] and biased[3] < biased[4] and biased[5] == 0.5
    assert biased[3] + biased[4] == pytest.approx(1.0)  # a pair's two debiased probabilities sum to 1
    # a judge that always says A (whatever it is shown) gives every image a draw
    always_a = FakeJudge(bias=50.0, scale=0.0)
    torch.testing.assert_close(
        PairwiseJudgeReward(always_a)(images, prompts, [{}] * 6), torch.full((6,), 0.5)
    )


def test_opponents_are_limited_and_drawn_deterministically():
    prompts = ["x"] * 8
    everyone = PairwiseJudgeReward(FakeJudge()).pairs(prompts)
    assert len(everyone) == 28  # 8 choose 2, each judged in both orders
    judge = FakeJudge()
    reward = PairwiseJudgeReward(judge, max_opponents=2, batch_size=5, seed=3)
    chosen = reward.pairs(prompts)
    assert chosen == PairwiseJudgeReward(FakeJudge(), max_opponents=2, seed=3).pairs(prompts)
    assert 8 <= len(chosen) <= 16 and set(chosen) <= set(everyone)
    assert all(sum(i in pair for pair in chosen) >= 2 for i in range(8))  # every image plays 2 or more
    scores = reward(flat_images([i / 8 for i in range(8)]), prompts, [{}] * 8)
    assert scores.shape == (8,) and sum(judge.calls) == 2 * len(chosen) and max(judge.calls) <= 5
    with pytest.raises(ValueError, match="max_opponents"):
        PairwiseJudgeReward(FakeJudge(), max_opponents=0)


def tiny_judge(seed: int = 0) -> UnifiedPolicy:
    return UnifiedPolicy(with_judge_tokens(unified_model(seed=seed, **TINY), seed=seed))


def compare_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand(batch, 3, 32, 32, generator=generator),
        "other_images": torch.rand(batch, 3, 32, 32, generator=generator),
        "questions": CAPTIONS[:batch],
    }


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_compare_log_probs_recomputed_equal_the_sampled_ones(temperature):
    policy = tiny_judge()
    generators = keyed(torch.Generator().manual_seed(0), [0, 1, 2], TOKEN)
    rollout = policy.sample_tokens("compare", compare_inputs(), generators, temperature=temperature)
    assert rollout.task == "compare" and rollout.mask[:, 0].all() and len(rollout.texts) == 3
    recomputed = policy.token_log_probs(rollout)
    gap = (recomputed - rollout.log_probs).abs().max()
    assert gap < 1e-5
    recomputed.sum().backward()
    assert policy.model.image_index.grad is not None  # the two images are told apart by a trained row
    # the images matter, and which is A matters: swapping them changes the verdict's distribution
    swapped = {**compare_inputs(), "images": compare_inputs()["other_images"]}
    swapped["other_images"] = compare_inputs()["images"]
    rows = [policy.model.judge_prefix(c) for c in CAPTIONS]
    offsets = torch.tensor([len(r) - 1 for r in rows])[:, None]
    with torch.no_grad():
        policy.model.image_index.add_(torch.randn_like(policy.model.image_index))
        first, _ = policy._context("compare", compare_inputs())
        second, _ = policy._context("compare", swapped)
        assert (
            policy._logits_at(first, rows, offsets) - policy._logits_at(second, rows, offsets)
        ).abs().max() > 1e-4


def test_verdicts_decode_without_spaces_and_a_model_without_judge_tokens_refuses():
    model = tiny_judge().model
    assert model.decode_verdict(model.verdict_ids("B")) == "<answer>B</answer>"
    assert exact_format(model.decode_verdict(model.verdict_ids("A")))
    plain = UnifiedPolicy(unified_model(seed=0, **TINY))
    with pytest.raises(ValueError, match="judge tokens"):
        plain.sample_tokens("compare", compare_inputs(1), [torch.Generator()])
    with pytest.raises(ValueError, match="already"):
        with_judge_tokens(model)


def test_judge_tokens_leave_the_answer_and_image_paths_as_they_were():
    shipped = load_unified_model()
    assert len(shipped.tokenizer) == 45 and not shipped.judges
    assert "image_index" not in shipped.state_dict()
    judge = with_judge_tokens(shipped)
    assert len(judge.tokenizer) == 45 + len(JUDGE_TOKENS)
    assert judge.tokenizer.convert_ids_to_tokens(list(range(45))) == shipped.tokenizer.convert_ids_to_tokens(
        list(range(45))
    )
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.tensor([shipped.question_prefix("what colour is the square")] * 2)
    captions = shipped.caption_ids(CAPTIONS[:2])
    sigma = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(judge.answer_logits(pixels, ids)[..., :45], shipped.answer_logits(pixels, ids))
        assert torch.equal(judge.velocity(captions, pixels, sigma), shipped.velocity(captions, pixels, sigma))
    # the shipped weights answer exactly as before the judge existed (greedy answers recorded on main)
    items = heldout_questions(2, seed=7)
    rollout = UnifiedPolicy(shipped).sample_tokens(
        "answer",
        {"images": torch.stack([i["image"] for i in items]), "questions": [i["question"] for i in items]},
        [torch.Generator() for _ in items],
        temperature=0.0,
    )
    assert rollout.texts == SHIPPED_GREEDY


def test_judge_pairs_are_deterministic_labelled_by_the_detector_and_split_by_composition():
    train_pairs, again = judge_pairs("train", 24, seed=1), judge_pairs("train", 24, seed=1)
    assert train_pairs.prompts == again.prompts
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(train_pairs.metadata, again.metadata))
    for meta in train_pairs.metadata:
        a, b = meta["scores"]
        assert abs(a - b) >= 0.1 and meta["preferred"] == ("A" if a > b else "B")
    assert {m["preferred"] for m in train_pairs.metadata} == {"A", "B"}
    heldout = judge_pairs("heldout", 24, seed=1)
    held = {m["prompt"] for task in split("heldout").values() for m in task}
    seen = {m["prompt"] for task in split("train").values() for m in task}
    assert set(heldout.prompts) <= held and set(train_pairs.prompts) <= seen
    assert all(p not in seen or p.split()[-1] in ("circle", "square", "triangle") for p in heldout.prompts)
    with pytest.raises(ValueError, match="split_name"):
        judge_pairs("all", 4)


def test_one_token_grpo_iteration_of_the_judge(compose_config):
    cfg = compose_config(
        "experiment=judge_grpo",
        "data.num_pairs=8",
        "logger=none",
        "trainer.max_epochs=1",
        "curriculum.prompts_per_iteration=2",
        "curriculum.group_size=4",
        "algo.rollout_batch_size=4",
    )
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert 0.0 <= record["reward/ranking/mean"] <= 1.0 and 0.0 <= record["reward/format/mean"] <= 1.0
    assert record["train/logprob_gap_before_update"] < 1e-4
    assert record["train/optimizer_steps"] >= 1
    assert (Path(cfg.run_dir) / "policy" / "model.safetensors").is_file()


def test_flow_grpo_trains_the_shapes_base_on_the_judge_reward(compose_config):
    cfg = compose_config(
        "experiment=quickstart",
        "reward=judge",
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "curriculum.prompts_per_iteration=2",
        "curriculum.group_size=4",
        "algo.num_steps=4",
        "callbacks.evaluate=null",
    )
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert 0.0 <= record["reward/judge/mean"] <= 1.0
    assert record["reward/judge/std"] > 0  # the judge tells the images of a group apart
    assert record["train/optimizer_steps"] >= 1
