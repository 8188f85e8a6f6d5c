"""The Qwen2.5-VL judge as a token policy, on a tiny random Qwen2.5-VL built in code (transformers' own model
and processor): per-sample decoding equal to the stock ``generate``, log-probs recomputed as sampled, token
GRPO training it on preference pairs, the reference, loading and export, the preference-pairs loader and the
judge's rewards."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image

import g2rpo.preflight as preflight
from g2rpo.algos.token_grpo import TokenGRPO
from g2rpo.data import preference_pairs
from g2rpo.loggers import read_metrics
from g2rpo.policies.qwen_vl import QwenVLJudgePolicy, load_qwen_vl
from g2rpo.policies.tiny import tiny_qwen_vl
from g2rpo.randomness import keyed
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.rewards.judge import VLMPairJudge
from g2rpo.rewards.preference import RankingCorrect, VerdictFormat
from g2rpo.run import train
from g2rpo.types import PromptBatch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to split over threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CAPTIONS = ["a cat", "two green dogs on a long blue mat", "x"]


def judge(lora: bool = True, **kwargs) -> QwenVLJudgePolicy:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]) if lora else None
    settings = {"image_size": 16, "max_new_tokens": 6, **kwargs}
    return QwenVLJudgePolicy(tiny_qwen_vl(seed=0), lora=config, **settings)


def generators(keys: list[int]) -> list[torch.Generator]:
    return keyed(torch.Generator().manual_seed(0), keys)


def compare_inputs(rows: list[int]) -> dict:
    images = torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(1))  # resized to 16 px
    others = torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    return {"images": images[rows], "other_images": others[rows], "questions": [CAPTIONS[i] for i in rows]}


def test_verdicts_are_per_sample_and_their_log_probs_are_recomputed_exactly():
    policy = judge()
    batch = policy.sample_tokens("compare", compare_inputs([0, 1, 2]), generators([0, 1, 2]))
    alone = policy.sample_tokens("compare", compare_inputs([1]), generators([1]))
    again = policy.sample_tokens("compare", compare_inputs([1]), generators([1]))
    assert torch.equal(alone.tokens, again.tokens)
    # sample 1 draws the same tokens alone and beside other (differently padded) prompts
    assert torch.equal(batch.tokens[1], alone.tokens[0]) and batch.texts[1] == alone.texts[0]
    torch.testing.assert_close(batch.log_probs[1], alone.log_probs[0], atol=1e-5, rtol=0)
    assert not torch.equal(batch.tokens[0], batch.tokens[1])
    assert (batch.log_probs[batch.mask] < 0).all()
    # the policy gradient's log-probs, recomputed in one forward, are the sampled ones (ratio 1)
    assert (policy.token_log_probs(batch) - batch.log_probs).abs().max() < 1e-5
    chosen = batch.select(torch.tensor([2, 0]))
    assert (policy.token_log_probs(chosen) - batch.log_probs[[2, 0]]).abs().max() < 1e-5
    # a different temperature gives other log-probs for the same tokens
    hot = policy.sample_tokens("compare", compare_inputs([1]), generators([1]), temperature=2.0)
    assert not torch.allclose(hot.log_probs[hot.mask], alone.log_probs[alone.mask])


def test_greedy_verdicts_and_log_probs_are_the_stock_model_s():
    """Temperature 0 decodes as transformers' ``generate`` (left-padded batch, its own RoPE positions), and
    the recomputed log-probs equal the stock forward's on prompt + answer."""
    policy = judge()
    inputs = compare_inputs([0, 1, 2])
    greedy = policy.sample_tokens("compare", inputs, generators([0, 1, 2]), temperature=0.0)
    other = policy.sample_tokens("compare", inputs, generators([7, 8, 9]), temperature=0.0)
    assert torch.equal(greedy.tokens, other.tokens)
    prompt = policy.prompts("compare", inputs)
    assert (prompt["input_ids"] == policy.model.config.image_token_id).sum() == 3 * 2 * 4  # A and B, 4 each
    length = greedy.tokens.shape[1]
    stock = policy.model.generate(**prompt, do_sample=False, max_new_tokens=length, min_new_tokens=length)
    assert torch.equal(stock[:, prompt["input_ids"].shape[1] :], greedy.tokens)
    policy.model.model.rope_deltas = None
    with torch.no_grad():
        logits = policy.model(
            input_ids=torch.cat([prompt["input_ids"], greedy.tokens], 1),
            attention_mask=torch.cat([prompt["attention_mask"], torch.ones_like(greedy.tokens)], 1),
            mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(greedy.tokens)], 1),
            pixel_values=prompt["pixel_values"],
            image_grid_thw=prompt["image_grid_thw"],
        ).logits
    start = prompt["input_ids"].shape[1]
    expected = torch.log_softmax(logits[:, start - 1 : -1].float(), -1).gather(-1, greedy.tokens[..., None])
    with torch.no_grad():
        torch.testing.assert_close(policy.token_log_probs(greedy), expected[..., 0], atol=1e-5, rtol=0)


def test_the_compare_prompt_labels_the_images_and_answer_reads_one():
    policy = judge()
    text = policy.processor.apply_chat_template(policy.conversation("compare", "a cat"), tokenize=False)
    assert text.index("Image A:") < text.index("<|image_pad|>") < text.index("Image B:")
    assert '"a cat"' in text and "<answer>A</answer>" in text
    with pytest.raises(ValueError, match="must contain \\{caption\\}"):
        judge(compare_instruction="Which one?")
    inputs = {key: value for key, value in compare_inputs([0, 1]).items() if key != "other_images"}
    answers = policy.sample_tokens("answer", inputs, generators([0, 1]))
    assert (
        policy.prompts("answer", inputs)["input_ids"] == policy.model.config.image_token_id
    ).sum() == 2 * 4
    assert (policy.token_log_probs(answers) - answers.log_probs).abs().max() < 1e-5
    with pytest.raises(ValueError, match="compare, answer"):
        policy.sample_tokens("image", {"prompts": CAPTIONS}, generators([0, 1, 2]))


def write_pairs(folder, lines: list) -> str:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(folder / name)
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


PAIR = {"caption": "a cat", "image_a": "a.png", "image_b": "b.png", "preferred": "A", "source": "pickapic"}


def test_preference_pairs_show_each_pair_both_ways_and_name_the_bad_line(tmp_path):
    path = write_pairs(tmp_path, [PAIR, "", {**PAIR, "caption": "a dog", "preferred": "B"}])
    data = preference_pairs(path, image_size=16)
    assert data.prompts == ["a cat", "a cat", "a dog", "a dog"]
    first, swapped = data.metadata[:2]
    assert (first["image"], first["other_image"]) == (str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert (swapped["image"], swapped["other_image"], swapped["preferred"]) == (
        first["other_image"], first["image"], "B"
    )  # fmt: skip
    assert first["source"] == "pickapic" and first["image_size"] == 16
    assert len(preference_pairs(path, both_orders=False)) == 2
    bad = [
        ({**PAIR, "preferred": "left"}, 'pairs.jsonl:3: "preferred" must be "A" or "B"'),
        ({key: v for key, v in PAIR.items() if key != "image_b"}, r"pairs.jsonl:3: .*missing \['image_b'\]"),
        ({**PAIR, "image_a": "gone.png"}, "pairs.jsonl:3: no image_a at .*gone.png"),
        ({**PAIR, "caption": ""}, 'pairs.jsonl:3: "caption" must be a non-empty string'),
        ("{not json", "pairs.jsonl:3: not a JSON object"),
    ]
    for line, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            preference_pairs(write_pairs(tmp_path, [PAIR, "", line]))


def test_the_judge_s_rewards_pay_the_preferred_verdict_and_its_format():
    texts = [
        "<answer>A</answer>",
        "A looks sharper. <answer>B</answer>",
        "<answer>A</answer> then <answer>B</answer>",
        "B",
    ]
    metadata = [{"preferred": "A"}, {"preferred": "B"}, {"preferred": "A"}, {"preferred": "B"}]
    reward = RewardEnsemble(
        {"ranking": RankingCorrect(), "format": VerdictFormat(reasoning=True)}, {"format": 0.5}
    )
    scores = reward(texts, ["a cat"] * 4, metadata)
    assert scores.scores["ranking"].tolist() == [1.0, 1.0, 1.0, 0.0]  # the first verdict counts
    assert scores.scores["format"].tolist() == [1.0, 1.0, 0.0, 0.0]  # one verdict, at the end
    assert VerdictFormat()(texts, [""] * 4, metadata).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_one_token_grpo_iteration_on_preference_pairs_trains_the_lora(tmp_path):
    policy = judge()
    data = preference_pairs(write_pairs(tmp_path, [PAIR, {**PAIR, "caption": "a dog"}]), image_size=16)
    batch = PromptBatch.from_groups(data.prompts, data.metadata, torch.arange(len(data)), torch.full((4,), 3))
    algo = TokenGRPO(task="compare", max_new_tokens=6, rollout_batch_size=5, num_minibatches=1, beta=0.04)
    policy.enable_reference()
    generator = torch.Generator().manual_seed(0)
    rollout = algo.rollout(policy, batch, generator)
    assert rollout.task == "compare" and len(rollout.texts) == 12
    assert rollout.inputs["other_images"].shape == (12, 3, 16, 16)

    def ascii_share(texts, prompts, metadata):  # varies between random answers, unlike the verdict rewards
        return torch.tensor([sum(c.isascii() for c in t) / max(len(t), 1) for t in texts])

    rewards = algo.score(RewardEnsemble({"ascii": ascii_share}), rollout)
    advantages = algo.advantages(rewards, rollout)
    assert advantages.train_mask.any()
    trainable = policy.trainable_parameters()
    assert trainable and all(
        "lora_" in name for name, p in policy.model.named_parameters() if p.requires_grad
    )
    before = [p.detach().clone() for p in trainable]
    frozen = policy.model.model.visual.patch_embed.proj.weight.detach().clone()
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    units = algo.minibatches(rollout, advantages, torch.Generator().manual_seed(1))[0]
    for unit in units:
        out = algo.loss(policy, rollout, advantages, unit)
        assert torch.isfinite(out.loss) and out.metrics["logprob_gap"] < 1e-5 and out.metrics["kl"] < 1e-6
        out.loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
    assert torch.equal(policy.model.model.visual.patch_embed.proj.weight, frozen)
    with torch.no_grad():
        after = policy.token_log_probs(rollout)
        with policy.reference():
            reference = policy.token_log_probs(rollout)
    torch.testing.assert_close(reference, rollout.log_probs, atol=1e-5, rtol=0)  # adapters off: the base
    # the step raised the likelihood of the better-than-average answers relative to the others
    gain = (after - rollout.log_probs).sum(-1)
    assert (advantages.values * gain).sum() > 0


def test_full_fine_tuning_trains_the_language_model_and_exports_a_checkpoint_load_qwen_vl_reads(tmp_path):
    policy = judge(lora=False)
    names = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert names and not any(name.startswith("model.visual.") for name in names)
    assert any(name.startswith("lm_head.") for name in names)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    policy.save_pretrained(tmp_path)
    loaded = load_qwen_vl(str(tmp_path), dtype="float32")
    reloaded = QwenVLJudgePolicy(loaded, lora=None, image_size=16, max_new_tokens=6)
    rollout = policy.sample_tokens("compare", compare_inputs([0, 2]), generators([0, 2]))
    again = reloaded.sample_tokens("compare", compare_inputs([0, 2]), generators([0, 2]))
    assert torch.equal(again.tokens, rollout.tokens) and again.texts == rollout.texts


def test_lora_export_loads_onto_the_base_model(tmp_path):
    policy = judge()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    policy.save_pretrained(tmp_path)
    base = tiny_qwen_vl(seed=0)
    base.model.load_adapter(str(tmp_path))
    rollout = policy.sample_tokens("compare", compare_inputs([0, 1]), generators([0, 1]))
    with torch.no_grad():
        loaded = QwenVLJudgePolicy(base, image_size=16).token_log_probs(rollout)
        untrained = judge().token_log_probs(rollout)
    torch.testing.assert_close(loaded, rollout.log_probs, atol=1e-5, rtol=0)
    assert not torch.allclose(untrained, rollout.log_probs, atol=1e-4)


def test_missing_weights_raise_with_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download Qwen/Qwen2.5-VL-7B-Instruct"):
        load_qwen_vl("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(FileNotFoundError, match="hf download"):
        load_qwen_vl(str(tmp_path / "nowhere"), dtype="float32")
    with pytest.raises(ValueError, match="multiple of 8"):
        judge(image_size=20)


class FakeChat:
    """Answers like a served judge: the verdict named by the caption ("prefer A" / "prefer B"), none for
    "mumble"; records the messages."""

    def __init__(self) -> None:
        self.messages = []

    def complete_all(self, messages: list) -> list:
        self.messages.extend(messages)
        answers = {"prefer A": "A is crisper. <answer>A</answer>", "prefer B": "<answer> b </answer>"}
        return [answers.get(message[-1]["text"].split('"')[1], "hmm") for message in messages]


def test_a_served_judge_is_asked_as_it_was_trained_and_its_verdicts_read():
    chat = FakeChat()
    served = VLMPairJudge(chat, instruction=judge().compare_instruction, image_size=16)
    images, others = compare_inputs([0, 1, 2])["images"], compare_inputs([0, 1, 2])["other_images"]
    preference = served.prefer(images, others, ["prefer A", "prefer B", "mumble"])
    assert preference.tolist() == [1.0, 0.0, 0.5]
    message = chat.messages[0]
    assert [part["type"] for part in message] == ["text", "image_url", "text", "image_url", "text"]
    assert (message[0]["text"], message[2]["text"]) == ("Image A:", "Image B:")
    # the same instruction text as the policy's own prompt
    template = judge().processor.apply_chat_template(
        judge().conversation("compare", "prefer A"), tokenize=False
    )
    assert message[-1]["text"] in template
    with pytest.raises(ValueError, match="caption"):
        VLMPairJudge(chat, instruction="Which one?")


def test_preflight_names_the_qwen_weights_and_the_gpu_before_anything_loads(compose_config):
    cfg = compose_config("experiment=paper_unipic_imgreward_qwen25vl", "trainer=cpu")
    found = " ".join(preflight.problems(cfg))
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct" in found and "trainer=cpu" in found
    assert preflight.problems(compose_config("model=tiny_qwen_vl")) == []


def test_the_preset_trains_the_tiny_judge_end_to_end_and_exports_its_adapter(compose_config, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = compose_config(
        "experiment=paper_unipic_imgreward_qwen25vl",
        "model=tiny_qwen_vl",
        "trainer=cpu",
        "logger=none",
        f"data.path={write_pairs(data, [PAIR, {**PAIR, 'caption': 'a dog', 'preferred': 'B'}])}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "curriculum.prompts_per_iteration=2",
        "curriculum.group_size=4",
        "algo.rollout_batch_size=4",
        # the random tiny model never writes a verdict: train flat groups too (advantage 0), so the step runs
        "algo.normalization.drop_zero_std=false",
    )
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert {"reward/ranking/mean", "reward/format/mean"} <= record.keys()
    assert record["train/optimizer_steps"] == 2 and record["train/logprob_gap_before_update"] < 1e-5
    assert record["train/kl"] < 1e-3  # beta 0.04: the reference (adapters off) is used
    assert (Path(cfg.run_dir) / "policy" / "adapter_model.safetensors").is_file()
