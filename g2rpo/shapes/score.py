"""The ``shapes_score`` reward: a tiny CLIP trained on the shapes world, in PickScore's and HPS's role (a CLIP
whose reward is ``logit_scale * cos(image, text)``).

This is what a run imports: the reward, the model's builder and the embedding helpers. Its training (data,
losses, trainer, ``make reward-model``) is :mod:`g2rpo.shapes.training.score`; why it is trained as it is,
the shapes world's page in the docs. Pixels enter as ``2 * image - 1`` (the base model's normalisation, not
CLIP's ImageNet mean/std: the world's colours are its own); the weights ship in fp16 (1.7 MB), load in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from g2rpo.shapes.model import word_tokenizer

SCORE_MODEL_DIR = Path(__file__).parent / "weights" / "shapes_score"


def shapes_clip(
    seed: int = 0,
    text_hidden_size: int = 128,
    vision_hidden_size: int = 128,
    text_layers: int = 2,
    vision_layers: int = 2,
    projection_dim: int = 128,
    image_size: int = 32,
    patch_size: int = 4,
    max_length: int = 16,
    logit_scale_init: float = 1 / 0.07,
) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """A freshly initialised shapes CLIP and its word-level tokenizer; weights depend on ``seed``.

    Width matters more than depth here: at width 64 (four vision layers) the same budget learnt colours and
    shapes but not binding, at 128 binding is learnt within a few hundred steps.
    """
    tokenizer = word_tokenizer(max_length)
    config = CLIPConfig(
        text_config={
            "hidden_size": text_hidden_size,
            "intermediate_size": 4 * text_hidden_size,
            "num_attention_heads": 4,
            "num_hidden_layers": text_layers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,  # pooled at the first end token, as CLIP's text tower
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": vision_hidden_size,
            "intermediate_size": 4 * vision_hidden_size,
            "num_attention_heads": 4,
            "num_hidden_layers": vision_layers,
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": 3,
        },
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(logit_scale_init),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model, tokenizer


def to_pixels(images: Tensor) -> Tensor:
    """[0, 1] images to the model's input range, [-1, 1]."""
    return images.clamp(0, 1) * 2 - 1


@torch.no_grad()
def embed_text(
    model: CLIPModel, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], device
) -> Tensor:
    """Unit-norm text embeddings ``[len(prompts), D]``."""
    text = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).to(device)
    features = model.get_text_features(
        input_ids=text.input_ids, attention_mask=text.attention_mask
    ).pooler_output
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def embed_images(model: CLIPModel, images: Tensor, batch_size: int = 256) -> Tensor:
    """Unit-norm image embeddings ``[B, D]`` of ``[B, 3, H, W]`` images in [0, 1], resized to the model's size."""
    size = model.config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    chunks = []
    for chunk in images.split(batch_size):
        chunk = chunk.float()
        if chunk.shape[-2:] != (size, size):
            chunk = F.interpolate(
                chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        features = model.get_image_features(pixel_values=to_pixels(chunk).to(dtype)).pooler_output
        chunks.append(F.normalize(features.float(), dim=-1))
    return torch.cat(chunks)


class ShapesScore:
    """The ``shapes_score`` reward: the shapes CLIP's ``logit_scale * cos(image, prompt) / scale``.

    ``scale=None`` divides by the model's own logit scale, so the reward is the cosine, in [-1, 1] (true
    captions of held-out renders average about 0.54, corrupted ones about 0.30; ``training.json`` has the
    measured means): on the scale of the GenEval partial credit it may be mixed with. ``scale=1.0`` gives the
    raw logit, PickScore's raw score, and a constant divides it as Flow-GRPO divides PickScore by 26. Images
    of another size are resized to the model's 32x32; text embeddings are cached per distinct prompt.
    """

    def __init__(
        self, path: str | Path | None = None, scale: float | None = None, batch_size: int = 256
    ) -> None:
        path = Path(path) if path is not None else SCORE_MODEL_DIR
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no shapes_score model at {path}: train it with `make reward-model` "
                f"(python -m g2rpo.shapes.training.score --out {path})"
            )
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)  # shipped in fp16
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        logit_scale = float(self.model.logit_scale.exp())
        self.multiplier = logit_scale / (logit_scale if scale is None else float(scale))
        self.batch_size = batch_size
        self._text: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        device = images.device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
            self._text.clear()
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            self._text.update(zip(missing, embed_text(self.model, self.tokenizer, missing, device)))
        text = torch.stack([self._text[p] for p in prompts])
        image = embed_images(self.model, images, self.batch_size)
        return (image * text).sum(dim=-1) * self.multiplier
