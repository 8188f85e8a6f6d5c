"""Convert an OpenCLIP ViT checkpoint (OpenAI CLIP key layout) into a transformers ``CLIPModel``.

HPS-v2.1 (``xswu/HPSv2`` ``HPS_v2.1_compressed.pt``) and DFN5B-CLIP (``apple/DFN5B-CLIP-ViT-H-14``) ship only
as ``open_clip`` checkpoints of a ViT-H-14, the architecture transformers hosts as a ``CLIPModel``
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Written by hand because neither ready-made route works here:
``open_clip_torch`` imports torchvision, which has no working CPU build in this environment, and
transformers' ``convert_clip_original_pytorch_to_hf.py`` walks the original model *objects* (it needs the
``clip`` package to build them) rather than a state dict.

The key layout, restated from ``open_clip`` ``model.py`` / ``transformer.py`` (``CLIP`` with the default,
non-custom text tower, i.e. OpenAI's layout; residual blocks are pre-LN, the attention is a
``torch.nn.MultiheadAttention`` whose fused ``in_proj`` stacks q, k, v along dim 0; the projections are
plain matrices applied as ``x @ proj``, hence transposed into ``nn.Linear`` weights):

==========================================  ===================================================
open_clip                                   transformers ``CLIPModel``
==========================================  ===================================================
``visual.conv1.weight``                     ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                  ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``             ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre.*`` / ``visual.ln_post.*``  ``vision_model.pre_layrnorm.*`` / ``post_layernorm.*``
``visual.transformer.resblocks.{i}.*``      ``vision_model.encoder.layers.{i}.*`` (block below)
``visual.proj`` [W, D]                      ``visual_projection.weight`` = ``proj.T``
``token_embedding.weight``                  ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                    ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.{i}.*``             ``text_model.encoder.layers.{i}.*`` (block below)
``ln_final.*``                              ``text_model.final_layer_norm.*``
``text_projection`` [W, D]                  ``text_projection.weight`` = ``text_projection.T``
``logit_scale``                             ``logit_scale``
block: ``ln_1`` / ``ln_2``                  ``layer_norm1`` / ``layer_norm2``
block: ``attn.in_proj_{weight,bias}``       ``self_attn.{q,k,v}_proj.{weight,bias}`` (3 chunks)
block: ``attn.out_proj``                    ``self_attn.out_proj``
block: ``mlp.c_fc`` / ``mlp.c_proj``        ``mlp.fc1`` / ``mlp.fc2``
==========================================  ===================================================

The text tower must pool at the EOT token as open_clip does (``text.argmax(-1)``: EOT has the largest id):
a text config with ``eos_token_id: 2`` makes transformers take that argmax, one with the real EOT id (49407)
its first occurrence, which is the same position. The activation is *not* in the state dict: the config
must say it. ``ViT-H-14`` (HPSv2, LAION) uses GELU; DFN5B-CLIP-ViT-H-14 is the open_clip model
``ViT-H-14-quickgelu`` (``open_clip`` ``pretrained.py``: ``_VITH14_quickgelu`` ``dfn5b``), so it needs
``hidden_act: quick_gelu`` in both towers (``--hidden-act quick_gelu`` below; editing ``config.json`` by hand
may not stick, as an old config's ``text_config_dict`` / ``vision_config_dict`` override ``text_config``).

Usage (no network; CONFIG_DIR is a local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s json/txt
files; when it also holds the processor files they are copied into OUT_DIR, which then serves as both the
reward's ``path`` and ``processor_path``)::

    python -m g2rpo.rewards.weights.openclip HPS_v2.1_compressed.pt CONFIG_DIR OUT_DIR
    python -m g2rpo.rewards.weights.openclip open_clip_pytorch_model.bin CONFIG_DIR OUT_DIR \\
        --hidden-act quick_gelu    # DFN5B
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from g2rpo.rewards.weights.checks import check_fits, check_keys

#: a residual block's tensors copied as they are: open_clip name -> ``CLIPEncoderLayer`` name
_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
#: the projections open_clip applies as ``x @ proj``; an ``nn.Linear`` stores the transpose
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
#: buffers open_clip may carry that have no counterpart (the text tower's causal mask)
_IGNORED = {"attn_mask"}


def _copied(config: CLIPConfig) -> dict[str, str]:
    """open_clip name -> transformers name for every tensor copied unchanged."""
    names = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    norms = {
        "visual.ln_pre": "vision_model.pre_layrnorm",
        "visual.ln_post": "vision_model.post_layernorm",
        "ln_final": "text_model.final_layer_norm",
    }
    for source, target in norms.items():
        names.update({f"{source}.{p}": f"{target}.{p}" for p in ("weight", "bias")})
    for block, layer in _blocks(config):
        for old, new in _BLOCK.items():
            names.update({f"{block}.{old}.{p}": f"{layer}.{new}.{p}" for p in ("weight", "bias")})
    return names


def _blocks(config: CLIPConfig) -> list[tuple[str, str]]:
    """(open_clip prefix, transformers prefix) of every residual block of both towers."""
    towers = (
        ("visual.transformer", "vision_model.encoder", config.vision_config.num_hidden_layers),
        ("transformer", "text_model.encoder", config.text_config.num_hidden_layers),
    )
    return [
        (f"{old}.resblocks.{i}", f"{new}.layers.{i}") for old, new, layers in towers for i in range(layers)
    ]


def _fused(config: CLIPConfig) -> dict[str, str]:
    """open_clip ``attn.in_proj_{weight,bias}`` -> the transformers prefix its q, k, v chunks go to."""
    names = {}
    for block, layer in _blocks(config):
        for p in ("weight", "bias"):
            names[f"{block}.attn.in_proj_{p}"] = f"{layer}.self_attn.{{}}_proj.{p}"
    return names


def convert_open_clip_state_dict(state_dict: dict[str, Tensor], config: CLIPConfig) -> CLIPModel:
    """A ``CLIPModel`` built from ``config`` holding an open_clip state dict's weights (float32).

    Raises ``ValueError`` naming missing or unexpected keys (e.g. a custom text tower's ``text.*`` keys,
    or a SigLIP-style ``logit_bias``, which this layout does not cover) and tensors whose shapes disagree
    with ``config`` (e.g. the 224 px config for a 378 px checkpoint).
    """
    copied, fused = _copied(config), _fused(config)
    given = set(state_dict) - _IGNORED
    expected = set(copied) | set(fused) | set(_TRANSPOSED)
    check_keys(
        given,
        expected,
        "not an open_clip CLIP state dict in OpenAI's layout for this config",
        ". Only the default text tower (token_embedding, transformer, ln_final, text_projection) is supported, "
        "and the layer counts come from the config.",
    )
    converted = {copied[name]: state_dict[name] for name in copied}
    converted.update({target: state_dict[name].t() for name, target in _TRANSPOSED.items()})
    for name, target in fused.items():
        for part, chunk in zip("qkv", state_dict[name].chunk(3, dim=0), strict=True):
            converted[target.format(part)] = chunk

    model = CLIPModel(config)
    own = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}  # persistent ones stay as built
    converted.update({name: own[name] for name in buffers & set(own) if name not in converted})
    check_fits(converted, own, "transformers' CLIPModel", "config")
    model.load_state_dict(converted, strict=True)
    return model


def load_open_clip_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of an open_clip checkpoint: a plain state dict, or ``{"state_dict": ...}`` as HPSv2's.

    ``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``;
    a leading ``module.`` (from DistributedDataParallel) is stripped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(state).__name__}"
        )
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m g2rpo.rewards.weights.openclip CHECKPOINT CONFIG_DIR OUT_DIR [--hidden-act ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m g2rpo.rewards.weights.openclip",
        description="Convert an open_clip ViT checkpoint (e.g. HPS_v2.1_compressed.pt, DFN5B-CLIP) into a "
        "transformers CLIPModel directory (safetensors).",
    )
    parser.add_argument("checkpoint", help="open_clip checkpoint (.pt/.bin, or .safetensors)")
    parser.add_argument(
        "config_dir",
        help="directory with a CLIPConfig config.json, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
    parser.add_argument("out_dir", help="where to save_pretrained the converted CLIPModel")
    parser.add_argument(
        "--hidden-act",
        choices=("gelu", "quick_gelu"),
        help="override both towers' activation: quick_gelu for DFN5B (open_clip's ViT-H-14-quickgelu)",
    )
    args = parser.parse_args(argv)
    config = CLIPConfig.from_pretrained(args.config_dir, local_files_only=True)
    if args.hidden_act is not None:
        config.text_config.hidden_act = config.vision_config.hidden_act = args.hidden_act
    model = convert_open_clip_state_dict(load_open_clip_checkpoint(args.checkpoint), config)
    model.save_pretrained(args.out_dir)
    try:
        processor = CLIPProcessor.from_pretrained(args.config_dir, local_files_only=True)
    except OSError:
        print(
            f"wrote the model to {args.out_dir}; {args.config_dir} holds no processor, so pass processor_path"
        )
        return
    processor.save_pretrained(args.out_dir)
    print(f"wrote the model and the processor of {args.config_dir} to {args.out_dir}")


if __name__ == "__main__":
    main()
