"""FLUX.1 through the same adapter the real model uses, on a tiny FLUX built in code: the policy's ODE
rollout is the stock ``FluxPipeline`` (packing, image ids, dynamic shift, guidance embedding), an exported
LoRA loads into a stock pipeline, and an algorithm trains it for an iteration."""

import numpy as np
import pytest
import torch
from conftest import FAST_RUN
from peft import LoraConfig

from g2rpo.loggers import read_metrics
from g2rpo.policies import FluxPolicy, load_flux_pipeline, tiny_flux_pipeline
from g2rpo.rollout import ode_rollout
from g2rpo.run import train
from g2rpo.types import PromptBatch

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]


def flux_policy(lora: bool = True) -> FluxPolicy:
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS) if lora else None
    return FluxPolicy(tiny_flux_pipeline(seed=0), resolution=16, lora=config, max_sequence_length=16)


def test_the_ode_rollout_is_the_stock_flux_pipeline():
    policy = flux_policy(lora=False)
    prompts = ["a red cat", "two green dogs"]
    batch = PromptBatch.from_groups(prompts, [{}, {}], torch.arange(2), torch.tensor([1, 1]))
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    ours = ode_rollout(policy, batch, num_steps=4, guidance_scale=1.0, batch_size=2,
                       generator=torch.Generator(), initial_noise=noise)  # fmt: skip
    pipe = policy.pipeline
    packed = pipe._pack_latents(noise, 2, *noise.shape[1:])
    with torch.no_grad():
        stock = pipe(prompt=prompts, latents=packed, num_inference_steps=4, guidance_scale=3.5, height=16,
                     width=16, max_sequence_length=16, output_type="latent").images  # fmt: skip
    # the pipeline's grid: linspace(1, 1/T, T) shifted by mu(64 image tokens), then 0
    sigmas = policy.sigmas(4)
    assert len(sigmas) == 5 and sigmas[0] == 1 and sigmas[-1] == 0
    assert not torch.allclose(sigmas[1:-1], torch.tensor(np.linspace(1, 0.25, 4)[1:], dtype=torch.float32))
    torch.testing.assert_close(pipe._unpack_latents(stock, 16, 16, policy.vae_scale), ours.samples)


def test_a_static_shift_gives_the_dance_grpo_family_grid():
    """DanceGRPO / MixGRPO / G2RPO: sd3_time_shift(3) of linspace(1, 0, T + 1); brief g2rpo_dgpo.md 1.5 lists
    the T = 16 grid (1.000, 0.978, 0.955, ..., 0.300, 0.167, 0)."""
    policy = flux_policy(lora=False)
    policy.shift = 3.0
    t = torch.linspace(1, 0, 17, dtype=torch.float64)
    expected = (3 * t / (1 + 2 * t)).float()
    torch.testing.assert_close(policy.sigmas(16), expected)
    assert [round(v, 3) for v in policy.sigmas(16)[[1, 2, 14, 15]].tolist()] == [0.978, 0.955, 0.3, 0.167]


def test_guidance_embedding_and_true_cfg_change_the_velocity():
    policy = flux_policy(lora=False)
    cond = policy.encode(["a red cat"])
    x = policy.initial_noise(1, torch.Generator().manual_seed(0))
    base = policy.velocity(x, 0.6, cond)
    policy.guidance = 1.0
    assert not torch.allclose(policy.velocity(x, 0.6, cond), base)
    uncond = policy.velocity(
        x, 0.6, type(cond)(cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds)
    )
    guided = policy.velocity(x, 0.6, cond, guidance_scale=2.0)
    torch.testing.assert_close(guided, uncond + 2.0 * (policy.velocity(x, 0.6, cond) - uncond))


def test_exported_lora_loads_into_a_stock_flux_pipeline(tmp_path):
    policy = flux_policy()
    policy.save_pretrained(tmp_path)
    stock = tiny_flux_pipeline(seed=0)  # the same base weights, no adapter
    stock.load_lora_weights(tmp_path)
    cond = policy.encode(["a red cat"], negative=False)
    x = policy.initial_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = policy.velocity(x, 0.6, cond)
        policy.transformer = stock.transformer  # the stock pipeline's adapted transformer
        after = policy.velocity(x, 0.6, cond)
    torch.testing.assert_close(after, before)
    plain = flux_policy(lora=False)
    assert not torch.allclose(plain.velocity(x, 0.6, plain.encode(["a red cat"], negative=False)), before)


@pytest.mark.parametrize("algo", [["algo=flow_grpo"], ["algo=dgpo", "algo.max_timestep_index=3"],
                                  ["algo=g2rpo"]], ids=["flow_grpo", "dgpo", "g2rpo"])  # fmt: skip
def test_an_algorithm_trains_flux_through_the_run(compose_config, tmp_path, algo):
    cfg = compose_config(
        *FAST_RUN, "model=tiny_flux", *algo, "algo.guidance_scale=1.0", "trainer.max_epochs=1"
    )
    train(cfg)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["train/optimizer_steps"] >= 1 and np.isfinite(record["train/grad_norm"])
    assert (tmp_path / "run/policy/pytorch_lora_weights.safetensors").exists()


def test_missing_flux_weights_fail_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hf download black-forest-labs/FLUX.1-dev"):
        load_flux_pipeline("black-forest-labs/FLUX.1-dev")
