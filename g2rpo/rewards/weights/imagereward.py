"""ImageReward's ``ImageReward.pt`` renamed into :class:`~g2rpo.rewards.imagereward.ImageRewardModel`'s keys:
the tables and the strict converter (``THUDM/ImageReward`` loads with ``strict=False``; this lists what a
checkpoint lacks or has in excess, with the entries ``score`` never reads in ``_IGNORED_PREFIXES`` /
``_IGNORED_KEYS``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from g2rpo.rewards.weights.checks import check_fits, check_keys

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
    state_dict: Mapping[str, Tensor], model: nn.Module | None = None
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
