"""Resuming a run: from which checkpoint, with which of the new command's settings.

Re-running a command resumes its run directory (``ckpt_path: last``):

- **Which checkpoint.** The newest one that loads (by the iteration it holds), whether it is ``last.ckpt``
  or the ``epoch=N`` file written just before it: a run killed between the two writes, or whose
  ``last.ckpt`` is missing or damaged, loses no iteration. ``last.ckpt`` is then made a copy of that file,
  since a run killed after its last iteration's ``epoch=N`` has no iteration left that would rewrite it,
  and ``last.ckpt`` is what evaluation and users read. Unreadable files are named in the log, with why. If
  there are checkpoints and none loads, the run stops rather than start over.
- **Which settings.** The config is compared with the one the checkpoint was trained with (stored in it;
  ``config.yaml`` for older checkpoints). Fields that say *how* to go on take the new value, listed in the
  log: the optimiser's hyper-parameters and the learning-rate schedule (:func:`apply_optimizer_config`,
  after Lightning has restored the optimiser's state, whose learning rate would otherwise win), the
  trainer, loggers, callbacks, evaluation, gold rewards and the loop's safety limits. A change of anything
  else (what is trained: model, algorithm, reward, data, curriculum, seed, EMA, optimiser class) is refused
  with the field named, unless ``resume_accepts`` lists it.
- **Starting over.** A run that starts at iteration 0 in a directory that holds an earlier run's records
  (``ckpt_path=null``, or a run killed before its first checkpoint) moves them to ``previous/<time>/``, so
  one ``metrics.jsonl`` never mixes two runs.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningModule
from torch import nn

from g2rpo.files import PARTIAL, atomic_write

log = logging.getLogger(__name__)

#: Fields (and the fields under them) that a resumed run takes from its new command.
APPLIED = (
    "run_dir",
    "run_name",
    "ckpt_path",
    "resume_accepts",
    "optimized_metric",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "eval",
    "gold",
    "module.max_grad_norm",
    "module.logprob_tolerance",
    "module.max_skipped_steps",
    "module.num_logged_images",
    "module.fsdp_cpu_offload",
)
#: ... except these: the optimiser's saved state belongs to its class.
REFUSED = ("optimizer._target_",)
LAST = "last.ckpt"  # ModelCheckpoint's save_last file
#: What a run that starts over moves aside, from its run directory.
RECORDS = ("checkpoints", "metrics.jsonl", "config.yaml")


class ResumeError(RuntimeError):
    """The run directory cannot be resumed as asked; the message says why and what to do."""


@dataclass
class Checkpoint:
    path: Path
    iteration: int  # the last completed iteration (Lightning's epoch)
    global_step: int
    config: dict | None


def read_checkpoint(path: Path) -> Checkpoint:
    """The header of a checkpoint, loaded without running code (``weights_only``) and without reading its
    tensors (``mmap``); raises whatever a damaged or foreign file raises."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError("not a Lightning checkpoint (no 'epoch')")
    return Checkpoint(path, int(state["epoch"]), int(state.get("global_step", 0)), state.get("config"))


def newest_checkpoint(directories: list[Path]) -> Checkpoint | None:
    """The newest loadable checkpoint in ``directories``; None if there is none at all."""
    readable, unreadable = [], []
    for path in sorted(p for directory in directories for p in directory.glob("*.ckpt")):
        try:
            readable.append(read_checkpoint(path))
        except Exception as error:  # any failure to load is the same verdict: not resumable
            unreadable.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    if not readable and unreadable:
        raise ResumeError(
            "no checkpoint of this run can be read: "
            + "; ".join(unreadable)
            + ". Nothing was changed. To start this run over (its files are moved to previous/), re-run with "
            "ckpt_path=null; to resume from another file, ckpt_path=<path>."
        )
    if not readable:
        return None
    # the same iteration in last.ckpt and epoch=N.ckpt: either will do; prefer last.ckpt
    newest = max(readable, key=lambda c: (c.iteration, c.global_step, c.path.name.startswith("last")))
    for entry in unreadable:
        log.warning("resume: skipping an unreadable checkpoint: %s", entry)
    return newest


def resume_point(
    ckpt_path: str | None, directories: list[Path], run_dir: Path, config: Mapping, accepts: list[str]
) -> Path | None:
    """The checkpoint this run resumes from (None: it starts at iteration 0, with the previous records set
    aside), after checking the config against the checkpoint's."""
    clear_partial_writes(directories)
    if ckpt_path is None:
        set_aside_previous(run_dir)
        return None
    if ckpt_path == "last":
        checkpoint = newest_checkpoint(directories)
        if checkpoint is None:
            set_aside_previous(run_dir)
            log.info("no checkpoint in %s yet: starting a new run (the same command resumes it)", run_dir)
            return None
    else:
        try:
            checkpoint = read_checkpoint(Path(ckpt_path))
        except Exception as error:
            raise ResumeError(
                f"ckpt_path={ckpt_path} cannot be read ({type(error).__name__}: {error}). Give a readable "
                "checkpoint, or ckpt_path=last to take the newest readable one of this run."
            ) from error
    if ckpt_path == "last" and checkpoint.path.name != LAST:
        restore_last(checkpoint.path)
    previous = checkpoint.config
    if previous is None and (run_dir / "config.yaml").is_file():  # a checkpoint from before configs were kept
        previous = yaml.safe_load((run_dir / "config.yaml").read_text())
    if previous is not None:
        check_config_changes(previous, config, accepts)
    log.info(
        "resuming from %s: iteration %d was the last completed, training goes on from iteration %d",
        checkpoint.path,
        checkpoint.iteration,
        checkpoint.iteration + 1,
    )
    return checkpoint.path


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for a nested mapping (lists are leaves). An empty mapping holds no setting: ``{}``
    (``schedule=none``) compares equal to a field absent from a checkpoint written before it existed."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _under(key: str, fields: tuple[str, ...] | list[str]) -> bool:
    return any(key == field or key.startswith(f"{field}.") for field in fields)


def check_config_changes(previous: Mapping, current: Mapping, accepts: list[str]) -> list[str]:
    """The changed fields a resume applies (logged); raises :class:`ResumeError` naming any it refuses."""
    before, after = flatten(previous), flatten(current)
    changed = sorted(
        key for key in before.keys() | after.keys() if before.get(key, "<unset>") != after.get(key, "<unset>")
    )
    describe = [f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}" for key in changed]
    refused = [
        line
        for key, line in zip(changed, describe)
        if (_under(key, REFUSED) or not _under(key, APPLIED)) and not _under(key, accepts)
    ]
    if refused:
        raise ResumeError(
            "this run directory's checkpoint was trained with other settings, which a resumed run cannot "
            "change:\n  "
            + "\n  ".join(refused)
            + "\nPut them back; or start a new run (another run_dir, or ckpt_path=null to start this one over, "
            "its files moved to previous/); or, if the change is meant, list the fields in "
            "resume_accepts (e.g. 'resume_accepts=[" + refused[0].split(":")[0] + "]')."
        )
    applied = [line for key, line in zip(changed, describe) if key not in ("run_dir", "run_name")]
    if applied:
        log.info(
            "resume: settings changed since the checkpoint, applied from now on:\n  %s", "\n  ".join(applied)
        )
    return applied


@rank_zero_only
def restore_last(newest: Path) -> None:
    """Make ``last.ckpt`` beside ``newest`` a copy of it (atomically)."""
    last = newest.parent / LAST

    def copy(stream) -> None:
        with newest.open("rb") as source:
            shutil.copyfileobj(source, stream, 1 << 24)

    atomic_write(last, copy)
    log.warning("resume: %s was missing, older or unreadable: it is now a copy of %s", last, newest.name)


@rank_zero_only
def clear_partial_writes(directories: list[Path]) -> None:
    """Remove the temporary files of checkpoint writes that a kill interrupted (never a whole checkpoint)."""
    for path in (p for directory in directories for p in directory.glob(f".*{PARTIAL}")):
        log.info("resume: removing %s, a checkpoint write that was interrupted", path)
        path.unlink(missing_ok=True)


@rank_zero_only
def set_aside_previous(run_dir: Path) -> None:
    """Move an earlier run's records out of the way of a run that starts at iteration 0."""
    present = [run_dir / name for name in RECORDS if (run_dir / name).exists()]
    if not any(p.name != "config.yaml" for p in present):
        return
    target = run_dir / "previous" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        shutil.move(path, target / path.name)
    log.warning(
        "starting over in %s: the earlier run's %s moved to %s", run_dir, [p.name for p in present], target
    )


def apply_optimizer_config(module: LightningModule) -> list[str]:
    """After Lightning restored a checkpoint's optimiser and schedule: take the optimiser's hyper-parameters
    and the learning-rate schedule from the config, as if the run had used them from the start.

    A fresh optimiser from ``module.optimizer_factory`` (the config's) gives every hyper-parameter; a fresh
    schedule from ``module.scheduler_factory``, stepped once per completed iteration, gives the learning
    rate and the schedule's state. The moments (Adam's averages) are kept. Returns the changes, logged.
    """
    optimizer = module.optimizers().optimizer
    stand_ins = [{"params": [nn.Parameter(torch.zeros(1))]} for _ in optimizer.param_groups]
    fresh = module.optimizer_factory(stand_ins)
    schedule = module.lr_schedulers()
    if module.scheduler_factory is not None:
        fresh_schedule = module.scheduler_factory(fresh)
        for _ in range(module.current_epoch):  # one step per completed iteration, as training_step does
            fresh.step()
            fresh_schedule.step()
        schedule.load_state_dict(fresh_schedule.state_dict())
    changes = []
    for index, (group, target) in enumerate(zip(optimizer.param_groups, fresh.param_groups)):
        for key, value in target.items():
            if key != "params" and group.get(key) != value:
                changes.append(f"param group {index} {key}: {group.get(key)!r} -> {value!r}")
                group[key] = value
    if changes:
        log.info(
            "resume: optimiser settings from the config (the checkpoint had others):\n  %s",
            "\n  ".join(changes),
        )
    return changes
