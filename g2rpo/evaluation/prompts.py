"""The suites' prompt sets, read from local files (none is downloaded at run time, and sets whose licence or
size forbids are not shipped): a missing file fails with where to get it.

``.txt``: one prompt per line. ``.jsonl``: one object per line with a ``prompt`` key, the rest its metadata
(GenEval's ``evaluation_metadata.jsonl``, Flow-GRPO's ``*_metadata.jsonl``). ``.json``: an array of prompts
or of such objects. ``.csv``: a header row, the prompt in ``prompt_column`` and the task in ``task_column``
(DrawBench's ``Prompts`` and ``Category``). Suffixes in any case; another suffix fails, listing these.
"""

from __future__ import annotations

import csv
from pathlib import Path

from g2rpo.data import PROMPT_SUFFIXES, PromptDataset


def prompt_set(
    path: str,
    source: str,
    prompt_column: str = "prompt",
    task_column: str | None = None,
    limit: int | None = None,
) -> PromptDataset:
    """The prompts of ``path`` (the first ``limit`` when given); ``source`` says how to get the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"eval.dataset.path: no prompt file at {file}. Get it with:\n  {source}")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        with file.open(newline="", encoding="utf-8-sig") as stream:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(stream)
            numbered = [(reader.line_num, row) for row in reader]
        rows = [row for _, row in numbered]
        columns = [prompt_column] + ([task_column] if task_column else [])
        missing = [c for c in columns if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"{file}:1: no column {missing} in the header {list(rows[0])}")
        for line, row in numbered:
            short = [c for c in columns if row[c] is None]  # a row shorter than the header
            if short:
                raise ValueError(f"{file}:{line}: the row has no {short[0]!r} cell; fix or delete that row")
        rows = [row for row in rows if row[prompt_column].strip()]
        prompts = [row[prompt_column].strip() for row in rows]
        tasks = [row[task_column] for row in rows] if task_column else None
        metadata = [{"tag": task} for task in tasks] if tasks else None
        dataset = PromptDataset(prompts=prompts, metadata=metadata)
    elif suffix in PROMPT_SUFFIXES:
        dataset = PromptDataset(path=str(file))
    else:
        raise ValueError(
            f"eval.dataset.path: {file} has the unknown suffix {file.suffix or '(none)'!r}; use one of "
            f"{', '.join((*PROMPT_SUFFIXES, '.csv'))}"
        )
    if limit is not None:
        dataset = PromptDataset(prompts=dataset.prompts[:limit], metadata=dataset.metadata[:limit])
    return dataset
