"""Preference pairs for the shapes judge: two images for one GenEval-shapes caption, the better one known.

The truth is the GenEval-shapes detector reward (:class:`~g2rpo.shapes.geneval.GenEvalShapes`, partial credit),
the reward the judge is meant to stand in for. Each image of a pair is rendered from the caption's own scene
(``prompts.scene_for``, a third of the time) or from its objects after one or two mutations (an object
recoloured, reshaped, dropped or added; position relations left to chance), and half of the images are
degraded (blurred, with pixel noise) towards what a small generator draws. Both images are scored by the
detector; a pair is kept when the scores differ by at least ``min_gap``, and which image is shown as A is a
coin flip. The ``train`` split draws captions from ``prompts.split("train")``, ``heldout`` from the held-out
compositions (single objects appear in both, as in :mod:`g2rpo.shapes.prompts`).

Every draw comes from ``seed``, so a split is the same on every machine. Metadata per pair: ``image`` (A) and
``other_image`` (B) ``[3, H, W]`` in [0, 1], ``preferred`` (``"A"`` or ``"B"``), ``scores`` (A's, B's) and the
caption's GenEval ``tag``.

    python -m g2rpo.shapes.judge_pairs --split heldout --num-pairs 8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from g2rpo.data import PromptDataset
from g2rpo.shapes.geneval import GenEvalShapes
from g2rpo.shapes.prompts import TASKS, scene_for, split
from g2rpo.shapes.world import COLOURS, SHAPES, WorldObject, place, render

MUTATIONS = ("recolour", "reshape", "drop", "add")


def mutated_specs(metadata: dict, rng: np.random.Generator, mutations: int) -> list[tuple[str, str]]:
    """The caption's objects as ``(shape, colour)`` (unspecified colours random), then ``mutations`` random
    changes; a scene keeps at least one object."""
    colours = list(COLOURS)
    specs = [
        (req["class"], req.get("color") or colours[rng.integers(len(colours))])
        for req in metadata["include"]
        for _ in range(req["count"])
    ]
    for _ in range(mutations):
        kind = MUTATIONS[rng.integers(len(MUTATIONS))]
        index = int(rng.integers(len(specs)))
        shape, colour = specs[index]
        if kind == "recolour":
            specs[index] = (shape, str(rng.choice([c for c in colours if c != colour])))
        elif kind == "reshape":
            specs[index] = (str(rng.choice([s for s in SHAPES if s != shape])), colour)
        elif kind == "drop" and len(specs) > 1:
            specs.pop(index)
        elif len(specs) < 5:
            specs.append((str(rng.choice(SHAPES)), colours[rng.integers(len(colours))]))
    return specs


def degrade(image: Tensor, rng: np.random.Generator) -> Tensor:
    """A blurred (Gaussian, sigma in [0.3, 1.0] pixels), noisy (std in [0, 0.05]) copy in [0, 1]."""
    sigma, noise = rng.uniform(0.3, 1.0), rng.uniform(0.0, 0.05)
    pixels = ndimage.gaussian_filter(image.numpy(), sigma=(0, sigma, sigma))
    pixels = pixels + rng.normal(0.0, noise, size=pixels.shape)
    return torch.from_numpy(np.clip(pixels, 0.0, 1.0)).float()


def candidate(metadata: dict, rng: np.random.Generator, image_size: int, degraded: float) -> Tensor:
    if rng.random() < 1 / 3:
        objects: list[WorldObject] = scene_for(metadata, rng, image_size)
    else:
        objects = place(rng, mutated_specs(metadata, rng, int(rng.integers(1, 3))), image_size=image_size)
    image = render(objects, image_size)
    return degrade(image, rng) if rng.random() < degraded else image


def judge_pairs(
    split_name: str = "train",
    num_pairs: int = 1024,
    seed: int = 0,
    image_size: int = 32,
    min_gap: float = 0.1,
    degraded: float = 0.5,
) -> PromptDataset:
    """``num_pairs`` pairs, tasks drawn uniformly (GenEval weighs its six tasks equally), then a caption of
    the task (see the module docstring)."""
    if split_name not in ("train", "heldout"):
        raise ValueError(
            f"data.split_name={split_name!r}: the judge's pairs have a train and a heldout split"
        )
    captions = split(split_name)
    detector = GenEvalShapes(strict=False)
    rng = np.random.default_rng([seed, ("train", "heldout").index(split_name)])
    prompts, metadata = [], []
    while len(prompts) < num_pairs:
        task = TASKS[rng.integers(len(TASKS))]
        caption = captions[task][rng.integers(len(captions[task]))]
        images = torch.stack([candidate(caption, rng, image_size, degraded) for _ in range(2)])
        scores = detector(images, [caption["prompt"]] * 2, [caption, caption]).tolist()
        if abs(scores[0] - scores[1]) < min_gap:
            continue
        if rng.random() < 0.5:  # the better image is A or B by a coin flip
            images, scores = images.flip(0), scores[::-1]
        prompts.append(caption["prompt"])
        metadata.append(
            {
                "image": images[0],
                "other_image": images[1],
                "preferred": "A" if scores[0] > scores[1] else "B",
                "scores": scores,
                "tag": task,
                "image_size": image_size,
            }
        )
    return PromptDataset(prompts=prompts, metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="heldout", choices=("train", "heldout"))
    parser.add_argument("--num-pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = judge_pairs(args.split, args.num_pairs, args.seed)
    for prompt, meta in zip(data.prompts, data.metadata):
        a, b = meta["scores"]
        print(f"{meta['preferred']}  A {a:.2f}  B {b:.2f}  {meta['tag']:<13} {prompt}")


if __name__ == "__main__":
    main()
