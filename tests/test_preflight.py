"""A hub model's run stops before anything loads, naming every missing piece (g2rpo/preflight.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import g2rpo.preflight as preflight

ROOT = Path(__file__).resolve().parents[1]


def test_models_built_in_code_need_nothing(compose_config):
    for model in ("shapes", "tiny_sd3", "tiny_flux", "sd35_medium_random"):
        assert preflight.problems(compose_config(f"model={model}")) == []


def test_model_sd3_is_sd35_medium_with_a_real_run_around_it(compose_config):
    cfg = compose_config("algo=dgpo", "model=sd3")
    assert cfg.model.pipeline.path == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.reward.rewards.pickscore._target_ == "g2rpo.rewards.clip.PickScore"
    assert cfg.reward.rewards.pickscore.device == "cuda"  # the trainer's device
    assert "a cat" in cfg.data.prompts


def test_every_missing_piece_is_named(compose_config, monkeypatch):
    monkeypatch.setattr(preflight, "estimate_here", lambda cfg: "ESTIMATE")
    cfg = compose_config("algo=dgpo", "model=sd3", "trainer=cpu", "reward=geneval_shapes", "data=shapes")
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check(cfg)
    message = str(error.value)
    assert "hf download stabilityai/stable-diffusion-3.5-medium" in message
    assert "trainer=cpu" in message and "trainer=gpu" in message
    assert "shapes world" in message and "reward=pickscore" in message
    assert "data=animals" in message
    assert "ESTIMATE" in message


def test_local_weights_are_found(compose_config, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    cfg = compose_config("model=sd3", f"model.pipeline.path={tmp_path}")
    assert not any("weights" in problem for problem in preflight.problems(cfg))


@pytest.mark.skipif(
    torch.cuda.is_available()
    or preflight.weights_present("pipeline", "stabilityai/stable-diffusion-3.5-medium"),
    reason="this machine has a GPU or the weights: the command would start a run",
)
def test_the_mission_command_stops_within_seconds_naming_weights_and_gpu():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "g2rpo.run",
            "algo=dgpo",
            "model=sd3",
            "hydra.run.dir=/tmp/g2rpo-preflight-test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "hf download stabilityai/stable-diffusion-3.5-medium" in result.stderr
    assert "CUDA" in result.stderr
    assert "hours per iteration on this machine" in result.stderr
