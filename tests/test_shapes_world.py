"""The shapes world: renderer, prompts and splits, GenEval's rules, and the detector's validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g2rpo.rewards.geneval_rules import evaluate, relative_position
from g2rpo.shapes.geneval import GenEvalShapes, ShapesDetector
from g2rpo.shapes.prompts import TASKS, scene_for, shapes_dataset, split
from g2rpo.shapes.world import BACKGROUND, COLOURS, SHAPES, WorldObject, coverage, render


def test_render_is_deterministic_antialiased_and_in_range():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    meta = split("all")["color_attr"][0]
    image = render(scene_for(meta, rng_a))
    assert torch.equal(image, render(scene_for(meta, rng_b)))
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1
    # anti-aliasing: some edge pixels are strict mixtures of background and the object colour
    alpha = coverage("circle", 16.3, 15.7, 9.0, 32, 32)
    assert ((alpha > 0.05) & (alpha < 0.95)).sum() > 10
    assert abs(alpha.sum() - np.pi * 4.5**2) < 1.0  # coverage integrates to the shape's area


def test_objects_do_not_overlap_and_positions_hold():
    rng = np.random.default_rng(0)
    for meta in split("all")["position"]:
        objects = scene_for(meta, rng)
        alphas = [coverage(o.shape, o.cx, o.cy, o.size, 32, 32) for o in objects]
        assert (np.minimum(alphas[0], alphas[1]) == 0).all()
        relation = meta["include"][1]["position"][0]
        assert relation in relative_position(objects[1].box, objects[0].box)


def test_vocabulary_and_tasks_match_geneval():
    assert len(SHAPES) >= 3 and len(COLOURS) >= 5
    prompts = split("all")
    assert tuple(prompts) == TASKS
    assert prompts["counting"][0]["exclude"][0]["count"] == prompts["counting"][0]["include"][0]["count"] + 1
    assert all(p["prompt"].startswith("a photo of ") for task in prompts.values() for p in task)
    position = next(p for p in prompts["position"] if p["prompt"] == "a photo of a circle left of a square")
    assert position["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]


def test_heldout_compositions_are_absent_from_training():
    train, heldout = split("train"), split("heldout")
    for task in TASKS:
        train_prompts = {p["prompt"] for p in train[task]}
        held = {p["prompt"] for p in heldout[task]}
        assert held, task
        if task == "single_object":
            assert held == train_prompts  # nothing to hold out: three classes
        else:
            assert not held & train_prompts, task
    assert "a photo of a green circle" in {p["prompt"] for p in heldout["colors"]}
    assert not any("green circle" in p["prompt"] for p in train["color_attr"])


def test_dataset_is_balanced_over_tasks():
    dataset = shapes_dataset("train", per_task=10)
    tags = [m["tag"] for m in dataset.metadata]
    assert len(dataset) == 60 and all(tags.count(t) == 10 for t in TASKS)


def test_geneval_rules_on_hand_made_detections():
    from g2rpo.rewards.geneval_rules import Detection

    def det(shape, colour, x, y, size=8.0, score=0.9):
        return Detection(
            shape, colour, (x - size / 2, y - size / 2, x + size / 2, y + size / 2), score, size**2
        )

    three = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 3}],
        "exclude": [{"class": "circle", "count": 4}],
    }
    found = [det("circle", "red", 5, 5), det("circle", "red", 20, 5)]
    assert not evaluate(found, three).correct and evaluate(found, three).score == pytest.approx(2 / 3)
    found.append(det("circle", "blue", 5, 20))
    assert evaluate(found, three).correct
    found.append(det("circle", "blue", 20, 20))  # four: the exclude rule fails it, partial credit 2/3
    assert not evaluate(found, three).correct and evaluate(found, three).score == pytest.approx(2 / 3)

    left = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
    }
    assert evaluate([det("square", "red", 24, 16), det("circle", "red", 8, 16)], left).correct
    wrong = evaluate([det("square", "red", 8, 16), det("circle", "red", 24, 16)], left)
    assert not wrong.correct and wrong.score == pytest.approx(2 / 3)  # both counts right, position wrong

    attr = {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ],
    }
    swapped = evaluate([det("circle", "blue", 8, 8), det("square", "red", 24, 24)], attr)
    assert not swapped.correct and swapped.score == pytest.approx(0.5)


def test_detector_recovers_every_object():
    detector = ShapesDetector()
    rng = np.random.default_rng(7)
    for _ in range(100):
        specs = [
            (SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(len(COLOURS))])
            for _ in range(rng.integers(1, 5))
        ]
        from g2rpo.shapes.world import place

        objects = place(rng, specs)
        found = detector(render(objects))
        assert sorted((d.name, d.colour) for d in found) == sorted(specs)
        for obj in objects:
            nearest = min(found, key=lambda d: abs(d.box[0] - obj.box[0]) + abs(d.box[1] - obj.box[1]))
            assert np.allclose(nearest.box, obj.box, atol=0.75)


def test_detector_validation_per_task():
    """The acceptance check: GenEval's verdict on rendered truth is right >= 99% of the time, per task."""
    reward = GenEvalShapes(strict=True)
    rng = np.random.default_rng(2024)
    prompts = split("all")
    for task in TASKS:
        metadata = [prompts[task][rng.integers(len(prompts[task]))] for _ in range(200)]
        images = torch.stack([render(scene_for(meta, rng)) for meta in metadata])
        accuracy = reward(images, [m["prompt"] for m in metadata], metadata).mean().item()
        assert accuracy >= 0.99, (task, accuracy)


def test_detector_ignores_noise_and_reward_marks_unscorable():
    background = torch.tensor(BACKGROUND, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 32, 32)
    noisy = (background + 0.03 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    assert ShapesDetector()(noisy) == []
    reward = GenEvalShapes()
    scores = reward(noisy[None].repeat(2, 1, 1, 1), ["x", "y"], [{}, split("all")["colors"][0]])
    assert torch.isnan(scores[0]) and scores[1] == 0


def test_world_object_box_is_xyxy():
    assert WorldObject("square", "red", 10, 12, 4).box == (8, 10, 12, 14)
