"""The ``edit_shapes`` reward: the shapes detector judges an edited image against the edit's known target.

Three things are judged separately, as the edit benchmarks do (GEdit-Bench's VIEScore: semantic consistency
and perceptual quality; Skywork-EditReward: instruction compliance and preservation of the rest), so that
"edits everything" and "edits nothing" are both visible:

- **compliance**: what the instruction asks holds. Each edit type is a few checks on the detections (an
  object of a shape and colour present, or absent, near a place; a count), each an object matched by shape,
  colour and a centre within ``tolerance`` x image size: ``compliance`` is 1 when every check holds (strict),
  ``compliance_partial`` the fraction that hold (counts: ``1 - |found - wanted| / wanted``, as Flow-GRPO's
  partial credit).
- **preservation**: the objects the instruction does not name keep shape, colour and position, and nothing
  else appears: ``kept / (unnamed objects + unexplained detections)`` (1 when there is nothing to keep). A
  named object left as it was (or, for recolor and reshape, edited into something else) is a compliance
  failure only.
- **unchanged**: 1 when the image is the source scene again (every source object where it was, nothing
  else), a failure mode of editing models that preservation alone rewards.

The trained value ``overall`` is ``sqrt(compliance_partial * preservation)``, VIEScore's geometric mean, so
neither term can be traded away entirely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from g2rpo.rewards.geneval_rules import Detection
from g2rpo.shapes.editing import as_objects
from g2rpo.shapes.geneval import ShapesDetector
from g2rpo.shapes.world import WorldObject

TERMS = ("compliance", "compliance_partial", "preservation", "unchanged", "overall")


@dataclass(frozen=True)
class EditJudgement:
    compliance: float
    compliance_partial: float
    preservation: float
    unchanged: float

    @property
    def overall(self) -> float:
        return math.sqrt(self.compliance_partial * self.preservation)


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


class _Matcher:
    """Detections, each usable once, looked up by shape, colour and place."""

    def __init__(self, detections: Sequence[Detection], tolerance: float) -> None:
        self.free = list(detections)
        self.tolerance = tolerance

    def take(
        self, shape: str | None, colour: str | None = None, at: tuple[float, float] | None = None
    ) -> bool:
        """Use up the nearest free detection matching the description (None: any); whether there was one."""
        best, best_distance = None, math.inf
        for detection in self.free:
            if (shape is not None and detection.name != shape) or (
                colour is not None and detection.colour != colour
            ):
                continue
            distance = 0.0 if at is None else math.dist(_centre(detection.box), at)
            if distance <= (self.tolerance if at is not None else math.inf) and distance < best_distance:
                best, best_distance = detection, distance
        if best is not None:
            self.free.remove(best)
        return best is not None

    def has(self, shape: str, colour: str, at: tuple[float, float]) -> bool:
        return any(
            d.name == shape and d.colour == colour and math.dist(_centre(d.box), at) <= self.tolerance
            for d in self.free
        )


def judge_edit(
    detections: Sequence[Detection], edit: dict, image_size: int, tolerance: float = 0.1
) -> EditJudgement:
    """The verdict on one edited image's ``detections`` for ``edit`` (a record of ``g2rpo.shapes.editing``)."""
    source, target = as_objects(edit["source"]), as_objects(edit["target"])
    named = set(edit["named"])
    matcher = _Matcher(detections, tolerance * image_size)

    def at(obj: WorldObject) -> tuple[float, float]:
        return obj.cx, obj.cy

    kind = edit["edit"]
    checks: list[float] = []
    if kind in ("recolor", "reshape"):
        (index,) = named
        old, new = source[index], target[index]
        checks.append(float(matcher.take(new.shape, new.colour, at(new))))
        checks.append(float(not matcher.has(old.shape, old.colour, at(old))))
    elif kind == "remove":
        (index,) = named
        checks.append(float(not matcher.has(source[index].shape, source[index].colour, at(source[index]))))
    elif kind == "swap":
        checks += [
            float(matcher.take(target[i].shape, target[i].colour, at(target[i]))) for i in sorted(named)
        ]
    elif kind == "add":
        checks.append(float(matcher.take(edit["shape"], edit["colour"])))
    elif kind == "count":
        wanted = edit["count"]
        found = 0
        while matcher.take(edit["shape"]):
            found += 1
        checks.append(max(0.0, 1.0 - abs(found - wanted) / wanted))
    else:
        raise ValueError(f"unknown edit type {kind!r}")
    compliance_partial = sum(checks) / len(checks)

    for (
        index
    ) in named:  # a named object left as it was, or edited wrongly, fails compliance, not preservation
        obj = source[index]
        keeps_place = kind in ("recolor", "reshape")
        matcher.take(None if keeps_place else obj.shape, None if keeps_place else obj.colour, at(obj))
    unnamed = [o for i, o in enumerate(source) if i not in named]
    kept = sum(matcher.take(o.shape, o.colour, at(o)) for o in unnamed)
    extras = len(matcher.free)
    preservation = kept / (len(unnamed) + extras) if unnamed or extras else 1.0

    everything = _Matcher(detections, tolerance * image_size)
    unchanged = all(everything.take(o.shape, o.colour, at(o)) for o in source) and not everything.free
    return EditJudgement(float(compliance_partial == 1.0), compliance_partial, preservation, float(unchanged))


class EditShapes:
    """The ``edit_shapes`` reward: :func:`judge_edit` over :class:`ShapesDetector`'s detections. ``term`` is
    what ``__call__`` returns (``overall`` trains); ``scores()`` gives every term, for evaluation tables.
    Prompts without an edit in their metadata score NaN (not scored, rather than scored 0)."""

    def __init__(
        self, term: str = "overall", tolerance: float = 0.1, detector: ShapesDetector | None = None
    ) -> None:
        if term not in TERMS:
            raise ValueError(f"edit_shapes: term={term!r} is not one of {', '.join(TERMS)}")
        self.term = term
        self.tolerance = tolerance
        self.detector = detector or ShapesDetector()

    def judge(self, images: Tensor, metadata: Sequence[dict]) -> list[EditJudgement | None]:
        if len(metadata) != images.shape[0]:
            raise ValueError(f"edit_shapes: {images.shape[0]} images but {len(metadata)} metadata")
        return [
            judge_edit(self.detector(image), meta, image.shape[-1], self.tolerance)
            if "edit" in meta
            else None
            for image, meta in zip(images, metadata)
        ]

    def scores(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, Tensor]:
        judgements = self.judge(images, metadata)
        return {
            term: torch.tensor([math.nan if j is None else float(getattr(j, term)) for j in judgements])
            for term in TERMS
        }

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> Tensor:
        return self.scores(images, prompts, metadata)[self.term]
