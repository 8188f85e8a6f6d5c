"""Prompt datasets: a list of prompts with one metadata dict each (GenEval tags, OCR targets, ...)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def _read_text(path: Path) -> str:
    """A data file's text, or an error that says where the papers' sets are expected (never downloaded)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"data.path: no file at {path}. Set data.path, or G2RPO_DATA to the folder holding the papers' "
            "prompt sets (docs/rewards.md, prompt data)"
        )
    return path.read_text()


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
        lines = [line for line in _read_text(path).splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in lines]
            return [r.pop("prompt") for r in records], records
        return [line.strip() for line in lines], [{} for _ in lines]

    def __len__(self) -> int:
        return len(self.prompts)


def read_image(path: Path, size: int) -> Tensor:
    """An image file as ``[3, size, size]`` floats in [0, 1] (resized; the policy's processor does the rest)."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def pair_dataset(path: str, image_root: str | None = None, image_size: int = 384) -> PromptDataset:
    """Pair-GRPO data at scale (e.g. PairUni's PairUG-16k) from a JSONL file, one pair per line:
    ``{"prompt": caption, "question", "answer", "image": path of the understanding image, "kind": "aligned" |
    "retrieved", "similarity": float or null, ...more caption metadata}``. Images are read when a rollout needs
    them (``image_root`` prefixes relative paths; 16k images in memory would take gigabytes), but every file
    is checked here, so a missing one fails at start, not mid-run."""
    records = [json.loads(line) for line in _read_text(Path(path)).splitlines() if line.strip()]
    root = Path(image_root) if image_root else Path(path).parent
    prompts, metadata = [], []
    for number, record in enumerate(records, 1):
        missing = {"prompt", "question", "answer", "image", "kind"} - record.keys()
        if missing:
            raise ValueError(f"{path}:{number}: a pair needs {sorted(missing)}")
        image = Path(record.pop("image"))
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{number}: no image at {image}")
        pair = {key: record.pop(key) for key in ("question", "answer", "kind")}
        pair["similarity"] = record.pop("similarity", None)
        pair["qtype"] = record.pop("qtype", "all")
        pair["image"], pair["image_size"] = str(image), image_size
        prompts.append(record.pop("prompt"))
        metadata.append({**record, "pair": pair})
    return PromptDataset(prompts=prompts, metadata=metadata)
