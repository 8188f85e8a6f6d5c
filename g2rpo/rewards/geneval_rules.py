"""GenEval's scoring rules (Ghosh et al. 2023, ``djghosh13/geneval`` ``evaluation/evaluate_images.py``) over
detections, whatever detector produced them: the shapes world's (``g2rpo.shapes.geneval``) or Mask2Former
(``g2rpo.rewards.geneval``).

``evaluate`` gives GenEval's strict 0/1 verdict per image and the partial credit that Flow-GRPO's reward
server trains on (``yifan123/reward-server``: the mean of per-requirement terms, count
``1 - |n_req - n_found| / n_req``, colour the same on the correctly coloured count, position 0/1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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
    name: str  # the detected class: a shape in the shapes world, a COCO class in GenEval
    colour: str
    box: tuple[float, float, float, float]
    score: float
    area: float


@dataclass(frozen=True)
class Judgement:
    correct: bool
    score: float
    reason: str


def evaluate(detections: Sequence[Detection], metadata: dict) -> Judgement:
    """GenEval's rule for one image (``correct``) and the partial credit (``score``)."""
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:  # already by decreasing confidence, as GenEval's lists are
        by_class.setdefault(detection.name, []).append(detection)
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


class GenEvalReward:
    """GenEval's rules over a detector's output as a reward: partial credit (``strict=False``, Flow-GRPO's
    training reward) or the 0/1 accuracy. Prompts without GenEval metadata (``include``) score NaN: not
    scored, rather than scored 0. Subclasses say how an image becomes detections."""

    strict: bool = False

    def detect(self, image: Tensor, metadata: dict) -> list[Detection]:
        """The detections of one ``[3, H, W]`` image in [0, 1], most confident first within each class."""
        raise NotImplementedError

    def judge(self, images: Tensor, metadata: Sequence[dict]) -> list[Judgement | None]:
        if len(metadata) != images.shape[0]:
            raise ValueError(f"{type(self).__name__}: {images.shape[0]} images but {len(metadata)} metadata")
        return [
            evaluate(self.detect(image, meta), meta) if "include" in meta else None
            for image, meta in zip(images, metadata)
        ]

    def scores(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, Tensor]:
        """Both of GenEval's numbers, for evaluation tables: ``accuracy`` (strict) and ``partial``."""
        judgements = self.judge(images, metadata)
        nan = float("nan")
        return {
            "accuracy": torch.tensor([nan if j is None else float(j.correct) for j in judgements]),
            "partial": torch.tensor([nan if j is None else j.score for j in judgements]),
        }

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        return self.scores(images, prompts, metadata)["accuracy" if self.strict else "partial"]
