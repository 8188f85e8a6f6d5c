"""Kill a run, start the same command again: it resumes from its newest readable checkpoint and ends with the
weights of an uninterrupted run (fixed seed, CPU). One kill is polled (after a checkpoint appears), the
other chosen exactly: inside the write of ``last.ckpt`` (experiments/fault_injection.py's audit hook)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.fault_injection import (
    OVERRIDES,
    RUN_DIR,
    environment,
    final_weights,
    killed_command,
    run_command,
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The final weights of the uninterrupted run."""
    cwd = tmp_path_factory.mktemp("straight")
    result = run_command(cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return final_weights(cwd / RUN_DIR)


def _resume_and_compare(cwd: Path, straight: dict) -> str:
    resumed = run_command(cwd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    actual = final_weights(cwd / RUN_DIR)
    assert straight.keys() == actual.keys() and straight
    for key in straight:
        assert torch.equal(straight[key], actual[key]), key
    return resumed.stderr + resumed.stdout


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, straight):
    process = subprocess.Popen(
        [sys.executable, "-m", "g2rpo.run", *OVERRIDES],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / RUN_DIR / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("epoch=2-*.ckpt")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"]
    assert killed_at < 7

    log = _resume_and_compare(tmp_path, straight)
    assert "Restoring states from the checkpoint" in log


def test_a_kill_inside_the_write_of_last_ckpt_loses_no_iteration(tmp_path, straight):
    """Killed 4 KiB into the write of the 3rd ``last.ckpt`` (iteration 2's), with ``$TMPDIR`` on another
    filesystem where there is one: Lightning's writer copied its temp file over ``last.ckpt`` and left it
    truncated; ours writes beside it, so ``last.ckpt`` still holds iteration 1, and the resume takes
    ``epoch=2``, written just before, and redoes nothing."""
    killed = subprocess.run(
        killed_command("write", "last.ckpt", 3, 4096),
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = tmp_path / RUN_DIR / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 1  # the old file, whole
    (epoch_file,) = checkpoints.glob("epoch=*.ckpt")
    assert epoch_file.name.startswith("epoch=2-")
    assert list(checkpoints.glob(".last.ckpt.*.partial"))  # the interrupted write

    log = _resume_and_compare(tmp_path, straight)
    assert f"{epoch_file.name}: iteration 2 was the last completed" in log
    assert not list(checkpoints.glob(".*.partial"))  # cleared on resume
