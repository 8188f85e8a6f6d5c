"""GPU checks: bf16 and fp16 autocast keep the fp32 SDE math consistent between rollout and training."""

import pytest
import torch
from conftest import FAST_RUN

from g2rpo.loggers import read_metrics
from g2rpo.run import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_iteration_on_one_gpu(compose_config):
    cfg = compose_config(*FAST_RUN, "trainer=gpu")
    train(cfg)
    records = read_metrics(f"{cfg.run_dir}/metrics.jsonl")
    assert len(records) == 2
    assert records[0]["train/logprob_gap_before_update"] < cfg.module.logprob_tolerance
    assert all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in records)


def test_fp16_iteration_on_one_gpu(compose_config):
    """The Flow-GRPO SD3.5 presets' precision: fp16 autocast with torch's GradScaler under manual
    optimisation (g2rpo/optimization.py); the CPU tests (test_mixed_precision.py) check the same path."""
    cfg = compose_config(*FAST_RUN, "trainer=gpu", "trainer.precision=16-mixed")
    train(cfg)
    records = read_metrics(f"{cfg.run_dir}/metrics.jsonl")
    assert len(records) == 2
    assert records[0]["train/logprob_gap_before_update"] < cfg.module.logprob_tolerance
    assert all(r["train/loss_scale"] > 0 and r["train/optimizer_steps"] > 0 for r in records)
    assert all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in records)
