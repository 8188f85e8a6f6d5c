"""Reward-hacking monitoring: image statistics on images of known values, the warning rules on synthetic
series, the monitor's checkpointed state, gold rewards, and a short shapes-world run that logs them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from g2rpo.hacking import (
    GoldRewards,
    RewardHackingMonitor,
    brightness,
    colour_entropy,
    dark_fraction,
    edge_density,
    group_diversity,
    image_statistics,
    saturation,
    welch,
)
from g2rpo.loggers import read_metrics
from g2rpo.run import train
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


def test_welch_statistic():
    assert welch([1, 2, 3], [1, 2, 3]) == 0
    assert welch([0, 0], [1, 1]) == math.inf
    assert welch([1, 2, 3], [4, 5, 6]) == pytest.approx(3 / math.sqrt(2 / 3))


def series(start: float, slope: float, n: int, noise: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (start + slope * torch.arange(n) + noise * torch.randn(n, generator=generator)).tolist()


def run_monitor(monitor: RewardHackingMonitor, columns: dict[str, list[float]]) -> dict[str, int]:
    """Feed the monitor one iteration at a time; the iteration each flag first turned on."""
    for iteration in range(len(next(iter(columns.values())))):
        monitor.update(iteration, {key: values[iteration] for key, values in columns.items()})
    return monitor.first_fired


def test_gold_rule_fires_on_rising_reward_and_falling_gold_only():
    reward = series(0.50, 0.002, 30, 0.003, seed=0)
    falling = series(0.47, -0.004, 30, 0.02, seed=1)
    rising = series(0.47, 0.004, 30, 0.02, seed=2)
    fired = run_monitor(
        RewardHackingMonitor(), {"reward/total/mean": reward, "gold/a/mean": falling, "gold/b/mean": rising}
    )
    assert (
        set(fired) == {"hacking/gold/a/mean"} and fired["hacking/gold/a/mean"] >= 9
    )  # judged from 2 windows
    flat_reward = series(0.50, 0.0, 30, 0.003, seed=0)
    assert (
        run_monitor(RewardHackingMonitor(), {"reward/total/mean": flat_reward, "gold/a/mean": falling}) == {}
    )


def test_drift_rule_needs_k_base_deviations_and_the_minimum_change():
    noise = series(0.0, 0.0, 30, 0.01, seed=3)
    steady = [0.6 + x for x in noise]
    drifting = [0.6 + x - (0.01 * max(0, i - 10)) for i, x in enumerate(noise)]
    still = [0.0] * 25 + [0.01] * 5  # the base model never has a dark pixel; a trace of them is no drift
    fired = run_monitor(
        RewardHackingMonitor(),
        {
            "reward/total/mean": steady,
            "images/brightness": drifting,
            "images/saturation": steady,
            "images/dark_fraction": still,
        },
    )
    assert set(fired) == {"hacking/images/brightness"}
    assert run_monitor(
        RewardHackingMonitor(min_drift=0.005), {"reward/total/mean": steady, "images/dark_fraction": still}
    )


def test_monitor_state_round_trip_keeps_the_base_windows():
    monitor = RewardHackingMonitor(window=2)
    run_monitor(
        monitor, {"reward/total/mean": [0.1, 0.2, 0.3, 0.4], "images/brightness": [0.5, 0.52, 0.5, 0.9]}
    )
    resumed = RewardHackingMonitor(window=2)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.history == monitor.history and resumed.active == monitor.active == {
        "hacking/images/brightness"
    }
    assert resumed.first_fired == monitor.first_fired == {"hacking/images/brightness": 3}
    assert resumed.judge() == monitor.judge()


def test_monitor_names_the_logged_rewards_when_its_reward_is_not_logged():
    with pytest.raises(ValueError, match=r"reward/shapes_score/mean"):
        RewardHackingMonitor(reward="reward/total").record(0, {"reward/shapes_score/mean": 0.5})
    with pytest.raises(ValueError, match="window"):
        RewardHackingMonitor(window=1)


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


def test_a_shapes_run_logs_gold_image_statistics_and_flags(compose_config, caplog):
    cfg = compose_config(
        "experiment=quickstart",
        "reward=shapes_score",
        "logger=wandb",  # offline: the alert is recorded in the run's file, for `wandb sync`
        "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false",
        "curriculum.prompts_per_iteration=2",
        "curriculum.group_size=4",
        "algo.num_steps=4",
        "callbacks.evaluate=null",
        "callbacks.hacking.window=2",
        "callbacks.hacking.z=-inf",  # every gold reward "falls": the rule's plumbing, not its judgement
    )
    with caplog.at_level(logging.WARNING, logger="g2rpo.hacking"):
        train(cfg)
    records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert {
        "gold/geneval_shapes/accuracy/mean",
        "gold/geneval_shapes/partial/mean",
        "images/brightness",
        "images/diversity",
        "hacking/warning",
    } <= records[0].keys()
    assert not any(key.startswith("gold/shapes_score") for key in records[0])  # trained on: not gold
    assert "hacking/images/brightness" not in records[2]  # judged from two windows of 2 iterations
    assert records[3]["hacking/gold/geneval_shapes/accuracy/mean"] == records[3]["hacking/warning"] == 1
    assert "reward hacking? iteration 3" in caplog.text and "gold/geneval_shapes/accuracy/mean" in caplog.text
    (wandb_file,) = Path(cfg.run_dir).glob("wandb/offline-run-*/run-*.wandb")
    assert b"reward hacking? iteration 3" in wandb_file.read_bytes()
    # the checkpointed monitor saw each metric at the iterations it was logged, never a stale value
    state = torch.load(Path(cfg.run_dir) / "checkpoints/last.ckpt", weights_only=False)["callbacks"]
    (history,) = [s["history"] for name, s in state.items() if "RewardHackingMonitor" in name]
    per_task = [key for key in history if key.startswith("gold/") and not key.endswith("/mean")]
    assert per_task and all(
        sorted(history[key]) == [r["step"] for r in records if key in r] for key in per_task
    )
    assert any(len(history[key]) < len(records) for key in per_task)  # 2 prompts: some task is missed
