"""Questions about shapes-world images, with their exact answers: the understanding half of the unified model.

Five question types mirror what VQA benchmarks ask of a unified model (and what PairUni's understanding set
covers at small scale): counting, colour, shape, relative position and yes/no existence. Every answer is
one word, read off the scene's ground truth, so an understanding reward is an exact match. The same
templates stand in for the GPT completion of PairUni's PairUG builder: a caption for an understanding image
(:func:`caption_for_scene`) and a question targeting a caption's entities (:func:`question_for_caption`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from g2rpo.rewards.answer import normalize
from g2rpo.shapes import prompts as templates
from g2rpo.shapes.world import COLOURS, SHAPES, WorldObject, place

QUESTION_TYPES = ("count", "colour", "shape", "position", "exists")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
POSITION_WORDS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
ANSWERS = (*COUNT_WORDS, *COLOURS, *SHAPES, *POSITION_WORDS.values(), "yes", "no")
QUESTION_WORDS = (
    "how", "many", "are", "there", "what", "colour", "is", "the", "shape", "object", "where",
    "relative", "to", "a", "an",
)  # fmt: skip


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _relation(objects: list[WorldObject], first: WorldObject, second: WorldObject) -> str | None:
    """The one relation of ``first`` to ``second`` under GenEval's rule, or None when it is ambiguous."""
    from g2rpo.rewards.geneval_rules import relative_position

    relations = relative_position(first.box, second.box)
    return next(iter(relations)) if len(relations) == 1 else None


def questions(objects: list[WorldObject]) -> dict[str, list[dict]]:
    """Every question the scene answers unambiguously, per type: ``{"question", "answer", "qtype"}``."""
    shapes = Counter(o.shape for o in objects)
    colours = Counter(o.colour for o in objects)
    out: dict[str, list[dict]] = {qtype: [] for qtype in QUESTION_TYPES}
    for shape in SHAPES:
        out["count"].append((f"how many {shape}s are there", COUNT_WORDS[shapes[shape]]))
    for obj in objects:
        if shapes[obj.shape] == 1:
            out["colour"].append((f"what colour is the {obj.shape}", obj.colour))
        if colours[obj.colour] == 1:
            out["shape"].append((f"what shape is the {obj.colour} object", obj.shape))
    unique = [o for o in objects if shapes[o.shape] == 1]
    for first in unique:
        for second in unique:
            if first is not second and (relation := _relation(objects, first, second)):
                question = f"where is the {first.shape} relative to the {second.shape}"
                out["position"].append((question, POSITION_WORDS[relation]))
    present = {(o.colour, o.shape) for o in objects}
    for colour in COLOURS:
        for shape in SHAPES:
            answer = "yes" if (colour, shape) in present else "no"
            out["exists"].append((f"is there {_a(colour)} {shape}", answer))
    return {
        qtype: [{"question": q, "answer": a, "qtype": qtype} for q, a in entries]
        for qtype, entries in out.items()
    }


def sample_question(objects: list[WorldObject], rng: np.random.Generator, qtype: str | None = None) -> dict:
    """One question: a type drawn uniformly among those the scene can answer (or ``qtype``), then a question
    of that type; existence questions are balanced between yes and no."""
    available = questions(objects)
    if qtype is None:
        qtype = str(rng.choice([t for t in QUESTION_TYPES if available[t]]))
    elif qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; choose one of {', '.join(QUESTION_TYPES)}")
    entries = available[qtype]
    if not entries:
        raise ValueError(f"the scene {objects} answers no {qtype!r} question")
    if qtype == "exists":
        answer = "yes" if rng.random() < 0.5 else "no"
        entries = [e for e in entries if e["answer"] == answer] or entries
    return dict(entries[rng.integers(len(entries))])


def random_scene(rng: np.random.Generator, image_size: int = 32, max_objects: int = 4) -> list[WorldObject]:
    """1..``max_objects`` objects of random shapes and colours: the understanding set's images."""
    count = int(rng.integers(1, max_objects + 1))
    specs = [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))) for _ in range(count)]
    return place(rng, specs, image_size=image_size)


def answer_matches(predicted: str, answer: str) -> bool:
    """Answers are single words: the first word of ``predicted`` decides (the ``AnswerMatch`` reward's rule)."""
    return normalize(predicted, first_word=True) == normalize(answer, first_word=True)


def caption_for_scene(objects: list[WorldObject], rng: np.random.Generator) -> dict:
    """A GenEval-style prompt (with its metadata, as in :mod:`g2rpo.shapes.prompts`) true of the scene: the
    template completion of an understanding image into a generation prompt."""
    shapes = Counter(o.shape for o in objects)
    if len(objects) == 1:
        obj = objects[0]
        return (
            templates.colors(obj.shape, obj.colour)
            if rng.random() < 0.7
            else templates.single_object(obj.shape)
        )
    if len(shapes) == 1 and len(objects) in templates.NUMBERS:
        return templates.counting(objects[0].shape, len(objects))
    unique = [o for o in objects if shapes[o.shape] == 1]
    options = []
    if len(unique) >= 2:
        first, second = unique[0], unique[1]
        options.append(templates.color_attr(first.shape, first.colour, second.shape, second.colour))
        if relation := _relation(objects, first, second):
            options.append(templates.position(first.shape, relation, second.shape))
    distinct = list(shapes)
    if len(distinct) >= 2:
        options.append(templates.two_object(distinct[0], distinct[1]))
    for shape, count in shapes.items():
        if count in templates.NUMBERS:
            options.append(templates.counting(shape, count))
    if not options:  # e.g. two circles and a lone square: the lone object is always describable
        obj = unique[0] if unique else objects[0]
        options.append(templates.single_object(obj.shape))
    return options[rng.integers(len(options))]


def question_for_caption(metadata: dict, objects: list[WorldObject], rng: np.random.Generator) -> dict:
    """A question about the entities a caption names, answered on ``objects`` (a scene drawn for the caption,
    e.g. by :func:`g2rpo.shapes.prompts.scene_for`): the template completion of a generation prompt."""
    available = questions(objects)
    named = {req["class"] for req in metadata["include"]}
    preferred = {
        "single_object": ("exists", "count"),
        "two_object": ("exists", "count"),
        "counting": ("count",),
        "colors": ("colour", "exists"),
        "position": ("position",),
        "color_attr": ("colour", "shape"),
    }[metadata["tag"]]
    for qtype in preferred:
        entries = [e for e in available[qtype] if any(name in e["question"] for name in named)]
        if entries:
            return dict(entries[rng.integers(len(entries))])
    return sample_question(objects, rng)
