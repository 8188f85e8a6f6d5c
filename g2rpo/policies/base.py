"""The interface an algorithm sees: encode, velocity (with explicit CFG), decode, schedule, reference."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from g2rpo.data import source_images
from g2rpo.types import Conditioning


class Policy(nn.Module):
    """A model under training, whatever it samples: the part of the interface every algorithm uses.

    ``nfe`` counts network forwards, so every cost the framework reports is what actually ran (each kind of
    policy says what one forward is); ``nfe_backward`` those of them run with gradients enabled, which a
    backward pass follows (a flow policy counts them; compute budgets weigh them, ``g2rpo.callbacks.ComputeBudget``).
    """

    nfe: int = 0
    nfe_backward: int = 0

    def reference(self) -> AbstractContextManager:
        """Context in which the policy runs the frozen reference model (for KL terms)."""
        raise NotImplementedError

    def enable_reference(self) -> None:
        """Make ``reference()`` available; called once before training when an algorithm needs it."""

    #: trainable parameters that do not train for now (a progressive schedule's stage, g2rpo.schedule): they
    #: keep their place among :meth:`trainable_parameters`, with ``requires_grad`` False
    paused: frozenset[str] = frozenset()

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the run trains, whichever are paused: one fixed list for the optimiser, the EMA and
        checkpoints, so that pausing some never changes what they hold."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad or n in self.paused]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def train_only(self, names: Collection[str]) -> None:
        """Train only the trainable parameters ``names`` from now on; the others pause (no gradient, so AdamW
        skips them and their weights stay as they are) until a later call names them."""
        trainable = self.named_trainable_parameters()
        unknown = set(names) - {n for n, _ in trainable}
        if unknown:
            raise ValueError(f"not trainable parameters of {type(self).__name__}: {sorted(unknown)[:5]}")
        for name, parameter in trainable:
            parameter.requires_grad_(name in names)
        self.paused = frozenset(n for n, _ in trainable if n not in names)


def stack_rows(first: Conditioning, second: Conditioning) -> Conditioning:
    """The rows of ``first`` then those of ``second``, field by field (a field None in both stays None)."""
    return Conditioning(
        **{
            f.name: None
            if getattr(first, f.name) is None
            else torch.cat([getattr(first, f.name), getattr(second, f.name)])
            for f in fields(first)
        }
    )


class FlowPolicy(Policy):
    """A flow-matching text-to-image model under training.

    ``nfe`` counts the images pushed through the denoiser (a CFG forward of ``B`` images counts ``2B``).
    """

    def encode(
        self, prompts: list[str], negative: bool = True, sources: Tensor | None = None
    ) -> Conditioning:
        """Text conditioning for ``prompts`` (and the empty-prompt negatives when ``negative``); for an
        editing model, the ``sources`` images ``[N, 3, H, W]`` in [0, 1] too (:meth:`encode_source`)."""
        raise NotImplementedError

    def sources(self, metadata: list[dict]) -> Tensor | None:
        """The source images of the edits among ``metadata``, at this policy's resolution (None: no edit)."""
        return source_images(metadata, self.resolution, self.device)

    def encode_source(self, images: Tensor) -> Tensor:
        """An edit's source images as the ``context_latents`` an editing model conditions on."""
        raise ValueError(
            f"{type(self).__name__} generates from text only, and these prompts are edits of a source image: "
            "use an editing model (model=tiny_flux_kontext, flux_kontext, tiny_qwen_image_edit or "
            "qwen_image_edit)"
        )

    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] at this policy's resolution as the latents :meth:`decode` turns
        back into them (fine-tuning on image files: ``algo=rft`` offline)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode images into its latent space")

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        detach_uncond: bool = False,
    ) -> Tensor:
        """fp32 velocity ``v(x, sigma)``; with ``guidance_scale > 1`` the CFG combination (:meth:`guide`) of
        the unconditional and conditional rows, computed in one batched :meth:`transformer_velocity` call."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
        hidden, rows = latents, cond
        guided = guidance_scale > 1.0
        if guided:  # rows [unconditional; conditional]; the unconditional keeps the source (an edit's)
            hidden, sigma = torch.cat([hidden, hidden]), torch.cat([sigma, sigma])
            rows = stack_rows(cond.unconditional(), cond)
        # what only some models take: an edit's source; the text mask of prompts padded per batch
        extra = {"context": rows.context_latents, "mask": rows.prompt_mask}
        extra = {key: value for key, value in extra.items() if value is not None}
        output = self.transformer_velocity(
            hidden, sigma, rows.prompt_embeds, rows.pooled_prompt_embeds, **extra
        ).float()
        self.nfe += hidden.shape[0]
        if torch.is_grad_enabled():
            self.nfe_backward += hidden.shape[0]
        if not guided:
            return output
        uncond, text = output.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        return self.guide(uncond, text, guidance_scale)

    def guide(self, uncond: Tensor, text: Tensor, guidance_scale: float) -> Tensor:
        """The CFG combination ``u + w (c - u)`` of the unconditional and conditional velocities (a model
        whose pipeline combines them otherwise, as Qwen-Image's, says so here)."""
        return uncond + guidance_scale * (text - uncond)

    def transformer_velocity(
        self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor | None
    ) -> Tensor:
        """One forward of the active denoiser (the policy's or the reference) on ``[B, C, H, W]`` latents at
        noise levels ``sigma`` ``[B]`` with ``encode``'s embeddings, in the model's own input conventions."""
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

    def shard(self, mesh: DeviceMesh, cpu_offload: bool = False) -> None:
        """Shard the denoiser's weights over ``mesh`` with FSDP2 (``trainer=fsdp``); ``cpu_offload`` keeps the
        shards, their gradients and the optimiser state in host memory between uses."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded: use trainer=ddp")

    def save_pretrained(self, directory: str | Path) -> None:
        """Export the trained weights in the model library's own format (called on every rank; rank 0 writes)."""
        raise NotImplementedError
