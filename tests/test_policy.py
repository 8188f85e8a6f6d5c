"""The SD3-family policy over diffusers: conditioning, CFG, decode, LoRA reference, full fine-tuning, export."""

import pytest
import torch
from conftest import make_policy, perturb_lora
from diffusers import StableDiffusion3Pipeline

from g2rpo.policies import SD3Policy, load_sd3_pipeline, tiny_sd3_pipeline

VAE_MODEL = dict(latent_size=8, latent_channels=4, patch_size=1, vae_block_channels=(8, 16, 16))


def _inputs(policy, batch=2, seed=0):
    latents = policy.initial_noise(batch, torch.Generator().manual_seed(seed))
    return latents, policy.encode(["a cat", "a dog"][:batch])


def test_shapes_and_dtypes(policy):
    latents, cond = _inputs(policy)
    assert latents.shape == (2, 3, 32, 32) and latents.dtype == torch.float32
    assert cond.prompt_embeds.shape == (2, 32, 64) and cond.pooled_prompt_embeds.shape == (2, 64)
    assert cond.negative_prompt_embeds.shape == cond.prompt_embeds.shape
    velocity = policy.velocity(latents, 0.5, cond, guidance_scale=4.5)
    assert velocity.shape == latents.shape and velocity.dtype == torch.float32
    images = policy.decode(latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_classifier_free_guidance_combines_both_branches(policy):
    latents, cond = _inputs(policy)
    with torch.no_grad():
        guided = policy.velocity(latents, 0.7, cond, guidance_scale=4.5)
        text = policy.velocity(latents, 0.7, cond)
        empty = cond.select(torch.tensor([0, 1]))
        empty.prompt_embeds, empty.pooled_prompt_embeds = (
            cond.negative_prompt_embeds,
            cond.negative_pooled_prompt_embeds,
        )
        uncond = policy.velocity(latents, 0.7, empty)
    torch.testing.assert_close(guided, uncond + 4.5 * (text - uncond), rtol=1e-4, atol=1e-5)


def test_vae_latent_space_path():
    policy = make_policy(**VAE_MODEL)
    latents, cond = _inputs(policy)
    assert latents.shape == (2, 4, 8, 8)
    assert policy.velocity(latents, 1.0, cond, 4.5).shape == latents.shape
    assert policy.decode(latents).shape == (2, 3, 32, 32)


def test_lora_reference_is_the_base_model_with_adapters_disabled(policy):
    latents, cond = _inputs(policy)
    with torch.no_grad():
        at_init = policy.velocity(latents, 0.5, cond)
        with policy.reference():
            reference = policy.velocity(latents, 0.5, cond)
    torch.testing.assert_close(at_init, reference, rtol=0, atol=0)  # gaussian init: LoRA B = 0

    perturb_lora(policy)
    with torch.no_grad():
        trained = policy.velocity(latents, 0.5, cond)
        with policy.reference():
            still_reference = policy.velocity(latents, 0.5, cond)
    assert (trained - reference).abs().max() > 1e-3
    torch.testing.assert_close(still_reference, reference, rtol=0, atol=0)
    trainable = policy.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)  # re-enabled after the context
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all("lora" in n for n in names)


def test_full_finetuning_keeps_a_frozen_copy_as_reference():
    policy = make_policy(lora=False)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    with pytest.raises(RuntimeError, match="enable_reference"), policy.reference():
        pass
    policy.enable_reference()
    latents, cond = _inputs(policy)
    with torch.no_grad():
        before = policy.velocity(latents, 0.5, cond)
        for parameter in policy.transformer.parameters():
            parameter.add_(0.01)
        with policy.reference():
            reference = policy.velocity(latents, 0.5, cond)
    torch.testing.assert_close(reference, before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in policy.reference_copy.parameters())


def test_schedule_is_the_pipelines_scheduler(policy):
    scheduler = policy.pipeline.scheduler
    scheduler.set_timesteps(10)
    torch.testing.assert_close(policy.sigmas(10), scheduler.sigmas.float())


def test_exported_lora_loads_into_a_stock_diffusers_pipeline(policy, tmp_path):
    perturb_lora(policy)
    policy.save_pretrained(tmp_path)
    stock = tiny_sd3_pipeline(seed=0)  # the same base weights, no adapter
    stock.load_lora_weights(tmp_path)
    latents, cond = _inputs(policy)
    kwargs = dict(
        hidden_states=latents,
        timestep=torch.full((2,), 500.0),
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds,
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(stock.transformer(**kwargs)[0], policy.transformer(**kwargs)[0])


def test_missing_hub_weights_fail_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/stable-diffusion-3.5-medium"):
        load_sd3_pipeline("stabilityai/stable-diffusion-3.5-medium")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_sd3_pipeline(str(tmp_path / "not-there"))


def test_resolution_must_fit_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of"):
        SD3Policy(tiny_sd3_pipeline(), resolution=30)


def test_tiny_pipeline_is_deterministic_in_its_seed():
    a, b, c = (tiny_sd3_pipeline(seed=s).transformer.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_stock_pipeline_samples_with_the_policy_components():
    """The policy wraps a real StableDiffusion3Pipeline: its own __call__ still works on it."""
    policy = make_policy(**VAE_MODEL)
    assert isinstance(policy.pipeline, StableDiffusion3Pipeline)
    images = policy.pipeline(
        prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=16
    ).images
    assert images.shape == (1, 3, 32, 32)


def test_negative_embeddings_are_those_diffusers_computes(policy):
    cond = policy.encode(["a cat", "a dog"])
    _, negative, _, negative_pooled = policy.pipeline.encode_prompt(
        prompt=["a cat", "a dog"], prompt_2=None, prompt_3=None, negative_prompt="", max_sequence_length=16
    )
    torch.testing.assert_close(cond.negative_prompt_embeds, negative)
    torch.testing.assert_close(cond.negative_pooled_prompt_embeds, negative_pooled)
