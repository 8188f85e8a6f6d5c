"""Pair-GRPO end to end from the command-line config: a unified shapes policy (flow images + token answers),
Janus-Pro's image tokens, and the CurES curriculum over pairs."""

from pathlib import Path

import pytest
import torch

from g2rpo.algos import TokenGRPO
from g2rpo.loggers import read_metrics
from g2rpo.run import train
from g2rpo.shapes.pairug import PairDataset
from g2rpo.types import PromptBatch, TrainingUnit

SMALL_PAIRS = [
    "data.num_understanding=48",
    "data.num_generation=48",
    "data.k_clusters=12",
    "data.encoder=pixels",
    "data.threshold=0.5",
]
PAIR_RUN = [
    "algo=pair_grpo",
    "model=tiny_unified",
    "data=shapes_pairs",
    *SMALL_PAIRS,
    "reward=geneval_shapes",
    "callbacks.evaluate=null",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
    "algo.generation.num_steps=4",
    "algo.generation.rollout_batch_size=4",
    "algo.understanding.rollout_batch_size=4",
    # the random tiny model rarely answers right: train flat groups too (advantage 0), so the side runs
    "algo.understanding.normalization.drop_zero_std=false",
]


def test_pair_grpo_trains_both_sides_of_a_unified_policy_in_one_update(compose_config):
    cfg = compose_config(*PAIR_RUN)
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert 0.0 <= record["reward/understanding/accuracy"] <= 1.0
    assert "reward/generation/geneval_shapes/mean" in record
    # both sides trained, in the same optimiser steps (2 minibatches each: 2 steps, not 4)
    assert {"train/generation/ratio", "train/understanding/ratio"} <= record.keys()
    assert record["train/optimizer_steps"] == 2
    assert record["train/logprob_gap_before_update"] < 1e-4
    assert record["nfe/rollout"] > 0 and record["pair/weight_mean"] <= 1.0


def test_token_ratio_is_one_before_the_first_update(compose_config):
    from hydra.utils import instantiate

    policy = instantiate(compose_config("model=tiny_unified").model)
    dataset = PairDataset.build(
        num_understanding=24, num_generation=24, k_clusters=6, encoder="pixels", threshold=0.5
    )
    batch = PromptBatch.from_groups(dataset.prompts, dataset.metadata, torch.arange(3), torch.full((3,), 4))
    from g2rpo.algos.pair_grpo import understanding_batch

    algo = TokenGRPO(rollout_batch_size=5)  # chunks of 5 and 2: the ratio must not depend on the batch
    questions = understanding_batch(batch)
    rollout = algo.rollout(policy, questions, torch.Generator().manual_seed(0))
    assert rollout.mask[:, 0].all() and len(rollout.texts) == 12
    advantages = torch.linspace(-1, 1, 12)
    out = algo.loss(
        policy,
        rollout,
        type("A", (), {"values": advantages})(),
        TrainingUnit(torch.arange(12), 0),
    )
    assert out.metrics["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    assert out.metrics["logprob_gap"].item() < 1e-5
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_pair_grpo_trains_janus_image_tokens_with_cfg(compose_config):
    cfg = compose_config(
        *[o for o in PAIR_RUN if not o.startswith(("model=", "reward=", "algo.generation.num_steps"))],
        "model=tiny_janus",
        "reward=jpeg_compressibility",
        "algo/pair_generation@algo.generation=image_tokens",
        "algo.understanding.max_new_tokens=3",
    )
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert {"train/generation/ratio", "train/understanding/ratio"} <= record.keys()
    assert record["train/logprob_gap_before_update"] < 1e-4


def test_pair_grpo_runs_under_the_cures_curriculum(compose_config):
    cfg = compose_config(
        *PAIR_RUN,
        "curriculum=cures",
        "curriculum.subset_size=8",
        "curriculum.pre_rollouts=2",
    )
    train(cfg)
    (record,) = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert record["nfe/curriculum"] > 0 and "train/understanding/ratio" in record
