"""The shapes world's text-to-image model: a real SD3 pipeline at a few million parameters.

An ``SD3Transformer2DModel`` denoises 32x32 RGB pixels directly (no VAE: the world's images are already
tiny), conditioned by two small CLIP text encoders whose penultimate hidden states and pooled projections
the pipeline turns into SD3's ``encoder_hidden_states`` and ``pooled_projections``, exactly as for SD3.5.
The tokenizer is word-level over the world's vocabulary (a GenEval prompt is about ten words). The
pretrained base ships as a diffusers pipeline directory, so it loads through ``load_sd3_pipeline`` like any
SD3 checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from g2rpo.policies.tiny import tiny_sd3_pipeline
from g2rpo.shapes.prompts import NUMBERS, RELATIONS
from g2rpo.shapes.world import COLOURS, SHAPES

BASE_MODEL_DIR = Path(__file__).parent / "weights" / "base"
EDIT_MODEL_DIR = Path(__file__).parent / "weights" / "edit"
#: the words of the editing instructions (g2rpo.shapes.editing) that captions never use
EDIT_WORDS = ("add", "into", "leave", "make", "number", "one", "only", "remove", "swap", "the", "turn")
SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def vocabulary() -> list[str]:
    words = [
        "a",
        "an",
        "photo",
        "of",
        "and",
        *SHAPES,
        *(s + "s" for s in SHAPES),
        *COLOURS,
        *NUMBERS.values(),
    ]
    words += sorted({w for relation in RELATIONS for w in relation.split()} - set(words))
    return [*SPECIAL, *dict.fromkeys(words)]


def edit_vocabulary() -> list[str]:
    """The captions' vocabulary, then the instructions' own words: appended, so every caption keeps its ids."""
    return [*vocabulary(), *EDIT_WORDS]


def word_tokenizer(max_length: int = 16, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level, CLIP's conventions: ``<|startoftext|> words <|endoftext|>``, padded with end tokens.

    ``words`` (special tokens first) defaults to the captions' :func:`vocabulary`."""
    vocab = {word: index for index, word in enumerate(words or vocabulary())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[
            ("<|startoftext|>", vocab["<|startoftext|>"]),
            ("<|endoftext|>", vocab["<|endoftext|>"]),
        ],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def shapes_pipeline(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    max_length: int = 16,
    shift: float = 1.0,
    qk_norm: str | None = "rms_norm",
) -> StableDiffusion3Pipeline:
    """A freshly initialised shapes model (what ``make base-model`` pretrains); weights depend on ``seed``.

    The tiny test model's builder with the world's word-level tokenizer, 4x text FFNs, and qk RMSNorm as
    SD3.5 (it keeps attention logits bounded at a high learning rate).
    """
    return tiny_sd3_pipeline(
        seed=seed,
        latent_size=image_size,
        latent_channels=3,
        patch_size=patch_size,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        text_hidden_size=text_hidden_size,
        text_layers=text_layers,
        max_length=max_length,
        shift=shift,
        tokenizer=word_tokenizer(max_length),
        text_intermediate_size=4 * text_hidden_size,
        qk_norm=qk_norm,
    )


def load_base_model(path: str | None = None, dtype: str = "float32") -> StableDiffusion3Pipeline:
    """The pretrained base (shipped in ``g2rpo/shapes/weights/base``, or ``path``), loaded like any SD3."""
    return _load(Path(path) if path else BASE_MODEL_DIR, dtype, "base model", "make base-model", "90 minutes")


def load_edit_model(path: str | None = None, dtype: str = "float32") -> StableDiffusion3Pipeline:
    """The editing model (shipped in ``g2rpo/shapes/weights/edit``, or ``path``), for ``SD3EditPolicy``."""
    return _load(Path(path) if path else EDIT_MODEL_DIR, dtype, "editing model", "make edit-model", "an hour")


def _load(directory: Path, dtype: str, what: str, target: str, time: str) -> StableDiffusion3Pipeline:
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model: no shapes {what} at {directory}. It ships with the repository; regenerate it with "
            f"`{target}` (about {time} on 2 CPU cores)."
        )
    return StableDiffusion3Pipeline.from_pretrained(
        directory,
        dtype=getattr(torch, dtype),
        local_files_only=True,
        vae=None,  # pixel space; no T5
        text_encoder_3=None,
        tokenizer_3=None,
    )


def diptych_positions(embed_dim: int, patches: int) -> torch.Tensor:
    """SD3's sin-cos position table for a ``2 patches`` square grid, laid out so that the centre crop a
    ``patches x 2 patches`` diptych takes gives the generated (left) half exactly the positions a
    ``patches``-wide image has in the base model (rows and columns ``0..patches-1``), and the source (right)
    half the columns after them. Shape ``[1, (2 patches)^2, embed_dim]``, as ``PatchEmbed.pos_embed``."""
    size = 2 * patches
    table = get_2d_sincos_pos_embed(embed_dim, size, base_size=size, output_type="pt")
    table = table.reshape(size, size, embed_dim)
    top = (size - patches) // 2  # where PatchEmbed.cropped_pos_embed starts the diptych's rows
    return table.roll(top, dims=0).reshape(1, size * size, embed_dim).float()


def edit_pipeline(base: StableDiffusion3Pipeline) -> StableDiffusion3Pipeline:
    """The base made an in-context editor, before training (``make edit-model`` trains it): the same
    weights, a position table twice as wide (:func:`diptych_positions`) and the instructions' words added to
    both tokenizers and text encoders (new embedding rows drawn around the old ones' mean, as transformers
    resizes)."""
    transformer = base.transformer
    patches = transformer.config.sample_size // transformer.config.patch_size
    config = {**transformer.config, "pos_embed_max_size": 2 * patches}
    wide = type(transformer).from_config(config)
    weights = {k: v for k, v in transformer.state_dict().items() if k != "pos_embed.pos_embed"}
    missing, unexpected = wide.load_state_dict(weights, strict=False)
    assert missing == ["pos_embed.pos_embed"] and not unexpected, (missing, unexpected)
    wide.pos_embed.pos_embed.copy_(
        diptych_positions(wide.config.num_attention_heads * wide.config.attention_head_dim, patches)
    )
    words = edit_vocabulary()
    tokenizer = word_tokenizer(base.tokenizer.model_max_length, words)
    for encoder in (base.text_encoder, base.text_encoder_2):
        encoder.resize_token_embeddings(len(words))
    return StableDiffusion3Pipeline(
        transformer=wide,
        scheduler=base.scheduler,
        vae=None,
        text_encoder=base.text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
