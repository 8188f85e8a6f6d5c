"""GenEval (Ghosh et al. 2023, arXiv 2310.11513) as a reward: Mask2Former detections, CLIP colours, GenEval's rules.

Restated from ``djghosh13/geneval`` ``evaluation/evaluate_images.py`` (Flow-GRPO's GenEval reward server,
``yifan123/reward-server``, runs the same evaluator and trains on its partial credit):

1. **Detect**: Mask2Former Swin-S (mmdet 2.x, ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``), per class
   boxes ``[x0, y0, x1, y1, confidence]`` and masks. Keep, per class, the detections above 0.3 (0.9 for
   ``counting`` prompts), most confident first, at most 16; GenEval's NMS is off (``max_overlap`` 1).
2. **Colour** of the detections a colour requirement looks at: the image composited over a ``#999`` blank
   outside the object's mask, cropped to its box, zero-shot classified by CLIP ViT-L/14 (OpenAI weights)
   into red, orange, yellow, green, blue, purple, pink, brown, black, white with the templates "a photo of a
   {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object" (clip_benchmark's
   classifier: per colour the renormalised mean of the normalised template embeddings).
3. **Judge** with GenEval's rules (:func:`g2rpo.rewards.geneval_rules.evaluate`, shared with the shapes
   world): strict 0/1 and Flow-GRPO's partial credit.

Differences, deliberate: CLIP runs through transformers (``openai/clip-vit-large-patch14``, the same weights
as open_clip's ``ViT-L-14`` / ``openai``, with the same bicubic-224 / centre-crop / OpenAI-mean preprocessing)
and colours are classified for every kept detection of a class (the rules read only the top ``count``, so
verdicts are unchanged). mmdet 2.x needs its own environment (mmcv-full, an old torch): serve this reward
from there with :mod:`g2rpo.rewards.serve` and score through ``reward=geneval`` (README, "Rewards").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from g2rpo.rewards.geneval_rules import Detection, GenEvalReward

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
TEMPLATES = ["a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object"]

#: per class: ``[N, 5]`` boxes with confidences, and ``N`` boolean ``H x W`` masks (or None)
DetectorOutput = tuple[list[np.ndarray], list[list[np.ndarray]] | None]


class MMDetDetector:
    """GenEval's Mask2Former through mmdet 2.x's ``init_detector`` / ``inference_detector``."""

    def __init__(self, config: str, checkpoint: str, device: str = "cuda") -> None:
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as error:
            raise ImportError(
                "GenEval's detector needs mmdet 2.x with mmcv-full (GenEval's environment). Serve the reward "
                "from that environment and score through reward=geneval:\n"
                "  python -m g2rpo.rewards.serve g2rpo.rewards.geneval.GenEval --port 18085 --kwargs '{...}'"
            ) from error
        for path in (config, checkpoint):
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"GenEval: no file {path!r}; GenEval's evaluation/download_models.sh fetches the "
                    "Mask2Former checkpoint, and its config ships in mmdet's configs/mask2former/"
                )
        self.model = init_detector(config, checkpoint, device=device)
        self._infer = inference_detector

    @property
    def classes(self) -> list[str]:
        return list(self.model.CLASSES)

    def __call__(self, image: np.ndarray) -> DetectorOutput:
        # GenEval passes a file path, which mmcv loads as BGR; an array is taken as already BGR
        result = self._infer(self.model, np.ascontiguousarray(image[..., ::-1]))
        boxes = result[0] if isinstance(result, tuple) else result
        masks = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        return boxes, masks


class ColourClassifier:
    """CLIP zero-shot colour of object crops (GenEval's ``color_classification``)."""

    def __init__(self, model, processor, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.max_length = model.config.text_config.max_position_embeddings  # 77 for CLIP
        self._classifiers: dict[str, Tensor] = {}

    @staticmethod
    def _unit(features) -> Tensor:
        features = features if isinstance(features, Tensor) else features.pooler_output  # transformers 5
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def classifier(self, name: str) -> Tensor:
        """``[dim, colours]``: per colour, the renormalised mean of its normalised template embeddings."""
        if name not in self._classifiers:
            columns = []
            for colour in COLORS:
                texts = [t.format(c=colour, name=name) for t in TEMPLATES]
                tokens = self.processor.tokenizer(
                    texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                mean = self._unit(self.model.get_text_features(**tokens)).mean(dim=0)
                columns.append(mean / mean.norm())
            self._classifiers[name] = torch.stack(columns, dim=1)
        return self._classifiers[name]

    @torch.no_grad()
    def __call__(self, crops: Sequence[Image.Image], name: str) -> list[str]:
        pixels = self.processor.image_processor(images=list(crops), return_tensors="pt")["pixel_values"]
        features = self._unit(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return [COLORS[i] for i in (features @ self.classifier(name)).argmax(dim=1).tolist()]


def object_crop(image: Image.Image, box: np.ndarray, mask: np.ndarray | None, background: str) -> Image.Image:
    """The object alone: outside its mask the ``background`` colour, then cropped to its box (GenEval's
    ``ImageCrops``)."""
    if mask is not None:
        image = Image.composite(image, Image.new("RGB", image.size, color=background), Image.fromarray(mask))
    return image.crop(tuple(float(v) for v in box[:4]))


class GenEval(GenEvalReward):
    """The ``geneval`` reward: GenEval's evaluator on generated images (see the module docstring).

    ``detector``: a callable ``uint8 H x W x 3 RGB -> (per-class boxes, per-class masks)`` with ``classes``;
    by default Mask2Former from ``detector_config`` / ``detector_checkpoint``. ``object_names``: GenEval's
    ``object_names.txt`` (the detector's class names as the prompts' metadata spell them); by default the
    detector's own class list. ``clip_path``: a local copy of ``openai/clip-vit-large-patch14``.
    """

    def __init__(
        self,
        detector_config: str | None = None,
        detector_checkpoint: str | None = None,
        clip_path: str | None = None,
        object_names: str | None = None,
        device: str = "cuda",
        strict: bool = False,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        background: str = "#999",
        detector: Callable[[np.ndarray], DetectorOutput] | None = None,
        colours: Callable[[Sequence[Image.Image], str], list[str]] | None = None,
    ) -> None:
        if detector is None:
            if detector_config is None or detector_checkpoint is None:
                raise ValueError("GenEval: give detector_config and detector_checkpoint (Mask2Former)")
            detector = MMDetDetector(detector_config, detector_checkpoint, device)
        if colours is None:
            from g2rpo.rewards.clip import load_clip, load_processor

            repo = "openai/clip-vit-large-patch14"
            colours = ColourClassifier(load_clip(clip_path, repo), load_processor(clip_path, repo), device)
        self.detector, self.colours = detector, colours
        if object_names is not None:
            names = Path(object_names).read_text().splitlines()
            self.classes = [name.strip() for name in names if name.strip()]
        else:
            self.classes = list(detector.classes)
        self.strict = strict
        self.threshold, self.counting_threshold = threshold, counting_threshold
        self.max_objects, self.background = max_objects, background

    def detect(self, image: Tensor, metadata: dict) -> list[Detection]:
        """The kept detections, most confident first within each class, with their colours."""
        array = (
            (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        )
        boxes, masks = self.detector(array)
        if len(boxes) != len(self.classes):
            raise ValueError(
                f"GenEval: the detector gave {len(boxes)} classes, object_names {len(self.classes)}"
            )
        threshold = self.counting_threshold if metadata.get("tag") == "counting" else self.threshold
        pil = Image.fromarray(array)
        detections = []
        for index, name in enumerate(self.classes):
            order = np.argsort(boxes[index][:, 4])[::-1]
            order = order[boxes[index][order, 4] > threshold][: self.max_objects]
            if len(order) == 0:
                continue
            crops = [
                object_crop(pil, boxes[index][i], None if masks is None else masks[index][i], self.background)
                for i in order
            ]
            for i, colour in zip(order, self.colours(crops, name)):
                x0, y0, x1, y1, score = (float(v) for v in boxes[index][i][:5])
                detections.append(Detection(name, colour, (x0, y0, x1, y1), score, (x1 - x0) * (y1 - y0)))
        return detections
