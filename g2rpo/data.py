"""Prompt datasets: a list of prompts with one metadata dict each (GenEval tags, OCR targets, ...)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: prompt file formats, by suffix (any case)
PROMPT_SUFFIXES = (".txt", ".jsonl", ".json")


def _read_text(path: Path) -> str:
    """A data file's text, or an error that says where the papers' sets are expected (never downloaded)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"data.path: no file at {path}. Set data.path, or G2RPO_DATA to the folder holding the papers' "
            "prompt sets (docs/rewards.md, prompt data)"
        )
    try:  # utf-8-sig: a byte-order mark (Windows editors) would otherwise break the first JSON line
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); save the file as UTF-8") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line, numbered as an editor numbers them."""
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            yield number, line


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSONL file; any other line fails, naming it."""
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not a JSON object ({error}); fix or delete that line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{number}: not a JSON object but a JSON {type(record).__name__} ({line.strip()[:80]}); "
                'each line must be an object such as {"prompt": "a photo of a cat"}: fix or delete that line'
            )
        yield number, record


def _take_prompt(record: dict, where: str) -> str:
    """Pop ``record["prompt"]``, which must be a non-empty string: a null would train on the prompt "None"."""
    if "prompt" not in record:
        raise ValueError(
            f'{where}: no "prompt" key (the keys are {sorted(record)}); the prompt must be under "prompt", '
            "any other key is metadata"
        )
    prompt = record.pop("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}; fix or delete it')
    return prompt


def read_prompt_file(path: Path) -> tuple[list[str], list[dict]]:
    """The prompts and metadata of a ``.txt``, ``.jsonl`` or ``.json`` file (see :class:`PromptDataset`)."""
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"{path}: unknown prompt file type {path.suffix or '(no suffix)'!r}; use one of "
            f"{', '.join(PROMPT_SUFFIXES)} (docs/rewards.md, prompt data)"
        )
    if suffix == ".txt":
        prompts = [line.strip() for _, line in _lines(path)]
        return prompts, [{} for _ in prompts]
    if suffix == ".jsonl":
        records = [(f"{path}:{number}", record) for number, record in _json_lines(path)]
    else:
        try:
            items = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error}); fix the file") from None
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: a .json prompt file must hold a JSON array (of prompts, or of objects with a "
                f'"prompt" key), not a JSON {type(items).__name__}; or write one object per line to a .jsonl'
            )
        records = [
            (
                f"{path}: array item {index} (counting from 0)",
                {"prompt": item} if isinstance(item, str) else item,
            )
            for index, item in enumerate(items)
        ]
        for where, record in records:
            if not isinstance(record, dict):
                raise ValueError(
                    f'{where}: {record!r} is neither a prompt string nor an object with a "prompt" key; '
                    "fix or delete it"
                )
    prompts = [_take_prompt(record, where) for where, record in records]
    return prompts, [record for _, record in records]


class PromptDataset:
    """Prompts given inline or read from a file (suffixes in any case).

    ``.txt``: one prompt per line. ``.jsonl``: one object per line with a ``prompt`` key; the other keys
    are the prompt's metadata (the format of Flow-GRPO's ``dataset/geneval/*_metadata.jsonl``). ``.json``: an
    array of prompt strings, or of such objects. Blank lines are skipped; a prompt must be a non-empty string,
    and a line that is not fails naming the file and line. Another suffix fails, listing these.
    """

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        path: str | None = None,
    ) -> None:
        if (prompts is None) == (path is None):
            raise ValueError(
                "data: give exactly one of `prompts` (a list) or `path` (a .txt, .jsonl or .json file)"
            )
        if path is not None:
            prompts, metadata = read_prompt_file(Path(path))
        blank = [index for index, p in enumerate(prompts) if p is None or not str(p).strip()]
        if blank:
            raise ValueError(f"data.prompts: the prompts at {blank} (counting from 0) are null or empty")
        self.prompts = [str(p) for p in prompts]
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in self.prompts]
        if not self.prompts:
            raise ValueError("data: the prompt list is empty")
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"data: {len(self.prompts)} prompts but {len(self.metadata)} metadata entries")

    def __len__(self) -> int:
        return len(self.prompts)


def read_image(path: Path, size: int) -> Tensor:
    """An image file as ``[3, size, size]`` floats in [0, 1] (resized; the policy's processor does the rest)."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def source_images(metadata: Sequence[dict], size: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The source images ``[N, 3, size, size]`` in [0, 1] of the edits in ``metadata``: a shapes-world scene
    (``source``, rendered at its own ``image_size`` and resized) or an image file (``source_image``). None when
    no prompt is an edit; a batch that mixes edits and text-to-image prompts is an error."""
    from g2rpo.types import source_of

    found = [source_of(meta) is not None for meta in metadata]
    if not any(found):
        return None
    if not all(found):
        raise ValueError(
            f"{found.count(False)} of {len(found)} prompts have no source image while the others are edits: "
            "a data set is either text-to-image or editing"
        )
    images = []
    for meta in metadata:
        if "source" in meta:
            from g2rpo.shapes.editing import as_objects
            from g2rpo.shapes.world import render

            image = render(as_objects(meta["source"]), size=int(meta.get("image_size", 32)))
            if image.shape[-1] != size:
                image = torch.nn.functional.interpolate(
                    image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )[0].clamp(0, 1)
        else:
            image = read_image(Path(meta["source_image"]), size)
        images.append(image)
    return torch.stack(images).to(device)


def pair_dataset(path: str, image_root: str | None = None, image_size: int = 384) -> PromptDataset:
    """Pair-GRPO data at scale (e.g. PairUni's PairUG-16k) from a JSONL file, one pair per line:
    ``{"prompt": caption, "question", "answer", "image": path of the understanding image, "kind": "aligned" |
    "retrieved", "similarity": float or null, ...more caption metadata}``. Images are read when a rollout needs
    them (``image_root`` prefixes relative paths; 16k images in memory would take gigabytes), but every file
    is checked here, so a missing one fails at start, not mid-run."""
    root = Path(image_root) if image_root else Path(path).parent
    prompts, metadata = [], []
    for number, record in _json_lines(Path(path)):
        missing = {"prompt", "question", "answer", "image", "kind"} - record.keys()
        if missing:
            raise ValueError(
                f"{path}:{number}: a pair needs {sorted(missing)} (the keys are {sorted(record)})"
            )
        prompt = _take_prompt(record, f"{path}:{number}")
        image = Path(record.pop("image"))
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{number}: no image at {image}")
        pair = {key: record.pop(key) for key in ("question", "answer", "kind")}
        pair["similarity"] = record.pop("similarity", None)
        pair["qtype"] = record.pop("qtype", "all")
        pair["image"], pair["image_size"] = str(image), image_size
        prompts.append(prompt)
        metadata.append({**record, "pair": pair})
    return PromptDataset(prompts=prompts, metadata=metadata)


#: the columns of a preference-pairs file, each line ``{"caption", "image_a", "image_b", "preferred"}``
PREFERENCE_COLUMNS = ("caption", "image_a", "image_b", "preferred")


def preference_pairs(
    path: str, image_root: str | None = None, image_size: int = 448, both_orders: bool = True
) -> PromptDataset:
    """Human preference pairs to train a judge (``task="compare"``) from a JSONL file, one pair per line:
    ``{"caption": the prompt both images were drawn for, "image_a": path, "image_b": path, "preferred": "A" |
    "B"}``, other keys kept as metadata (e.g. an export of Pick-a-Pic, HPDv2 or ImageRewardDB with the source
    and its ids). ``image_root`` prefixes relative paths (default: the file's folder); every file is checked
    here and read when its sample is rolled out, at ``image_size``.

    ``both_orders`` shows each pair twice, A/B and swapped (its label with it), so that a judge cannot earn
    the ranking reward by favouring one position. Errors name the file and line."""
    root = Path(image_root) if image_root else Path(path).parent
    prompts, metadata = [], []
    for number, record in _json_lines(Path(path)):
        where = f"{path}:{number}"
        missing = [key for key in PREFERENCE_COLUMNS if key not in record]
        if missing:
            raise ValueError(
                f"{where}: a preference pair needs {list(PREFERENCE_COLUMNS)}; missing {missing} (the keys are "
                f"{sorted(record)})"
            )
        caption = record.pop("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f'{where}: "caption" must be a non-empty string, got {caption!r}')
        preferred = record.pop("preferred")
        if preferred not in ("A", "B"):
            raise ValueError(
                f'{where}: "preferred" must be "A" or "B" (image_a or image_b), got {preferred!r}'
            )
        images = []
        for key in ("image_a", "image_b"):
            image = Path(str(record.pop(key)))
            image = image if image.is_absolute() else root / image
            if not image.is_file():
                raise FileNotFoundError(f"{where}: no {key} at {image}")
            images.append(str(image))
        orders = [(images, preferred)]
        if both_orders:
            orders.append((images[::-1], "B" if preferred == "A" else "A"))
        for (first, second), label in orders:
            prompts.append(caption)
            metadata.append(
                {
                    **record,
                    "image": first,
                    "other_image": second,
                    "preferred": label,
                    "image_size": image_size,
                }
            )
    return PromptDataset(prompts=prompts, metadata=metadata)
