"""A vision-language model as judge: :class:`VLMJudge` asks an OpenAI-compatible chat endpoint to score images.

Source: Flow-GRPO's UnifiedReward scorer (research brief ``flow_grpo_family.md`` section 2.10), which queries
``CodeGoat24/UnifiedReward-7b-v1.5`` served by SGLang through the OpenAI-compatible chat API: each image is
resized to 512, sent with a fixed rubric asking for "Final Score: 1-5", the score is regex-parsed and divided
by 5. Any server of that API works the same way (SGLang, vLLM, ...); see ``conf/reward/unified_reward.yaml``.

Deliberate differences from Flow-GRPO:
- An answer with no parsable score, or a score outside ``[0, max_score]``, is NaN (unscorable: left out of
  the advantage statistics and logged at WARNING), not 0: a 0 would train the policy away from images the
  judge merely failed to grade.
- The last match of ``score_pattern`` counts (the rubric asks the judge to end with it), not the first, so a
  "Final Score" quoted inside the judge's reasoning does not win.
- Images are resized so that their longer side is ``image_size`` (bicubic), keeping the aspect ratio; for
  square images this is Flow-GRPO's 512x512.
- A server that cannot answer stops the run (:class:`~g2rpo.rewards.http.RewardServerError`) after the same
  retries as :class:`~g2rpo.rewards.remote.RemoteReward`, plus HTTP 429 (a busy inference server asks the
  client to slow down); other 4xx raise at once. Re-running the same command resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from g2rpo.rewards.chat import ChatClient
from g2rpo.rewards.preference import parse_verdict
from g2rpo.rewards.wire import encode_image, pixels_of

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "You are given a text caption and an image generated from that caption. Evaluate the image on two "
    "criteria:\n"
    "1. Alignment with the caption: how accurately the image depicts the objects, their attributes, counts "
    "and relationships described in the caption.\n"
    "2. Overall image quality: clarity, detail, colour accuracy, absence of artifacts and aesthetic appeal.\n"
    "Considering both criteria, rate the image with a score from 1 (poor) to 5 (excellent). Explain briefly, "
    "then end your answer with 'Final Score: <score>'.\n"
    "Text caption: [{prompt}]"
)
DEFAULT_SCORE_PATTERN = r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"


def encode_resized(pixels: np.ndarray, image_size: int | None) -> str:
    """``uint8 [H, W, 3]`` pixels as base64 PNG, their longer side resized to ``image_size`` (bicubic)."""
    image = Image.fromarray(pixels)
    if image_size is not None:
        scale = image_size / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
    return encode_image(np.asarray(image))


class VLMJudge:
    """Scores each image by asking a VLM served behind ``{base_url}/chat/completions`` to grade it.

    One request per image through ``chat`` (its connection, API key, concurrency, retries and sampling
    settings; inference servers batch concurrent requests themselves). The reward is the parsed score divided
    by ``max_score``. The constructor contacts nothing (configs are instantiated in tests with no server); the
    first call does.
    """

    def __init__(
        self,
        chat: ChatClient,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        score_pattern: str = DEFAULT_SCORE_PATTERN,
        max_score: float = 5.0,
        image_size: int | None = 512,
    ) -> None:
        if "{prompt}" not in prompt_template:
            raise ValueError("VLMJudge.prompt_template must contain '{prompt}', where the caption goes")
        pattern = re.compile(score_pattern)
        if pattern.groups != 1:
            raise ValueError(
                f"VLMJudge.score_pattern must have exactly one group (the score), got {pattern.groups}: "
                f"{score_pattern!r}"
            )
        if max_score <= 0 or (image_size is not None and image_size < 1):
            raise ValueError(
                f"VLMJudge needs max_score > 0 and image_size >= 1 or null; got max_score={max_score}, "
                f"image_size={image_size}"
            )
        self.chat = chat
        self.prompt_template = prompt_template
        self.score_pattern = pattern
        self.max_score = float(max_score)
        self.image_size = None if image_size is None else int(image_size)

    @property
    def url(self) -> str:
        return self.chat.url

    @property
    def model(self) -> str:
        return self.chat.model

    def __repr__(self) -> str:  # never shows the API key
        return f"{type(self).__name__}({self.chat!r})"

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        count = images.shape[0]
        if len(prompts) != count:
            raise ValueError(f"{count} images but {len(prompts)} prompts")
        if count == 0:
            return torch.empty(0)
        return self._ask(
            [
                [*self._image_parts(array), self._text_part(prompt)]
                for array, prompt in zip(pixels_of(images), prompts)
            ]
        )

    def _ask(self, messages: list[list[dict]]) -> Tensor:
        """The judge's score of each user message, divided by ``max_score`` (NaN where it gave none)."""
        answers = self.chat.complete_all(messages)
        return torch.tensor([self._parse_score(answer) for answer in answers], dtype=torch.float32)

    def _image_parts(self, *arrays: np.ndarray) -> list[dict]:
        return [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + self._encode(a)}}
            for a in arrays
        ]

    def _text_part(self, prompt: str) -> dict:
        # replace, not str.format: a rubric may contain other braces (JSON examples)
        return {"type": "text", "text": self.prompt_template.replace("{prompt}", str(prompt))}

    def _encode(self, pixels: np.ndarray) -> str:
        return encode_resized(pixels, self.image_size)

    def _parse_score(self, answer: str | None) -> float:
        matches = [] if answer is None else list(self.score_pattern.finditer(answer))
        if not matches:
            log.warning("VLM judge: no score in the answer, scored NaN: %r", (answer or "")[:200])
            return math.nan
        try:
            score = float(matches[-1].group(1))
        except (TypeError, ValueError):
            score = math.nan
        if not 0.0 <= score <= self.max_score:  # NaN fails this too
            log.warning(
                "VLM judge: score %s outside [0, %g], scored NaN: %r",
                matches[-1].group(1),
                self.max_score,
                answer[:200],
            )
            return math.nan
        return score / self.max_score


DEFAULT_EDIT_TEMPLATE = (
    "You are given two images: the first is the original, the second is the result of editing it with the "
    "instruction below. Evaluate the edit on two criteria:\n"
    "1. Instruction compliance: whether the second image carries out exactly what the instruction asks.\n"
    "2. Preservation: whether everything the instruction does not mention is kept as in the first image "
    "(over-editing, or returning the first image unchanged, are both failures), with no artifacts.\n"
    "Considering both, rate the edit from 1 (poor) to 5 (excellent). Explain briefly, then end your answer "
    "with 'Final Score: <score>'.\n"
    "Instruction: [{prompt}]"
)


class VLMEditJudge(VLMJudge):
    """An edit judged by a VLM from two images, the source then the edit, and the instruction (as EditReward
    and VIEScore prompt their judges). Prompts that are not edits score NaN."""

    reads_sources = True

    def __init__(self, chat: ChatClient, prompt_template: str = DEFAULT_EDIT_TEMPLATE, **kwargs) -> None:
        super().__init__(chat, prompt_template, **kwargs)

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> Tensor:
        pairs = self._edit_pixels(images, prompts, sources)
        if pairs is None:
            return torch.full((images.shape[0],), math.nan)
        return self._ask(
            [
                [*self._image_parts(source, edited), self._text_part(prompt)]
                for source, edited, prompt in zip(*pairs, prompts)
            ]
        )

    def _edit_pixels(
        self, images: Tensor, prompts: Sequence[str], sources: Tensor | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(sources, edits)`` as ``uint8 [N, H, W, 3]``; None (logged) when the prompts are not edits."""
        count = images.shape[0]
        if len(prompts) != count:
            raise ValueError(f"{count} images but {len(prompts)} prompts")
        if sources is None:
            log.warning("VLM edit judge: %d images without a source image (not edits), scored NaN", count)
            return None
        if sources.shape[0] != count:
            raise ValueError(f"{count} images but {sources.shape[0]} source images")
        return pixels_of(sources), pixels_of(images)


DEFAULT_COMPARE_INSTRUCTION = (
    'Which image matches the caption "{caption}" better, in content and in visual quality? You may reason '
    "first. End with your verdict, exactly <answer>A</answer> or <answer>B</answer>."
)


class VLMPairJudge:
    """A pairwise judge served behind an OpenAI-compatible chat endpoint: the Qwen2.5-VL judge trained by
    token GRPO (:class:`~g2rpo.policies.qwen_vl.QwenVLJudgePolicy`) served by vLLM, asked exactly as it was
    trained (``Image A:`` image ``Image B:`` image, then ``instruction`` with the caption). It is the
    ``judge`` of :class:`~g2rpo.rewards.preference.PairwiseJudgeReward`, which turns its preferences into
    per-image rewards.

    :meth:`prefer` is 1 when the verdict names A, 0 when it names B, 1/2 (logged) when the answer holds no
    verdict: a sampled verdict, not a probability (the chat API's answer text is all it reads).
    """

    def __init__(
        self,
        chat: ChatClient,
        instruction: str = DEFAULT_COMPARE_INSTRUCTION,
        image_size: int | None = 448,
    ) -> None:
        if "{caption}" not in instruction:
            raise ValueError("VLMPairJudge.instruction must contain '{caption}', where the caption goes")
        self.chat = chat
        self.instruction = instruction
        self.image_size = image_size

    def __repr__(self) -> str:  # never shows the API key
        return f"{type(self).__name__}({self.chat!r})"

    def message(self, first: np.ndarray, second: np.ndarray, caption: str) -> list[dict]:
        """The user turn: image A, image B (labelled), then the instruction with the caption."""
        parts = []
        for label, pixels in (("A", first), ("B", second)):
            url = "data:image/png;base64," + encode_resized(pixels, self.image_size)
            parts += [
                {"type": "text", "text": f"Image {label}:"},
                {"type": "image_url", "image_url": {"url": url}},
            ]
        return [*parts, {"type": "text", "text": self.instruction.replace("{caption}", str(caption))}]

    def prefer(self, images: Tensor, others: Tensor, prompts: Sequence[str]) -> Tensor:
        if not len(images) == len(others) == len(prompts):
            raise ValueError(f"{len(images)} images A, {len(others)} images B and {len(prompts)} captions")
        answers = self.chat.complete_all(
            [self.message(a, b, p) for a, b, p in zip(pixels_of(images), pixels_of(others), prompts)]
        )
        verdicts = [parse_verdict(answer or "") for answer in answers]
        for answer, verdict in zip(answers, verdicts):
            if verdict is None:
                log.warning("VLM pair judge: no verdict in the answer, scored 1/2: %r", (answer or "")[:200])
        return torch.tensor([{"A": 1.0, "B": 0.0, None: 0.5}[v] for v in verdicts])
