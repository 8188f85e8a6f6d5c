"""What a curriculum is: it draws an iteration's prompts, sizes their groups, and learns from the rewards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from g2rpo.data import PromptDataset
from g2rpo.types import Groups, PromptBatch, RewardOutput


@dataclass
class Probed:
    """What sampling the current policy on some prompts showed: one entry per sample."""

    rewards: Tensor  # [B] total reward (NaN = unscorable)
    grad_norms: Tensor | None = None  # [B] ||grad_theta log pi(y | x)|| on the trainable parameters


# Samples the current policy for a batch and scores it (CurES's pre-rollouts): called as
# ``probe(batch, num_steps=..., guidance_scale=..., batch_size=..., noise_level=..., grad_norms=...)``;
# the implementation, and what each argument does, is g2rpo.curriculum.probe.PolicyProbe.
Probe = Callable[..., Probed]


class Curriculum:
    """Draws the prompts of an iteration and learns from their rewards.

    ``sample`` must give every rank the same batch for the same generator state; ``update`` sees the
    rewards of what ``sample`` returned (for algorithms that score several images per sample, such as
    G2RPO's continuations, every scored image with its prompt). The state goes into checkpoints so a
    resumed run continues the same curriculum.
    """

    def sample(
        self, dataset: PromptDataset, generator: torch.Generator, probe: Probe | None = None
    ) -> PromptBatch:
        raise NotImplementedError

    def update(self, batch: PromptBatch, rewards: RewardOutput) -> dict[str, float]:
        """Learn from the iteration's rewards; returns metrics to log."""
        return {"curriculum/all_equal_frac": all_equal_fraction(batch.groups, rewards.total)}

    def diagnostics(self) -> dict[str, Tensor]:
        """Per-prompt state worth plotting (W&B histograms), keyed by name; empty if there is none."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def all_equal_fraction(groups: Groups, rewards: Tensor) -> float:
    """The fraction of groups whose finite rewards are all equal: groups that carry no learning signal
    (GRPO gives them zero advantage), i.e. rollouts wasted on prompts that are too easy or too hard."""
    ids = groups.ids.cpu()
    rewards = rewards.detach().float().cpu()
    finite = torch.isfinite(rewards)
    high = torch.full((groups.count,), -torch.inf).scatter_reduce(0, ids[finite], rewards[finite], "amax")
    low = torch.full((groups.count,), torch.inf).scatter_reduce(0, ids[finite], rewards[finite], "amin")
    return float((high <= low).float().mean())
