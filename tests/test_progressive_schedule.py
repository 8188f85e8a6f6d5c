"""The progressive schedule (g2rpo.schedule): the stage of each iteration, what switches at a boundary, the lr
schedules against hand-computed values, a run resumed mid-schedule in the right stage, and invalid stages
failing with the field named."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONF_DIR, FAST_RUN, make_policy
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from g2rpo.algos import FlowGRPO, PairGRPO
from g2rpo.algos.token_grpo import TokenGRPO
from g2rpo.checkpoint import trainable_keys
from g2rpo.data import PromptDataset
from g2rpo.run import train
from g2rpo.schedule import ProgressiveSchedule, Stage, trained_tasks
from g2rpo.shapes.geneval import ShapesDetector
from g2rpo.shapes.world import WorldObject, render

# stage 1: 16 px, only the q projections' LoRA, lr 0.01 constant, loss weight 0.5, EMA decay 0.5;
# stage 2: 32 px, every adapter, lr 0.001 cosine, loss weight 2, the module's EMA decay (0.9)
STAGES = (
    "{_target_: g2rpo.schedule.ProgressiveSchedule, stages: ["
    "{iterations: 2, resolution: {generation: 16}, trainable: ['*attn.to_q.*'], lr: 0.01,"
    " loss_weights: {generation: 0.5, understanding: 0.01}, ema_decay: 0.5},"
    "{iterations: 2, resolution: {generation: 32}, lr: 0.001, schedule: cosine, loss_weights: {generation: 2.0}}]}"
)


class Recorder(L.Callback):
    """Appends, per iteration, what the schedule set, read inside the iteration: one JSON line to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        policy, optimizer = module.policy, module.optimizers().optimizer
        to_k = [p for n, p in policy.named_trainable_parameters() if "to_k" in n]
        self.row = {
            "iteration": trainer.current_epoch,
            "resolution": policy.resolution,
            "training": sorted(n for n, p in policy.named_trainable_parameters() if p.requires_grad),
            "trainable": len(policy.trainable_parameters()),
            "in_optimizer": sum(len(group["params"]) for group in optimizer.param_groups),
            "lr": optimizer.param_groups[0]["lr"],
            "loss_weight": module.loss_weight,
            "ema_decay": module.ema.decay,
            "to_k_before": float(sum(p.detach().double().abs().sum() for p in to_k)),
        }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.row["image_size"] = outputs["samples"].images.shape[-1]
        with self.path.open("a") as stream:
            stream.write(json.dumps(self.row) + "\n")


def _run(compose_config, tmp_path: Path, name: str, max_epochs: int) -> list[dict]:
    record = tmp_path / f"{name}.jsonl"
    cfg = compose_config(
        *FAST_RUN,
        f"++schedule={STAGES}",
        f"+callbacks.record={{_target_: {__name__}.Recorder, path: '{record}'}}",
        "callbacks.images=null",
        "callbacks.export=null",
        f"trainer.max_epochs={max_epochs}",
        name=name,
    )
    train(cfg)
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2 + 2 schedule run straight through: its per-iteration records and its last checkpoint."""
    tmp_path = tmp_path_factory.mktemp("straight")

    def compose_config(*overrides, name):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[f"run_dir={tmp_path / name}", f"run_name={name}", *overrides])

    rows = _run(compose_config, tmp_path, "straight", 4)
    checkpoint = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    return rows, checkpoint


def test_each_iteration_is_in_its_stage():
    schedule = ProgressiveSchedule([{"iterations": 3}, {"iterations": 2}, {"iterations": 1}])
    located = [schedule.locate(i) for i in range(6)]
    assert located == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    assert schedule.total == 6 and schedule.ends == [3, 5, 6]
    assert schedule.locate(6) == (2, 0)  # after the last iteration: the last stage's end


def test_the_boundary_switches_resolution_trainable_set_lr_and_weights(uninterrupted):
    rows, checkpoint = uninterrupted
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    every = [r["training"] for r in rows][-1]
    q_only = [n for n in every if "attn.to_q." in n]
    assert q_only and len(q_only) < len(every)
    for row in rows[:2]:  # stage 1
        assert (row["resolution"], row["image_size"]) == (16, 16)
        assert row["training"] == q_only
        assert (row["lr"], row["loss_weight"], row["ema_decay"]) == (0.01, 0.5, 0.5)
    for row in rows[2:]:  # stage 2
        assert (row["resolution"], row["image_size"]) == (32, 32)
        assert row["training"] == every
        assert (row["loss_weight"], row["ema_decay"]) == (2.0, 0.9)
    assert [r["lr"] for r in rows[2:]] == pytest.approx([0.001, 0.001 * 0.5 * (1 + math.cos(math.pi / 2))])
    # the optimiser, EMA and checkpoints hold every trainable weight whichever train; a paused one stays put
    assert all(r["in_optimizer"] == r["trainable"] == len(every) for r in rows)
    assert rows[0]["to_k_before"] == rows[1]["to_k_before"] == rows[2]["to_k_before"]
    assert rows[3]["to_k_before"] != rows[2]["to_k_before"]  # trained in stage 2
    assert {f"policy.{n}" for n in every} == set(checkpoint["state_dict"])
    assert len(checkpoint["ema"]["shadow_params"]) == len(every)


def test_a_run_resumed_mid_schedule_is_in_the_right_stage(compose_config, tmp_path, uninterrupted):
    """2 iterations, stop; the same command with trainer.max_epochs=4 resumes from the checkpoint into stage 2
    with the uninterrupted run's settings, and ends with its weights."""
    straight, straight_checkpoint = uninterrupted
    first = _run(compose_config, tmp_path, "run", 2)
    assert [r["iteration"] for r in first] == [0, 1]
    both = _run(compose_config, tmp_path, "run", 4)  # the record file holds both runs' iterations
    assert both == straight  # stage 2's resolution, trainable set, lr, loss weight and EMA decay, and weights
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["state_dict"].keys() == straight_checkpoint["state_dict"].keys()
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(value, straight_checkpoint["state_dict"][key])


def test_lr_schedules_match_hand_computed_values():
    cosine = Stage(iterations=10, lr=1.0, schedule="cosine", warmup_ratio=0.2)  # 2 warm-up iterations
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert [cosine.lr_factor(step) for step in range(10)] == pytest.approx(expected)
    assert expected[2] == 1.0 and expected[-1] == pytest.approx(0.0380602, abs=1e-6)
    constant = Stage(iterations=4, warmup_ratio=0.25)  # 1 warm-up iteration
    assert [constant.lr_factor(step) for step in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [Stage(iterations=3, schedule="cosine").lr_factor(s) for s in range(3)] == pytest.approx(
        [1.0, 0.75, 0.25]
    )


@pytest.mark.parametrize(
    ("stages", "field"),
    [
        ([{"iterations": 0}], r"schedule.stages\[0\].iterations=0 must be a positive"),
        ([{"iterations": 2}, {"iterations": -1}], r"schedule.stages\[1\].iterations=-1"),
        ([{"lr": 1e-3}], r"schedule.stages\[0\].iterations is missing"),
        ([{"iterations": 1, "sched": "cosine"}], r"schedule.stages\[0\]: unknown field\(s\) \['sched'\]"),
        (
            [{"iterations": 1, "schedule": "linear"}],
            r"schedule.stages\[0\].schedule='linear'.*constant, cosine",
        ),
        ([{"iterations": 1, "loss_weights": {"vision": 1}}], r"schedule.stages\[0\].loss_weights.vision"),
        ([{"iterations": 1, "resolution": {"editing": 16}}], r"schedule.stages\[0\].resolution.editing"),
        ([{"iterations": 1, "trainable": []}], r"schedule.stages\[0\].trainable"),
    ],
)
def test_invalid_stages_fail_naming_the_field(stages, field):
    with pytest.raises(ValueError, match=field):
        ProgressiveSchedule(stages)


def _setup(stages, max_epochs: int = 2, **module):
    """``setup`` against a tiny policy, as the trainer calls it before fitting."""
    parts = {
        "policy": make_policy(),
        "scheduler_factory": None,
        "optimizer_factory": partial(torch.optim.AdamW, lr=1e-3),
        "ema": None,
        "algorithm": FlowGRPO(),
        "dataset": PromptDataset(prompts=["a cat"]),
        **module,
    }
    optimizer = parts["optimizer_factory"](parts["policy"].trainable_parameters())
    module = SimpleNamespace(
        optimizers=lambda: SimpleNamespace(optimizer=optimizer), loss_weight=1.0, **parts
    )
    schedule = ProgressiveSchedule(stages)
    schedule.setup(SimpleNamespace(max_epochs=max_epochs, world_size=1), module, "fit")
    return schedule, module


@pytest.mark.parametrize(
    ("stages", "field"),
    [
        (
            [{"iterations": 1}, {"iterations": 1, "trainable": ["*nothing*"]}],
            r"stages\[1\].trainable\[0\]='\*nothing\*' matches no trainable",
        ),
        (
            [{"iterations": 2, "trainable": ["*pos_embed*"]}],
            r"stages\[0\].trainable\[0\]",
        ),  # frozen by the model
        (
            [{"iterations": 2, "resolution": {"generation": 18}}],
            r"stages\[0\].resolution.generation=18.*multiple of 4",
        ),
        ([{"iterations": 2, "resolution": {"understanding": 16}}], r"stages\[0\].resolution.understanding"),
        ([{"iterations": 2, "ema_decay": 0.5}], r"stages\[0\].ema_decay=0.5: the run keeps no EMA"),
        ([{"iterations": 1}], r"trainer.max_epochs=2 runs past the schedule's 1 iterations"),
    ],
)
def test_stages_that_do_not_fit_the_run_fail_naming_the_field(stages, field):
    with pytest.raises(ValueError, match=field):
        _setup(stages)


def test_setup_refuses_a_second_lr_schedule():
    with pytest.raises(ValueError, match="scheduler=null"):
        _setup([{"iterations": 2}], scheduler_factory=lambda optimizer: None)


def test_pausing_keeps_the_trainable_set_of_optimiser_ema_and_checkpoint():
    policy = make_policy()
    names = [n for n, _ in policy.named_trainable_parameters()]
    before = policy.trainable_parameters()
    policy.train_only([n for n in names if "to_q" in n])
    assert [p for p in policy.trainable_parameters()] == before  # same objects, same order
    assert {n for n, p in policy.named_trainable_parameters() if p.requires_grad} == {
        n for n in names if "to_q" in n
    }
    assert trainable_keys(SimpleNamespace(policy=policy)) == {f"policy.{n}" for n in names}
    policy.train_only(names)
    assert all(p.requires_grad for p in before) and not policy.paused
    with pytest.raises(ValueError, match="not trainable parameters"):
        policy.train_only(["transformer.pos_embed.proj.weight"])


def test_the_loss_weight_of_each_algorithm_is_that_of_the_task_it_trains():
    text = PromptDataset(prompts=["a cat"])
    edits = PromptDataset(prompts=["make it red"], metadata=[{"source": [["circle", "blue", 16, 16, 8]]}])
    assert trained_tasks(FlowGRPO(), text) == ("generation",)
    assert trained_tasks(FlowGRPO(), edits) == ("editing",)
    assert trained_tasks(TokenGRPO(task="answer"), text) == ("understanding",)
    assert trained_tasks(TokenGRPO(task="image"), text) == ("generation",)
    assert trained_tasks(PairGRPO(generation=FlowGRPO()), text) == ("generation", "understanding")


def test_loss_weights_reach_pair_grpo_sides_or_the_single_task_loss():
    """Pair-GRPO: its configured side weights times the stage's; one task: the module's loss weight; null: 1."""
    weights = {"understanding": 0.01, "generation": 2.0, "editing": 3.0}
    stages = [{"iterations": 1, "loss_weights": weights}, {"iterations": 1}]
    pair = PairGRPO(generation=FlowGRPO(), side_weights={"generation": 1.0, "understanding": 0.5})
    schedule, module = _setup(stages, algorithm=pair)
    schedule.apply(module, 0)
    assert pair.side_weights == pytest.approx({"generation": 2.0, "understanding": 0.005})
    assert module.loss_weight == 1.0
    schedule.apply(module, 1)
    assert pair.side_weights == {"generation": 1.0, "understanding": 0.5}  # the config's, not stage 1's
    edits = PromptDataset(prompts=["make it red"], metadata=[{"source": [["circle", "blue", 16, 16, 8]]}])
    schedule, module = _setup(stages, dataset=edits)
    schedule.apply(module, 0)
    assert module.loss_weight == 3.0  # a flow algorithm on edits trains editing
    schedule.apply(module, 1)
    assert module.loss_weight == 1.0


def test_the_shapes_detector_reads_16_px_images():
    """A small triangle downsampled to 16 px covers ~7 of its pixels: found, with ``min_area`` scaled to 16 px."""
    scene = render(
        [WorldObject("triangle", "blue", 10.0, 12.0, 8.0), WorldObject("circle", "red", 22.0, 20.0, 9.0)]
    )
    small = F.interpolate(scene[None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)[0]
    found = sorted((d.name, d.colour) for d in ShapesDetector()(small))
    assert found == [("circle", "red"), ("triangle", "blue")]
    assert np.allclose(sorted(d.box[0] for d in ShapesDetector()(small)), [3.0, 9.0], atol=1.0)
