"""Evaluation images on disk in GenEval's output layout, which GenEval's own scorer reads.

GenEval's ``generation/diffusers_generate.py`` writes, per prompt of ``evaluation_metadata.jsonl``::

    <outdir>/00000/metadata.jsonl      the prompt's metadata line, one JSON object (``tag``, ``include``, ...)
    <outdir>/00000/samples/00000.png   its images, numbered from 0
    <outdir>/00000/samples/00001.png   ...

and ``evaluation/evaluate_images.py <outdir>`` walks every all-digit folder, ``json.load``s its
``metadata.jsonl`` and scores every ``samples/<digits>.png``. Writing the same layout lets the official
scorer check our numbers on the very same images. Every suite saves its images this way (``prompt`` is
always in the metadata); only GenEval's metadata makes the official scorer meaningful.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from g2rpo.types import source_of


def write_images(
    outdir: str | Path, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict], keys: Sequence[int]
) -> None:
    """Image ``i`` (``[3, H, W]`` in [0, 1]) as ``<outdir>/<prompt index>/samples/<keys[i]>.png``; prompts are
    numbered in order of first appearance, as in the metadata file they came from. An edit's prompt is its
    instruction and its source: one instruction over two sources is two folders."""
    outdir = Path(outdir)
    folders: dict[tuple[str, str], Path] = {}
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for array, prompt, meta, key in zip(pixels, prompts, metadata, keys, strict=True):
        condition = (prompt, json.dumps(source_of(meta), sort_keys=True))
        if condition not in folders:
            folder = outdir / f"{len(folders):05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps({**meta, "prompt": prompt}))
            folders[condition] = folder
        Image.fromarray(array).save(folders[condition] / "samples" / f"{key:05d}.png")


def read_images(outdir: str | Path) -> list[tuple[dict, Path]]:
    """``(metadata, image path)`` for every image of a folder in GenEval's layout, found exactly as
    ``evaluate_images.py``'s ``main`` finds them (all-digit folders, ``samples/\\d+.png``), sorted."""
    found = []
    for subfolder in sorted(os.listdir(outdir)):
        folder = os.path.join(outdir, subfolder)
        if not os.path.isdir(folder) or not subfolder.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as stream:
            metadata = json.load(stream)
        for name in sorted(os.listdir(os.path.join(folder, "samples"))):
            path = os.path.join(folder, "samples", name)
            if os.path.isfile(path) and re.match(r"\d+\.png", name):
                found.append((metadata, Path(path)))
    return found


def load_image(path: Path) -> np.ndarray:
    """A written image back as ``uint8 [H, W, 3]``."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))
