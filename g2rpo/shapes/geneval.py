"""GenEval in the shapes world: an object detector and GenEval's scoring rules, strict and partial.

The detector plays Mask2Former's role. Because the world's images are ``background + coverage * (colour -
background)``, it can invert them: foreground pixels are grouped into connected components, each component's
colour is read from its most saturated pixels, its coverage map is recovered, and the shape whose rendered
template (same centroid and area) best matches that map is chosen. The match quality is the detection's
confidence, thresholded like GenEval's detector scores.

Scoring follows GenEval's ``evaluate_images.py`` (strict, 0/1 per image) and the partial credit that
Flow-GRPO's reward server trains on (the mean of per-requirement terms: count ``1 - |n_req - n_found| /
n_req``, colour the same on the correctly coloured count, position 0/1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from g2rpo.shapes.world import BACKGROUND, COLOURS, SHAPES, WorldObject, coverage

POSITION_THRESHOLD = 0.1  # GenEval's: offsets within 10% of the summed box sizes do not count


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """The relations of box A to box B (xyxy, y down), by GenEval's rule."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    box: tuple[float, float, float, float]
    score: float
    area: float


class ShapesDetector:
    """Finds the objects in a shapes-world image.

    ``foreground``: RGB distance from the background above which a pixel belongs to an object;
    ``min_area``: components with less coverage (in pixels) are noise; ``threshold``: minimum confidence.
    """

    def __init__(self, foreground: float = 0.2, min_area: float = 8.0, threshold: float = 0.3) -> None:
        self.foreground = foreground
        self.min_area = min_area
        self.threshold = threshold
        self.background = np.asarray(BACKGROUND, dtype=np.float64) / 255
        self.palette = np.asarray(list(COLOURS.values()), dtype=np.float64) / 255
        self.colour_names = list(COLOURS)

    def __call__(self, image: Tensor) -> list[Detection]:
        """Detections in one ``[3, H, W]`` image in [0, 1], by decreasing confidence."""
        pixels = image.detach().float().cpu().permute(1, 2, 0).numpy().astype(np.float64)
        height, width, _ = pixels.shape
        diff = pixels - self.background
        distance = np.linalg.norm(diff, axis=-1)
        labels, count = ndimage.label(distance > self.foreground, structure=np.ones((3, 3)))
        detections = []
        for index, window in enumerate(ndimage.find_objects(labels), start=1):
            y0, y1 = max(window[0].start - 2, 0), min(window[0].stop + 2, height)
            x0, x1 = max(window[1].start - 2, 0), min(window[1].stop + 2, width)
            own = labels[y0:y1, x0:x1]
            component = own == index
            local_diff, local_distance = diff[y0:y1, x0:x1], distance[y0:y1, x0:x1]
            core = component & (local_distance >= 0.8 * local_distance[component].max())
            mean_colour = pixels[y0:y1, x0:x1][core].mean(axis=0)
            colour_index = int(np.argmin(np.linalg.norm(self.palette - mean_colour, axis=-1)))
            direction = self.palette[colour_index] - self.background
            alpha = np.clip(local_diff @ direction / (direction @ direction), 0.0, 1.0)
            alpha[(own != 0) & ~component] = 0.0  # another object's pixels
            area = float(alpha.sum())
            if area < self.min_area:
                continue
            ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
            cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
            best = None
            for shape in SHAPES:
                obj = _fit(shape, cx, cy, area)
                template = coverage(shape, obj.cx - x0, obj.cy - y0, obj.size, y1 - y0, x1 - x0)
                error = float(np.abs(alpha - template).sum() + max(obj_area(obj) - template.sum(), 0.0))
                if best is None or error < best[0]:
                    best = (error, obj)
            error, obj = best
            score = max(0.0, 1.0 - error / area)
            if score >= self.threshold:
                detections.append(Detection(obj.shape, self.colour_names[colour_index], obj.box, score, area))
        return sorted(detections, key=lambda d: -d.score)


def obj_area(obj: WorldObject) -> float:
    return {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[obj.shape] * obj.size**2


def _fit(shape: str, cx: float, cy: float, area: float) -> WorldObject:
    """The object of ``shape`` with this coverage centroid and area (the triangle's centroid is low)."""
    if shape == "circle":
        return WorldObject(shape, "", cx, cy, 2 * np.sqrt(area / np.pi))
    if shape == "square":
        return WorldObject(shape, "", cx, cy, np.sqrt(area))
    size = np.sqrt(2 * area)
    return WorldObject(shape, "", cx, cy - size / 6, size)


@dataclass(frozen=True)
class Judgement:
    correct: bool
    score: float
    reason: str


def evaluate(detections: Sequence[Detection], metadata: dict) -> Judgement:
    """GenEval's rule for one image (``correct``) and the partial credit (``score``)."""
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:  # already by decreasing confidence, as GenEval's lists are
        by_class.setdefault(detection.shape, []).append(detection)
    correct, reasons, terms = True, [], []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        every = by_class.get(name, [])
        found = every[:count]
        matched = True
        terms.append(max(0.0, 1 - abs(count - len(every)) / count))
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
            if "color" in req:
                terms.append(0.0)
            if "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                colours = [d.colour for d in found]
                terms.append(max(0.0, 1 - abs(count - colours.count(req["color"])) / count))
                if colours.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colours}")
            if "position" in req:
                relation, target = req["position"]
                holds = (
                    matched
                    and matched_groups[target] is not None
                    and all(
                        relation in relative_position(d.box, t.box)
                        for d in found
                        for t in matched_groups[target]
                    )
                )
                terms.append(float(holds))
                if not holds:
                    correct = matched = False
                    reasons.append(f"expected {name} {relation} target {target}")
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(by_class.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(by_class[name])}")
    return Judgement(correct, float(np.mean(terms)) if terms else float(correct), "; ".join(reasons))


class GenEvalShapes:
    """The ``geneval_shapes`` reward: partial credit (``strict=False``, Flow-GRPO's training reward) or
    GenEval's 0/1 accuracy. Prompts without GenEval metadata score NaN (not scored, not zero)."""

    def __init__(self, strict: bool = False, detector: ShapesDetector | None = None) -> None:
        self.strict = strict
        self.detector = detector or ShapesDetector()

    def judge(self, images: Tensor, metadata: Sequence[dict]) -> list[Judgement | None]:
        return [
            evaluate(self.detector(image), meta) if "include" in meta else None
            for image, meta in zip(images, metadata, strict=True)
        ]

    def scores(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, Tensor]:
        """Both of GenEval's numbers, for evaluation tables: ``accuracy`` (strict) and ``partial``."""
        judgements = self.judge(images, metadata)
        nan = float("nan")
        return {
            "accuracy": torch.tensor([nan if j is None else float(j.correct) for j in judgements]),
            "partial": torch.tensor([nan if j is None else j.score for j in judgements]),
        }

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        judgements = self.judge(images, metadata)
        return torch.tensor(
            [
                float("nan") if j is None else (float(j.correct) if self.strict else j.score)
                for j in judgements
            ]
        )
