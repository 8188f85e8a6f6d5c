"""Data parallelism on CPU: two processes with gloo under torchrun train with `trainer=ddp` and with
`trainer=fsdp` (FSDP2), and splitting the batch over ranks, or sharding the weights, changes nothing: the
2-rank run rolls out the same global batch, takes the same first step and ends with the same weights as
the 1-rank run with the same seed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN

from g2rpo import distributed
from g2rpo.loggers import read_metrics
from g2rpo.types import PromptBatch

ROOT = Path(__file__).resolve().parents[1]
# The tiny plumbing run, with a continuous reward: JPEG sizes would move by whole bytes on fp noise.
COMMON = [*(o for o in FAST_RUN if not o.startswith("reward=")), "reward=shapes_score"]
CPU_RANKS = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
ALGOS = {
    "dgpo": (["algo=dgpo", "algo.max_timestep_index=3"], "train/policy_loss"),
    "flow_grpo_kl": (["algo=flow_grpo", "algo.num_minibatches=1", "algo.beta=0.04"], "train/kl"),
    # full fine-tuning: FSDP shards the trained transformer and its frozen reference copy
    "flow_grpo_kl_full": (["algo=flow_grpo", "algo.num_minibatches=1", "algo.beta=0.04", "model.lora=null"],
                          "train/kl"),
}  # fmt: skip


def train(run_dir: Path, *overrides: str, ranks: int = 1) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*(launcher if ranks > 1 else [sys.executable]), "-m", "g2rpo.run", *COMMON, *overrides,
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(run_dir / "metrics.jsonl")


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")["state_dict"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The 1-rank run of each algorithm, trained once for both strategies."""
    runs = {}

    def run(algo: str) -> Path:
        if algo not in runs:
            runs[algo] = tmp_path_factory.mktemp(f"one_{algo}")
            train(runs[algo], *ALGOS[algo][0])
        return runs[algo]

    return run


@pytest.mark.parametrize(
    ("strategy", "algo"),
    [("ddp", "dgpo"), ("ddp", "flow_grpo_kl"), ("fsdp", "dgpo"), ("fsdp", "flow_grpo_kl_full")],
)
def test_two_ranks_take_the_same_steps_as_one(tmp_path, one_rank, strategy, algo):
    overrides, loss_key = ALGOS[algo]
    one_dir = one_rank(algo)
    one = read_metrics(one_dir / "metrics.jsonl")
    two = train(tmp_path / "two", *overrides, f"trainer={strategy}", *CPU_RANKS, ranks=2)
    assert len(one) == len(two) == 2
    # the same prompts, group sizes and per-sample noise: the same images, hence the same rewards
    for single, double in zip(one, two):
        assert double["reward/total/mean"] == pytest.approx(single["reward/total/mean"], rel=1e-5)
        assert double["reward/total/std"] == pytest.approx(single["reward/total/std"], rel=1e-4)
        assert double["advantage/max"] == pytest.approx(single["advantage/max"], rel=1e-4)
        assert double["train/optimizer_steps"] == single["train/optimizer_steps"] >= 1
    # the pre-clip gradient norm: each rank's loss scale matters here (Adam would hide a wrong one)
    assert two[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=1e-4)
    assert two[0][loss_key] == pytest.approx(one[0][loss_key], rel=1e-4, abs=1e-12)
    # After an update, fp noise in a near-zero gradient entry can flip the sign of Adam's first step
    # (lr * g / |g|): the second iteration and the weights agree to within a few such entries.
    assert two[1][loss_key] == pytest.approx(one[1][loss_key], rel=5e-2, abs=1e-12)
    assert abs(two[1][loss_key]) > 0
    if strategy == "fsdp":  # both ranks held shards, not replicas
        assert (tmp_path / "two/run.log").read_text().count("sharded over the device mesh") == 2
    # FSDP's checkpoint holds the whole trainable weights and EMA, gathered from the shards on rank 0
    single, double = weights(one_dir), weights(tmp_path / "two")
    assert single.keys() == double.keys()
    for key in single:
        assert double[key].shape == single[key].shape, key
        assert (double[key] - single[key]).norm() <= 1e-2 * single[key].norm() + 1e-6, key
    exported = sorted(p.relative_to(one_dir / "policy") for p in (one_dir / "policy").rglob("*.*"))
    assert exported == sorted(
        p.relative_to(tmp_path / "two/policy") for p in (tmp_path / "two/policy").rglob("*.*")
    )


def test_an_fsdp_checkpoint_resumes_exactly_and_on_another_world_size(tmp_path):
    """Stopped after 2 iterations and resumed to 3: on 2 ranks, exactly the third iteration of an
    uninterrupted run (sharded weights, optimiser state and DGPO's EMA come back from the single-file
    checkpoint); on 1 rank (``trainer=cpu``), the same up to the fp noise of a different reduction order."""
    overrides = [*ALGOS["dgpo"][0], "trainer=fsdp", *CPU_RANKS]
    train(tmp_path / "resumed", *overrides, ranks=2)
    checkpoint = shutil.copy(tmp_path / "resumed/checkpoints/last.ckpt", tmp_path / "two_iterations.ckpt")
    resumed = train(tmp_path / "resumed", *overrides, "trainer.max_epochs=3", ranks=2)
    straight = train(tmp_path / "straight", *overrides, "trainer.max_epochs=3", ranks=2)
    one_rank = train(
        tmp_path / "one_rank", *ALGOS["dgpo"][0], "trainer.max_epochs=3", f"ckpt_path={checkpoint}"
    )
    assert len(resumed) == len(straight) == 3 and len(one_rank) == 1
    for key in ("reward/total/mean", "train/policy_loss", "train/grad_norm"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-6), key
        assert one_rank[-1][key] == pytest.approx(straight[-1][key], rel=5e-2), key
    expected = weights(tmp_path / "straight")
    for name, value in weights(tmp_path / "resumed").items():
        assert torch.equal(value, expected[name]), name
    for name, value in weights(tmp_path / "one_rank").items():  # LoRA B starts at 0: a lost update shows
        assert (value - expected[name]).norm() <= 1e-2 * expected[name].norm() + 1e-6, name


def test_ranks_split_the_batch_by_whole_groups(monkeypatch):
    batch = PromptBatch.from_groups(
        ["a", "b", "c", "d"], [{}] * 4, torch.arange(4), torch.tensor([2, 3, 2, 5])
    )
    parts = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        parts.append(distributed.rank_slice(batch))
    assert [sorted(set(p.group_ids.tolist())) for p in parts] == [[0, 1], [2, 3]]
    assert torch.equal(torch.cat([p.sample_ids for p in parts]), batch.sample_ids)
    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        distributed.rank_slice(batch)
