"""A reward-curated dataset on disk: what ``python -m g2rpo.curate`` writes and ``algo=rft`` reads.

UniPic's stage-4 data (arXiv 2508.03320, sec. 3.3): samples scored by a reward model, those under a
threshold (0.9) discarded, the rest checked again by a second scorer. The directory holds every sample
that was scored, kept or not, so a report or another threshold can be made from it without sampling again::

    <directory>/samples.jsonl    one JSON object per scored image (CuratedSample's fields)
    <directory>/images/*.png     the images, 8-bit RGB, named by prompt and sample index

JSON only: nothing read here can run code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SAMPLES_FILE = "samples.jsonl"
IMAGES_DIR = "images"


@dataclass
class CuratedSample:
    """One scored image: its prompt, the reward terms, and whether it passed the threshold and the check."""

    prompt: str
    metadata: dict
    prompt_id: int  # the prompt's index in the dataset it was drawn from
    sample: int  # which of the prompt's N images
    image: str  # path relative to the dataset directory
    scores: dict[str, float]  # every term of the reward ensemble
    total: float  # the ensemble's weighted total, compared with the threshold
    check: float | None = None  # the second reward's total, when there is one
    kept: bool = False
    extra: dict = field(default_factory=dict)

    @staticmethod
    def image_name(prompt_id: int, sample: int) -> str:
        return f"{IMAGES_DIR}/{prompt_id:06d}_{sample:03d}.png"


def read_samples(directory: str | Path) -> list[CuratedSample]:
    """Every sample of a curated dataset, in the order written; an unreadable line names its file and line."""
    path = Path(directory) / SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no curated dataset here; make one with `python -m g2rpo.curate curate.output={directory}`"
        )
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            samples.append(CuratedSample(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(
                f"{path}:{number}: not a curated sample ({error}); regenerate the dataset with "
                "`python -m g2rpo.curate`"
            ) from None
    return samples


def read_kept(directory: str | Path) -> list[CuratedSample]:
    """The samples that passed the threshold and the check: the fine-tuning set."""
    kept = [sample for sample in read_samples(directory) if sample.kept]
    if not kept:
        raise ValueError(f"{directory}: no sample was kept; lower curate.threshold or sample more per prompt")
    return kept


def sample_line(sample: CuratedSample) -> str:
    return json.dumps(asdict(sample), sort_keys=True) + "\n"
