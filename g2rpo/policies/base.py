"""The interface an algorithm sees: encode, velocity (with explicit CFG), decode, schedule, reference."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from g2rpo.types import Conditioning


class FlowPolicy(nn.Module):
    """A flow-matching text-to-image model under training.

    ``nfe`` counts the images pushed through the denoiser (a CFG forward of ``B`` images counts ``2B``),
    so every cost the framework reports is what actually ran.
    """

    nfe: int = 0

    def encode(self, prompts: list[str], negative: bool = True) -> Conditioning:
        """Text conditioning for ``prompts`` (and the empty-prompt negatives when ``negative``)."""
        raise NotImplementedError

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        detach_uncond: bool = False,
    ) -> Tensor:
        """fp32 velocity ``v(x, sigma)``; with ``guidance_scale > 1`` the CFG combination ``u + w (c - u)``."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``."""
        raise NotImplementedError

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The config of the model's own flow-matching scheduler (its ``shift``, for other samplers)."""
        raise NotImplementedError

    def sigmas(self, num_steps: int) -> Tensor:
        """The model's sampling grid: ``num_steps + 1`` sigmas from 1 to 0 (fp32)."""
        raise NotImplementedError

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> Tensor:
        """``x_{sigma=1} ~ N(0, I)`` in the model's latent shape (fp32); a list gives one generator per sample."""
        raise NotImplementedError

    def reference(self) -> AbstractContextManager:
        """Context in which ``velocity`` runs the frozen reference model (for KL terms)."""
        raise NotImplementedError

    def enable_reference(self) -> None:
        """Make ``reference()`` available; called once before training when an algorithm needs it."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def shard(self, mesh: DeviceMesh, cpu_offload: bool = False) -> None:
        """Shard the denoiser's weights over ``mesh`` with FSDP2 (``trainer=fsdp``); ``cpu_offload`` keeps the
        shards, their gradients and the optimiser state in host memory between uses."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded: use trainer=ddp")

    def save_pretrained(self, directory: str | Path) -> None:
        """Export the trained weights in the model library's own format (called on every rank; rank 0 writes)."""
        raise NotImplementedError
