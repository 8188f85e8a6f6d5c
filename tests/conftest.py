"""Shared fixtures: tiny policies built in code, and configs composed as the CLI would compose them."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import LoraConfig

import g2rpo.config  # noqa: F401  (schemas and resolvers)
from g2rpo.policies import SD3Policy, tiny_sd3_pipeline

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]

# Small enough that a full iteration takes well under a second on 2 cores.
FAST_RUN = [
    "model=tiny_sd3",  # plumbing tests run on the tiny random model; the shapes world has its own tests
    "reward=jpeg_compressibility",
    "data=animals",
    "callbacks.evaluate=null",
    "logger=none",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
    "algo.num_steps=4",
    "algo.rollout_batch_size=4",
    "callbacks.images.every_n_iterations=1",
]


def make_policy(lora: bool = True, seed: int = 0, **pipeline_kwargs) -> SD3Policy:
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    return SD3Policy(
        tiny_sd3_pipeline(seed=seed, **pipeline_kwargs),
        resolution=32,
        lora=config if lora else None,
        max_sequence_length=16,
    )


@pytest.fixture
def policy() -> SD3Policy:
    torch.manual_seed(0)
    return make_policy()


def perturb_lora(policy: SD3Policy, scale: float = 0.05) -> None:
    """Give the LoRA B matrices non-zero values, so the policy differs from its reference."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture
def compose_config(tmp_path):
    """Compose ``conf/config.yaml`` with overrides, writing the run into ``tmp_path / name``."""

    def _compose(*overrides: str, name: str = "run"):
        run_dir = tmp_path / name
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[f"run_dir={run_dir}", f"run_name={name}", *overrides])

    return _compose


def fit_quietly(module, tmp_path, **trainer_options) -> L.Trainer:
    """Fit ``module`` with a bare CPU ``Trainer`` (no logger, checkpoints, progress bar or summary)."""
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_options,
    )
    trainer.fit(module)
    return trainer
