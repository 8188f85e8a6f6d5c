"""GenEval in the shapes world: an object detector and GenEval's scoring rules, strict and partial.

The detector plays Mask2Former's role. Because the world's images are ``background + coverage * (colour -
background)``, it can invert them: foreground pixels are grouped into connected components, each component's
colour is read from its most saturated pixels, its coverage map is recovered, and the shape whose rendered
template (same centroid and area) best matches that map is chosen. The match quality is the detection's
confidence, thresholded like GenEval's detector scores.

Scoring is GenEval's, shared with the real-model GenEval reward: ``g2rpo.rewards.geneval_rules`` (strict
0/1 per image, and Flow-GRPO's partial credit). :func:`holds` applies the same rule to a scene's ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from torch import Tensor

from g2rpo.rewards.geneval_rules import Detection, GenEvalReward, evaluate
from g2rpo.shapes.world import BACKGROUND, COLOURS, SHAPES, WorldObject, coverage


class ShapesDetector:
    """Finds the objects in a shapes-world image.

    ``foreground``: RGB distance from the background above which a pixel belongs to an object;
    ``min_area``: components with less coverage (in pixels of a ``reference_size`` image) are noise;
    ``threshold``: minimum confidence.

    An image of another size (a progressive schedule's 16-px stage) is read at its own size, with
    ``min_area`` scaled by the ratio of areas: resizing it to 32 px first blurs the one-pixel gaps between
    objects shut. A perfect 16-px image (a world scene rendered at 32 px and downsampled) still scores below
    its 32-px original, since objects 4 px wide lose their shapes (experiments/notes/progressive.md).
    """

    def __init__(
        self, foreground: float = 0.2, min_area: float = 8.0, threshold: float = 0.3, reference_size: int = 32
    ) -> None:
        self.foreground = foreground
        self.min_area = min_area
        self.reference_size = reference_size
        self.threshold = threshold
        self.background = np.asarray(BACKGROUND, dtype=np.float64) / 255
        self.palette = np.asarray(list(COLOURS.values()), dtype=np.float64) / 255
        self.colour_names = list(COLOURS)

    def __call__(self, image: Tensor) -> list[Detection]:
        """Detections in one ``[3, H, W]`` image in [0, 1], by decreasing confidence."""
        pixels = image.detach().float().cpu().permute(1, 2, 0).numpy().astype(np.float64)
        height, width, _ = pixels.shape
        min_area = self.min_area * height * width / self.reference_size**2
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
            if area < min_area:
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


class GenEvalShapes(GenEvalReward):
    """The ``geneval_shapes`` reward: GenEval's rules over :class:`ShapesDetector`'s detections."""

    def __init__(self, strict: bool = False, detector: ShapesDetector | None = None) -> None:
        self.strict = strict
        self.detector = detector or ShapesDetector()

    def detect(self, image: Tensor, metadata: dict) -> list[Detection]:
        return self.detector(image)


def holds(objects: Sequence[WorldObject], metadata: dict) -> bool:
    """Whether a caption is true of a scene: GenEval's rule applied to the scene's ground truth."""
    detections = [Detection(o.shape, o.colour, o.box, 1.0, obj_area(o)) for o in objects]
    return evaluate(detections, metadata).correct
