"""ImageReward (Xu et al. 2023, arXiv 2304.05977) run as transformers BLIP modules.

Why: the ``image-reward`` package cannot be installed here (it pins timm 0.6.13 and imports torchvision,
which has no working CPU build in this environment); transformers ships BLIP, so the official checkpoint
``THUDM/ImageReward`` ``ImageReward.pt`` runs here after a key renaming
(:mod:`g2rpo.rewards.weights.imagereward`). What ``ImageReward.score`` computes and how each module maps onto
transformers': the rewards page of the docs.
"""

from __future__ import annotations

import json
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

from g2rpo.rewards.clip import AestheticMLP
from g2rpo.rewards.weights.imagereward import convert_image_reward_state_dict

REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_REPO = "google-bert/bert-base-uncased"
#: ``ImageReward.score``: prompts padded (and truncated) to 35 tokens
MAX_LENGTH = 35
#: ``ImageReward.__init__``: the raw MLP output is standardised with these
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072

#: ``create_vit('large', 224)`` with ``VisionTransformer``'s defaults (the docs' rewards page)
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
