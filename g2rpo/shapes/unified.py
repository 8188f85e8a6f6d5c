"""The shapes world's unified model: one transformer that answers questions about images and draws them.

Transfusion (Zhou et al. 2024, arXiv 2408.11039) in miniature: a single decoder (a ``transformers``
``LlamaModel``) reads one sequence of word tokens and image patches; words are predicted token by token by
an LM head, image patches are denoised by flow matching through a linear velocity head, and attention is
causal over text but bidirectional within the image. As in JanusFlow (Ma et al. 2024, arXiv 2411.07975)
the generative half is rectified flow with light linear layers between pixels and the shared transformer,
and the same weights serve understanding (a clean image, noise level 0) and generation (a noisy one).

Layouts (a 32x32 RGB image in [-1, 1] cut into 4x4 patches is 64 image tokens)::

    understanding   <bos> [image at sigma = 0] question words <|answer|> answer <eos>
    generation      <bos> caption words <eos> <eos> ... [image at sigma]        (fixed caption length)
    comparison      <bos> [image A] [image B] caption words <|judge|> <answer> A|B </answer> <eos>

The comparison layout is the judge's (:func:`with_judge_tokens` adds its tokens; UniPic's Skywork-ImgReward
in miniature): two clean images, each bidirectional within itself, told apart by a learned image-index
embedding, then the caption both were drawn for.

Captions are padded with end tokens as CLIP pads them, so no padding mask is needed: text is causal and
never sees what follows it, and every caption has the same length in training and sampling. Questions
in a batch are right-padded, which causal attention makes invisible to the tokens before the padding.
The unconditional caption of classifier-free guidance is the empty caption ``<bos> <eos> ...``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from g2rpo.shapes import vqa
from g2rpo.shapes.model import SPECIAL, vocabulary, word_tokenizer

UNIFIED_MODEL_DIR = Path(__file__).parent / "weights" / "unified"
ANSWER_MARKER = "<|answer|>"
JUDGE_MARKER = "<|judge|>"
#: the verdict's tokens, appended after the unified vocabulary so that every earlier id is kept. ``A`` and
#: ``B`` are produced by id, never read from text (the lowercasing normalizer would read "A" as "a").
VERDICT_OPEN, VERDICT_CLOSE, CHOICES = "<answer>", "</answer>", ("A", "B")
JUDGE_TOKENS = (JUDGE_MARKER, VERDICT_OPEN, VERDICT_CLOSE, *CHOICES)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
DEFAULT_SIZES = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "image_size": 32,
    "patch_size": 4,
    "caption_length": 12,  # the longest GenEval-shapes prompt is 10 words, plus <bos> and <eos>
    "max_positions": 128,
}


def unified_vocabulary() -> list[str]:
    """The base model's caption words, the question words and answers of :mod:`g2rpo.shapes.vqa`, and the
    answer marker (after the special tokens, so that ids of the caption words do not depend on the VQA)."""
    return list(dict.fromkeys([*SPECIAL, ANSWER_MARKER, *vocabulary(), *vqa.QUESTION_WORDS, *vqa.ANSWERS]))


def unified_tokenizer(caption_length: int = DEFAULT_SIZES["caption_length"]) -> PreTrainedTokenizerFast:
    """Word-level with CLIP's conventions, as :func:`g2rpo.shapes.model.word_tokenizer`, over the unified
    vocabulary: ``<|startoftext|> words <|endoftext|>``, padded with end tokens."""
    return word_tokenizer(caption_length, unified_vocabulary())


@lru_cache(maxsize=64)
def block_causal_mask(before: int, image: int, after: int, images: int = 1) -> Tensor:
    """``[1, 1, S, S]`` additive mask (0 = attend): causal over the sequence, except that each of the
    ``images`` consecutive blocks of ``image`` tokens after the first ``before`` text tokens sees itself
    whole (Transfusion's mask; a later image also sees the earlier ones, causally)."""
    size = before + images * image + after
    allowed = torch.ones(size, size, dtype=torch.bool).tril()
    for start in range(before, before + images * image, image):
        allowed[start : start + image, start : start + image] = True
    mask = torch.zeros(size, size).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[None, None]


class UnifiedModel(nn.Module):
    """The shared transformer with its text and image ends.

    Text tokens are embedded by the Llama's own ``embed_tokens``; image patches by ``image_in`` plus a
    learned 2-D position embedding and the noise-level embedding (diffusers' sinusoidal ``Timesteps`` of
    ``1000 sigma`` and its ``TimestepEmbedding`` MLP), added to every image token. The LM head reads text
    positions, ``image_out`` reads image positions (the velocity ``noise - x0`` of each patch).

    A tokenizer with the judge's tokens (:data:`JUDGE_TOKENS`) makes a judge: it gains ``image_index``, one
    row per compared image, added to that image's tokens; a model without them has exactly the parameters
    (and outputs) it had before judges existed.
    """

    def __init__(self, sizes: dict, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__()
        self.sizes = {**DEFAULT_SIZES, **sizes}
        unknown = set(self.sizes) - set(DEFAULT_SIZES)
        if unknown:
            raise ValueError(f"unknown unified model sizes {sorted(unknown)}; valid: {sorted(DEFAULT_SIZES)}")
        s = self.sizes
        if s["image_size"] % s["patch_size"]:
            raise ValueError(
                f"image_size {s['image_size']} is not a multiple of patch_size {s['patch_size']}"
            )
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.marker_id = tokenizer.convert_tokens_to_ids(ANSWER_MARKER)
        self.grid = s["image_size"] // s["patch_size"]
        self.num_image_tokens = self.grid**2
        patch_dim = 3 * s["patch_size"] ** 2
        hidden = s["hidden_size"]
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_heads"],
            max_position_embeddings=s["max_positions"],
            pad_token_id=None,  # a padding id would freeze the end token's embedding (padding_idx)
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            tie_word_embeddings=False,
        )
        config._attn_implementation = "sdpa"
        self.llama = LlamaModel(config)
        self.lm_head = nn.Linear(hidden, len(tokenizer), bias=False)
        self.image_in = nn.Linear(patch_dim, hidden)
        # learned, but starting from the 2-D sin-cos table of DiT and SD3: the sequence's 1-D RoPE knows
        # only raster order, and a small random table is drowned by the patch projection at first
        grid = get_2d_sincos_pos_embed(hidden, self.grid, base_size=self.grid, output_type="pt")
        self.image_pos = nn.Parameter(grid.float())
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden)
        self.image_out = nn.Linear(hidden, patch_dim)
        nn.init.zeros_(self.image_out.weight)  # a zero velocity at initialisation, as DiT's final layer
        nn.init.zeros_(self.image_out.bias)
        self.judges = JUDGE_MARKER in tokenizer.get_vocab()
        if self.judges:
            # zero: before training both images look as the understanding layout's single image does
            self.image_index = nn.Parameter(torch.zeros(len(CHOICES), hidden))
            self.judge_id, self.open_id, self.close_id, *self.choice_ids = tokenizer.convert_tokens_to_ids(
                list(JUDGE_TOKENS)
            )

    @property
    def device(self) -> torch.device:
        return self.image_in.weight.device

    # ---- tokens -------------------------------------------------------------------------------------

    def caption_ids(self, captions: list[str]) -> Tensor:
        """``[N, caption_length]`` long: ``<bos> words <eos>`` padded with ``<eos>`` (truncated if longer)."""
        return self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.sizes["caption_length"],
            return_tensors="pt",
        ).input_ids.to(self.device)

    def words(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def question_prefix(self, question: str) -> list[int]:
        """The text after the image up to the answer: ``question words <|answer|>``."""
        return [*self.words(question), self.marker_id]

    def judge_prefix(self, caption: str) -> list[int]:
        """The text after the two images up to the verdict: ``caption words <|judge|>``."""
        self.check_judges()
        return [*self.words(caption), self.judge_id]

    def verdict_ids(self, choice: str) -> list[int]:
        """``<answer> A|B </answer> <eos>``: the exact format (for the format cold start)."""
        return [self.open_id, self.choice_ids[CHOICES.index(choice)], self.close_id, self.eos_id]

    def decode_verdict(self, tokens: list[int]) -> str:
        """The tokens before the first end token, joined without spaces: ``<answer>A</answer>`` when the
        format is kept (the answer task's decoding would put spaces between the verdict's tokens)."""
        if self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id)]
        return "".join(self.tokenizer.convert_ids_to_tokens(tokens))

    def check_judges(self) -> None:
        if not self.judges:
            raise ValueError(
                "this unified model has no judge tokens: compare images with the shipped judge "
                "(g2rpo/shapes/weights/judge, `make judge-model`) or a model from with_judge_tokens()"
            )

    def decode_answer(self, tokens: list[int]) -> str:
        """The words before the first end token."""
        if self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- images -------------------------------------------------------------------------------------

    def patchify(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W] -> [B, N, 3 p p]``, patches in raster order."""
        b, c, _, _ = images.shape
        p, g = self.sizes["patch_size"], self.grid
        return images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def unpatchify(self, patches: Tensor) -> Tensor:
        b = patches.shape[0]
        p, g = self.sizes["patch_size"], self.grid
        return patches.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)

    def image_embeds(self, images: Tensor, sigma: Tensor) -> Tensor:
        """Image tokens ``[B, N, D]`` of pixels in [-1, 1] (noisy at ``sigma`` [B], 0 for a clean image)."""
        noise_level = self.time_embed(self.time_proj(sigma.float() * 1000).to(self.image_in.weight.dtype))
        return self.image_in(self.patchify(images)) + self.image_pos + noise_level[:, None]

    # ---- forwards -----------------------------------------------------------------------------------

    def hidden_states(self, embeds: Tensor, before: int) -> Tensor:
        """The shared transformer over ``[text x before, image, text ...]`` with the block-causal mask."""
        after = embeds.shape[1] - before - self.num_image_tokens
        mask = block_causal_mask(before, self.num_image_tokens, after).to(embeds.device, embeds.dtype)
        return self.llama(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    def velocity(self, caption_ids: Tensor, noisy: Tensor, sigma: Tensor) -> Tensor:
        """Generation: the velocity ``[B, 3, H, W]`` of images noisy at ``sigma`` [B] given captions [B, L]."""
        text = self.llama.embed_tokens(caption_ids)
        image = self.image_embeds(noisy.to(text.dtype), sigma)
        hidden = self.hidden_states(torch.cat([text, image], dim=1), before=text.shape[1])
        return self.unpatchify(self.image_out(hidden[:, text.shape[1] :]))

    def answer_logits(self, images: Tensor, text_ids: Tensor) -> Tensor:
        """Understanding: ``[B, T, V]`` logits at each of ``text_ids``' positions (position ``t`` predicts
        token ``t + 1``) in ``<bos> [clean image] text_ids``; ``images`` in [-1, 1]."""
        bos = torch.full((images.shape[0], 1), self.bos_id, dtype=torch.long, device=text_ids.device)
        first, text = self.llama.embed_tokens(bos), self.llama.embed_tokens(text_ids)
        image = self.image_embeds(images.to(text.dtype), torch.zeros(images.shape[0], device=images.device))
        hidden = self.hidden_states(torch.cat([first, image, text], dim=1), before=1)
        return self.lm_head(hidden[:, 1 + self.num_image_tokens :])

    def compare_logits(self, images: Tensor, others: Tensor, text_ids: Tensor) -> Tensor:
        """Comparison: ``[B, T, V]`` logits at each of ``text_ids``' positions in ``<bos> [image A]
        [image B] text_ids`` (clean images in [-1, 1]; ``images`` is A, ``others`` B)."""
        self.check_judges()
        bos = torch.full((images.shape[0], 1), self.bos_id, dtype=torch.long, device=text_ids.device)
        first, text = self.llama.embed_tokens(bos), self.llama.embed_tokens(text_ids)
        clean = torch.zeros(images.shape[0], device=images.device)
        pictures = [
            self.image_embeds(pixels.to(text.dtype), clean) + self.image_index[index]
            for index, pixels in enumerate((images, others))
        ]
        embeds = torch.cat([first, *pictures, text], dim=1)
        mask = block_causal_mask(1, self.num_image_tokens, text.shape[1], images=2)
        hidden = self.llama(
            inputs_embeds=embeds, attention_mask=mask.to(embeds.device, embeds.dtype), use_cache=False
        ).last_hidden_state
        return self.lm_head(hidden[:, 1 + 2 * self.num_image_tokens :])

    # ---- files --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """``config.json`` (the sizes), ``model.safetensors`` (in ``dtype``) and the tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(weights, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.sizes, indent=2) + "\n")
        self.tokenizer.save_pretrained(directory)


def unified_model(seed: int = 0, **sizes) -> UnifiedModel:
    """A freshly initialised unified model (what ``make unified-model`` pretrains); weights depend only on
    ``seed`` (the global RNG is left untouched). ``sizes`` override :data:`DEFAULT_SIZES`."""
    sizes = {**DEFAULT_SIZES, **sizes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UnifiedModel(sizes, unified_tokenizer(sizes["caption_length"]))


def with_judge_tokens(model: UnifiedModel, seed: int = 0) -> UnifiedModel:
    """A copy of ``model`` that can also judge (:meth:`UnifiedModel.compare_logits`): the tokenizer gains
    :data:`JUDGE_TOKENS` (after every existing id), the word embeddings and LM head gain their rows, and the
    image-index embedding starts at zero. New embedding rows are drawn around the old rows' mean with their
    spread (as transformers' mean resizing), new LM-head rows are the old rows' mean, so every new token
    starts with the mean logit. The weights depend only on ``model`` and ``seed``."""
    if model.judges:
        raise ValueError("the model already has the judge tokens")
    words = list(model.tokenizer.convert_ids_to_tokens(list(range(len(model.tokenizer)))))
    tokenizer = word_tokenizer(model.sizes["caption_length"], [*words, *JUDGE_TOKENS])
    with torch.random.fork_rng(devices=[]):  # the fresh model's initialisation is overwritten below
        judge = UnifiedModel(model.sizes, tokenizer).to(model.device)
    grown = ("llama.embed_tokens.weight", "lm_head.weight")
    missing, unexpected = judge.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in grown}, strict=False
    )
    assert set(missing) == {*grown, "image_index"} and not unexpected, (missing, unexpected)
    old = len(words)
    embed, head = model.llama.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(JUDGE_TOKENS), embed.shape[1], generator=generator).to(embed)
    with torch.no_grad():
        judge.llama.embed_tokens.weight[:old] = embed
        judge.llama.embed_tokens.weight[old:] = embed.mean(0) + noise * embed.std(0)
        judge.lm_head.weight[:old] = head
        judge.lm_head.weight[old:] = head.mean(0)
    return judge


def load_unified_model(path: str | None = None, dtype: str = "float32") -> UnifiedModel:
    """The pretrained unified model (shipped in ``g2rpo/shapes/weights/unified``, or ``path``)."""
    directory = Path(path) if path else UNIFIED_MODEL_DIR
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"model: no unified shapes model at {directory}. It ships with the repository; regenerate it "
            "with `make unified-model` (about 40 minutes on 2 CPU cores)."
        )
    sizes = json.loads((directory / CONFIG_NAME).read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    model = UnifiedModel(sizes, tokenizer)
    model.load_state_dict({k: v.float() for k, v in load_file(directory / WEIGHTS_NAME).items()})
    return model.to(getattr(torch, dtype))
