"""GPU checks: bf16 autocast keeps the fp32 SDE math consistent between rollout and training."""

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
