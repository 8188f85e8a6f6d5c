"""ImageReward (Xu et al. 2023, arXiv 2304.05977) run as transformers BLIP modules.

The ``image-reward`` package cannot be installed here (it pins timm 0.6.13 and imports torchvision, which has
no working CPU build in this environment). ImageReward is a BLIP ViT-L/16 plus BLIP's BERT text encoder with
cross-attention to the image and an MLP head; transformers ships BLIP (ported from BLIP's code), so the
official checkpoint ``THUDM/ImageReward`` ``ImageReward.pt`` runs here after a key renaming.

What ``ImageReward.score(prompt, image)`` computes, restated from ``THUDM/ImageReward``
``ImageReward/ImageReward.py`` (``score``; ``inference_rank`` and the training code ``train/src/ImageReward.py``
``encode_data`` do the same):

1. ``blip.tokenizer(prompt, padding='max_length', truncation=True, max_length=35)``. The tokenizer is
   ``init_tokenizer`` of ``ImageReward/models/BLIP/blip.py`` (as in ``salesforce/BLIP`` ``models/blip.py``):
   ``bert-base-uncased``'s ``BertTokenizer`` plus ``add_special_tokens({'bos_token': '[DEC]'})`` and
   ``add_special_tokens({'additional_special_tokens': ['[ENC]']})``, i.e. 30522 + 2 = 30524 ids, the
   ``vocab_size`` of ``med_config.json``. The ids are ``[CLS] prompt [SEP] [PAD]...``: ``score`` does *not*
   replace the first id by ``enc_token_id`` (BLIP's image-text matching does, ``salesforce/BLIP``
   ``models/blip_pretrain.py``; ImageReward never does).
2. ``image_embeds = blip.visual_encoder(image)``: every token after the ViT's final norm.
3. ``blip.text_encoder(input_ids, attention_mask=..., encoder_hidden_states=image_embeds,
   encoder_attention_mask=ones, return_dict=True)``: med's ``BertModel`` (``ImageReward/models/BLIP/med.py``)
   with its defaults ``mode='multimodal'`` (every layer: self-attention, then cross-attention to the image)
   and ``is_decoder=False`` (bidirectional self-attention, padding masked).
4. ``mlp(last_hidden_state[:, 0, :].float())`` and ``(reward - 0.16717362830052426) / 1.0333394966054072``.

Preprocessing, ``_transform(224)`` of ``ImageReward.py``: ``Resize(224, BICUBIC)`` (shorter side),
``CenterCrop(224)``, RGB, ``ToTensor``, ``Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954,
0.26130258, 0.27577711))`` (OpenAI CLIP's mean/std). ``score`` takes a PIL image, so images are quantised to
uint8 here as for the other rewards (``g2rpo/rewards/models.py``).

The model, from ``BLIP_Pretrain(image_size=224, vit='large', med_config=...)``
(``ImageReward/models/BLIP/blip_pretrain.py``), which overrides the config's ``encoder_width`` with the ViT
width 1024, and ``MLP(768)``:

* vision: ``create_vit('large', 224)`` (``blip.py``): ``VisionTransformer(patch_size=16, embed_dim=1024,
  depth=24, num_heads=16)`` with ``vit.py``'s defaults ``mlp_ratio=4`` (4096), ``qkv_bias=True``, ``nn.GELU``
  and ``norm_layer = partial(nn.LayerNorm, eps=1e-6)``; pre-LN blocks with a fused ``attn.qkv`` (laid out as
  ``[3, heads, head_dim]``) and ``attn.proj``, a conv ``patch_embed.proj``, ``cls_token``, ``pos_embed`` and a
  final ``norm``; its output is all tokens after ``norm``. Read from ``salesforce/BLIP`` ``models/vit.py``,
  which ImageReward's ``vit.py`` adapts. transformers' ``BlipVisionModel`` has the same computation (fused
  ``qkv`` reshaped the same way, ``projection``, ``layer_norm1/2``, ``post_layernorm`` applied to
  ``last_hidden_state``) but defaults ``layer_norm_eps`` to 1e-5: the config below sets BLIP's 1e-6.
* text: med's ``BertModel(add_pooling_layer=False)``; ``BlipTextModel`` keeps med's module names
  (``embeddings.{word_embeddings,position_embeddings,LayerNorm}``, ``encoder.layer.{i}.attention.self.{query,
  key,value}``, ``attention.output.{dense,LayerNorm}``, ``crossattention.*`` with key/value taking the
  encoder width, ``intermediate.dense``, ``output.{dense,LayerNorm}``), post-LN as BERT, absolute positions,
  no token-type embeddings (med has none either). Differences: transformers builds ``crossattention`` only
  when the config says ``is_decoder=True`` (med: ``add_cross_attention``), so the config sets it and the
  forward passes ``is_decoder=False`` for med's bidirectional mask; its ``embeddings.position_ids`` buffer is
  not persistent (med's is, so the checkpoint may carry it; it is ignored); masked scores get the dtype's
  minimum instead of med's -10000 (both give exactly zero attention in float32).
* head: ``MLP(768)``: Linear 768-1024, Dropout 0.2, 1024-128, Dropout 0.2, 128-64, Dropout 0.1, 64-16,
  16-1, no activations (the ReLUs are commented out) -- the LAION aesthetic head's layout.

``THUDM/ImageReward`` ``ImageReward/utils.py`` ``load`` reads ``ImageReward.pt`` as a plain state dict of
that ``ImageReward`` module and loads it with ``strict=False``; the converter maps its keys (table in
``convert_image_reward_state_dict``) and is strict instead, with the entries ``score`` never reads listed in
``_IGNORED_PREFIXES`` / ``_IGNORED_KEYS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    CLIPImageProcessorPil,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from g2rpo.rewards.conversion import check_fits, check_keys
from g2rpo.rewards.models import AestheticMLP

REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_REPO = "google-bert/bert-base-uncased"
#: ``ImageReward.score``: prompts padded (and truncated) to 35 tokens
MAX_LENGTH = 35
#: ``ImageReward.__init__``: the raw MLP output is standardised with these
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072

#: ``create_vit('large', 224)`` with ``VisionTransformer``'s defaults (see the module docstring)
VIT_LARGE: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu",  # nn.GELU: the exact (erf) GELU, as transformers' "gelu"
    "layer_norm_eps": 1e-6,  # partial(nn.LayerNorm, eps=1e-6); BlipVisionConfig's default is 1e-5
}
#: BLIP's ``med_config.json`` (bert-base-uncased sizes, cross-attention, 30522 + [DEC] + [ENC] ids)
MED_CONFIG: dict[str, Any] = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "add_cross_attention": True,
}


def vision_config(**overrides: Any) -> BlipVisionConfig:
    """BLIP's ViT-L/16 at 224 px (``overrides`` for tests, e.g. a tiny width)."""
    return BlipVisionConfig(**{**VIT_LARGE, **overrides})


def text_config(med_config: Mapping[str, Any] | None = None, encoder_width: int = 1024) -> BlipTextConfig:
    """A ``BlipTextConfig`` equal to med's ``BertConfig`` from ``med_config`` (defaults: ``MED_CONFIG``).

    ``encoder_width`` is the ViT width, as ``BLIP_Pretrain`` sets it whatever the file says.
    """
    med = {**MED_CONFIG, **(med_config or {})}
    if not med["add_cross_attention"]:
        raise ValueError("ImageReward's text encoder needs cross-attention (med_config add_cross_attention)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("BlipTextModel has absolute position embeddings only")
    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"],
        layer_norm_eps=med["layer_norm_eps"],
        pad_token_id=med["pad_token_id"],
        encoder_hidden_size=encoder_width,
        is_decoder=True,  # only so that BlipTextLayer builds `crossattention`; forward passes is_decoder=False
        bos_token_id=None,  # unused by an encoder (and a tiny test vocabulary has no id 30522)
        eos_token_id=None,
        sep_token_id=None,
    )


class ImageRewardModel(nn.Module):
    """``vision_model`` (ViT), ``text_encoder`` (BERT with cross-attention) and ``mlp``; ``forward`` is ``score``.

    Built from configs (defaults: ImageReward's sizes) so that tests can build a tiny one; the weights come
    from ``convert_image_reward_state_dict``.
    """

    def __init__(self, vision: BlipVisionConfig | None = None, text: BlipTextConfig | None = None) -> None:
        super().__init__()
        vision = vision if vision is not None else vision_config()
        text = text if text is not None else text_config(encoder_width=vision.hidden_size)
        if text.encoder_hidden_size != vision.hidden_size:
            raise ValueError(
                f"the text encoder attends to width {text.encoder_hidden_size}, the ViT is {vision.hidden_size} wide"
            )
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = AestheticMLP(text.hidden_size)  # ImageReward's MLP: the aesthetic head's layout

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Standardised rewards ``[B]`` of normalised 224 px images and their prompts' token ids."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,  # med's BertModel default: bidirectional self-attention
        )
        features = text.last_hidden_state[:, 0, :].float()
        rewards = self.mlp(features.to(self.mlp.layers[0].weight.dtype)).float()
        return (rewards - REWARD_MEAN) / REWARD_STD


# --- the checkpoint's keys --------------------------------------------------------------------------------

_VISION, _TEXT = "blip.visual_encoder.", "blip.text_encoder."
#: ViT tensors outside the blocks: BLIP name -> ``BlipVisionModel`` name
_VISION_NAMES = {
    "cls_token": "embeddings.class_embedding",  # [1, 1, W] both
    "pos_embed": "embeddings.position_embedding",  # [1, 1 + grid², W] both
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
#: a ViT block's modules: BLIP ``blocks.{i}.*`` -> ``encoder.layers.{i}.*`` (weight and bias each)
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
#: text tensors outside the layers, named alike in med and ``BlipTextModel``
_TEXT_NAMES = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)
#: a text layer's modules, named alike (``encoder.layer.{i}.*``)
_TEXT_LAYER = tuple(
    f"{attention}.{part}"
    for attention in ("attention", "crossattention")
    for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
) + ("intermediate.dense", "output.dense", "output.LayerNorm")
_HEAD_LINEARS = (0, 2, 4, 6, 7)  # ``mlp.layers.{i}``: the Linear layers of the Sequential
#: checkpoint entries ``score`` never reads. BLIP_Pretrain's contrastive projections (ImageReward's
#: ``blip_pretrain.py`` keeps ``vision_proj`` / ``text_proj``); salesforce BLIP_Pretrain's ITM head, momentum
#: encoders, decoder, queues and temperature, should a checkpoint carry them; med's persistent
#: ``position_ids`` buffer (transformers rebuilds it).
_IGNORED_PREFIXES = (
    "blip.vision_proj.",
    "blip.text_proj.",
    "blip.itm_head.",
    "blip.visual_encoder_m.",
    "blip.vision_proj_m.",
    "blip.text_encoder_m.",
    "blip.text_proj_m.",
    "blip.text_decoder.",
)
_IGNORED_KEYS = frozenset(
    {
        "blip.text_encoder.embeddings.position_ids",
        "blip.image_queue",
        "blip.text_queue",
        "blip.queue_ptr",
        "blip.temp",
    }
)


def _ignored(name: str) -> bool:
    return name in _IGNORED_KEYS or name.startswith(_IGNORED_PREFIXES)


def _target(name: str) -> str | None:
    """The ``ImageRewardModel`` key of a checkpoint key, or None when no rule covers it."""
    if name.startswith(_VISION):
        rest = name.removeprefix(_VISION)
        if rest in _VISION_NAMES:
            return f"vision_model.{_VISION_NAMES[rest]}"
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
        if block and block[2] in _VISION_BLOCK:
            return f"vision_model.encoder.layers.{block[1]}.{_VISION_BLOCK[block[2]]}.{block[3]}"
    elif name.startswith(_TEXT):
        rest = name.removeprefix(_TEXT)
        layer = re.fullmatch(r"encoder\.layer\.\d+\.(.+)\.(weight|bias)", rest)
        if rest in _TEXT_NAMES or (layer and layer[1] in _TEXT_LAYER):
            return f"text_encoder.{rest}"
    else:
        head = re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", name)
        if head and int(head[1]) in _HEAD_LINEARS:
            return name
    return None


def _expected(vision_blocks: int, text_layers: int) -> set[str]:
    """Every checkpoint key ``score`` reads, for these depths."""
    names = {_VISION + name for name in _VISION_NAMES} | {_TEXT + name for name in _TEXT_NAMES}
    for i in range(vision_blocks):
        names |= {f"{_VISION}blocks.{i}.{m}.{p}" for m in _VISION_BLOCK for p in ("weight", "bias")}
    for i in range(text_layers):
        names |= {f"{_TEXT}encoder.layer.{i}.{m}.{p}" for m in _TEXT_LAYER for p in ("weight", "bias")}
    names |= {f"mlp.layers.{i}.{p}" for i in _HEAD_LINEARS for p in ("weight", "bias")}
    return names


def _depth(names: set[str], pattern: str) -> int:
    """1 + the largest layer index among ``names`` (0 when none), to check a checkpoint on its own."""
    indices = [int(match[1]) for name in names if (match := re.match(pattern, name))]
    return max(indices, default=-1) + 1


def convert_image_reward_state_dict(
    state_dict: Mapping[str, Tensor], model: ImageRewardModel | None = None
) -> dict[str, Tensor]:
    """``ImageReward.pt``'s state dict renamed to ``ImageRewardModel``'s keys.

    ==========================================  ==================================================
    ImageReward checkpoint                      ``ImageRewardModel``
    ==========================================  ==================================================
    ``blip.visual_encoder.cls_token``           ``vision_model.embeddings.class_embedding``
    ``blip.visual_encoder.pos_embed``           ``vision_model.embeddings.position_embedding``
    ``blip.visual_encoder.patch_embed.proj.*``  ``vision_model.embeddings.patch_embedding.*``
    ``blip.visual_encoder.blocks.{i}.*``        ``vision_model.encoder.layers.{i}.*`` (block below)
    ``blip.visual_encoder.norm.*``              ``vision_model.post_layernorm.*``
    ``blip.text_encoder.*``                     ``text_encoder.*`` (the same names)
    ``mlp.layers.{0,2,4,6,7}.*``                ``mlp.layers.{0,2,4,6,7}.*``
    block: ``norm1`` / ``norm2``                ``layer_norm1`` / ``layer_norm2``
    block: ``attn.qkv`` / ``attn.proj``         ``self_attn.qkv`` / ``self_attn.projection``
    block: ``mlp.fc1`` / ``mlp.fc2``            ``mlp.fc1`` / ``mlp.fc2``
    ==========================================  ==================================================

    Raises ``ValueError`` naming the keys no rule covers (unexpected), the keys a complete model needs that
    are absent (missing: for ``model``'s depths, or else for the depths the checkpoint's own layer indices
    imply) and, given ``model``, the tensors whose shapes differ from it (e.g. a ``med_config`` of other sizes).
    """
    given = {name for name in state_dict if not _ignored(name)}
    if model is not None:
        depths = (model.vision_model.config.num_hidden_layers, model.text_encoder.config.num_hidden_layers)
    else:
        depths = (
            _depth(given, re.escape(_VISION) + r"blocks\.(\d+)\."),
            _depth(given, re.escape(_TEXT) + r"encoder\.layer\.(\d+)\."),
        )
    expected = _expected(*depths)
    check_keys(
        given,
        expected,
        f"not an ImageReward checkpoint for {depths[0]} ViT blocks and {depths[1]} text layers",
    )
    converted = {_target(name): state_dict[name] for name in sorted(given)}
    if model is not None:
        check_fits(converted, model.state_dict(), "ImageRewardModel", "model")
    return converted


# --- loading ----------------------------------------------------------------------------------------------


def _shown(path: str | Path | None) -> str:
    return repr(None if path is None else str(path))


def how_to_download(target: str | Path | None) -> str:
    """The commands that fetch ImageReward's files (the missing-files message)."""
    return (
        "Download them once with\n"
        f"  hf download {REPO} {CHECKPOINT_FILE} {MED_CONFIG_FILE} --local-dir {target or '<dir>'}\n"
        "and point the reward's path at that folder (or set G2RPO_WEIGHTS to the folder that holds it)."
    )


def how_to_download_tokenizer(target: str | Path | None) -> str:
    """The command that fetches ``bert-base-uncased``'s tokenizer files (config and vocabulary only)."""
    return (
        "Download them once with\n"
        f'  hf download {TOKENIZER_REPO} --include "*.json" --include "*.txt" --local-dir {target or "<dir>"}\n'
        "and point the reward's tokenizer_path at that folder (or set G2RPO_WEIGHTS to the folder that holds it)."
    )


def load_image_reward_model(
    path: str | Path | None, vision: BlipVisionConfig | None = None
) -> ImageRewardModel:
    """The model in directory ``path`` (``ImageReward.pt`` and ``med_config.json``), float32 on the CPU.

    ``vision`` overrides BLIP's ViT-L/16 config (tests); ``torch.load(weights_only=True)`` reads the plain
    state dict ``ImageReward/utils.py`` loads.
    """
    directory = Path(path) if path is not None else None
    for name in (CHECKPOINT_FILE, MED_CONFIG_FILE):
        if directory is None or not (directory / name).is_file():
            raise FileNotFoundError(f"ImageReward: no {name} in {_shown(path)}. " + how_to_download(path))
    vision = vision if vision is not None else vision_config()
    med = json.loads((directory / MED_CONFIG_FILE).read_text())
    model = ImageRewardModel(vision, text_config(med, encoder_width=vision.hidden_size))
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(t, Tensor) for t in state.values()):
        raise ValueError(f"{directory / CHECKPOINT_FILE}: expected a state dict, got {type(state).__name__}")
    model.load_state_dict(convert_image_reward_state_dict(state, model), strict=True)
    return model


def add_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """BLIP's ``init_tokenizer`` additions, [DEC] as bos and [ENC] as an extra special token (idempotent).

    They only set the vocabulary size (and how a prompt that spells them is split): ``score`` neither
    prepends [DEC] nor swaps in [ENC].
    """
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_tokenizer(path: str | Path | None) -> PreTrainedTokenizerBase:
    """``bert-base-uncased``'s tokenizer from a local directory, with BLIP's tokens added."""
    directory = Path(path) if path is not None else None
    if directory is None or not any((directory / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        # checked here: from_pretrained on a folder without them silently builds a 5-token vocabulary
        raise FileNotFoundError(
            f"ImageReward: no bert-base-uncased tokenizer (vocab.txt / tokenizer.json) in {_shown(path)}. "
            + how_to_download_tokenizer(path)
        )
    return add_blip_tokens(BertTokenizer.from_pretrained(directory, local_files_only=True))


def image_processor(size: int = 224) -> CLIPImageProcessorPil:
    """ImageReward's ``_transform(size)`` as a transformers image processor.

    ``CLIPImageProcessor`` (its PIL backend, PIL being what torchvision's ``Resize`` runs on PIL images)
    resizes the shorter side with PIL bicubic, centre-crops and normalises with OpenAI's mean/std, as
    ``_transform`` does; ``BlipImageProcessor`` would squash to a fixed square without a crop. For square
    images (what the policies generate) the two pipelines give identical pixels; for others with an odd
    margin the crop may sit one pixel apart (torchvision rounds the offset, transformers floors it).
    """
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


class ImageReward:
    """The ImageReward score of each image for its prompt (standardised with ImageReward's mean and std).

    ``path``: a local directory with ``ImageReward.pt`` and ``med_config.json`` of ``THUDM/ImageReward``;
    ``tokenizer_path``: a local copy of ``bert-base-uncased``'s tokenizer files. ``model`` / ``tokenizer``
    take built objects instead (tests pass tiny ones; BLIP's tokens are added to a given tokenizer too).
    One batched forward per call: prompts are padded to 35 tokens as ``score`` pads them, so each row
    sees the same inputs as when scored alone. The MLP runs in float32 whatever ``dtype`` the towers run in.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer_path: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        model: ImageRewardModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        # the tokenizer first: a wrong path then fails before the 0.5 B-parameter model is built
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer is None else add_blip_tokens(tokenizer)
        if model is None:
            model = load_image_reward_model(path)
        vocab = model.text_encoder.config.vocab_size
        if len(tokenizer) != vocab:
            raise ValueError(
                f"ImageReward: the tokenizer has {len(tokenizer)} ids with [DEC] and [ENC], the text encoder "
                f"{vocab}; use bert-base-uncased's tokenizer ({TOKENIZER_REPO})"
            )
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model.mlp.float()
        self.tokenizer = tokenizer
        self.image_processor = image_processor(model.vision_model.config.image_size)

    def pixel_values(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images in [0, 1] -> uint8 PIL -> ImageReward's transform."""
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pil = [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]
        values = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return values.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"ImageReward: {images.shape[0]} images but {len(prompts)} prompts")
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        rewards = self.model(
            self.pixel_values(images),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )
        return rewards.float().cpu()
