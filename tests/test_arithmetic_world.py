"""The arithmetic world (g2rpo/reasoning): problems are deterministic and their worked answers right, the
held-out split never repeats a training question, the character tokenizer and chat template write what the
RL side expects, and the shipped model is the one its training.json describes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from g2rpo.reasoning.arithmetic import (
    CAPS,
    EOS,
    LEVELS,
    MAX_LENGTH,
    WEIGHTS,
    arithmetic_dataset,
    arithmetic_tokenizer,
    boxed_answer,
    is_correct,
    load_arithmetic_lm,
    make_problems,
    solution_steps,
    split_of,
    tiny_lm,
)
from g2rpo.reasoning.training import chat_prompt, encode, generate, pretrain, tensors

APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_problems_are_deterministic_and_extend():
    first = make_problems(30, seed=3)
    assert first == make_problems(30, seed=3)
    assert make_problems(10, seed=3) == first[:10]
    assert [p["prompt"] for p in make_problems(30, seed=4)] != [p["prompt"] for p in first]


def test_worked_answers_are_right():
    """Re-evaluate every step: it starts from the stated amount, chains, stays in [0, cap], uses an operand
    the question states, and the box holds the last result, which is the answer."""
    for problem in make_problems(300, seed=0):
        steps = solution_steps(problem["solution"])
        level, prompt = problem["level"], problem["prompt"]
        assert len(steps) == level
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        assert re.search(rf"\bhas {steps[0][0]}\b", prompt)
        value = steps[0][0]
        for a, op, b, result in steps:
            assert a == value
            assert APPLY[op](a, b) == result
            assert 0 <= result <= CAPS[level] and b in numbers
            value = result
        assert problem["answer"] == str(value) == boxed_answer(problem["solution"])
        assert problem["solution"].endswith(f"\\boxed{{{value}}}")


def test_levels_are_balanced_and_bounded():
    problems = make_problems(10 * len(LEVELS), seed=1)
    assert [p["level"] for p in problems] == [*LEVELS] * 10
    assert {p["level"] for p in make_problems(8, seed=1, levels=(2, 4))} == {2, 4}
    tokenizer = arithmetic_tokenizer()
    longest = max(len(ids) for ids, _ in encode(tokenizer, make_problems(200, seed=2, levels=(max(LEVELS),))))
    assert longest <= MAX_LENGTH
    with pytest.raises(ValueError, match="levels"):
        make_problems(1, levels=(0,))
    with pytest.raises(ValueError, match="split"):
        make_problems(1, split="test")


def test_heldout_never_repeats_a_training_question():
    train = arithmetic_dataset("train", count=3000, seed=0)
    heldout = arithmetic_dataset("heldout", count=500, seed=0)
    assert not set(train.prompts) & set(heldout.prompts)
    assert {split_of(p) for p in train.prompts} == {"train"}
    assert {split_of(p) for p in heldout.prompts} == {"heldout"}
    assert all(set(m) == {"answer", "level"} for m in [*train.metadata, *heldout.metadata])
    assert {m["level"] for m in heldout.metadata} == set(LEVELS)
    first = make_problems(50, 0, split="heldout")
    assert [p["prompt"] for p in first] == heldout.prompts[:50]


def test_tokenizer_round_trips_and_renders_the_chat_template():
    tokenizer = arithmetic_tokenizer()
    for problem in make_problems(50, seed=5):
        for text in (problem["prompt"], problem["solution"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
    question = "Ann has 3 apples. She buys 4 more. How many apples now?"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert text == f"<bos><|user|>{question}<|assistant|>" == chat_prompt(tokenizer, question)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["<bos>", "<|user|>"])
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>") and len(ids) == len(question) + 3
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": "3+4=7\n\\boxed{7}"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False).endswith("<|assistant|>3+4=7\n\\boxed{7}<eos>")
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("<pad>", EOS, "left")


def test_answers_are_checked_by_their_last_box():
    assert is_correct("3+4=7\n\\boxed{7}", "7") and is_correct("\\boxed{ 07 }", "7")
    assert not is_correct("7", "7") and not is_correct("\\boxed{-7}", "7")
    assert boxed_answer("\\boxed{1} then \\boxed{2}") == "2" and boxed_answer("no box") is None


def test_training_labels_are_the_answer_tokens_only():
    tokenizer = arithmetic_tokenizer()
    problems = make_problems(4, seed=0)
    examples = encode(tokenizer, problems)
    ids, labels = tensors(examples, tokenizer.pad_token_id)
    for row, problem in enumerate(problems):
        kept = labels[row][labels[row] != -100].tolist()
        assert tokenizer.decode(kept, skip_special_tokens=False) == problem["solution"] + EOS
        position = (labels[row] != -100).nonzero()[0].item()
        assert tokenizer.decode(ids[row, : position + 1]) == chat_prompt(tokenizer, problem["prompt"])


def test_tiny_lm_builds_trains_and_generates():
    model, tokenizer = tiny_lm(seed=0)
    again, _ = tiny_lm(seed=0)
    other, _ = tiny_lm(seed=1)
    assert model.config.vocab_size == len(tokenizer) and model.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, again.model.embed_tokens.weight)
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    losses = pretrain(model, tokenizer, steps=3, batch_size=4, lr=1e-3, warmup=1, levels=(1,), seed=0)
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    texts = generate(model, tokenizer, ["Ann has 3 apples. How many apples now?"], 2, True, 5)
    assert len(texts) == 2 and all(len(t) <= 5 for t in texts)


@pytest.mark.skipif(not (WEIGHTS / "config.json").is_file(), reason="no shipped arithmetic model")
def test_shipped_model_matches_its_card():
    info = json.loads((WEIGHTS / "training.json").read_text())
    model, tokenizer = load_arithmetic_lm()
    config = model.config
    described = info["model"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        described["hidden_size"],
        described["num_layers"],
        described["num_heads"],
    )
    assert sum(p.numel() for p in model.parameters()) == described["parameters"]
    assert tokenizer.get_vocab() == arithmetic_tokenizer().get_vocab()
    assert tokenizer.chat_template == arithmetic_tokenizer().chat_template
    assert tokenizer.eos_token_id == info["eos_id"] == model.generation_config.eos_token_id
    assert set(info["heldout"]) == {str(level) for level in info["settings"]["levels"]}
    problems = make_problems(12, seed=7, levels=(1,), split="heldout")
    answers = generate(model, tokenizer, [p["prompt"] for p in problems], 1, False, 24)
    assert sum(is_correct(a, p["answer"]) for a, p in zip(answers, problems)) >= 6
