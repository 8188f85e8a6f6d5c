"""Qwen-Image and Qwen-Image-Edit over diffusers' ``QwenImagePipeline`` / ``QwenImageEditPipeline``: what
differs from FLUX.1, all taken from the pipelines.

- **Latents.** A video VAE (``AutoencoderKLQwenImage``) seen at one frame, its latents normalised per channel
  (``(z - latents_mean) / latents_std``). The transformer (``QwenImageTransformer2DModel``, a 20B MMDiT of
  60 double-stream blocks) reads 2x2 patches as tokens (the pipeline's ``_pack_latents``), placed by the RoPE
  of ``img_shapes``. The algorithms keep latents as ``[B, C, H, W]``, as for FLUX.
- **Text.** Qwen2.5-VL's last hidden states of the prompt inside a chat template, the template's system
  prefix dropped. Sequences keep their own lengths, so rows are padded and masked. Qwen-Image has no pooled
  text vector; the mask (``Conditioning.prompt_mask``) travels with the embeddings through CFG and DGPO's text
  dropout.
- **Guidance.** True CFG, the negative prompt ``" "`` (the model card's and Flow-GRPO's), the combination
  rescaled token by token to the conditional velocity's norm (:meth:`QwenImagePolicy.guide`), as the
  pipelines' ``true_cfg_scale`` does. No distilled guidance embedding.
- **Schedule.** FLUX's ``linspace(1, 1/T, T)`` with the dynamic ``mu`` of the generated tokens
  (:func:`~g2rpo.policies.flux.packed_sigmas`), through Qwen-Image's own scheduler config (exponential time
  shift, terminal sigma 0.02). The transformer takes sigma itself (the pipelines divide timesteps by 1000).
- **Editing (Qwen-Image-Edit).** The source image conditions twice, as ``QwenImageEditPipeline`` does: the
  VL encoder reads it inside the instruction's template (``<|vision_start|><|image_pad|><|vision_end|>``), and
  its VAE latents (the mode, normalised) are packed and appended after the generated tokens, with a second
  entry in ``img_shapes``; the velocity is read off the generated tokens. The CFG negative is ``" "`` with the
  same source, so guidance drops the instruction, not the image. The pipeline encodes the source at about
  1 MP whatever the output size (1024 px for a square source); ``source_resolution`` sets that side here.
"""

from __future__ import annotations

from functools import partial

import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline
from torch import Tensor
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from g2rpo.data import source_images
from g2rpo.policies.flux import PackedLatentPolicy
from g2rpo.policies.transformer import load_pipeline, missing_weights
from g2rpo.types import Conditioning


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor: transformers builds that one only with torchvision,
    which this project does not depend on (it has no CPU build for the pinned torch), and the edit pipeline
    gives the processor images only. Loads from the model's ``processor`` folder like the stock class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_qwen_image_pipeline(path: str, dtype: str = "bfloat16") -> QwenImagePipeline:
    """Load Qwen-Image from a local directory or the Hugging Face cache, never the network."""
    return load_pipeline(QwenImagePipeline, path, dtype, "Qwen-Image")


def load_qwen_image_edit_pipeline(path: str, dtype: str = "bfloat16") -> QwenImageEditPipeline:
    """Load Qwen-Image-Edit from a local directory or the Hugging Face cache, never the network; its VL
    processor as :class:`ImageOnlyQwen2VLProcessor`."""
    try:
        processor = ImageOnlyQwen2VLProcessor.from_pretrained(
            path, subfolder="processor", local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise missing_weights("Qwen-Image-Edit", path, error) from error
    return load_pipeline(QwenImageEditPipeline, path, dtype, "Qwen-Image-Edit", processor=processor)


def pad_text(embeds: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Token embeddings ``[N, L, D]`` and their mask (None: every token counts) padded with masked zeros
    to ``length`` tokens; masked tokens are invisible to the transformer (its attention skips them and the
    text RoPE counts positions from the start)."""
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pad = length - embeds.shape[1]
    return torch.nn.functional.pad(embeds, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))


class QwenImagePolicy(PackedLatentPolicy):
    """A Qwen-Image policy: a ``QwenImageTransformer2DModel`` trained by LoRA or fully, Qwen2.5-VL and the
    VAE frozen (the module docstring says what differs from FLUX)."""

    negative_prompt = " "

    @property
    def input_weight(self) -> Tensor:
        return self.transformer.img_in.weight

    @torch.no_grad()
    def encode(
        self, prompts: list[str], negative: bool = True, sources: Tensor | None = None
    ) -> Conditioning:
        """Embeddings and masks of ``prompts``; the negatives are ``" "``, with each
        row's source for an edit (one encoding broadcast to every row otherwise)."""
        prompts = list(prompts)
        context = None if sources is None else self.encode_source(sources)
        embeds, mask = self.encode_text(prompts, sources)
        if not negative:
            embeds, mask = pad_text(embeds, mask, embeds.shape[1])
            return Conditioning(embeds, context_latents=context, prompt_mask=mask)
        rows = len(prompts) if sources is not None else 1
        negative_embeds, negative_mask = self.encode_text([self.negative_prompt] * rows, sources)
        length = max(embeds.shape[1], negative_embeds.shape[1])
        embeds, mask = pad_text(embeds, mask, length)
        negative_embeds, negative_mask = pad_text(negative_embeds, negative_mask, length)
        return Conditioning(
            embeds,
            negative_prompt_embeds=negative_embeds.expand(len(prompts), -1, -1),
            context_latents=context,
            prompt_mask=mask,
            negative_prompt_mask=negative_mask.expand(len(prompts), -1),
        )

    def encode_text(self, prompts: list[str], sources: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The pipeline's own ``encode_prompt``: embeddings ``[N, L, D]`` and their mask (None when no row is
        padded). ``sources``: the images edited (an editing model's; :meth:`encode` refuses them here)."""
        return self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )

    def transformer_velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        embeds: Tensor,
        pooled: None,
        mask: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """``pooled``: none (Qwen-Image has no pooled text vector); ``mask``: the text mask; ``context``: an edit's source latents, appended as
        tokens after the generated ones and listed second in ``img_shapes``."""
        batch, channels, height, width = latents.shape
        dtype = self.compute_dtype
        pack = QwenImagePipeline._pack_latents
        hidden = pack(latents, batch, channels, height, width).to(dtype)
        tokens = hidden.shape[1]
        shapes = [(1, height // 2, width // 2)]
        if context is not None:
            source_height, source_width = context.shape[-2:]
            source = pack(context, batch, channels, source_height, source_width).to(dtype)
            hidden = torch.cat([hidden, source], dim=1)
            shapes.append((1, source_height // 2, source_width // 2))
        output = self.active(
            hidden_states=hidden,
            timestep=sigma,
            encoder_hidden_states=embeds.to(dtype),
            # as the pipelines: no mask when no token is padded (the attention then needs none)
            encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask,
            img_shapes=[shapes] * batch,
            return_dict=False,
        )[0][:, :tokens]
        # back to [B, C, H, W]: _unpack_latents takes the image size in pixels and gives one frame
        scale = self.vae_scale
        return QwenImagePipeline._unpack_latents(output, height * scale, width * scale, scale)[:, :, 0]

    def guide(self, uncond: Tensor, text: Tensor, guidance_scale: float) -> Tensor:
        """``u + w (c - u)`` rescaled, token by token (a 2x2 patch of latents), to the norm of the conditional
        velocity ``c``, as the pipelines' true CFG."""
        batch, channels, height, width = text.shape
        patches = (batch, channels, height // 2, 2, width // 2, 2)
        guided = super().guide(uncond, text, guidance_scale).reshape(patches)
        norm = partial(torch.linalg.vector_norm, dim=(1, 3, 5), keepdim=True)  # over a token's features
        return (guided * (norm(text.reshape(patches)) / norm(guided))).reshape(text.shape)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """One frame through the VAE, normalised by its ``latents_mean`` / ``latents_std`` (:meth:`decode`'s
        inverse)."""
        config = self.vae.config
        pixels = images.to(self.device, self.vae.dtype)[:, :, None] * 2 - 1
        latents = self.vae.encode(pixels).latent_dist.mode().float()
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        return ((latents - mean) / std)[:, :, 0]

    def decode(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        latents = latents.float()[:, :, None] * std + mean
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pt")


class QwenImageEditPolicy(QwenImagePolicy):
    """Qwen-Image-Edit: Qwen-Image's transformer conditioned on a source image, through the VL encoder and
    as in-context latents. Prompts are instructions; each carries its source image
    (``g2rpo.data.source_images``).

    ``source_resolution``: the side the source is encoded at, by the VAE and the VL encoder (the stock
    pipeline's is 1024 for a square source; None: the policy's own resolution)."""

    def __init__(self, *args, source_resolution: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source_resolution = source_resolution
        if source_resolution is not None:
            self._check_resolution(source_resolution, "model.source_resolution")

    @property
    def source_size(self) -> int:
        return self.source_resolution or self.resolution

    def sources(self, metadata: list[dict]) -> Tensor | None:
        return source_images(metadata, self.source_size, self.device)

    @torch.no_grad()
    def encode_source(self, images: Tensor) -> Tensor:
        """The pipeline's own preprocessing (to [-1, 1] at ``source_size``) and VAE encoding, one frame."""
        pipe = self.pipeline
        pixels = pipe.image_processor.preprocess(images, self.source_size, self.source_size)
        latents = pipe._encode_vae_image(pixels[:, :, None].to(self.device, self.vae.dtype), generator=None)
        return latents[:, :, 0]

    def encode_text(self, prompts: list[str], sources: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The instructions in the edit template with their sources, which the VL encoder reads as the stock
        pipeline gives them: 8-bit images at ``source_size``."""
        if sources is None:
            raise ValueError(
                f"{type(self).__name__} edits a source image: every prompt needs one (metadata `source` or "
                "`source_image`, docs/models.md, editing)"
            )
        processor = self.pipeline.image_processor
        images = processor.numpy_to_pil(processor.pt_to_numpy(sources.float().cpu()))
        images = [processor.resize(image, self.source_size, self.source_size) for image in images]
        return self.pipeline.encode_prompt(prompt=prompts, image=images, device=self.device)
