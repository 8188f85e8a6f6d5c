"""Uniform prompt sampling with a fixed group size: the baseline every paper uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g2rpo.curriculum.base import Curriculum, Probe
from g2rpo.data import PromptDataset
from g2rpo.types import PromptBatch


@dataclass
class UniformCurriculum(Curriculum):
    """``prompts_per_iteration`` distinct prompts drawn uniformly, ``group_size`` samples each.

    As Flow-GRPO's ``DistributedKRepeatSampler``: a fresh random subset every iteration (no epochs over
    the prompt set). Paper sizing is 48 prompts x 24 samples; the defaults here fit a CPU.
    """

    prompts_per_iteration: int = 4
    group_size: int = 8

    def __post_init__(self) -> None:
        if self.prompts_per_iteration < 1 or self.group_size < 2:
            raise ValueError(
                "curriculum: prompts_per_iteration must be >= 1 and group_size >= 2 "
                f"(a group of one has no baseline); got {self.prompts_per_iteration}, {self.group_size}"
            )

    def sample(
        self, dataset: PromptDataset, generator: torch.Generator, probe: Probe | None = None
    ) -> PromptBatch:
        if self.prompts_per_iteration > len(dataset):
            raise ValueError(
                f"curriculum.prompts_per_iteration={self.prompts_per_iteration} exceeds the "
                f"{len(dataset)} prompts of the dataset"
            )
        prompt_ids = torch.randperm(len(dataset), generator=generator)[: self.prompts_per_iteration]
        sizes = torch.full((self.prompts_per_iteration,), self.group_size)
        return PromptBatch.from_groups(dataset.prompts, dataset.metadata, prompt_ids, sizes)
