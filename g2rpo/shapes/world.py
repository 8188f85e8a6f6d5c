"""The shapes world: flat-coloured shapes on a plain background, rendered with their ground truth.

A closed stand-in for GenEval's photos: the vocabulary (shapes, colours) plays the role of COCO's classes
and colour names, and every image comes with the exact object list that a detector must recover. Images are
anti-aliased by supersampling, so an edge pixel is ``background + coverage * (colour - background)``: the
detector inverts exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (250, 140, 10),
    "yellow": (235, 215, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "purple": (140, 50, 185),
}
BACKGROUND = (245, 245, 245)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class WorldObject:
    """One object: ``box`` is ``(x1, y1, x2, y2)`` in pixels (GenEval's xyxy), ``size`` its side/diameter."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


def coverage(shape: str, cx: float, cy: float, size: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, ``[height, width]`` in [0, 1] (supersampled).

    Every shape fills the ``size`` x ``size`` box centred on ``(cx, cy)``: the circle is inscribed, the
    triangle points up with its base on the box's bottom edge.
    """
    step = 1.0 / SUPERSAMPLE
    offsets = (np.arange(SUPERSAMPLE) + 0.5) * step
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)[:, None] - cy
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)[None, :] - cx
    half = size / 2
    if shape == "circle":
        inside = xs**2 + ys**2 <= half**2
    elif shape == "square":
        inside = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif shape == "triangle":
        depth = (ys + half) / size  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(xs) <= half * depth)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def render(objects: list[WorldObject], size: int = 32) -> Tensor:
    """``[3, size, size]`` float image in [0, 1]."""
    background = np.asarray(BACKGROUND, dtype=np.float64) / 255
    image = np.broadcast_to(background[:, None, None], (3, size, size)).copy()
    for obj in objects:
        alpha = coverage(obj.shape, obj.cx, obj.cy, obj.size, size, size)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float64) / 255
        image = image * (1 - alpha) + colour[:, None, None] * alpha
    return torch.from_numpy(image).float()


def boxes_apart(a: WorldObject, b: WorldObject, gap: float) -> bool:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return ax2 + gap <= bx1 or bx2 + gap <= ax1 or ay2 + gap <= by1 or by2 + gap <= ay1


def place(
    rng: np.random.Generator,
    specs: list[tuple[str, str]],
    image_size: int = 32,
    size_range: tuple[float, float] = (0.24, 0.34),
    gap: float = 2.0,
    accept=None,
    max_tries: int = 1000,
) -> list[WorldObject]:
    """Random non-overlapping placement of ``(shape, colour)`` specs, boxes at least ``gap`` pixels apart.

    ``accept(objects)`` can reject a layout (e.g. one that breaks a position relation); the sizes shrink
    towards the lower bound when a crowded scene keeps failing.
    """
    low, high = (f * image_size for f in size_range)
    margin = 1.0
    for attempt in range(max_tries):
        shrink = min(attempt / (max_tries / 2), 1.0)
        objects: list[WorldObject] = []
        for shape, colour in specs:
            size = rng.uniform(low, high - (high - low) * shrink)
            for _ in range(50):
                cx, cy = rng.uniform(margin + size / 2, image_size - margin - size / 2, size=2)
                candidate = WorldObject(shape, colour, float(cx), float(cy), float(size))
                if all(boxes_apart(candidate, other, gap) for other in objects):
                    objects.append(candidate)
                    break
            else:
                break
        if len(objects) == len(specs) and (accept is None or accept(objects)):
            return objects
    raise RuntimeError(f"could not place {specs} in a {image_size}px image")
