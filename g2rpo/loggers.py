"""``metrics.jsonl``: the run's machine-readable record, which ``experiments/`` aggregates into tables.

W&B keeps offline metrics only in its binary log and CSV columns change as keys appear, so every run also
appends one JSON object per logged step here. After a resume the interrupted iteration may appear twice;
readers keep the last line of each step (:func:`read_metrics`).

Each record is one ``write`` of a whole line to a file opened for appending, so a kill leaves at most a
partial last line; the next run cuts it off (saying so) before it appends, and a reader skips a line that
is not JSON with a warning naming it, rather than fail a finished run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class JsonlLogger(Logger):
    def __init__(self, save_dir: str | Path, filename: str = "metrics.jsonl") -> None:
        super().__init__()
        self._save_dir = Path(save_dir)
        self.path = self._save_dir / filename
        self._repaired = False

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The resolved config is written next to this file by ``g2rpo.run``."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._save_dir.mkdir(parents=True, exist_ok=True)
        if not self._repaired:
            cut_partial_line(self.path)
            self._repaired = True
        line = (json.dumps(record) + "\n").encode()
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                written = os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError as error:
            raise OSError(f"could not append step {step}'s record to {self.path}: {error}") from error
        if written != len(line):  # the next run cuts the partial line off (cut_partial_line)
            raise OSError(f"{self.path}: step {step}'s record was written only in part (disk full?)")


def cut_partial_line(path: Path) -> None:
    """Remove a last line without its newline: a record cut short by a kill, which the next record appended
    to it would turn into an unreadable line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning(
        "%s:%d: removing a partial last record (a run stopped while writing it): %r",
        path,
        data.count(b"\n", 0, keep) + 1,
        data[keep:][:200],
    )
    os.truncate(path, keep)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl``, one per step, sorted by step.

    Lines of the same step are merged (evaluation metrics join the iteration's), later values winning. A
    line that is not a JSON record is skipped with a warning naming it.
    """
    by_step: dict[int, dict] = {}
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, KeyError, TypeError) as error:
            log.warning(
                "%s:%d: skipping a line that is not a metrics record (%s: %s); delete it to silence this",
                path,
                number,
                type(error).__name__,
                error,
            )
            continue
        by_step.setdefault(step, {}).update(record)
    return [by_step[step] for step in sorted(by_step)]
