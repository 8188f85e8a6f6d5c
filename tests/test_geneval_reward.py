"""The GenEval reward's glue around its detector: thresholds, ordering, crops, CLIP colours, the mmdet call.

Mask2Former itself needs mmdet 2.x (GenEval's own environment), so a fake detector stands in; the rules are
the shared ones tested in test_shapes_world.py.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from g2rpo.rewards.geneval import COLORS, ColourClassifier, GenEval, MMDetDetector, object_crop

GREY = (153, 153, 153)  # GenEval's #999 blank


class FakeDetector:
    """Per-class boxes ``[x0, y0, x1, y1, confidence]`` and masks, fixed in advance."""

    classes = ["person", "dog", "cat"]

    def __init__(self, boxes: dict[str, list[list[float]]], size: int = 32) -> None:
        self.boxes = boxes
        self.size = size
        self.seen: list[np.ndarray] = []

    def __call__(self, image: np.ndarray):
        self.seen.append(image)
        boxes, masks = [], []
        for name in self.classes:
            rows = np.array(self.boxes.get(name, []), dtype=np.float32).reshape(-1, 5)
            boxes.append(rows)
            class_masks = []
            for x0, y0, x1, y1, _ in rows:
                mask = np.zeros((self.size, self.size), dtype=bool)
                mask[int(y0) : int(y1), int(x0) : int(x1)] = True
                class_masks.append(mask)
            masks.append(class_masks)
        return boxes, masks


def dominant_colour(crops, name):
    """Red or blue by the crop's non-grey pixels: a stand-in for CLIP that sees what the crop holds."""
    out = []
    for crop in crops:
        pixels = np.asarray(crop).reshape(-1, 3).astype(int)
        pixels = pixels[(pixels != GREY).any(axis=1)]
        out.append("red" if pixels[:, 0].sum() > pixels[:, 2].sum() else "blue")
    return out


def picture() -> torch.Tensor:
    """A red block at the left and a blue block at the right of a grey-free black canvas."""
    image = torch.zeros(3, 32, 32)
    image[0, 8:16, 2:10] = 1.0
    image[2, 8:16, 20:28] = 1.0
    return image


RED_DOG, BLUE_DOG = [2, 8, 10, 16], [20, 8, 28, 16]


def reward(boxes, **kwargs) -> GenEval:
    return GenEval(detector=FakeDetector(boxes), colours=dominant_colour, **kwargs)


def test_counting_prompts_use_the_higher_threshold():
    dogs = {"dog": [[*RED_DOG, 0.5], [*BLUE_DOG, 0.95], [0, 0, 4, 4, 0.2]]}
    two = {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
    }
    scorer = reward(dogs)
    found = scorer.detect(picture(), two)
    assert [d.score for d in found] == pytest.approx([0.95])  # 0.9 for counting: one dog
    assert scorer.scores(picture()[None], ["two dogs"], [two])["partial"].item() == pytest.approx(0.5)
    other = {"tag": "two_object", "include": [{"class": "dog", "count": 2}]}
    found = scorer.detect(picture(), other)
    assert [d.score for d in found] == pytest.approx([0.95, 0.5])  # 0.3 elsewhere, most confident first
    assert scorer(picture()[None], ["two dogs"], [other]).item() == 1.0


def test_max_objects_limits_each_class():
    many = {"cat": [[i, 0, i + 2, 2, 0.5 + i / 100] for i in range(10)]}
    found = reward(many, max_objects=4).detect(picture(), {"tag": "single_object"})
    assert len(found) == 4 and found[0].score == pytest.approx(0.59)


def test_colours_are_read_from_the_masked_crop_of_each_detection():
    red_first = {"dog": [[*RED_DOG, 0.9], [*BLUE_DOG, 0.8]]}
    red_dog = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}
    blue_dog = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "blue"}]}
    scorer = reward(red_first, strict=True)
    assert [d.colour for d in scorer.detect(picture(), red_dog)] == ["red", "blue"]
    # GenEval judges the colour of the most confident dog only
    assert scorer(picture()[None].repeat(2, 1, 1, 1), ["", ""], [red_dog, blue_dog]).tolist() == [1.0, 0.0]


def test_object_crop_blanks_outside_the_mask_and_crops_to_the_box():
    from PIL import Image

    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:8, 4:8] = True
    crop = np.asarray(object_crop(image, np.array([2, 2, 10, 12, 0.9]), mask, "#999"))
    assert crop.shape == (10, 8, 3)
    assert (crop[2:6, 2:6] == 200).all() and (crop[0, 0] == GREY).all() and (crop[-1, -1] == GREY).all()


def test_prompts_without_metadata_are_not_scored_and_counts_must_match():
    scorer = reward({})
    assert torch.isnan(scorer(picture()[None], ["free text"], [{}])).all()
    with pytest.raises(ValueError, match="metadata"):
        scorer(picture()[None].repeat(2, 1, 1, 1), ["a", "b"], [{}])


def test_object_names_must_match_the_detectors_classes(tmp_path):
    names = tmp_path / "object_names.txt"
    names.write_text("person\ndog\n")
    scorer = reward({}, object_names=str(names))
    with pytest.raises(ValueError, match="3 classes"):
        scorer.detect(picture(), {"tag": "single_object"})


def test_colour_classifier_is_the_template_mean_zero_shot_rule():
    from test_reward_models import tiny_clip

    model, processor = tiny_clip(projection_dim=16)
    model.eval()
    classify = ColourClassifier(model, processor)
    columns = classify.classifier("dog")
    assert columns.shape == (16, len(COLORS))
    torch.testing.assert_close(columns.norm(dim=0), torch.ones(len(COLORS)))
    with torch.no_grad():  # the red column by hand
        texts = ["a photo of a red dog", "a photo of a red-colored dog", "a photo of a red object"]
        tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
        features = model.get_text_features(**tokens)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        mean = torch.nn.functional.normalize(features, dim=-1).mean(0)
    torch.testing.assert_close(columns[:, 0], mean / mean.norm())
    from PIL import Image

    crops = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 12, 3), dtype=np.uint8))
        for i in range(3)
    ]
    pixels = processor.image_processor(images=crops, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
    expected = [
        COLORS[i] for i in (torch.nn.functional.normalize(image, dim=-1) @ columns).argmax(1).tolist()
    ]
    assert classify(crops, "dog") == expected


def test_mmdet_detector_gets_bgr_arrays_and_missing_mmdet_says_how_to_serve_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mmdet", None)
    with pytest.raises(ImportError, match="g2rpo.rewards.serve"):
        MMDetDetector("config.py", "model.pth")
    calls = {}
    model = types.SimpleNamespace(CLASSES=("person", "dog"))
    apis = types.ModuleType("mmdet.apis")
    apis.init_detector = lambda config, checkpoint, device: calls.update(device=device) or model
    apis.inference_detector = lambda m, image: calls.update(image=image) or ([np.zeros((0, 5))] * 2, None)
    monkeypatch.setitem(sys.modules, "mmdet", types.ModuleType("mmdet"))
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)
    with pytest.raises(FileNotFoundError, match="download_models.sh"):
        MMDetDetector(str(tmp_path / "missing.py"), str(tmp_path / "missing.pth"))
    (tmp_path / "c.py").write_text("")
    (tmp_path / "m.pth").write_text("")
    detector = MMDetDetector(str(tmp_path / "c.py"), str(tmp_path / "m.pth"), device="cpu")
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    boxes, masks = detector(rgb)
    assert detector.classes == ["person", "dog"] and calls["device"] == "cpu" and masks is None
    assert (calls["image"][..., 2] == 255).all() and (calls["image"][..., 0] == 0).all()  # red is BGR's last
