"""GenEval's six tasks in the shapes world: prompts in GenEval's wording, its metadata, and the splits.

Metadata is GenEval's (``tag``, ``include``/``exclude`` lists of ``{class, count[, color][, position]}``),
so the scoring rules in :mod:`g2rpo.rewards.geneval_rules` read exactly like GenEval's ``evaluate_images.py``.

The held-out split holds compositions that RL training never sees: a colour-shape pair per shape (in the
``colors`` and ``color_attr`` tasks), one count per shape, some ordered shape pairs and position relations.
Single-object prompts cannot be held out (there are three) and appear in both, as GenEval's classes would.
The base model is pretrained on every composition, as SD3 was pretrained on the web.
"""

from __future__ import annotations

import itertools

import numpy as np

from g2rpo.data import PromptDataset
from g2rpo.shapes.world import COLOURS, SHAPES, WorldObject, place

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")

HELD_OUT_COLOURS = {("green", "circle"), ("purple", "square"), ("orange", "triangle")}
HELD_OUT_COUNTS = {("circle", 3), ("square", 4), ("triangle", 2)}
HELD_OUT_PAIRS = {("triangle", "circle"), ("square", "triangle")}
HELD_OUT_POSITIONS = {
    ("circle", "left of", "square"),
    ("square", "above", "triangle"),
    ("triangle", "right of", "circle"),
    ("circle", "below", "triangle"),
    ("square", "right of", "circle"),
    ("triangle", "above", "square"),
}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def single_object(shape: str) -> dict:
    return {
        "tag": "single_object",
        "include": [{"class": shape, "count": 1}],
        "prompt": f"a photo of {_a(shape)}",
    }


def two_object(first: str, second: str) -> dict:
    return {
        "tag": "two_object",
        "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
        "prompt": f"a photo of {_a(first)} and {_a(second)}",
    }


def counting(shape: str, count: int) -> dict:
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": count}],
        "exclude": [{"class": shape, "count": count + 1}],
        "prompt": f"a photo of {NUMBERS[count]} {shape}s",
    }


def colors(shape: str, colour: str) -> dict:
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": colour}],
        "prompt": f"a photo of {_a(colour)} {shape}",
    }


def position(first: str, relation: str, second: str) -> dict:
    """``first`` is ``relation`` ``second``: GenEval lists the anchor (``second``) first."""
    return {
        "tag": "position",
        "include": [{"class": second, "count": 1}, {"class": first, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {_a(first)} {relation} {_a(second)}",
    }


def color_attr(first: str, first_colour: str, second: str, second_colour: str) -> dict:
    return {
        "tag": "color_attr",
        "include": [
            {"class": first, "count": 1, "color": first_colour},
            {"class": second, "count": 1, "color": second_colour},
        ],
        "prompt": f"a photo of {_a(first_colour)} {first} and {_a(second_colour)} {second}",
    }


def all_prompts() -> dict[str, list[tuple[dict, bool]]]:
    """Every prompt of the world per task, each with whether its composition is held out from RL training."""
    pairs = list(itertools.permutations(SHAPES, 2))
    tasks: dict[str, list[tuple[dict, bool]]] = {
        "single_object": [(single_object(s), False) for s in SHAPES],
        "two_object": [(two_object(a, b), (a, b) in HELD_OUT_PAIRS) for a, b in pairs],
        "counting": [(counting(s, n), (s, n) in HELD_OUT_COUNTS) for s in SHAPES for n in NUMBERS],
        "colors": [(colors(s, c), (c, s) in HELD_OUT_COLOURS) for s in SHAPES for c in COLOURS],
        "position": [
            (position(a, r, b), (a, r, b) in HELD_OUT_POSITIONS) for a, b in pairs for r in RELATIONS
        ],
        "color_attr": [
            (color_attr(a, ca, b, cb), bool({(ca, a), (cb, b)} & HELD_OUT_COLOURS))
            for a, b in pairs
            for ca, cb in itertools.permutations(COLOURS, 2)
        ],
    }
    return tasks


def split(name: str) -> dict[str, list[dict]]:
    """Prompt metadata per task: ``train`` (no held-out composition), ``heldout``, or ``all``."""
    if name not in ("train", "heldout", "all"):
        raise ValueError(f"unknown shapes split {name!r}; choose train, heldout or all")
    out = {}
    for task, entries in all_prompts().items():
        if name == "all":
            out[task] = [m for m, _ in entries]
        elif name == "heldout":  # single objects have no composition to hold out: evaluated as seen
            out[task] = [m for m, held in entries if held or task == "single_object"]
        else:
            out[task] = [m for m, held in entries if not held]
    return out


def shapes_dataset(split_name: str = "train", per_task: int | None = None, seed: int = 0) -> PromptDataset:
    """A prompt dataset balanced over the six tasks.

    ``per_task`` prompts are drawn per task (with replacement where a task has fewer), so that uniform
    sampling visits each task equally often, as GenEval weighs its tasks equally; ``None`` keeps every
    distinct prompt once.
    """
    rng = np.random.default_rng(seed)
    records = []
    for prompts in split(split_name).values():
        if per_task is None:
            chosen = prompts
        else:
            order = np.concatenate(
                [rng.permutation(len(prompts)) for _ in range(-(-per_task // len(prompts)))]
            )
            chosen = [prompts[i] for i in order[:per_task]]
        records.extend(chosen)
    return PromptDataset(
        prompts=[r["prompt"] for r in records],
        metadata=[{k: v for k, v in r.items() if k != "prompt"} for r in records],
    )


def scene_for(metadata: dict, rng: np.random.Generator, image_size: int = 32) -> list[WorldObject]:
    """A random scene that satisfies a prompt's metadata exactly (unspecified colours are random)."""
    from g2rpo.rewards.geneval_rules import relative_position  # the scoring rule decides what "left of" means

    colour_names = list(COLOURS)
    specs = []
    for req in metadata["include"]:
        for _ in range(req["count"]):
            colour = req.get("color") or colour_names[rng.integers(len(colour_names))]
            specs.append((req["class"], colour))
    accept = None
    if metadata["tag"] == "position":
        relation = metadata["include"][1]["position"][0]

        def accept(objects):  # objects[0] is the anchor, objects[1] the one placed relative to it
            return relative_position(objects[1].box, objects[0].box) == {relation}

    return place(rng, specs, image_size=image_size, accept=accept)
