"""What an evaluation's numbers depend on, pinned and recorded beside them.

Papers' numbers move with the resolution, the sampler and its step count, the CFG scale, the images per
prompt and the noise (UniRL#182/#221: GenEval2 from 7.9 to 20.4 with these alone), so every evaluation
writes its :class:`Protocol` into its JSON, and each suite's config pins the paper's values.

Noise is derived per image from the prompt's text (``noise="prompt"``): image ``k`` of prompt ``p`` starts
from ``seeded(seed, sha256(p), k)``, so any subset of a suite, any order and any batch size reproduces the
same images, and two checkpoints are compared on identical noise. ``noise="set"`` draws the whole set's
noise from one generator in order; only the shapes world's recorded tables use it, to keep their numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

NOISE = ("prompt", "set")
OVERALL = ("tasks", "images")


def image_seed(seed: int, prompt: str, k: int) -> int:
    """The seed of image ``k`` of ``prompt``: a hash of the suite's seed, the prompt's text and ``k``."""
    digest = np.frombuffer(hashlib.sha256(prompt.encode()).digest()[:16], dtype=np.uint32)
    key = [int(seed), *(int(word) for word in digest), int(k)]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Protocol:
    """A suite's sampling and scoring settings, as they were used (``resolution`` and ``sampler`` are read
    from the policy evaluated)."""

    num_steps: int | None  # the ODE's steps (flow policies); recorded as None for token policies
    guidance_scale: float
    images_per_prompt: int | None  # every prompt this many times (GenEval: 4) ...
    images_per_task: int | None  # ... or this many images per task, its prompts cycled (the shapes world)
    noise: str
    seed: int
    temperature: float  # token policies' image tokens (Janus-Pro); recorded as None for flow policies
    overall: str  # "tasks": the mean of the task means (GenEval); "images": the mean over images
    resolution: int | None = None
    sampler: str | None = None

    def __post_init__(self) -> None:
        if (self.images_per_prompt is None) == (self.images_per_task is None):
            raise ValueError(
                "eval: set exactly one of images_per_prompt (every prompt k times) and images_per_task "
                f"(k images per task); got images_per_prompt={self.images_per_prompt}, "
                f"images_per_task={self.images_per_task}"
            )
        if self.noise not in NOISE:
            raise ValueError(f"eval.noise={self.noise!r}: choose one of {', '.join(NOISE)}")
        if self.overall not in OVERALL:
            raise ValueError(f"eval.overall={self.overall!r}: choose one of {', '.join(OVERALL)}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"eval.num_steps={self.num_steps} must be >= 1")

    def to_json(self) -> dict:
        return asdict(self)
