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


LINEAR_LR = "scheduler={_target_:torch.optim.lr_scheduler.LinearLR,_partial_:true,start_factor:2.0}"
STEP_LR = "scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gama:0.5}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", "optimizer.lr=-1: torch.optim.AdamW rejects it (ValueError: Invalid learning rate: -1); "
         "set a learning rate >= 0, e.g. optimizer.lr=3e-4"),
        ("optimizer.betas=[1.5,0.999]", "optimizer.betas=[1.5, 0.999]: torch.optim.AdamW rejects it (ValueError: "
         "Invalid beta parameter at index 0: 1.5); set two coefficients in [0, 1)"),
        ("optimizer.eps=-1", "optimizer.eps=-1: torch.optim.AdamW rejects it (ValueError: Invalid epsilon value"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1: torch.optim.AdamW rejects it (ValueError: Invalid "
         "weight_decay value: -1); set a value >= 0"),
        ("+optimizer.foo=1", "optimizer.foo=1: torch.optim.AdamW rejects it (TypeError: AdamW.__init__() got an "
         "unexpected keyword argument 'foo'); remove it (~optimizer.foo)"),
        ("optimizer._target_=torch.optim.AdamX", "optimizer: ModuleNotFoundError: No module named 'torch.optim.AdamX'"),
        (LINEAR_LR, "scheduler: ValueError: Starting multiplicative factor expected to be greater than 0 and less or "
         "equal to 1. (the scheduler config: {'_target_': 'torch.optim.lr_scheduler.LinearLR'"),
        (STEP_LR, "scheduler.gama=0.5: torch.optim.lr_scheduler.StepLR rejects it (TypeError: StepLR.__init__() got "
         "an unexpected keyword argument 'gama')"),
    ],
)  # fmt: skip
def test_an_optimizer_or_scheduler_setting_torch_rejects_is_named_for_every_model(
    compose_config, override, message
):
    """Built on one dummy parameter, so a bad setting fails before any model loads, naming its field."""
    for model in ("shapes", "sd3"):  # a model built in code too: the hub checks come after these
        with pytest.raises(preflight.PreflightError) as error:
            preflight.check(compose_config(f"model={model}", override))
        assert str(error.value).startswith("the config cannot train:\n  - ")
        assert message in str(error.value)
    assert preflight.config_problems(compose_config("optimizer.lr=0")) == []  # torch accepts lr=0


def test_a_rejected_setting_stops_train_before_the_run_directory_exists(compose_config):
    from g2rpo.run import train

    cfg = compose_config("optimizer.lr=-1")
    with pytest.raises(preflight.PreflightError, match=r"optimizer.lr=-1"):
        train(cfg)
    assert not Path(cfg.run_dir).exists()


def test_fsdp_with_cures_is_rejected_unless_every_rank_draws_as_many_samples(compose_config):
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check(compose_config("trainer=fsdp", "curriculum=cures"))
    message = str(error.value)
    assert "trainer=fsdp with curriculum=cures" in message and "use trainer=ddp" in message.lower()
    assert "curriculum.n_min=2 and curriculum.n_max=16" in message
    for fine in (
        ["trainer=ddp", "curriculum=cures"],
        ["trainer=fsdp", "curriculum=uniform"],
        ["trainer=fsdp", "curriculum=cures", "curriculum.n_min=8", "curriculum.n_max=8"],  # equal group sizes
        ["trainer=fsdp", "curriculum=cures", "trainer.devices=1"],  # one rank
    ):
        assert preflight.config_problems(compose_config(*fine)) == [], fine
