"""Speed levers that must not change results: regional compilation of the transformer blocks and the text
embedding cache (docs/performance.md). Exact micro-batches are tested with the stepwise algorithms."""

from __future__ import annotations

import pytest
import torch
from conftest import LORA_TARGETS, perturb_lora
from peft import LoraConfig

from g2rpo.policies import FluxPolicy, SD3Policy, tiny_flux_pipeline, tiny_sd3_pipeline


def _policy(lora: bool = True, **options) -> SD3Policy:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    return SD3Policy(
        tiny_sd3_pipeline(seed=0),
        resolution=32,
        lora=config if lora else None,
        max_sequence_length=16,
        **options,
    )


def _inputs(policy: SD3Policy):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(4, policy.transformer.config.in_channels, 32 // policy.vae_scale, 32 // policy.vae_scale,
                          generator=generator)  # fmt: skip
    return latents, torch.tensor([0.9, 0.7, 0.5, 0.3]), policy.encode(["a cat", "a dog", "a fox", "a cow"])


def test_compile_wraps_every_repeated_block_and_nothing_else():
    policy = _policy(compile=True, compile_options={"backend": "eager"})
    blocks = list(policy.blocks(policy.transformer))
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert policy.transformer._compiled_call_impl is None
    assert getattr(_policy().transformer.transformer_blocks[0], "_compiled_call_impl", None) is None


def test_compiled_training_matches_eager_forward_backward_and_reference():
    """aot_eager traces forward and backward as inductor would, without code generation (fast on CPU)."""
    eager, compiled = _policy(), _policy(compile=True, compile_options={"backend": "aot_eager"})
    perturb_lora(eager)
    perturb_lora(compiled)
    latents, sigma, cond = _inputs(eager)
    outputs = []
    for policy in (eager, compiled):
        v = policy.velocity(latents, sigma, cond, guidance_scale=4.5)
        v.square().mean().backward()
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(latents, sigma, cond, guidance_scale=4.5)
        grads = [p.grad.clone() for p in policy.trainable_parameters()]
        outputs.append((v.detach(), v_ref, grads))
    (v, v_ref, grads), (cv, cv_ref, cgrads) = outputs
    torch.testing.assert_close(cv, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cv_ref, v_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, v_ref)  # the LoRA moves the policy off its reference
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg, g, rtol=1e-4, atol=1e-6)


def test_full_fine_tuning_reference_copy_runs_its_own_initial_weights_when_compiled():
    """A compiled block's call is bound to the block: a deep copy would run the trained weights."""
    policy = _policy(lora=False, compile=True, compile_options={"backend": "eager"})
    latents, sigma, cond = _inputs(policy)
    with torch.no_grad():
        before = policy.velocity(latents, sigma, cond)
        policy.enable_reference()
        for parameter in policy.transformer.transformer_blocks.parameters():
            parameter.add_(0.05)
        after = policy.velocity(latents, sigma, cond)
        with policy.reference():
            reference = policy.velocity(latents, sigma, cond)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(reference, before, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"mode": "no-such-mode"}])
def test_unknown_compile_options_fail_at_construction(options):
    with pytest.raises(RuntimeError, match="no-such-mode"):
        _policy(compile=True, compile_options=options)


def test_text_cache_returns_the_encoders_rows_and_encodes_each_prompt_once(monkeypatch):
    plain, cached = _policy(), _policy(text_cache_size=3)
    calls = []
    encode_text = cached.encode_text
    monkeypatch.setattr(
        cached, "encode_text", lambda prompts: calls.append(list(prompts)) or encode_text(prompts)
    )
    for prompts in (["a cat", "a dog", "a cat"], ["a dog", "a fox"], ["a cat"]):
        want, got = plain.encode(prompts), cached.encode(prompts)
        # a prompt encoded in another batch differs by the kernels' batch-size-dependent rounding only
        torch.testing.assert_close(got.prompt_embeds, want.prompt_embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.pooled_prompt_embeds, want.pooled_prompt_embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.negative_prompt_embeds, want.negative_prompt_embeds, rtol=0, atol=0)
    # each prompt once, until the 3-prompt cache evicted the least recently used ("a cat") to hold "a fox"
    assert calls == [["a cat", "a dog"], [""], ["a fox"], ["a cat"]]


def test_a_negative_text_cache_size_is_refused():
    with pytest.raises(ValueError, match="text_cache_size must be >= 0"):
        _policy(text_cache_size=-1)


def _flux(**options):
    torch.manual_seed(0)
    return FluxPolicy(tiny_flux_pipeline(seed=0), resolution=16, lora=None, max_sequence_length=16, **options)


def test_attention_backend_reaches_fluxs_dispatcher_with_the_same_velocity():
    default, math = _flux(), _flux(attention_backend="_native_math")
    assert {
        m.processor._attention_backend for m in math.transformer.modules() if hasattr(m, "processor")
    } == {"_native_math"}
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *default.initial_noise(1, generator).shape[1:], generator=generator)
    cond = default.encode(["a cat", "a dog"])
    with torch.no_grad():
        want, got = (p.velocity(latents, torch.tensor([0.8, 0.4]), cond) for p in (default, math))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "backend", "message"),
    [
        (_policy, "native", "JointAttnProcessor2_0 calls torch's scaled_dot_product_attention itself"),
        (_flux, "flash_hub", "choose one of flash, flash_varlen"),  # would download kernels
        (_flux, "no-such-backend", "_native_flash"),
    ],
)
def test_attention_backends_that_would_be_silent_or_reach_the_network_are_refused(build, backend, message):
    with pytest.raises(ValueError, match=message):
        build(attention_backend=backend)
