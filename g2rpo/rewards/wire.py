"""The JSON wire format of served rewards, shared by the client (:mod:`g2rpo.rewards.remote`) and the server
(:mod:`g2rpo.rewards.serve`). JSON only, never pickle, so neither side can run code the other sends:

    POST /score  {"images": [base64 PNG of uint8 HxWx3, ...], "prompts": [str, ...], "metadata": [dict, ...],
                  "sources": [base64 PNG, ...] (edits only: each image's source, for rewards that read it)}
              -> {"scores": [float or null, ...], "batch": {"requests": R, "images": N}}
                 null = NaN = unscorable (left out of the advantages); "batch" says how many requests (from any
                 client) and images the server scored together with this one (clients may ignore it)
    POST /scores (the same request) -> {"scores": {name: [float or null, ...], ...}, "batch": {...}}
              a reward's named scores (``scores()``, e.g. GenEval's accuracy and partial), for evaluation
    GET /health -> 200 "ok" once the server's workers are ready (503 "not ready" before); the earlier
              stdlib server answered {"status": "ok"}, which clients still accept
Errors come back as ``{"error": message}``: 400 for a malformed request, 401 for a missing or wrong
``X-API-Key``, 408 for a client silent mid-body, 413 for a body over the server's limit, 500 when the reward
raised, 503 while the server starts, 504 for a request that waited in its queue past the server's timeout.

Images are quantised with ``round(x * 255)`` (as the JPEG reward does) and PNG is lossless, so a served reward
sees the pixels an in-process one would quantise to. This module needs only numpy, Pillow and torch, so a
reward's own environment (GenEval's mmdet stack) can import it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def encode_image(pixels: np.ndarray) -> str:
    """Base64 PNG of one ``uint8 [H, W, 3]`` array; compress_level=1: lossless either way, and fast."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> np.ndarray:
    """The ``uint8 [H, W, 3]`` array of a base64 PNG; anything else is a malformed request (ValueError)."""
    if not isinstance(data, str):
        raise ValueError(f"an image must be a base64 string, got {type(data).__name__}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG"])
        image.load()
    except (ValueError, OSError) as error:
        raise ValueError(f"an image is not a base64 PNG: {error}") from None
    if image.mode != "RGB":
        raise ValueError(f"images must be 8-bit RGB PNGs, got mode {image.mode!r}")
    return np.asarray(image)


def pixels_of(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] as ``uint8 [B, H, W, 3]``, quantised as the module docstring says."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def images_of(encoded: Sequence[str]) -> Tensor:
    """Base64 PNGs of one size as ``[B, 3, H, W]`` floats in [0, 1] (ValueError for sizes that differ)."""
    arrays = [decode_image(data) for data in encoded]
    if len({array.shape for array in arrays}) > 1:
        raise ValueError(f"the images differ in size: {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def scores_of(scores: Tensor | Sequence, count: int) -> list[float | None]:
    """A reward's scores as JSON numbers, NaN as null (ValueError unless there are ``count`` of them)."""
    if isinstance(scores, Tensor):
        scores = scores.detach().float().flatten().cpu().tolist()
    scores = [None if s is None or math.isnan(float(s)) else float(s) for s in scores]
    if len(scores) != count:
        raise ValueError(f"the reward returned {len(scores)} scores for {count} images")
    return scores
