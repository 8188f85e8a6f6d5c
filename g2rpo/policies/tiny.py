"""Tiny SD3, FLUX, Qwen-Image, Qwen2.5-VL and Janus models built from configs in code: no download, random but seeded
weights.

They have the real architecture (``SD3Transformer2DModel``, optionally an ``AutoencoderKL``, two CLIP text
encoders; T5 omitted as diffusers allows; Qwen-Image's MMDiT, video VAE and Qwen2.5-VL with its vision
tower, the Qwen2.5-VL also alone as a judge; Janus's Llama, vision encoder and VQ-VAE) at a few hundred
thousand parameters, as diffusers' and transformers' own fast tests do, so the code path that drives SD3.5,
Qwen-Image-Edit, Janus-Pro or a Qwen2.5-VL judge is the one tested here. Tokenisation is byte-level: a BPE tokenizer with a byte vocabulary and no
merges, built locally.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    T5Config,
    T5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from g2rpo.policies.janus import Janus
from g2rpo.policies.qwen_image import ImageOnlyQwen2VLProcessor
from g2rpo.policies.qwen_vl import QwenVL


def char_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (vocabulary 514): works offline, encodes any text."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = list(bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_text_config(
    tokenizer: CLIPTokenizer,
    hidden_size: int,
    num_layers: int,
    max_length: int,
    intermediate_size: int | None = None,
    num_heads: int = 4,
) -> CLIPTextConfig:
    """A CLIP text tower over ``tokenizer``'s vocabulary (its projection as wide as its hidden states)."""
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_attention_heads=num_heads,
        num_hidden_layers=num_layers,
        projection_dim=hidden_size,
        max_position_embeddings=max_length,
    )


def tiny_vae(
    block_channels: tuple[int, ...],
    latent_channels: int,
    shift_factor: float,
    scaling_factor: float,
    sample_size: int = 32,
) -> AutoencoderKL:
    """An ``AutoencoderKL`` of the real layout (no quant convs, as SD3's and FLUX's) with tiny blocks; the
    latent normalisation constants are the real model's."""
    blocks = len(block_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def tiny_sd3_pipeline(
    seed: int = 0,
    latent_size: int = 32,
    latent_channels: int = 3,
    patch_size: int = 4,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    max_length: int = 16,
    vae_block_channels: tuple[int, ...] | None = None,
    shift: float = 3.0,
    tokenizer=None,
    text_intermediate_size: int | None = None,
    qk_norm: str | None = None,
) -> StableDiffusion3Pipeline:
    """Without ``vae_block_channels`` the model works in pixel space (``latent_channels`` must be 3) and its
    images are ``latent_size`` pixels square; with them, an ``AutoencoderKL`` with those block widths
    decodes ``latent_size * 2 ** (len(vae_block_channels) - 1)`` pixel images.

    Weights depend only on ``seed`` (the global RNG is left untouched), so a resumed run rebuilds the
    same base model. ``tokenizer`` defaults to :func:`char_tokenizer`; the shapes world passes its word-level
    one (and ``qk_norm``, ``text_intermediate_size``) to build its base model from the same parts.
    """
    tokenizer = tokenizer if tokenizer is not None else char_tokenizer(max_length)
    clip_config = clip_text_config(
        tokenizer, text_hidden_size, text_layers, max_length, text_intermediate_size
    )
    if vae_block_channels is None and latent_channels != 3:
        raise ValueError("a pixel-space model (no vae_block_channels) needs latent_channels=3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=patch_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            caption_projection_dim=num_attention_heads * attention_head_dim,
            joint_attention_dim=2 * text_hidden_size,  # CLIP-L and CLIP-G hidden states are concatenated
            pooled_projection_dim=2 * text_hidden_size,
            pos_embed_max_size=latent_size // patch_size,
            qk_norm=qk_norm,
        )
        vae = None
        if vae_block_channels is not None:
            size = latent_size * 2 ** (len(vae_block_channels) - 1)
            vae = tiny_vae(vae_block_channels, latent_channels, 0.0609, 1.5035, sample_size=size)
        text_encoder = CLIPTextModelWithProjection(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux_pipeline(
    seed: int = 0,
    latent_channels: int = 4,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_hidden_size: int = 32,
    max_length: int = 16,
    vae_block_channels: tuple[int, ...] = (8,),
    guidance_embeds: bool = True,
) -> FluxPipeline:
    """A tiny FLUX.1 from configs in code, as diffusers' FLUX tests build it: the real
    ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE axes summing to the head dimension,
    the distilled guidance embedding), an ``AutoencoderKL``, a CLIP text encoder for the pooled embedding and
    a T5 encoder for the token embeddings, both over the offline byte-level tokenizer. Weights depend only
    on ``seed``."""
    tokenizer = char_tokenizer(max_length)
    rope_axis = attention_head_dim // 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2x2 packed latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=text_hidden_size,
            pooled_projection_dim=text_hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(rope_axis, rope_axis, attention_head_dim - 2 * rope_axis),
        )
        vae = tiny_vae(
            vae_block_channels, latent_channels, shift_factor=0.1159, scaling_factor=0.3611
        )  # FLUX.1's
        # the pipeline tokenises CLIP prompts to 77 tokens
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, text_hidden_size, 2, 77))
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=text_hidden_size,
                d_kv=8,
                d_ff=2 * text_hidden_size,
                num_layers=2,
                num_heads=4,
                pad_token_id=tokenizer.pad_token_id,
                decoder_start_token_id=0,
            )
        )
    # FLUX.1-dev's scheduler: dynamic shifting by the number of image tokens
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )


def tiny_flux_kontext_pipeline(seed: int = 0, **kwargs) -> FluxKontextPipeline:
    """:func:`tiny_flux_pipeline`'s components as a ``FluxKontextPipeline``: FLUX.1-Kontext is FLUX.1's
    architecture, and the pipeline is what differs (the source image's tokens, their ids)."""
    return FluxKontextPipeline(**tiny_flux_pipeline(seed, **kwargs).components)


QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
]  # fmt: skip


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level ``Qwen2Tokenizer`` (no merges) with the chat and vision tokens the Qwen-Image pipelines'
    templates use, built offline."""
    vocab = {token: i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS]
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Qwen2Tokenizer(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def tiny_qwen_vl_config(
    tokenizer: Qwen2Tokenizer, text_hidden_size: int = 32, vision_patch_size: int = 4
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config at a few hundred thousand parameters: multimodal RoPE sections summing to half the
    text head dimension, a one-block vision tower (full attention) whose merger outputs the text width."""
    token = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden_size,
            "intermediate_size": 2 * text_hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
            "bos_token_id": None,
            "eos_token_id": token("<|im_end|>"),
            "pad_token_id": token("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": text_hidden_size,
            "patch_size": vision_patch_size,
            "fullatt_block_indexes": [0],
        },
        image_token_id=token("<|image_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
    )


def tiny_qwen_vl_image_processor(vision_patch_size: int = 4) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor cutting ``vision_patch_size`` patches, merged 2x2 into tokens."""
    return Qwen2VLImageProcessorPil(
        patch_size=vision_patch_size,
        merge_size=2,
        min_pixels=(2 * vision_patch_size) ** 2,
        max_pixels=(32 * vision_patch_size) ** 2,
    )


def tiny_qwen_image_components(
    seed: int = 0, latent_channels: int = 4, text_hidden_size: int = 32, vision_patch_size: int = 4
) -> dict:
    """The parts of a tiny Qwen-Image(-Edit), as diffusers' Qwen-Image tests size them: the real
    ``QwenImageTransformer2DModel`` (RoPE axes summing to the head dimension), an ``AutoencoderKLQwenImage``
    downsampling 2x with non-trivial latent normalisation constants, a Qwen2.5-VL with its vision tower
    (multimodal RoPE sections summing to half the text head dimension), the byte-level tokenizer and a VL
    processor that cuts images into ``vision_patch_size`` patches, merged 2x2 into tokens; the scheduler is
    Qwen-Image's own config. Weights depend only on ``seed``."""
    tokenizer = tiny_qwen_tokenizer()
    config = tiny_qwen_vl_config(tokenizer, text_hidden_size, vision_patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent_channels,  # 2x2 packed latents
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_hidden_size,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=latent_channels,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=torch.linspace(-0.8, 0.4, latent_channels).tolist(),
            latents_std=torch.linspace(1.2, 2.8, latent_channels).tolist(),
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = tiny_qwen_vl_image_processor(vision_patch_size)
    # Qwen-Image's scheduler: dynamic shifting by the number of image tokens, exponential time shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer),
        "scheduler": scheduler,
    }


def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A tiny Qwen-Image (text to image) of :func:`tiny_qwen_image_components`."""
    components = tiny_qwen_image_components(seed)
    del components["processor"]
    return QwenImagePipeline(**components)


def tiny_qwen_image_edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    """A tiny Qwen-Image-Edit of :func:`tiny_qwen_image_components`: the same parts as the text-to-image
    model, the VL processor added for the source image."""
    return QwenImageEditPipeline(**tiny_qwen_image_components(seed))


# The hub Qwen2-VL / Qwen2.5-VL chat template without its video branch and vision ids: a default system
# prompt, then "<|im_start|>{role}\n{content}<|im_end|>\n" turns, images as
# "<|vision_start|><|image_pad|><|vision_end|>".
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_vl(seed: int = 0, text_hidden_size: int = 32, vision_patch_size: int = 4) -> QwenVL:
    """A randomly initialised Qwen2.5-VL of :func:`tiny_qwen_vl_config` with the byte-level tokenizer and an
    image-only processor carrying the hub chat template's image subset: the judge's tiny model. Images of
    side ``4 * vision_patch_size`` are 4 tokens each. Weights depend only on ``seed``."""
    tokenizer = tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(
            tiny_qwen_vl_config(tokenizer, text_hidden_size, vision_patch_size)
        ).eval()
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=tiny_qwen_vl_image_processor(vision_patch_size),
        tokenizer=tokenizer,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return QwenVL(model, processor)


def random_sd3_pipeline(
    transformer: dict,
    vae: dict,
    clip_hidden_sizes: tuple[int, int] = (768, 1280),
    seed: int = 0,
    dtype: str = "bfloat16",
) -> StableDiffusion3Pipeline:
    """An SD3 pipeline of a real model's *shape* with random weights (``transformer`` and ``vae`` are the
    model's ``config.json`` fields), for benchmarks on a GPU without the download: the transformer and VAE
    cost what the real ones cost. The two CLIP encoders have the real widths (their projections make the
    pooled embedding) but one layer each, and T5 is left out (the pipeline feeds zeros in its place), since
    text encoding is not what RL iterations spend their time on. Frozen weights in ``dtype``, as loaded."""
    tokenizer = char_tokenizer(77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoders = [
            CLIPTextModelWithProjection(clip_text_config(tokenizer, width, 1, 77, 4 * width, width // 64))
            for width in clip_hidden_sizes
        ]
        pipeline = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**transformer),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=AutoencoderKL(**vae),
            text_encoder=encoders[0],
            tokenizer=tokenizer,
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    return pipeline.to(dtype=getattr(torch, dtype))


BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}
ROLE_TOKENS = ["<|User|>", "<|Assistant|>"]

# The single-turn subset of the hub processor's chat template (transformers' convert_janus_weights_to_hf.py),
# the only conversations the policy builds: "<|User|>: <image_placeholder>\n{question}\n\n<|Assistant|>:".
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: "
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image_placeholder>' }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{% set text = content['text'] %}{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}{{ text }}{% endif %}"
    "{% endfor %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def tiny_janus_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges) with Janus's special tokens, built offline: it encodes any text,
    adds the begin-of-sentence token as DeepSeek's tokenizer does, and carries the image tokens
    ``JanusProcessor`` reads (``image_token``, ``boi_token``, ``eoi_token``)."""
    specials = [BOS, EOS, PAD, *IMAGE_TOKENS.values(), *ROLE_TOKENS]
    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        extra_special_tokens=IMAGE_TOKENS,
        padding_side="left",
    )


def tiny_janus(
    seed: int = 0,
    image_size: int = 16,
    patch_size: int = 4,
    hidden_size: int = 32,
    num_layers: int = 2,
    codebook_size: int = 64,
) -> Janus:
    """A randomly initialised Janus of the real architecture (Llama language model, SigLIP-style vision
    encoder and aligner, VQ-VAE with its generation embeddings, aligner and head) at a few hundred thousand
    parameters, with a processor built in code, as transformers' own Janus tests build theirs.

    Understanding sees ``image_size`` pixel images as ``(image_size / patch_size)^2`` tokens; generation
    samples as many VQ codes and decodes them to ``image_size`` pixel images (the VQ decoder upsamples 4x).
    Weights depend only on ``seed`` (the global RNG is left untouched).
    """
    tokenizer = tiny_janus_tokenizer()
    grid = image_size // patch_size
    if grid * 4 != image_size:
        raise ValueError(
            "tiny_janus: image_size must be 4 * (image_size // patch_size) (the VQ decoder's 4x)"
        )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = JanusVisionConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2.0,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
        num_image_tokens=grid * grid,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=4,
        num_embeddings=codebook_size,
        latent_channels=8,
        base_channels=32,  # the VQ-VAE's GroupNorms have 32 groups
        channel_multiplier=[1, 1, 2],
        num_res_blocks=1,
        projection_dim=hidden_size,
        image_token_embed_dim=hidden_size,
    )
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config).eval()
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TINY_CHAT_TEMPLATE,
        use_default_system_prompt=True,  # as the hub processors
        num_image_tokens=grid * grid,
    )
    return Janus(model, processor)
