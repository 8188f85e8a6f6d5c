"""Kill a run after a checkpoint, start the same command again: it resumes, and ends with the weights
of an uninterrupted run (fixed seed, CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

COMMAND = [
    sys.executable,
    "-m",
    "g2rpo.run",
    "model=tiny_sd3",  # the framework's resume path; the tiny model keeps it fast
    "reward=jpeg_compressibility",
    "data=animals",
    "callbacks.evaluate=null",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
    "algo.num_steps=4",
    "algo.rollout_batch_size=4",
    "trainer.max_epochs=8",
]
RUN_DIR = Path("outputs") / (
    "algo.num_steps=4,algo.rollout_batch_size=4,callbacks.evaluate=null,curriculum.group_size=4,"
    "curriculum.prompts_per_iteration=2,data=animals,model=tiny_sd3,reward=jpeg_compressibility"
)


def _run(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(COMMAND, cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["state_dict"]


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir()
    interrupted.mkdir()
    assert _run(straight).returncode == 0

    process = subprocess.Popen(
        COMMAND, cwd=interrupted, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = interrupted / RUN_DIR / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("epoch=2-*.ckpt")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(checkpoints / "last.ckpt", weights_only=False)["epoch"]
    assert killed_at < 7

    resumed = _run(interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    expected, actual = _weights(straight / RUN_DIR), _weights(interrupted / RUN_DIR)
    assert expected.keys() == actual.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
