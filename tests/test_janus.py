"""Janus-Pro as a token policy, on a tiny random Janus built in code (transformers' own model and processor):
per-sample sampling, log-probs recomputed exactly as sampled (ratio 1 before an update) on both tasks, CFG,
decoding, the end-of-answer mask, the reference model, loading and export."""

import dataclasses

import pytest
import torch
from peft import LoraConfig

from g2rpo.policies.janus import Janus, JanusPolicy, load_janus, positions_of
from g2rpo.policies.tiny import tiny_janus
from g2rpo.randomness import keyed


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to split over threads: on shared cores the threads' hand-offs
    cost a thousand times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUESTIONS = ["what is it?", "how many shapes are there in the picture", "colour?"]
PROMPTS = ["a red cat", "two green dogs on a blue mat", "x"]


def janus_policy(lora: bool = True, **kwargs) -> JanusPolicy:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    return JanusPolicy(tiny_janus(seed=0), lora=config, **kwargs)


def generators(keys: list[int]) -> list[torch.Generator]:
    return keyed(torch.Generator().manual_seed(0), keys)


def answer_inputs(rows: list[int]) -> dict:
    images = torch.rand(len(QUESTIONS), 3, 24, 12, generator=torch.Generator().manual_seed(1))  # not square
    return {"images": images[rows], "questions": [QUESTIONS[i] for i in rows]}


def boost_end_token(policy: JanusPolicy, boost: float = 4.0) -> None:
    """Make the end-of-sentence token likely, so that answers end within a few tokens."""
    bias = torch.zeros(policy.model.config.text_config.vocab_size)
    bias[policy.eos_id] = boost
    policy.model.lm_head.register_forward_hook(lambda module, args, output: output + bias)


def test_answers_are_per_sample_and_their_log_probs_are_recomputed_exactly():
    policy = janus_policy()
    batch = policy.sample_tokens("answer", answer_inputs([0, 1, 2]), generators([0, 1, 2]), max_new_tokens=6)
    alone = policy.sample_tokens("answer", answer_inputs([1]), generators([1]), max_new_tokens=6)
    again = policy.sample_tokens("answer", answer_inputs([1]), generators([1]), max_new_tokens=6)
    assert torch.equal(alone.tokens, again.tokens)
    # sample 1 draws the same tokens alone and beside other (differently padded) prompts
    assert torch.equal(batch.tokens[1], alone.tokens[0])
    torch.testing.assert_close(batch.log_probs[1], alone.log_probs[0], atol=1e-5, rtol=0)
    assert batch.texts[1] == alone.texts[0] and len(batch.texts) == 3
    assert not torch.equal(batch.tokens[0], batch.tokens[1])
    assert (batch.log_probs[batch.mask] < 0).all()
    torch.testing.assert_close(policy.token_log_probs(batch), batch.log_probs, atol=1e-5, rtol=0)
    ratio = (policy.token_log_probs(batch.select(torch.tensor([2, 0]))) - batch.log_probs[[2, 0]]).exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_the_answer_mask_runs_through_the_end_token():
    policy = janus_policy()
    boost_end_token(policy)
    rollout = policy.sample_tokens(
        "answer", answer_inputs([0, 1, 2]), generators([3, 4, 5]), max_new_tokens=8
    )
    lengths = rollout.mask.sum(1)
    assert lengths.min() < lengths.max()  # rows end at different steps, so the rollout is padded
    for tokens, mask, log_probs, length in zip(rollout.tokens, rollout.mask, rollout.log_probs, lengths):
        assert mask[:length].all() and not mask[length:].any()
        ended = (tokens[:length] == policy.eos_id).nonzero()
        if length < rollout.tokens.shape[1]:
            assert ended.flatten().tolist() == [length - 1]  # the first end token is the last one trained
        assert (tokens[length:] == policy.pad_id).all() and (log_probs[length:] == 0).all()
    assert all(policy.processor.tokenizer.eos_token not in text for text in rollout.texts)
    torch.testing.assert_close(policy.token_log_probs(rollout), rollout.log_probs, atol=1e-5, rtol=0)


def test_greedy_answers_take_the_argmax_whatever_the_generators():
    """Temperature 0 (benchmarks) decodes greedily: the first token is the argmax of the prompt's next-token
    logits, no generator matters, and the log-probs (under temperature 1) are recomputed exactly."""
    policy = janus_policy()
    inputs = answer_inputs([0, 1, 2])
    greedy = policy.sample_tokens("answer", inputs, generators([0, 1, 2]), temperature=0.0, max_new_tokens=5)
    again = policy.sample_tokens("answer", inputs, generators([7, 8, 9]), temperature=0.0, max_new_tokens=5)
    assert torch.equal(greedy.tokens, again.tokens) and greedy.texts == again.texts
    prompt = policy.answer_prompts(inputs["images"], inputs["questions"])
    embeds = policy.prompt_embeddings(prompt["input_ids"], prompt["pixel_values"])
    mask = prompt["attention_mask"]
    with torch.no_grad():
        hidden = policy.language_model(embeds, mask, positions_of(mask)).last_hidden_state[:, -1]
        assert torch.equal(greedy.tokens[:, 0], policy.model.lm_head(hidden).argmax(-1))
    torch.testing.assert_close(policy.token_log_probs(greedy), greedy.log_probs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image codes a positive one"):
        policy.sample_tokens("image", {"prompts": PROMPTS}, generators([0, 1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match="Janus-Pro samples 'answer' or 'image'"):
        policy.sample_tokens("compare", inputs, generators([0, 1, 2]))


def test_images_are_sampled_with_cfg_decoded_and_their_log_probs_recomputed_exactly():
    policy = janus_policy()
    inputs = {"prompts": PROMPTS}
    policy.nfe = 0
    rollout = policy.sample_tokens("image", inputs, generators([0, 1, 2]), guidance_scale=5.0)
    codes = policy.num_image_codes
    assert policy.nfe == 2 * 3 * codes  # a CFG forward of B sequences counts 2B, one per code
    assert rollout.tokens.shape == (3, codes) and rollout.mask.all() and rollout.guidance_scale == 5.0
    assert rollout.images.shape == (3, 3, 16, 16)
    assert rollout.images.min() >= 0 and rollout.images.max() <= 1 and rollout.images.std() > 0
    alone = policy.sample_tokens("image", {"prompts": PROMPTS[1:2]}, generators([1]), guidance_scale=5.0)
    assert torch.equal(alone.tokens[0], rollout.tokens[1])
    policy.nfe = 0
    torch.testing.assert_close(policy.token_log_probs(rollout), rollout.log_probs, atol=1e-5, rtol=0)
    assert policy.nfe == 2 * 3  # one teacher-forced forward of the conditional and unconditional rows
    # the log-probs are the guided distribution's, not the conditional one's
    unguided = policy.token_log_probs(dataclasses.replace(rollout, guidance_scale=1.0))
    assert not torch.allclose(unguided, rollout.log_probs, atol=1e-3)


def test_cfg_with_scale_one_is_conditional_sampling():
    guided, conditional = janus_policy(), janus_policy(logprob_from="conditional")
    inputs = {"prompts": PROMPTS[:2]}
    conditional.nfe = 0
    plain = conditional.sample_tokens("image", inputs, generators([0, 1]), guidance_scale=1.0)
    assert conditional.nfe == 2 * conditional.num_image_codes  # no unconditional rows at w = 1
    same = guided.sample_tokens("image", inputs, generators([0, 1]), guidance_scale=1.0)
    assert torch.equal(same.tokens, plain.tokens)
    torch.testing.assert_close(same.log_probs, plain.log_probs, atol=1e-6, rtol=0)
    # logprob_from="conditional" records, and recomputes, log-probs of u + 1 (c - u) = c whatever w sampled
    cfg = conditional.sample_tokens("image", inputs, generators([0, 1]), guidance_scale=5.0)
    assert not torch.equal(cfg.tokens, plain.tokens)
    at_one = guided.token_log_probs(dataclasses.replace(cfg, guidance_scale=1.0))
    torch.testing.assert_close(conditional.token_log_probs(cfg), at_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(cfg.log_probs, at_one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [True, False])
def test_reference_is_the_policy_before_a_step_and_not_after(lora):
    policy = janus_policy(lora=lora)
    policy.enable_reference()
    answers = policy.sample_tokens("answer", answer_inputs([0, 1]), generators([0, 1]), max_new_tokens=4)
    images = policy.sample_tokens("image", {"prompts": PROMPTS[:2]}, generators([0, 1]), guidance_scale=5.0)
    with torch.no_grad(), policy.reference():
        reference = [policy.token_log_probs(answers), policy.token_log_probs(images)]
    for ref, rollout in zip(reference, (answers, images)):
        torch.testing.assert_close(ref, rollout.log_probs, atol=1e-5, rtol=0)
    trainable = policy.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    if lora:  # the adapter is on the language model only: Janus's vision encoder also has q_proj layers
        names = [name for name, p in policy.model.named_parameters() if p.requires_grad]
        assert all(".language_model." in name and "lora_" in name for name in names)
    else:
        assert not any(p.requires_grad for p in policy.model.model.vqmodel.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.5 if lora else 0.05)
    loss = -(policy.token_log_probs(answers).sum() + policy.token_log_probs(images).sum())
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = [policy.token_log_probs(answers), policy.token_log_probs(images)]
        with policy.reference():
            still = [policy.token_log_probs(answers), policy.token_log_probs(images)]
    for new, old, ref in zip(after, reference, still):
        assert not torch.allclose(new, old, atol=1e-4)
        torch.testing.assert_close(ref, old, atol=1e-5, rtol=0)


def test_missing_weights_raise_with_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download deepseek-community/Janus-Pro-1B"):
        load_janus("deepseek-community/Janus-Pro-1B")
    with pytest.raises(FileNotFoundError, match="hf download"):
        load_janus(str(tmp_path / "nowhere"), dtype="float32")
    with pytest.raises(ValueError, match="guided, conditional"):
        janus_policy(logprob_from="cfg")


def perturb(policy: JanusPolicy) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_lora_export_loads_onto_the_base_model(tmp_path):
    policy = janus_policy()
    perturb(policy)
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    base = tiny_janus(seed=0)
    base.model.load_adapter(str(tmp_path))
    rollout = policy.sample_tokens("image", {"prompts": PROMPTS[:2]}, generators([0, 1]), guidance_scale=5.0)
    with torch.no_grad():
        loaded = JanusPolicy(base).token_log_probs(rollout)
        untrained = janus_policy().token_log_probs(rollout)
    torch.testing.assert_close(loaded, rollout.log_probs, atol=1e-5, rtol=0)
    assert not torch.allclose(untrained, rollout.log_probs, atol=1e-4)


def test_full_fine_tuning_export_is_a_checkpoint_load_janus_reads(tmp_path):
    policy = janus_policy(lora=False)
    perturb(policy)
    policy.save_pretrained(tmp_path)
    loaded = load_janus(str(tmp_path), dtype="float32")
    assert isinstance(loaded, Janus)
    reloaded = JanusPolicy(loaded, lora=None)
    rollout = policy.sample_tokens("answer", answer_inputs([0, 2]), generators([0, 2]), max_new_tokens=4)
    again = reloaded.sample_tokens("answer", answer_inputs([0, 2]), generators([0, 2]), max_new_tokens=4)
    assert torch.equal(again.tokens, rollout.tokens) and again.texts == rollout.texts
    with torch.no_grad():
        torch.testing.assert_close(reloaded.token_log_probs(rollout), rollout.log_probs, atol=1e-5, rtol=0)
