"""JPEG (in)compressibility: DDPO's weight-free rewards (Black et al. 2023, ``ddpo_pytorch/rewards.py``)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor


class JpegCompressibility:
    """Minus the image's JPEG size in kB (quality 95): rewards smooth, simple images.

    Needs no weights, so it works for any model and in tests. DDPO's scale (kB) is kept; Flow-GRPO's
    variant divides by 500, which only matters through the advantage eps.
    """

    sign = -1.0

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def __call__(self, images: Tensor, prompts: Sequence[str] = (), metadata: Sequence[dict] = ()) -> Tensor:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibility(JpegCompressibility):
    """The JPEG size in kB: rewards detailed, high-frequency images."""

    sign = 1.0
