"""Nothing lost, nothing silent: the faults of a long run, injected in-process (a kill inside a checkpoint
write is in test_resume.py, the NaN-reward and flat-reward stops in test_run.py)."""

import contextlib
import errno
import json
import logging
import os
import pathlib
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST_RUN
from hydra.utils import instantiate

from g2rpo.callbacks import ExportPolicy
from g2rpo.checkpoint import CheckpointWriteError, load_policy
from g2rpo.files import atomic_write
from g2rpo.loggers import JsonlLogger, read_metrics
from g2rpo.resume import ResumeError
from g2rpo.run import train


def _steps(run_dir: Path) -> list[int]:
    """The step of every line of metrics.jsonl, in file order (a repeated step is a restarted run)."""
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_directory_that_refuses_writes_stops_the_run(compose_config, monkeypatch):
    """As ``chattr +i checkpoints/`` after two iterations: creating or renaming a file in it fails."""
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=4")
    checkpoints = (Path(cfg.run_dir) / "checkpoints").resolve()
    placed: list[str] = []
    real_open, real_rename, real_replace = os.open, os.rename, os.replace

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(path).resolve().parent == checkpoints

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path) and len(placed) >= 4:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded(real):
        def rename(source, target, *args, **kwargs):
            if inside(target):
                if len(placed) >= 4:  # epoch=N and last.ckpt of iterations 0 and 1 went in
                    refuse(target)
                placed.append(str(target))
            return real(source, target, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "rename", guarded(real_rename))  # shutil.move's, as Lightning's writer uses
    monkeypatch.setattr(os, "replace", guarded(real_replace))
    with pytest.raises(
        CheckpointWriteError, match=r"could not write the checkpoint .*epoch=2.*Permission denied"
    ):
        train(cfg)
    monkeypatch.undo()
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 1


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")

    def fail_halfway(stream):
        stream.write(b"new, cut")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fail_halfway)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class Payload:
    """What a malicious checkpoint carries: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_no_checkpoint_is_loaded_in_a_way_that_runs_code(compose_config, tmp_path):
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=1")
    train(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    marker = tmp_path / "code-ran"
    for path in last.parent.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)
        state["payload"] = Payload(marker)
        torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):  # python -m g2rpo.evaluate checkpoint=...
        load_policy(instantiate(cfg.model), last)
    with pytest.raises(ResumeError, match="no checkpoint of this run can be read: .*last.ckpt.*Unpickling"):
        train(compose_config(*FAST_RUN, "trainer.max_epochs=2"))
    assert not marker.exists()


def test_a_resumed_run_takes_its_commands_learning_rate(compose_config, caplog):
    caplog.set_level(logging.INFO)
    train(compose_config(*FAST_RUN, "optimizer.lr=1e-2"))
    cfg = compose_config(*FAST_RUN, "optimizer.lr=1e-3", "trainer.max_epochs=3")
    train(cfg)
    rates = [r["train/lr"] for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")]
    assert rates == pytest.approx([1e-2, 1e-2, 1e-3])
    assert "optimizer.lr: 0.01 -> 0.001" in caplog.text  # the config change, applied
    assert "lr: 0.01 -> 0.001" in caplog.text.split("optimiser settings from the config")[1]


def test_a_resumed_run_takes_its_commands_schedule(compose_config):
    def schedule(end: float) -> str:
        return (
            "scheduler={_target_: torch.optim.lr_scheduler.LinearLR, _partial_: true, start_factor: 1.0, "
            f"end_factor: {end}, total_iters: 4}}"
        )

    train(compose_config(*FAST_RUN, schedule(0.5)))
    cfg = compose_config(*FAST_RUN, schedule(0.0), "trainer.max_epochs=4")
    train(cfg)
    rates = [r["train/lr"] for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")]
    # 3e-4 x (1 - n/8) for the first two iterations, then the new schedule's 3e-4 x (1 - n/4) at n = 2, 3
    assert rates == pytest.approx([3e-4, 2.625e-4, 1.5e-4, 0.75e-4])


def test_a_resumed_run_refuses_a_change_of_what_is_trained(compose_config):
    train(compose_config(*FAST_RUN, "trainer.max_epochs=1"))
    with pytest.raises(ResumeError, match=r"algo.clip_range: 0.0001 -> 0.5(.|\n)*resume_accepts"):
        train(compose_config(*FAST_RUN, "algo.clip_range=0.5"))
    cfg = compose_config(*FAST_RUN, "algo.clip_range=0.5", "resume_accepts=[algo.clip_range]")
    train(cfg)
    assert _steps(Path(cfg.run_dir)) == [0, 1]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_takes_the_newest_readable_checkpoint(compose_config, caplog, damage):
    caplog.set_level(logging.INFO)
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=3")
    train(cfg)
    run = Path(cfg.run_dir)
    last = run / "checkpoints" / "last.ckpt"
    if damage == "missing":
        last.unlink()
    else:
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    train(compose_config(*FAST_RUN, "trainer.max_epochs=4"))
    assert _steps(run) == [0, 1, 2, 3]  # one run, no iteration redone or restarted
    assert "iteration 2 was the last completed, training goes on from iteration 3" in caplog.text
    assert (damage == "truncated") == ("skipping an unreadable checkpoint" in caplog.text)
    assert "last.ckpt was missing, older or unreadable: it is now a copy of epoch=2-" in caplog.text
    assert torch.load(last, weights_only=True)["epoch"] == 3


def test_a_run_killed_after_its_last_epoch_file_ends_with_an_up_to_date_last_ckpt(compose_config):
    """Killed between the last iteration's ``epoch=N`` and ``last.ckpt``: no iteration is left to rewrite
    ``last.ckpt``, so the resume makes it a copy of ``epoch=N``."""
    cfg = compose_config(*FAST_RUN)
    train(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    iteration_1 = last.read_bytes()
    train(compose_config(*FAST_RUN, "trainer.max_epochs=3"))
    last.write_bytes(iteration_1)  # as if killed before iteration 2's last.ckpt
    train(compose_config(*FAST_RUN, "trainer.max_epochs=3"))  # nothing left to train
    (newest,) = last.parent.glob("epoch=2-*.ckpt")
    assert last.read_bytes() == newest.read_bytes()


def test_a_run_killed_in_its_first_last_ckpt_write_goes_on_writing_last_ckpt(compose_config):
    """The first ``epoch=0`` file records no ``last.ckpt`` yet: Lightning's version counter then wrote
    ``last-v1.ckpt`` beside the copy the resume made, and ``last.ckpt`` stayed at iteration 0."""
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=1")
    train(cfg)
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    (checkpoints / "last.ckpt").unlink()  # killed while writing it
    train(compose_config(*FAST_RUN, "trainer.max_epochs=3"))
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2


def test_no_readable_checkpoint_stops_naming_each_file(compose_config):
    cfg = compose_config(*FAST_RUN)
    train(cfg)
    for path in (Path(cfg.run_dir) / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ResumeError) as error:
        train(compose_config(*FAST_RUN, "trainer.max_epochs=3"))
    assert (
        "epoch=1-" in str(error.value)
        and "last.ckpt" in str(error.value)
        and "ckpt_path=null" in str(error.value)
    )


def test_starting_over_moves_the_earlier_run_aside(compose_config):
    cfg = compose_config(*FAST_RUN)
    train(cfg)
    train(compose_config(*FAST_RUN, "trainer.max_epochs=1", "ckpt_path=null"))
    run = Path(cfg.run_dir)
    assert _steps(run) == [0]
    (previous,) = (run / "previous").iterdir()
    assert _steps(previous) == [0, 1] and len(list((previous / "checkpoints").glob("*.ckpt"))) == 2


def test_a_partial_metrics_record_is_cut_off_and_the_run_goes_on(compose_config, caplog):
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=1")
    train(cfg)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    with metrics.open("a") as stream:
        stream.write('{"step": 1, "reward/tot')  # killed while writing iteration 1's record
    train(compose_config(*FAST_RUN))
    assert "metrics.jsonl:2: removing a partial last record" in caplog.text
    assert _steps(Path(cfg.run_dir)) == [0, 1]


def test_reading_metrics_skips_a_bad_line_naming_it(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1.0}\nnot json\n{"step": 1, "a": 2.0}\n')
    assert [r["a"] for r in read_metrics(path)] == [1.0, 2.0]
    assert f"{path}:2: skipping a line that is not a metrics record" in caplog.text


def test_an_export_interrupted_midway_leaves_the_previous_export_whole(tmp_path):
    class Policy:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def save_pretrained(self, directory):
            directory.mkdir(parents=True)
            (directory / "weights.safetensors").write_bytes(b"new, cut" if self.fail else b"new")
            if self.fail:
                raise KeyboardInterrupt  # the run is stopped while exporting

    def module(fail: bool) -> SimpleNamespace:
        return SimpleNamespace(policy=Policy(fail), evaluation_weights=contextlib.nullcontext)

    strategy = SimpleNamespace(barrier=lambda: None, broadcast=lambda value: value)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True, strategy=strategy)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "weights.safetensors").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        ExportPolicy().on_train_end(trainer, module(fail=True))
    assert (tmp_path / "policy" / "weights.safetensors").read_bytes() == b"old"
    ExportPolicy().on_train_end(trainer, module(fail=False))  # the next export clears the interrupted one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    assert (tmp_path / "policy" / "weights.safetensors").read_bytes() == b"new"


def test_a_metrics_record_that_cannot_be_written_stops_naming_the_file(tmp_path, monkeypatch):
    logger = JsonlLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, step=0)

    def disk_full(descriptor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match=r"could not append step 1's record to .*metrics.jsonl: .*No space"):
        logger.log_metrics({"a": 2.0}, step=1)


def test_a_run_killed_before_its_export_exports_when_resumed(compose_config):
    cfg = compose_config(*FAST_RUN)
    train(cfg)
    policy = Path(cfg.run_dir) / "policy"
    shutil.rmtree(policy)  # killed after the last checkpoint, before the export
    train(compose_config(*FAST_RUN))  # nothing left to train
    assert (policy / "pytorch_lora_weights.safetensors").is_file()
