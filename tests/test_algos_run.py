"""DanceGRPO, MixGRPO, G2RPO and DGPO end to end through the CLI config: ``algo=<name>`` trains and logs."""

from pathlib import Path

import pytest
from conftest import FAST_RUN

from g2rpo.loggers import read_metrics
from g2rpo.run import train


@pytest.mark.parametrize(
    ("algo", "optimizer_steps"),
    [("dance_grpo", 3), ("mix_grpo", 3), ("g2rpo", 2)],  # G2RPO: one step per stochastic step (k = 0, 1)
)
def test_algorithm_trains_from_the_command_line(compose_config, algo, optimizer_steps):
    # 8 samples in micro-batches of 2: DanceGRPO's and MixGRPO's 3 optimiser steps per rollout can happen
    extra = ["algo.window_size=2"] if algo == "mix_grpo" else []  # T = 4: windows start in [0, 2)
    cfg = compose_config(
        *FAST_RUN, f"algo={algo}", "trainer.max_epochs=1", "algo.rollout_batch_size=2", *extra
    )
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert record["train/optimizer_steps"] == optimizer_steps
    assert record["train/logprob_gap_before_update"] < 1e-5
    assert record["nfe/rollout"] > 0 and record["nfe/train"] > 0
    if algo == "g2rpo":
        # 2 groups: anchors 2 x 4 steps (in forwards of 2 groups); 8 members x (k=0: 3 + 2, k=1: 2 + 1) continuation forwards; CFG x2
        assert record["nfe/rollout"] == 2 * (2 * 4 + 8 * (5 + 3))
        assert {"reward/stride_1/mean", "reward/stride_2/mean"} <= record.keys()
    if algo == "mix_grpo":
        assert record["window/start"] == 0


def test_dgpo_trains_from_the_command_line(compose_config):
    cfg = compose_config(
        *FAST_RUN, "algo=dgpo", "trainer.max_epochs=2", "algo.max_timestep_index=3", "algo.kl_beta=0.02"
    )
    train(cfg)
    first, second = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert first["train/optimizer_steps"] == 1  # the official code: one step per rollout
    # 8 images x 4 DPM-Solver steps x CFG; training: K = 4 levels x 8 samples x (theta, reference, theta^-)
    assert first["nfe/rollout"] == 8 * 4 * 2
    assert first["nfe/train"] == 4 * 8 * 3
    assert first["train/gate"] == pytest.approx(0.5, abs=1e-4)  # theta = reference before any update
    assert second["train/gate"] != first["train/gate"]
    assert 0 < second["train/sigma"] <= 1 and second["train/denoising_loss"] > 0
