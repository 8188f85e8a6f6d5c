"""``metrics.jsonl``: the run's machine-readable record, which ``experiments/`` aggregates into tables.

W&B keeps offline metrics only in its binary log and CSV columns change as keys appear, so every run also
appends one JSON object per logged step here. After a resume the interrupted iteration may appear twice;
readers keep the last line of each step (:func:`read_metrics`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class JsonlLogger(Logger):
    def __init__(self, save_dir: str | Path, filename: str = "metrics.jsonl") -> None:
        super().__init__()
        self._save_dir = Path(save_dir)
        self.path = self._save_dir / filename

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
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl``, one per step, sorted by step.

    Lines of the same step are merged (evaluation metrics join the iteration's), later values winning.
    """
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]
