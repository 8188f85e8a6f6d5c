"""Reward-hacking signals: image statistics on images of known values, and gold rewards."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from g2rpo.hacking import (
    GoldRewards,
    brightness,
    colour_entropy,
    dark_fraction,
    edge_density,
    group_diversity,
    image_statistics,
    saturation,
)
from g2rpo.types import PromptBatch


def solid(rgb: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def checkerboard(size: int = 8) -> torch.Tensor:
    cells = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2
    return cells.float().expand(1, 3, size, size).clone()


def test_black_image_is_dark_and_white_is_bright():
    black, white = solid((0, 0, 0)), solid((1, 1, 1))
    assert brightness(black).item() == 0 and dark_fraction(black).item() == 1
    assert brightness(white).item() == pytest.approx(1) and dark_fraction(white).item() == 0
    assert brightness(solid((1, 0, 0))).item() == pytest.approx(0.299)


def test_saturation_is_zero_for_greys_and_one_for_pure_hues():
    assert saturation(solid((0.5, 0.5, 0.5))).item() == 0 and saturation(solid((0, 0, 0))).item() == 0
    assert saturation(solid((1, 0, 0))).item() == 1
    assert saturation(solid((1, 0.5, 0.5))).item() == pytest.approx(0.5)


def test_edge_density_of_a_flat_image_and_a_checkerboard():
    assert edge_density(solid((0.3, 0.6, 0.9))).item() == 0
    assert edge_density(checkerboard()).item() == 1
    half = solid((0, 0, 0))
    half[..., 4:] = 1  # one vertical edge: the column left of it, 7 of the 7 x 7 judged pixels in a row
    assert edge_density(half).item() == pytest.approx(7 / 49)
    isoluminant = solid((1, 0, 0))
    isoluminant[:, :, :, 4:] = torch.tensor([0, 0.299 / 0.587, 0]).view(3, 1, 1)  # same luma, other colour
    assert edge_density(isoluminant).item() == pytest.approx(7 / 49)


def test_colour_entropy_of_one_two_and_all_colours():
    assert colour_entropy(solid((0.2, 0.4, 0.6))).item() == 0
    assert colour_entropy(checkerboard()).item() == pytest.approx(1 / 9)  # two colours, equally often: 1 bit
    levels = (torch.arange(512)[:, None] // torch.tensor([64, 8, 1]) % 8).float() / 8 + 1 / 16
    every_colour = levels.T.reshape(1, 3, 16, 32)
    assert colour_entropy(every_colour).item() == pytest.approx(1)


def test_diversity_is_zero_within_identical_groups():
    a, b = solid((0, 0, 0)), solid((1, 1, 1))
    images = torch.cat([a, a, a, b, b, a])
    diversity = group_diversity(images, torch.tensor([0, 0, 0, 1, 1, 2]))
    assert diversity.tolist() == [0, 0]  # group 2 has one member: no pair
    mixed = group_diversity(torch.cat([a, b, a]), torch.tensor([5, 5, 5]))
    assert mixed.item() == pytest.approx(2 / 3)  # pairs (a, b), (a, a), (b, a): RMS distances 1, 0, 1


def test_image_statistics_are_batch_means_under_images():
    images = torch.cat([solid((0, 0, 0)), solid((1, 1, 1)), checkerboard()])
    stats = image_statistics(images, torch.tensor([0, 0, 1]))
    assert stats["images/brightness"] == pytest.approx(0.5, abs=1e-6)
    assert stats["images/dark_fraction"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert stats["images/diversity"] == pytest.approx(1.0)  # group 1 has a single member
    assert set(stats) == {
        f"images/{s}"
        for s in ("brightness", "saturation", "colour_entropy", "edge_density", "dark_fraction", "diversity")
    }


class ByTask:
    """A reward function: 1 for every prompt but position ones, which score 0."""

    def __call__(self, images, prompts, metadata):
        return torch.tensor([0.0 if m.get("tag") == "position" else 1.0 for m in metadata])


class TwoScores:
    def scores(self, images, prompts, metadata):
        return {"strict": torch.zeros(len(prompts)), "partial": torch.tensor([0.5, float("nan"), 0.5])}


def test_gold_rewards_log_every_score_per_task():
    batch = PromptBatch(
        ["p", "q", "r"],
        [{"tag": "position"}, {"tag": "colors"}, {}],
        torch.tensor([0, 1, 1]),
        torch.arange(3),
    )
    gold = GoldRewards({"task": ByTask(), "pair": TwoScores()})
    metrics = gold.metrics(torch.zeros(3, 3, 4, 4), batch)
    assert metrics == {
        "gold/task/mean": pytest.approx(2 / 3),
        "gold/task/colors": 1.0,
        "gold/task/position": 0.0,
        "gold/pair/strict/mean": 0.0,
        "gold/pair/strict/colors": 0.0,
        "gold/pair/strict/position": 0.0,
        "gold/pair/partial/mean": 0.5,
        "gold/pair/partial/position": 0.5,  # colors' one score is NaN: not logged
    }
    assert gold.excluding(["task"]).rewards.keys() == {"pair"}
    assert gold.excluding(["task", "pair"]) is None


def test_gold_node_takes_any_reward_function(compose_config):
    """A paper preset sets ``gold`` to reward models of its own (here one needing no weights)."""
    cfg = compose_config(
        "experiment=paper_flow_grpo_sd35_ocr",
        "+gold._target_=g2rpo.hacking.GoldRewards",
        "+gold.rewards.jpeg._target_=g2rpo.rewards.JpegCompressibility",
    )
    gold = instantiate(cfg.gold)
    assert list(gold.rewards) == ["jpeg"]
    assert compose_config().gold.rewards.keys() == {"geneval_shapes", "shapes_score"}  # the shapes world's
    assert not compose_config("gold=none").gold
