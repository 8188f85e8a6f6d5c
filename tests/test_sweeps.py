"""Sweeps go through Hydra's own launchers and sweepers: ``--multirun`` over seeds with the basic launcher
and with joblib (parallel local processes), an Optuna search that optimises ``optimized_metric``, and the
SLURM launcher preset, whose job size follows the trainer's devices and nodes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, FAST_RUN
from hydra import compose, initialize_config_dir

from g2rpo.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ONE_ITERATION = [*FAST_RUN, "trainer.max_epochs=1", "callbacks.images=null"]


def sweep(sweep_dir: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "g2rpo.run", "--multirun", *ONE_ITERATION, *overrides,
               f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"]
)
def test_a_multirun_over_seeds_trains_one_run_per_seed(tmp_path, launcher):
    sweep(tmp_path, *launcher, "seed=0,1")
    runs = [read_metrics(tmp_path / str(job) / "metrics.jsonl") for job in (0, 1)]
    seeds = [yaml.safe_load((tmp_path / str(job) / "config.yaml").read_text())["seed"] for job in (0, 1)]
    assert sorted(seeds) == [0, 1]
    assert all(len(run) == 1 for run in runs)
    assert runs[0][0]["reward/total/mean"] != runs[1][0]["reward/total/mean"]  # other seeds, other samples


def test_optuna_search_optimises_the_logged_metric(tmp_path):
    sweep(tmp_path, "hparams_search=shapes_optuna", "optimized_metric=reward/total/mean",
          "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2")  # fmt: skip
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    trials = [read_metrics(tmp_path / str(job) / "metrics.jsonl")[-1]["reward/total/mean"] for job in (0, 1)]
    assert results["best_value"] == pytest.approx(max(trials))
    assert set(results["best_params"]) == {"algo.beta", "optimizer.lr"}
    assert 5e-5 <= results["best_params"]["optimizer.lr"] <= 1e-3


def test_the_slurm_launcher_sizes_each_job_from_the_trainer():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
