"""Editing with Qwen-Image-Edit through the same adapter the real model uses, on a tiny one built in code: the
policy's ODE rollout is the stock ``QwenImageEditPipeline`` given the same sources (true CFG included), CFG
drops the instruction and keeps the source, an exported LoRA changes a stock pipeline's output as it changes
the policy's, and the loader reads the hub's layout (every algorithm's iteration on edits:
test_editing_algorithms.py).

The stock pipeline resizes every source to about 1 MP (``calculate_dimensions(1024 * 1024, ratio)``) before
encoding it; the tests pin that size to the policy's ``source_resolution`` (32 px), as a CPU cannot run a
1024 px source. Sources are 8-bit, as the stock pipeline's PIL inputs are."""

import json
import shutil

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as stock_edit
import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from peft import LoraConfig

from g2rpo.data import source_images
from g2rpo.policies import (
    QwenImageEditPolicy,
    QwenImagePolicy,
    load_qwen_image_edit_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_pipeline,
)
from g2rpo.policies.tiny import tiny_qwen_tokenizer
from g2rpo.rollout import ode_rollout
from g2rpo.shapes.editing import make_edit
from g2rpo.types import Conditioning, PromptBatch

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "img_mlp.net.2"]
SOURCE = 32  # the tiny policy's source side, twice its output's: the source tokens outnumber the generated


def edit_policy(lora: bool = False) -> QwenImageEditPolicy:
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS) if lora else None
    return QwenImageEditPolicy(
        tiny_qwen_image_edit_pipeline(seed=0), resolution=16, source_resolution=SOURCE, lora=config
    )


def edits(*kinds: str, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [make_edit(kind, rng) for kind in kinds]


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round() / 255


def stock_edit_latents(policy, instructions, sources, noise, guidance_scale, monkeypatch) -> torch.Tensor:
    """The stock pipeline's final latents from ``noise`` (``[B, C, H, W]``), its source at ``SOURCE`` px."""
    monkeypatch.setattr(stock_edit, "calculate_dimensions", lambda area, ratio: (SOURCE, SOURCE, None))
    pipe = policy.pipeline
    images = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(sources))
    guided = {"negative_prompt": [" "] * len(images)} if guidance_scale > 1 else {}
    with torch.no_grad():
        packed = pipe(image=images, prompt=instructions, true_cfg_scale=guidance_scale, **guided,
                      latents=pipe._pack_latents(noise, *noise.shape), num_inference_steps=4, height=16,
                      width=16, output_type="latent").images  # fmt: skip
    return pipe._unpack_latents(packed, 16, 16, policy.vae_scale)[:, :, 0]


def rollout(policy, prompts, metadata, noise, guidance_scale):
    batch = PromptBatch.from_groups(
        prompts, metadata, torch.arange(len(prompts)), torch.ones(len(prompts), dtype=torch.long)
    )
    return ode_rollout(policy, batch, num_steps=4, guidance_scale=guidance_scale, batch_size=len(prompts),
                       generator=torch.Generator(), initial_noise=noise).samples  # fmt: skip


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_the_ode_rollout_is_the_stock_edit_pipeline_given_the_source(monkeypatch, guidance_scale):
    policy = edit_policy()
    batch_edits = edits("recolor", "add")  # instructions of different lengths: padded, masked rows
    instructions = [e["instruction"] for e in batch_edits]
    sources = eight_bit(source_images(batch_edits, SOURCE))
    monkeypatch.setattr(policy, "sources", lambda metadata: sources[: len(metadata)])
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    ours = rollout(policy, instructions, batch_edits, noise, guidance_scale)
    stock = stock_edit_latents(policy, instructions, sources, noise, guidance_scale, monkeypatch)
    torch.testing.assert_close(ours, stock)
    monkeypatch.setattr(policy, "sources", lambda metadata: sources.flip(0))
    swapped = rollout(policy, instructions, batch_edits, noise, guidance_scale)
    assert not torch.allclose(swapped, ours)  # the source is read
    with pytest.raises(ValueError, match="edits a source image"):
        policy.encode_text(instructions)


def test_cfg_drops_the_instruction_not_the_source():
    policy = edit_policy()
    first, second = edits("remove", "swap")
    sources = eight_bit(source_images([first, second], SOURCE))
    cond = policy.encode([first["instruction"]] * 2, sources=sources)
    pipe = policy.pipeline
    # the unconditional row is " " read with the same source (each row its own), padded to the prompts' length
    for row in range(2):
        image = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(sources[row : row + 1]))
        blank, _ = pipe.encode_prompt([" "], image=image)
        length = blank.shape[1]
        torch.testing.assert_close(cond.negative_prompt_embeds[row, :length], blank[0])
        assert cond.negative_prompt_mask[row].sum() == length  # the rest is padding
    assert not torch.allclose(cond.negative_prompt_embeds[0], cond.negative_prompt_embeds[1])
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])  # the VL encoder sees the source
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    uncond = Conditioning(
        cond.negative_prompt_embeds,
        context_latents=cond.context_latents,
        prompt_mask=cond.negative_prompt_mask,
    )
    text, blank = policy.velocity(x, 0.6, cond), policy.velocity(x, 0.6, uncond)
    # the pipeline's true CFG, by hand on its packed tokens: u + w (c - u), rescaled to |c| per token
    pack = lambda v: QwenImagePipeline._pack_latents(v, *v.shape)  # noqa: E731
    combined = pack(blank) + 2.0 * (pack(text) - pack(blank))
    expected = combined * pack(text).norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    guided = pack(policy.velocity(x, 0.6, cond, guidance_scale=2.0))
    torch.testing.assert_close(guided, expected)


def test_the_text_to_image_rollout_is_the_stock_pipeline():
    policy = QwenImagePolicy(tiny_qwen_image_pipeline(seed=0), resolution=16, max_sequence_length=512)
    prompts = ["a red circle", "two blue squares left of a green triangle"]
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    ours = rollout(policy, prompts, [{}, {}], noise, guidance_scale=4.0)
    pipe = policy.pipeline
    with torch.no_grad():
        packed = pipe(prompt=prompts, negative_prompt=[" "] * 2, true_cfg_scale=4.0, height=16, width=16,
                      latents=pipe._pack_latents(noise, *noise.shape), num_inference_steps=4,
                      output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, pipe._unpack_latents(packed, 16, 16, policy.vae_scale)[:, :, 0])
    with pytest.raises(ValueError, match="generates from text only.*qwen_image_edit"):
        policy.encode(prompts, sources=source_images(edits("add", "add"), 16))


def test_exported_lora_loads_into_a_stock_edit_pipeline(tmp_path, monkeypatch):
    policy = edit_policy(lora=True)
    policy.save_pretrained(tmp_path)
    (edit,) = edits("swap")
    sources = eight_bit(source_images([edit], SOURCE))
    monkeypatch.setattr(policy, "sources", lambda metadata: sources)
    noise = policy.initial_noise(1, torch.Generator().manual_seed(0))
    ours = rollout(policy, [edit["instruction"]], [edit], noise, guidance_scale=4.0)
    with policy.reference():
        base = rollout(policy, [edit["instruction"]], [edit], noise, guidance_scale=4.0)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapters change the edit
    stock = edit_policy()
    stock.pipeline.load_lora_weights(tmp_path)
    adapted = stock_edit_latents(stock, [edit["instruction"]], sources, noise, 4.0, monkeypatch)
    torch.testing.assert_close(adapted, ours)


def test_the_loader_reads_the_hub_layout_without_torchvision(tmp_path):
    """The hub's ``processor`` folder (``preprocessor_config.json``, which names ``Qwen2VLImageProcessor``)
    and ``model_index.json`` (which names transformers' ``Qwen2VLProcessor``) load offline."""
    saved = tiny_qwen_image_edit_pipeline(seed=0)
    saved.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(
        json.dumps({**index, "processor": ["transformers", "Qwen2VLProcessor"]})
    )
    shutil.rmtree(tmp_path / "processor")
    tiny_qwen_tokenizer().save_pretrained(tmp_path / "processor")
    hub_names = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    preprocessor = {**saved.processor.image_processor.to_dict(), **hub_names}
    (tmp_path / "processor" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    loaded = load_qwen_image_edit_pipeline(str(tmp_path), dtype="float32")
    image = saved.image_processor.numpy_to_pil(np.random.default_rng(0).random((1, 24, 24, 3)))
    expected, _ = saved.encode_prompt(["make it blue"], image=image)
    torch.testing.assert_close(loaded.encode_prompt(["make it blue"], image=image)[0], expected)
    with pytest.raises(FileNotFoundError, match="hf download Qwen/Qwen-Image-Edit"):
        load_qwen_image_edit_pipeline("Qwen/Qwen-Image-Edit")
