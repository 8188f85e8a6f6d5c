"""Completion of PairUG's medoids: a caption for an understanding image, a question for a generation caption,
written by the world's templates (:class:`TemplateCompleter`) or an LLM (:class:`OpenAICompleter`, in GPT's
role in PairUni, arXiv 2510.25682v3 sec. 3.1), then checked against the scene (:class:`Verifier`, the
paper's generate-then-verify loop). :mod:`g2rpo.shapes.pairug` builds the pairs with them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from g2rpo.rewards.answer import normalize as normalize_text
from g2rpo.rewards.chat import ChatClient
from g2rpo.shapes import prompts, vqa
from g2rpo.shapes.geneval import holds
from g2rpo.shapes.world import COLOURS, SHAPES, WorldObject

# an understanding scene and its question {"question", "answer", "qtype"}
CaptionRequest = tuple[list[WorldObject], dict]
# a generation item's reference scene and its caption metadata
QuestionRequest = tuple[list[WorldObject], dict]


class Completer(Protocol):
    """Writes what an item lacks: a caption for an understanding image, a question for a generation caption.

    Answers are free text (``None`` when there is none); the :class:`Verifier` decides what they mean.
    """

    def captions(self, requests: Sequence[CaptionRequest], rng: np.random.Generator) -> list[str | None]: ...

    def questions(
        self, requests: Sequence[QuestionRequest], rng: np.random.Generator
    ) -> list[tuple[str, str] | None]: ...


class TemplateCompleter:
    """The world's templates in GPT's role. True by construction, so the verifier rejects only captions of
    held-out compositions and those outside the world's prompts (two same-coloured objects bound by colour)."""

    def captions(self, requests: Sequence[CaptionRequest], rng: np.random.Generator) -> list[str | None]:
        return [vqa.caption_for_scene(objects, rng)["prompt"] for objects, _ in requests]

    def questions(
        self, requests: Sequence[QuestionRequest], rng: np.random.Generator
    ) -> list[tuple[str, str] | None]:
        out = []
        for objects, caption in requests:
            qa = vqa.question_for_caption(caption, objects, rng)
            out.append((qa["question"], qa["answer"]))
        return out


def describe(objects: Sequence[WorldObject]) -> str:
    """The scene's ground truth as the text an LLM completes from (it sees no pixels)."""
    lines = [
        f"- {o.colour} {o.shape}, centre (x={o.cx:.1f}, y={o.cy:.1f}), size {o.size:.1f}" for o in objects
    ]
    return "Objects in a 32x32 image (pixel coordinates, x to the right, y downwards):\n" + "\n".join(lines)


CAPTION_INSTRUCTIONS = (
    '{scene}\n\nThe image comes with the question "{question}" (answer: {answer}). Write one text-to-image '
    "prompt that is true of the image and includes the details needed to answer the question. Use exactly one "
    "of these forms: 'a photo of a SHAPE', 'a photo of a SHAPE and a SHAPE', 'a photo of NUMBER SHAPEs', "
    "'a photo of a COLOUR SHAPE', 'a photo of a SHAPE RELATION a SHAPE', 'a photo of a COLOUR SHAPE and a "
    "COLOUR SHAPE', with SHAPE in {shapes}, COLOUR in {colours}, NUMBER in two, three, four and RELATION in "
    'left of, right of, above, below (use \'an\' before a vowel). Reply with JSON only: {{"caption": "..."}}'
)
QUESTION_INSTRUCTIONS = (
    '{scene}\n\nThe image was drawn for the caption "{caption}". Write one question about the entities of '
    "the caption that the image answers, and its one-word answer. Use exactly one of these forms: 'how many "
    "SHAPEs are there' (zero to four), 'what colour is the SHAPE', 'what shape is the COLOUR object', 'where "
    "is the SHAPE relative to the SHAPE' (left, right, above or below), 'is there a COLOUR SHAPE' (yes or "
    "no), with SHAPE in {shapes} and COLOUR in {colours}. Reply with JSON only: "
    '{{"question": "...", "answer": "..."}}'
)


class OpenAICompleter:
    """Completion by an LLM behind an OpenAI-compatible ``{base_url}/chat/completions`` (vLLM, SGLang, an API),
    reached through ``chat`` (its connection, concurrency, retries and sampling settings).

    The model gets the scene's ground-truth object list as text and answers in JSON; an answer that is not
    parsable JSON with the asked fields is ``None`` (dropped and counted by the builder). A server that cannot
    answer stops the build. At temperature 0 (the client's default) a rebuild asks the same questions.
    """

    def __init__(self, chat: ChatClient) -> None:
        self.chat = chat

    def __repr__(self) -> str:  # never shows the API key
        return f"OpenAICompleter({self.chat!r})"

    def captions(self, requests: Sequence[CaptionRequest], rng: np.random.Generator) -> list[str | None]:
        texts = [
            CAPTION_INSTRUCTIONS.format(
                scene=describe(objects), question=qa["question"], answer=qa["answer"], **_vocabulary()
            )
            for objects, qa in requests
        ]
        answers = self._ask(texts)
        return [a["caption"] if a is not None and _strings(a, "caption") else None for a in answers]

    def questions(
        self, requests: Sequence[QuestionRequest], rng: np.random.Generator
    ) -> list[tuple[str, str] | None]:
        texts = [
            QUESTION_INSTRUCTIONS.format(scene=describe(objects), caption=caption["prompt"], **_vocabulary())
            for objects, caption in requests
        ]
        return [
            (a["question"], a["answer"]) if a is not None and _strings(a, "question", "answer") else None
            for a in self._ask(texts)
        ]

    def _ask(self, texts: list[str]) -> list[dict | None]:
        return [
            _json_object(answer) if answer is not None else None for answer in self.chat.complete_all(texts)
        ]


def _vocabulary() -> dict[str, str]:
    return {"shapes": ", ".join(SHAPES), "colours": ", ".join(COLOURS)}


def _strings(answer: dict, *keys: str) -> bool:
    return all(isinstance(answer.get(key), str) for key in keys)


def _json_object(text: str) -> dict | None:
    """The JSON object in a model's answer (models wrap it in prose or code fences), or None."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start : end + 1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Verifier:
    """Accepts a completion only if it is true of the scene, reading it back into the world's terms.

    A caption must be one of the world's prompts (its GenEval metadata found by its text), hold on the scene
    by GenEval's rule, and not be a held-out composition; a question must be one the scene answers
    unambiguously, with the ground-truth answer. Each method returns the accepted value or a rejection reason.
    """

    def __init__(self) -> None:
        self.prompts = {m["prompt"]: m for ms in prompts.split("all").values() for m in ms}
        self.train = {m["prompt"] for ms in prompts.split("train").values() for m in ms}

    def caption(self, text: str | None, objects: list[WorldObject]) -> dict | str:
        if text is None:
            return "unparsable"
        metadata = self.prompts.get(normalize_text(text, first_word=False))
        if metadata is None:
            return "caption_unknown"
        if not holds(objects, metadata):
            return "caption_false"
        if metadata["prompt"] not in self.train:
            return "caption_heldout"
        return metadata

    def question(self, completion: tuple[str, str] | None, objects: list[WorldObject]) -> dict | str:
        if completion is None:
            return "unparsable"
        question, answer = completion
        truth = {q["question"]: q for qs in vqa.questions(objects).values() for q in qs}
        entry = truth.get(normalize_text(question, first_word=False))
        if entry is None:
            return "question_unknown"
        if normalize_text(answer, first_word=False) != entry["answer"]:
            return "answer_wrong"
        return dict(entry)
