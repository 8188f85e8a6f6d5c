"""Image editing in the shapes world: instructions over a source scene, whose target scene is known.

Six edit types in the spirit of GEdit-Bench's and ImgEdit's categories, in the world's wording:

    recolor   "make the red circle blue"              (GEdit: colour alteration)
    reshape   "turn the red circle into a square"     (GEdit: subject replacement)
    add       "add a blue triangle"                   (subject addition)
    remove    "remove the red circle"                 (subject removal)
    swap      "swap the red circle and the blue square"  (position change)
    count     "make the number of squares three"      (count change; which ones go, or where new ones
                                                        appear, is left to the model)

An object is named by its colour and shape, unique in its scene. Every edit is a record of JSON values
(``edit``, ``source`` and ``target`` scenes as object lists, the named objects), so it travels as prompt
metadata through rollouts, rewards and the remote wire format, and the source image is re-rendered from it.

The held-out split holds the compositions the GenEval-shapes split holds out (``g2rpo.shapes.prompts``): an
edit is held out when it produces or removes a held-out colour-shape pair, swaps a held-out ordered shape
pair, or changes a count to a held-out one.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from g2rpo.data import PromptDataset
from g2rpo.shapes.prompts import HELD_OUT_COLOURS, HELD_OUT_COUNTS, HELD_OUT_PAIRS, NUMBERS, _a
from g2rpo.shapes.world import COLOURS, SHAPES, WorldObject, boxes_apart, place

EDIT_TYPES = ("recolor", "reshape", "add", "remove", "swap", "count")
MAX_OBJECTS = 4


def as_records(objects: list[WorldObject]) -> list[dict]:
    return [asdict(o) for o in objects]


def as_objects(records: list[dict]) -> list[WorldObject]:
    return [WorldObject(**r) for r in records]


def _name(obj: WorldObject) -> str:
    return f"the {obj.colour} {obj.shape}"


def _fits(objects: list[WorldObject], image_size: int, gap: float = 2.0) -> bool:
    inside = all(0.5 <= x <= image_size - 0.5 for o in objects for x in o.box)
    apart = all(boxes_apart(a, b, gap) for i, a in enumerate(objects) for b in objects[i + 1 :])
    return inside and apart


def _distinct_scene(rng: np.random.Generator, count: int, image_size: int) -> list[WorldObject]:
    """``count`` objects with distinct (colour, shape) pairs, so each can be named."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return place(rng, [pairs[i] for i in chosen], image_size=image_size)


def _add_object(
    rng: np.random.Generator, objects: list[WorldObject], shape: str, colour: str, image_size: int
) -> list[WorldObject] | None:
    """``objects`` plus one ``shape`` of ``colour`` in free space (None if it does not fit)."""
    low, high = 0.24 * image_size, 0.34 * image_size
    for _ in range(200):
        size = rng.uniform(low, high)
        cx, cy = rng.uniform(1.0 + size / 2, image_size - 1.0 - size / 2, size=2)
        new = WorldObject(shape, colour, float(cx), float(cy), float(size))
        if _fits([*objects, new], image_size):
            return [*objects, new]
    return None


def make_edit(kind: str, rng: np.random.Generator, image_size: int = 32) -> dict:
    """A random edit of type ``kind``: ``{"edit", "instruction", "source", "target", "named"}`` plus the
    type's parameters. ``named`` lists the source objects the instruction concerns (the rest must be kept)."""
    if kind not in EDIT_TYPES:
        raise ValueError(f"unknown edit type {kind!r}; choose one of {', '.join(EDIT_TYPES)}")
    for _ in range(1000):
        edit = _try_edit(kind, rng, image_size)
        if edit is not None:
            return {**edit, "image_size": image_size}
    raise RuntimeError(f"could not make a {kind} edit in a {image_size}px image")


def _try_edit(kind: str, rng: np.random.Generator, image_size: int) -> dict | None:
    colours = list(COLOURS)
    if kind == "add":
        source = _distinct_scene(rng, int(rng.integers(1, MAX_OBJECTS)), image_size)
        taken = {(o.colour, o.shape) for o in source}
        free = [(c, s) for s in SHAPES for c in colours if (c, s) not in taken]
        colour, shape = free[rng.integers(len(free))]
        target = _add_object(rng, source, shape, colour, image_size)
        if target is None:
            return None
        return _record(kind, f"add {_a(colour)} {shape}", source, target, [], shape=shape, colour=colour)
    if kind == "count":
        shape = SHAPES[rng.integers(len(SHAPES))]
        have = int(rng.integers(1, MAX_OBJECTS + 1))
        want = int(rng.choice([n for n in range(1, MAX_OBJECTS + 1) if n != have]))
        others = int(rng.integers(0, MAX_OBJECTS - max(have, want) + 1))
        specs = [(shape, colours[rng.integers(len(colours))]) for _ in range(have)]
        other_shapes = [s for s in SHAPES if s != shape]
        specs += [(other_shapes[rng.integers(2)], colours[rng.integers(len(colours))]) for _ in range(others)]
        source = place(rng, specs, image_size=image_size)
        mine = [i for i, o in enumerate(source) if o.shape == shape]
        target = [o for i, o in enumerate(source) if i not in mine[want:]]
        for _ in range(want - have):
            target = _add_object(rng, target, shape, colours[rng.integers(len(colours))], image_size)
            if target is None:
                return None
        instruction = (
            f"make the number of {shape}s {NUMBERS[want]}" if want > 1 else f"leave only one {shape}"
        )
        return _record(kind, instruction, source, target, mine, shape=shape, count=want)
    source = _distinct_scene(rng, int(rng.integers(2 if kind == "swap" else 1, MAX_OBJECTS + 1)), image_size)
    index = int(rng.integers(len(source)))
    obj = source[index]
    taken = {(o.colour, o.shape) for o in source}
    if kind == "recolor":
        choices = [c for c in colours if (c, obj.shape) not in taken]
        colour = choices[rng.integers(len(choices))]
        target = [
            o if i != index else WorldObject(o.shape, colour, o.cx, o.cy, o.size)
            for i, o in enumerate(source)
        ]
        return _record(kind, f"make {_name(obj)} {colour}", source, target, [index], colour=colour)
    if kind == "reshape":
        choices = [s for s in SHAPES if (obj.colour, s) not in taken]
        if not choices:
            return None
        shape = choices[rng.integers(len(choices))]
        target = [
            o if i != index else WorldObject(shape, o.colour, o.cx, o.cy, o.size)
            for i, o in enumerate(source)
        ]
        return _record(kind, f"turn {_name(obj)} into {_a(shape)}", source, target, [index], shape=shape)
    if kind == "remove":
        target = [o for i, o in enumerate(source) if i != index]
        return _record(kind, f"remove {_name(obj)}", source, target, [index])
    other = int(rng.choice([i for i in range(len(source)) if i != index]))
    a, b = source[index], source[other]
    target = list(source)
    target[index] = WorldObject(a.shape, a.colour, b.cx, b.cy, a.size)
    target[other] = WorldObject(b.shape, b.colour, a.cx, a.cy, b.size)
    if not _fits(target, image_size) or np.hypot(a.cx - b.cx, a.cy - b.cy) < 0.25 * image_size:
        return None
    return _record(kind, f"swap {_name(a)} and {_name(b)}", source, target, [index, other])


def _record(kind, instruction, source, target, named, **parameters) -> dict:
    return {
        "edit": kind,
        "instruction": instruction,
        "source": as_records(source),
        "target": as_records(target),
        "named": list(named),
        **parameters,
    }


def held_out(edit: dict) -> bool:
    """Whether an edit's composition is held out from RL training (see the module docstring)."""
    source = as_objects(edit["source"])
    kind = edit["edit"]
    if kind == "recolor":
        return (edit["colour"], source[edit["named"][0]].shape) in HELD_OUT_COLOURS
    if kind == "reshape":
        return (source[edit["named"][0]].colour, edit["shape"]) in HELD_OUT_COLOURS
    if kind == "add":
        return (edit["colour"], edit["shape"]) in HELD_OUT_COLOURS
    if kind == "remove":
        named = source[edit["named"][0]]
        return (named.colour, named.shape) in HELD_OUT_COLOURS
    if kind == "swap":
        first, second = (source[i].shape for i in edit["named"])
        return (first, second) in HELD_OUT_PAIRS
    return (edit["shape"], edit["count"]) in HELD_OUT_COUNTS


def edits(split: str, per_type: int, seed: int = 0, image_size: int = 32) -> list[dict]:
    """``per_type`` random edits of each type in ``split`` (``train``: none held out; ``heldout``: only held
    out), deterministic from ``seed``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown editing split {split!r}; choose train or heldout")
    rng = np.random.default_rng(seed)
    out = []
    for kind in EDIT_TYPES:
        found = 0
        while found < per_type:
            edit = make_edit(kind, rng, image_size)
            if held_out(edit) == (split == "heldout"):
                out.append(edit)
                found += 1
    return out


def edit_dataset(
    split: str = "train", per_type: int = 64, seed: int = 0, image_size: int = 32
) -> PromptDataset:
    """The edits as a prompt dataset: the instruction is the prompt, the rest its metadata (``tag`` is the
    edit type, for per-type evaluation tables)."""
    records = edits(split, per_type, seed, image_size)
    return PromptDataset(
        prompts=[r["instruction"] for r in records],
        metadata=[{"tag": r["edit"], **{k: v for k, v in r.items() if k != "instruction"}} for r in records],
    )
