"""Flow-GRPO's OCR reward for visual text rendering (Liu et al. 2025, arXiv 2505.05470).

Restated from the research brief ``flow_grpo_family.md`` §2.9-2.10 and ``yifan123/flow_grpo``
``flow_grpo/ocr.py``: the text to render is the first double-quoted span of the prompt (the prompt alone:
no metadata); OCR runs without the angle classifier; the recognised lines are concatenated; both strings
have their spaces removed and are lower-cased; then

    reward = 1 - min(Levenshtein(recognised, target), len(target)) / len(target)

and 1 when the target occurs inside the recognised text (extra characters are not penalised).

Two deliberate differences: Flow-GRPO runs PaddleOCR 2.9.1 (``lang="en"``), here RapidOCR runs the PP-OCRv4
detection and recognition models as ONNX with onnxruntime (``rapidocr-onnxruntime``, the weights ship inside
the wheel, so it works offline); and a sample on which the engine raises is NaN (unscorable, left out of the
advantage statistics) where Flow-GRPO scores it 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor

log = logging.getLogger(__name__)


def target_text(prompt: str) -> str:
    """The text between the prompt's first double quote and the next one (or the end), as Flow-GRPO's
    ``prompt.split('"')[1]``."""
    parts = prompt.split('"')
    if len(parts) < 2 or not parts[1].replace(" ", ""):
        raise ValueError(f"OcrReward: the prompt names no text to render between double quotes: {prompt!r}")
    return parts[1]


def ocr_similarity(recognised: str, target: str) -> float:
    """``1 - min(edit distance, len(target)) / len(target)`` on space-free lower-case strings; 1 for a
    substring match."""
    recognised = recognised.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if target in recognised:
        return 1.0
    return 1.0 - min(Levenshtein.distance(recognised, target), len(target)) / len(target)


class OcrReward:
    """Flow-GRPO's ``ocr`` reward in [0, 1] for prompts like ``a sign that says "Hello World"``.

    ``engine_options`` are keyword arguments of ``rapidocr_onnxruntime.RapidOCR`` (``intra_op_num_threads``,
    ``det_use_cuda`` with onnxruntime-gpu, ...); ``engine`` takes an already-built engine with RapidOCR's
    call signature.
    """

    def __init__(self, engine_options: Mapping[str, Any] | None = None, engine: Any = None) -> None:
        if engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as error:
                raise ImportError(
                    "OcrReward needs its OCR engine: pip install rapidocr-onnxruntime "
                    "(the wheel holds the weights)"
                ) from error
            engine = RapidOCR(**dict(engine_options or {}))
        self.engine = engine

    def recognise(self, image: np.ndarray) -> str:
        """The recognised lines of one ``[H, W, 3]`` uint8 RGB image, top to bottom, concatenated."""
        bgr = np.ascontiguousarray(image[..., ::-1])  # RapidOCR reads arrays as OpenCV's BGR
        lines, _ = self.engine(bgr, use_cls=False)
        return "".join(line[1] for line in lines or [])

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"OcrReward: {images.shape[0]} images but {len(prompts)} prompts")
        targets = [target_text(prompt) for prompt in prompts]
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        scores = []
        for index, (array, target) in enumerate(zip(pixels.permute(0, 2, 3, 1).cpu().numpy(), targets)):
            try:
                recognised = self.recognise(array)
            except Exception as error:  # an engine failure leaves the sample unscored, not zero
                log.warning("OcrReward: the OCR engine failed on sample %d (%s); scored NaN", index, error)
                scores.append(float("nan"))
                continue
            scores.append(ocr_similarity(recognised, target))
        return torch.tensor(scores, dtype=torch.float32)
