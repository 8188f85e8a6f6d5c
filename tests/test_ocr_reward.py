"""Flow-GRPO's OCR reward: prompt parsing and the edit-distance score, and the real offline OCR engine
(the PP-OCRv4 ONNX weights inside the rapidocr-onnxruntime wheel) on rendered text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

pytest.importorskip("rapidfuzz")
from g2rpo.rewards.ocr import OcrReward, ocr_similarity, target_text  # noqa: E402


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ('A neon sign that says "Open Late" above a door', "Open Late"),
        ('a cake with "Happy Birthday" and "Anna" on it', "Happy Birthday"),  # the first quoted span
        ('a poster reading "GRAND OPENING', "GRAND OPENING"),  # no closing quote: up to the end
    ],
)
def test_target_is_the_first_quoted_span(prompt, target):
    assert target_text(prompt) == target


@pytest.mark.parametrize("prompt", ["a photo of a cat", 'an empty sign ""', 'a sign "   "'])
def test_prompt_without_text_to_render_is_an_error(prompt):
    with pytest.raises(ValueError, match="double quotes"):
        target_text(prompt)


def test_similarity_ignores_case_and_spaces_and_caps_the_penalty():
    assert ocr_similarity("HELLO world", "Hello World") == 1.0
    assert ocr_similarity("Sale: Hello World today", "hello world") == 1.0  # a substring match is exact
    assert ocr_similarity("Helo World", "Hello World") == pytest.approx(1 - 1 / 10)  # 10 letters, 1 edit
    assert ocr_similarity("", "Hello") == 0.0
    assert ocr_similarity("completely unrelated long text", "abc") == 0.0  # at most len(target) edits


def render(text: str | None, size: int = 256) -> torch.Tensor:
    """Black text on white, ``[3, size, size]`` in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    if text:
        ImageDraw.Draw(image).text(
            (16, size // 2 - 20), text, fill="black", font=ImageFont.load_default(size=36)
        )
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward() -> OcrReward:
    pytest.importorskip("rapidocr_onnxruntime")
    return OcrReward(engine_options={"intra_op_num_threads": 1, "inter_op_num_threads": 1})


def test_real_engine_reads_rendered_text(reward):
    images = torch.stack([render("Hello World"), render("Hello World"), render(None), render("Open 24h")])
    prompts = [
        'a sign that says "Hello World"',
        'a sign that says "Goodbye Moon"',
        'a sign that says "Hello World"',
        'a shop window with "OPEN 24H"',
    ]
    scores = reward(images, prompts, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores[0] > 0.8 and scores[3] > 0.8  # the right text, any case
    assert scores[1] < 0.5 and scores[2] == 0.0  # the wrong target; no text at all


def test_engine_failure_is_nan_and_the_rest_is_scored():
    class FailsOnBlank:
        def __call__(self, image, use_cls=True):
            if image.min() == 255:
                raise RuntimeError("engine crashed")
            return [[None, "hello", 0.99]], None

    reward = OcrReward(engine=FailsOnBlank())
    scores = reward(torch.stack([render("x"), render(None)]), ['"hello"', '"hello"'], [{}, {}])
    assert scores[0] == 1.0 and torch.isnan(scores[1])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.stack([render("x"), render(None)]), ['"hello"'], [{}])
