"""Editing with FLUX.1-Kontext through the same adapter the real model uses, on a tiny Kontext built in code:
the policy's ODE rollout is the stock ``FluxKontextPipeline`` given the same source images, CFG keeps the
source in both rows, and an exported LoRA loads into a stock pipeline (every algorithm's iteration on edits:
test_editing_algorithms.py)."""

import numpy as np
import pytest
import torch
from peft import LoraConfig

from g2rpo.data import source_images
from g2rpo.policies import FluxKontextPolicy, FluxPolicy, tiny_flux_kontext_pipeline, tiny_flux_pipeline
from g2rpo.rollout import ode_rollout
from g2rpo.shapes.editing import make_edit
from g2rpo.types import PromptBatch

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]


def kontext_policy(lora: bool = False) -> FluxKontextPolicy:
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS) if lora else None
    return FluxKontextPolicy(
        tiny_flux_kontext_pipeline(seed=0), resolution=16, lora=config, max_sequence_length=16
    )


def edits(*kinds: str, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [make_edit(kind, rng) for kind in kinds]


def test_the_ode_rollout_is_the_stock_kontext_pipeline_given_the_source():
    policy = kontext_policy()
    batch_edits = edits("recolor", "add")
    instructions = [e["instruction"] for e in batch_edits]
    batch = PromptBatch.from_groups(instructions, batch_edits, torch.arange(2), torch.tensor([1, 1]))
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    ours = ode_rollout(policy, batch, num_steps=4, guidance_scale=1.0, batch_size=2,
                       generator=torch.Generator(), initial_noise=noise)  # fmt: skip
    pipe = policy.pipeline
    with torch.no_grad():
        stock = pipe(image=source_images(batch_edits, 16), prompt=instructions,
                     latents=pipe._pack_latents(noise, 2, *noise.shape[1:]), num_inference_steps=4,
                     guidance_scale=3.5, height=16, width=16, max_area=16 * 16, max_sequence_length=16,
                     output_type="latent", _auto_resize=False).images  # fmt: skip
    torch.testing.assert_close(pipe._unpack_latents(stock, 16, 16, policy.vae_scale), ours.samples)
    text_only = PromptBatch.from_groups(instructions, [{}, {}], torch.arange(2), torch.tensor([1, 1]))
    unconditioned = ode_rollout(policy, text_only, num_steps=4, guidance_scale=1.0, batch_size=2,
                                generator=torch.Generator(), initial_noise=noise)  # fmt: skip
    assert not torch.allclose(unconditioned.samples, ours.samples)  # the source is read


def test_cfg_drops_the_instruction_not_the_source():
    policy = kontext_policy()
    (edit,) = edits("remove")
    sources = source_images([edit], 16)
    cond = policy.encode([edit["instruction"]], sources=sources)
    x = policy.initial_noise(1, torch.Generator().manual_seed(0))
    uncond = type(cond)(
        cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds, context_latents=cond.context_latents
    )
    expected = policy.velocity(x, 0.6, uncond) + 2.0 * (
        policy.velocity(x, 0.6, cond) - policy.velocity(x, 0.6, uncond)
    )
    torch.testing.assert_close(policy.velocity(x, 0.6, cond, guidance_scale=2.0), expected)


def test_the_source_keys_the_conditioning_and_a_text_to_image_model_refuses_edits():
    first, second = edits("recolor", "recolor", seed=1)
    second = {**first, "source": second["source"]}  # the same instruction over another scene
    batch = PromptBatch.from_groups(
        [first["instruction"]] * 2, [first, second], torch.arange(2), torch.tensor([1, 1])
    )
    prompts, index, metadata = batch.unique()
    assert len(prompts) == 2 and index.tolist() == [0, 1] and metadata[1]["source"] == second["source"]
    flux = FluxPolicy(tiny_flux_pipeline(seed=0), resolution=16, max_sequence_length=16)
    with pytest.raises(ValueError, match="generates from text only.*use an editing model"):
        flux.encode(prompts, sources=flux.sources(metadata))
    with pytest.raises(ValueError, match="1 of 2 prompts have no source image"):
        source_images([first, {}], 16)


def test_exported_lora_loads_into_a_stock_kontext_pipeline(tmp_path):
    policy = kontext_policy(lora=True)
    policy.save_pretrained(tmp_path)
    stock = tiny_flux_kontext_pipeline(seed=0)
    stock.load_lora_weights(tmp_path)
    (edit,) = edits("swap")
    cond = policy.encode([edit["instruction"]], negative=False, sources=source_images([edit], 16))
    x = policy.initial_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = policy.velocity(x, 0.6, cond)
        policy.transformer = stock.transformer
        after = policy.velocity(x, 0.6, cond)
    torch.testing.assert_close(after, before)
