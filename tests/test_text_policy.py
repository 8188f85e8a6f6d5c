"""The text-only policy (a transformers causal LM) under token GRPO and REINFORCE++, with CurES's curriculum:
sampling that does not depend on the batch, on-policy ratios of exactly 1, the LoRA reference, and one
iteration of each algorithm end to end on ``model=tiny_lm``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from g2rpo.loggers import read_metrics
from g2rpo.policies.causal_lm import CausalLMPolicy, load_causal_lm
from g2rpo.randomness import seeded
from g2rpo.reasoning.arithmetic import tiny_lm
from g2rpo.run import train

QUESTIONS = ["Ann has 3 apples. She buys 4 more. How many apples does she have now?", "Ben has 12 pens."]


def policy(**kwargs) -> CausalLMPolicy:
    return CausalLMPolicy(tiny_lm(), max_new_tokens=10, **kwargs)


def test_a_sample_does_not_depend_on_its_batch_and_its_log_probs_are_recomputed_exactly():
    lm = policy()
    both = lm.sample_tokens(
        "text", {"questions": QUESTIONS}, [seeded(0, i) for i in range(2)], temperature=1.0
    )
    alone = lm.sample_tokens("text", {"questions": QUESTIONS[1:]}, [seeded(0, 1)], temperature=1.0)
    assert alone.texts[0] == both.texts[1]
    valid = both.mask[1]
    assert torch.equal(alone.tokens[0][alone.mask[0]], both.tokens[1][valid])
    assert torch.allclose(lm.token_log_probs(both), both.log_probs, atol=1e-5)
    assert (both.log_probs[~both.mask] == 0).all() and (both.log_probs[both.mask] < 0).all()


def test_the_prompt_is_the_chat_template_of_the_instruction():
    lm = policy(prompt_template="Q: {question}")
    assert lm.render("2+2?") == "<bos><|user|>Q: 2+2?<|assistant|>"
    plain = policy(prompt_template="Q: {question} A:", chat_template=False)
    assert plain.render("2+2?") == "Q: 2+2? A:"
    with pytest.raises(ValueError, match="prompt_template must contain"):
        policy(prompt_template="no slot")


def test_greedy_decoding_takes_the_argmax_and_stops_at_the_end_token():
    lm = policy()
    greedy = lm.sample_tokens(
        "text", {"questions": QUESTIONS}, [seeded(0, i) for i in range(2)], temperature=0
    )
    again = lm.sample_tokens(
        "text", {"questions": QUESTIONS}, [seeded(9, i) for i in range(2)], temperature=0
    )
    assert torch.equal(greedy.tokens, again.tokens)
    ends = torch.isin(greedy.tokens, lm.end_ids) & greedy.mask
    assert (ends.sum(-1) <= 1).all()  # nothing is generated after an end token


def test_lora_trains_the_adapter_and_its_reference_is_the_base_model():
    lm = policy(
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    names = [n for n, _ in lm.named_trainable_parameters()]
    assert names and all("lora" in n for n in names)
    sampled = lm.sample_tokens("text", {"questions": QUESTIONS}, [seeded(0, i) for i in range(2)])
    base = CausalLMPolicy(tiny_lm(), max_new_tokens=10)
    with torch.no_grad(), lm.reference():
        reference = lm.token_log_probs(sampled)
    assert torch.allclose(reference, base.token_log_probs(sampled), atol=1e-5)
    assert not torch.allclose(reference, lm.token_log_probs(sampled), atol=1e-3)  # the adapter moved it


def test_missing_weights_say_how_to_download_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        load_causal_lm(str(tmp_path / "nowhere"))


TINY_TEXT_RUN = [
    "experiment=arithmetic",
    "model=tiny_lm",
    "logger=none",
    "callbacks.evaluate=null",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "algo.max_new_tokens=12",
    "algo.rollout_batch_size=8",
    "data.count=16",
    "curriculum=cures",
    "curriculum.prompts_per_iteration=4",
    "curriculum.group_size=4",
    "curriculum.subset_size=8",
]


@pytest.mark.parametrize(
    ("algo", "extra"),
    [("text_grpo", []), ("rpp", []), ("rpp", ["curriculum.sigma_mode=grad_norm", "algo.baseline=group"])],
)
def test_one_iteration_of_each_algorithm_under_cures(compose_config, algo, extra):
    cfg = compose_config(*TINY_TEXT_RUN, f"algo={algo}", *extra)
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert record["curriculum/pre_rollouts"] == 8 * 4  # N' = 4 answers to each of the subset's 8 problems
    assert record["train/optimizer_steps"] == 2
    assert record["train/logprob_gap_before_update"] < 1e-5
    assert 0 < record["response_length"] <= 12
    assert record["nfe/curriculum"] > 0 and record["nfe/rollout"] > 0
    if algo == "rpp":
        assert abs(record["kl_k1"]) < 1e-5  # the policy is still its reference
    assert (Path(cfg.run_dir) / "policy" / "config.json").is_file()  # the exported model
