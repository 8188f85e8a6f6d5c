"""FLUX.1 over a diffusers ``FluxPipeline``: what differs from SD3, all taken from the pipeline itself.

- **Packed latents.** The transformer sees 2x2 patches of the VAE latents as tokens, with positional
  ``img_ids``. The algorithms keep latents in the VAE's ``[B, C, H, W]`` layout (the SDE math and the
  per-element mean log-probability do not depend on the layout), and ``velocity`` packs and unpacks with
  the pipeline's own ``_pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``.
- **Schedule.** ``sigmas = linspace(1, 1/T, T)`` shifted by the resolution-dependent ``mu`` of
  ``calculate_shift(image tokens)`` (dynamic shifting), plus the terminal 0: exactly the pipeline's grid
  (Flow-GRPO's FLUX rollouts use it too, brief ``flow_grpo_family.md`` 2.1). DanceGRPO, MixGRPO and G2RPO
  instead shift the same grid by a fixed ``s = 3`` (their ``sd3_time_shift``: ``s t / (1 + (s - 1) t)``;
  brief ``g2rpo_dgpo.md`` 1.5): ``shift: 3.0`` selects that, through the scheduler's static shift.
- **Guidance.** FLUX.1-dev is guidance-distilled: the scale (3.5 in Flow-GRPO, DanceGRPO, MixGRPO and
  G2RPO) is an input embedding, ``model.guidance``, and no true CFG runs by default (algorithms' CFG 1).
  A true-CFG scale > 1 uses the empty prompt's embeddings as the negative, as ``true_cfg_scale`` does.
- **Timestep.** The transformer takes sigma itself (the pipeline divides its 0-1000 timesteps by 1000).
- **Editing (FLUX.1-Kontext).** ``FluxKontextPipeline`` encodes the source image with the VAE (its mode,
  ``(z - shift) * scale``), packs it like the latents and appends its tokens after the generated ones, with
  image ids whose first coordinate is 1 instead of 0; the velocity is read off the generated tokens only.
  :class:`FluxKontextPolicy` does the same with the pipeline's own methods. The schedule's ``mu`` counts the
  generated tokens only, as the pipeline's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from g2rpo.policies.transformer import TransformerPolicy, load_pipeline
from g2rpo.sampling import sigma_schedule


def load_flux_pipeline(path: str, dtype: str = "bfloat16") -> FluxPipeline:
    """Load FLUX.1 from a local directory or the Hugging Face cache, never the network."""
    return load_pipeline(FluxPipeline, path, dtype, "FLUX.1")


def load_flux_kontext_pipeline(path: str, dtype: str = "bfloat16") -> FluxKontextPipeline:
    """Load FLUX.1-Kontext from a local directory or the Hugging Face cache, never the network."""
    return load_pipeline(FluxKontextPipeline, path, dtype, "FLUX.1-Kontext")


def packed_sigmas(
    config: Mapping[str, Any], num_steps: int, image_tokens: int, shift: float | None = None
) -> Tensor:
    """The grid of the pipelines that pack latents (FLUX.1, Qwen-Image): ``linspace(1, 1/T, T)`` shifted by
    the ``mu`` of ``calculate_shift(image_tokens)`` (the scheduler's dynamic shifting), or by a static
    ``shift``, plus the terminal 0."""
    unshifted = np.linspace(1.0, 1 / num_steps, num_steps)
    if shift is not None:
        static = {**config, "use_dynamic_shifting": False, "shift": shift}
        return sigma_schedule(static, num_steps, sigmas=unshifted)
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return sigma_schedule(config, num_steps, mu=mu, sigmas=unshifted)


class PackedLatentPolicy(TransformerPolicy):
    """A policy whose pipeline packs latents in 2x2 patches (FLUX.1, Qwen-Image): latents kept ``[B, C, H, W]``
    with ``C`` the transformer's input channels / 4, and :func:`packed_sigmas`'s grid."""

    def __init__(self, *args, shift: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shift = shift  # None: the pipeline's dynamic mu; a number: that static shift

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale

    @property
    def num_image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    def sigmas(self, num_steps: int) -> Tensor:
        return packed_sigmas(self.scheduler_config, num_steps, self.num_image_tokens, self.shift)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> Tensor:
        shape = (batch_size, self.transformer.config.in_channels // 4, self.latent_size, self.latent_size)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)


class FluxPolicy(PackedLatentPolicy):
    """A FLUX.1 policy (``FluxTransformer2DModel``: joint double-stream blocks, then single-stream ones)."""

    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, *args, guidance: float = 3.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guidance = guidance

    @property
    def latent_multiple(self) -> int:
        return self.vae_scale * 2  # latents are packed in 2x2 patches

    @property
    def input_weight(self) -> Tensor:
        return self.transformer.x_embedder.weight

    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    def transformer_velocity(
        self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor, context: Tensor | None = None
    ) -> Tensor:
        """``context``: an edit's source latents (Kontext), appended as tokens with image ids ``(1, y, x)``."""
        batch, channels, height, width = latents.shape
        dtype = self.compute_dtype
        transformer = self.active
        hidden = FluxPipeline._pack_latents(latents, batch, channels, height, width).to(dtype)
        ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, dtype)
        tokens = hidden.shape[1]
        if context is not None:
            source_height, source_width = context.shape[-2:]
            source = FluxPipeline._pack_latents(context, batch, channels, source_height, source_width)
            source_ids = FluxPipeline._prepare_latent_image_ids(
                batch, source_height // 2, source_width // 2, latents.device, dtype
            )
            source_ids[..., 0] = 1
            hidden, ids = torch.cat([hidden, source.to(dtype)], dim=1), torch.cat([ids, source_ids])
        output = transformer(
            hidden_states=hidden,
            timestep=sigma,
            guidance=torch.full_like(sigma, self.guidance) if transformer.config.guidance_embeds else None,
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=ids,
            return_dict=False,
        )[0][:, :tokens]
        # back to [B, C, H, W]: _unpack_latents takes the image size in pixels and the VAE factor
        return FluxPipeline._unpack_latents(
            output, height * self.vae_scale, width * self.vae_scale, self.vae_scale
        )


class FluxKontextPolicy(FluxPolicy):
    """FLUX.1-Kontext-dev, an in-context editing model: a FLUX.1 transformer that also reads the source
    image's tokens. Prompts are instructions; each carries its source image (``g2rpo.data.source_images``)."""

    @torch.no_grad()
    def encode_source(self, images: Tensor) -> Tensor:
        """The pipeline's own preprocessing (to [-1, 1] at the policy's resolution) and VAE encoding."""
        pipe = self.pipeline
        pixels = pipe.image_processor.preprocess(images, self.resolution, self.resolution)
        return pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None)
