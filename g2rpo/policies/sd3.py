"""The SD3 family (SD3, SD3.5) over a diffusers ``StableDiffusion3Pipeline``.

The pipeline supplies the parts: ``encode_prompt`` (CLIP-L + CLIP-G + optional T5), the
``FlowMatchEulerDiscreteScheduler`` config, the VAE and its image processor. We only drive the
``SD3Transformer2DModel`` step by step, because RL needs every intermediate latent and log-probability.
The same class drives the tiny test model, the embedded world and SD3.5-Large: nothing is special-cased.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from g2rpo.policies.transformer import TransformerPolicy, load_pipeline
from g2rpo.sampling import sigma_schedule


def load_sd3_pipeline(
    path: str,
    dtype: str = "bfloat16",
    variant: str | None = None,
    text_encoder_3: bool = True,
) -> StableDiffusion3Pipeline:
    """Load an SD3 / SD3.5 pipeline from a local directory or the Hugging Face cache, never the network.

    ``text_encoder_3=False`` drops T5-XXL (about 9 GB in bf16); the pipeline then feeds zeros in its place,
    as diffusers documents for memory-constrained SD3 use.
    """
    extra = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    return load_pipeline(StableDiffusion3Pipeline, path, dtype, "SD3", variant=variant, **extra)


class SD3Policy(TransformerPolicy):
    """An SD3-architecture policy (``SD3Transformer2DModel``: joint blocks over patchified latents)."""

    @property
    def input_weight(self) -> Tensor:
        return self.transformer.pos_embed.proj.weight

    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def transformer_velocity(self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        return self.active(
            hidden_states=latents.to(self.compute_dtype),
            timestep=sigma * self.pipeline.scheduler.config.num_train_timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def sigmas(self, num_steps: int) -> Tensor:
        return sigma_schedule(self.scheduler_config, num_steps)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> Tensor:
        size = self.resolution // self.vae_scale
        shape = (batch_size, self.transformer.config.in_channels, size, size)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)


class SD3EditPolicy(SD3Policy):
    """In-context editing with an SD3 transformer, as a diptych: the source image's latents sit beside the
    generated image's (along the width), the joint blocks attend over both, and only the generated half's
    velocity is kept. The halves are told apart by their positions in the transformer's position table,
    which must hold twice the image width (``pos_embed_max_size``).

    FLUX.1-Kontext appends the source tokens to the sequence with RoPE ids ``(1, y, x)``; SD3's positions are
    a cropped absolute table, so the diptych (as In-Context LoRA and ICEdit lay out edits for FLUX) is how
    its stock forward sees two images. The source is clean at every noise level; CFG drops the instruction
    and keeps the source (:meth:`FlowPolicy.velocity`).
    """

    def _check_resolution(self, resolution: int, key: str) -> None:
        super()._check_resolution(resolution, key)
        patches = resolution // self.latent_multiple
        table = self.transformer.config.pos_embed_max_size
        if table is not None and 2 * patches > table:
            raise ValueError(
                f"{key}={resolution}: a diptych of two {patches}-patch-wide images needs pos_embed_max_size "
                f">= {2 * patches}; this transformer's is {table}"
            )

    def encode_source(self, images: Tensor) -> Tensor:
        """Source images in the generated images' latent space (:meth:`encode_images`)."""
        return self.encode_images(images)

    def transformer_velocity(
        self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor, context: Tensor | None = None
    ) -> Tensor:
        if context is None:
            raise ValueError(
                f"{type(self).__name__} edits a source image: every prompt needs one (metadata `source` or "
                "`source_image`, docs/models.md, editing)"
            )
        width = latents.shape[-1]
        diptych = torch.cat([latents, context.to(latents.dtype)], dim=-1)
        return super().transformer_velocity(diptych, sigma, embeds, pooled)[..., :width]
