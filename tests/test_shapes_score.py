"""The shapes_score reward (a tiny CLIP trained on the shapes world), with its shipped weights."""

import numpy as np
import pytest
import torch

from g2rpo.rewards import RewardFunction
from g2rpo.shapes.geneval import holds
from g2rpo.shapes.prompts import TASKS, scene_for, split
from g2rpo.shapes.score import ShapesScore
from g2rpo.shapes.training.score import CORRUPTIONS, applicable, corrupt, render_batch


@pytest.fixture(scope="module")
def score() -> ShapesScore:
    return ShapesScore()


def _heldout(n: int, seed: int = 123):
    rng = np.random.default_rng(seed)
    images, metadata, _ = render_batch(rng, n, split("heldout"))
    return images, metadata, rng


def test_true_captions_outscore_corrupted_ones(score):
    images, metadata, rng = _heldout(96)
    true = score(images, [m["prompt"] for m in metadata], metadata)
    margins = {}
    for kind in CORRUPTIONS:
        rows = [i for i, m in enumerate(metadata) if kind in applicable(m)]
        wrong = [corrupt(metadata[i], kind, rng) for i in rows]
        corrupted = score(images[rows], [w["prompt"] for w in wrong], wrong)
        margins[kind] = (true[rows] - corrupted).numpy()
    for kind in ("shape", "colour", "binding", "count"):  # relations are not learnt (see training.json)
        assert len(margins[kind]) and margins[kind].mean() > 0.05, f"{kind}: true captions do not win"
        assert (margins[kind] > 0).mean() > 0.75, kind
    assert (np.concatenate(list(margins.values())) > 0).mean() > 0.75


def test_output_is_one_finite_float_per_image(score):
    images, metadata, _ = _heldout(5)
    images = torch.cat([images, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    metadata = [*metadata, metadata[0]]
    prompts = [m["prompt"] for m in metadata]
    out = score(images, prompts, metadata)
    assert isinstance(score, RewardFunction)
    assert out.shape == (6,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().max() <= 1 + 1e-5  # the default scale gives the cosine
    torch.testing.assert_close(score(images[:1], prompts[:1], metadata[:1]), out[:1])  # cached text, batching
    raw = ShapesScore(scale=1.0)(images, prompts, metadata)
    torch.testing.assert_close(raw, out * float(score.model.logit_scale.exp()))
    upsampled = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert score(upsampled, prompts, metadata).shape == (6,)


def test_corruptions_are_false_of_every_scene():
    rng = np.random.default_rng(0)
    prompts = split("all")
    for task in TASKS:
        for meta in prompts[task][:12]:
            scene = scene_for(meta, rng)
            assert holds(scene, meta)
            for kind in applicable(meta):
                assert not holds(scene, corrupt(meta, kind, rng)), (meta["prompt"], kind)


def test_missing_weights_name_the_make_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="make reward-model"):
        ShapesScore(tmp_path / "absent")
