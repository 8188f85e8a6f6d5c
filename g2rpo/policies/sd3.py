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
from g2rpo.types import Conditioning


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

    @torch.no_grad()
    def encode(self, prompts: list[str], negative: bool = True) -> Conditioning:
        embeds, pooled = self._encode(list(prompts))
        if not negative:
            return Conditioning(embeds, pooled)
        # The negative prompt is the same "" for every row: encode it once and broadcast (a view).
        negative_embeds, negative_pooled = self._encode([""])
        return Conditioning(
            embeds,
            pooled,
            negative_embeds.expand(len(prompts), -1, -1),
            negative_pooled.expand(len(prompts), -1),
        )

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        detach_uncond: bool = False,
    ) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
        hidden, embeds, pooled = latents, cond.prompt_embeds, cond.pooled_prompt_embeds
        guided = guidance_scale > 1.0
        if guided:
            if cond.negative_prompt_embeds is None:
                raise ValueError(
                    "guidance_scale > 1 needs negative embeddings: encode(prompts, negative=True)"
                )
            hidden, sigma = torch.cat([hidden, hidden]), torch.cat([sigma, sigma])
            embeds = torch.cat([cond.negative_prompt_embeds, embeds])
            pooled = torch.cat([cond.negative_pooled_prompt_embeds, pooled])
        output = self.active_transformer(
            hidden_states=hidden.to(self.compute_dtype),
            timestep=sigma * self.pipeline.scheduler.config.num_train_timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0].float()
        self.nfe += hidden.shape[0]
        if not guided:
            return output
        uncond, text = output.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        return uncond + guidance_scale * (text - uncond)

    def sigmas(self, num_steps: int) -> Tensor:
        return sigma_schedule(self.scheduler_config, num_steps)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> Tensor:
        size = self.resolution // self.vae_scale
        shape = (batch_size, self.transformer.config.in_channels, size, size)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
