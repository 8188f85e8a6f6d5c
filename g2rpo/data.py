"""Prompt datasets: a list of prompts with one metadata dict each (GenEval tags, OCR targets, ...)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class PromptDataset:
    """Prompts given inline or read from a file.

    ``.txt``: one prompt per line. ``.jsonl``: one object per line with a ``prompt`` key; the other keys
    are the prompt's metadata (the format of Flow-GRPO's ``dataset/geneval/*_metadata.jsonl``).
    """

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        path: str | None = None,
    ) -> None:
        if (prompts is None) == (path is None):
            raise ValueError("data: give exactly one of `prompts` (a list) or `path` (a .txt or .jsonl file)")
        if path is not None:
            prompts, metadata = self._read(Path(path))
        self.prompts = [str(p) for p in prompts]
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in self.prompts]
        if not self.prompts:
            raise ValueError("data: the prompt list is empty")
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"data: {len(self.prompts)} prompts but {len(self.metadata)} metadata entries")

    @staticmethod
    def _read(path: Path) -> tuple[list[str], list[dict]]:
        if not path.is_file():
            raise FileNotFoundError(f"data.path: no prompt file at {path}")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in lines]
            return [r.pop("prompt") for r in records], records
        return [line.strip() for line in lines], [{} for _ in lines]

    def __len__(self) -> int:
        return len(self.prompts)
