"""The shapes world end to end: the shipped base model loads, trains with Flow-GRPO, and is evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from g2rpo.evaluation.evaluator import Evaluator, balanced_prompts
from g2rpo.loggers import read_metrics
from g2rpo.run import train
from g2rpo.shapes.geneval import GenEvalShapes
from g2rpo.shapes.model import BASE_MODEL_DIR, load_base_model, word_tokenizer
from g2rpo.shapes.prompts import shapes_dataset

SHAPES_RUN = [
    "experiment=quickstart",
    "logger=none",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
    "algo.num_steps=4",
    "eval.num_steps=4",
    "eval.images_per_task=4",
    "callbacks.evaluate.every_n_iterations=1",
]


def test_tokenizer_is_word_level_with_clip_conventions():
    tokenizer = word_tokenizer(16)
    ids = tokenizer(
        "a photo of an orange triangle left of a square", padding="max_length", max_length=16
    ).input_ids
    assert len(ids) == 16 and ids[0] == tokenizer.bos_token_id and ids[11] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of an orange triangle left of a square"


def test_missing_base_model_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make base-model"):
        load_base_model(str(tmp_path))


def test_balanced_prompts_cycle_each_task():
    dataset = shapes_dataset("heldout")
    prompts, metadata, tasks = balanced_prompts(dataset, 5)
    assert len(prompts) == 30 and all(tasks.count(t) == 5 for t in set(tasks))
    assert all(m["tag"] == t for m, t in zip(metadata, tasks, strict=True))


def test_two_iterations_on_the_shapes_world(compose_config):
    """The default world: shipped base model, GenEval-shapes reward, held-out evaluation before and after."""
    assert (BASE_MODEL_DIR / "model_index.json").is_file(), "the base model ships with the repository"
    cfg = compose_config(*SHAPES_RUN, "callbacks.evaluate.final_num_steps=[2]")
    train(cfg)
    run = Path(cfg.run_dir)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert {"reward/geneval_shapes/mean", "advantage/zero_std_frac", "time/iteration_s"} <= records[1].keys()
    assert {"eval/geneval_shapes/accuracy/overall", "eval/geneval_shapes/partial/counting"} <= records[
        0
    ].keys()
    assert "eval_steps2/geneval_shapes/accuracy/overall" in records[-1]  # the final policy at 2 ODE steps
    history = json.loads((run / "eval.json").read_text())
    assert history.pop("final_by_num_steps")["2"]["protocol"]["num_steps"] == 2
    assert sorted(history, key=int) == ["0", "1", "2"]
    assert history["0"]["num_images"] == 24
    assert history["0"]["protocol"] == {
        "num_steps": 4, "guidance_scale": 4.5, "images_per_prompt": None, "images_per_task": 4, "noise": "set",
        "seed": 0, "temperature": None, "overall": "tasks", "resolution": 32, "sampler": "euler_ode",
    }  # fmt: skip
    # every evaluation with one record per image; the final one's images in GenEval's layout
    final = json.loads((run / "eval" / "iteration_000002.json").read_text())
    assert len(final["images"]) == 24 and {"prompt", "task", "k", "seed"} <= final["images"][0].keys()
    assert len(list((run / "eval" / "iteration_000002_images").glob("*/samples/*.png"))) == 24


def test_evaluation_before_training_can_be_skipped(compose_config):
    """Table rows sharing one base policy set ``at_start: false``: only the trained policy is evaluated."""
    cfg = compose_config(*SHAPES_RUN, "trainer.max_epochs=1", "callbacks.evaluate.at_start=false")
    train(cfg)
    run = Path(cfg.run_dir)
    assert list(json.loads((run / "eval.json").read_text())) == ["1"]
    evaluated = [
        r["step"] for r in read_metrics(run / "metrics.jsonl") if "eval/geneval_shapes/accuracy/overall" in r
    ]
    assert evaluated == [1]


def test_evaluation_is_deterministic_and_pairs_noise():
    from g2rpo.policies import SD3Policy

    policy = SD3Policy(load_base_model(), resolution=32, max_sequence_length=0)
    evaluator = Evaluator(
        shapes_dataset("heldout"), {"geneval_shapes": GenEvalShapes()}, num_steps=4, images_per_task=2
    )
    first, second = evaluator(policy), evaluator(policy)
    assert first.scores == second.scores
    assert set(first.scores) == {"geneval_shapes/accuracy", "geneval_shapes/partial"}
    overall = first.scores["geneval_shapes/accuracy"]
    assert overall["overall"] == pytest.approx(sum(v for k, v in overall.items() if k != "overall") / 6)
    assert torch.isfinite(torch.tensor(list(overall.values()))).all()


def test_wandb_shows_the_evaluation_panel_and_tables(compose_config):
    """The offline W&B run holds, at every evaluation, the panel (the same prompts and noise each time) and the
    per-task table with a column per score, as `wandb sync` would upload them."""
    cfg = compose_config(*SHAPES_RUN, "logger=wandb", "trainer.max_epochs=1", "eval.panel_size=6")
    train(cfg)
    media = next(Path(cfg.run_dir).glob("wandb/offline-run-*/files/media"))
    assert len(list((media / "images" / "eval").glob("panel_*.png"))) == 2 * 6  # before and after training
    tables = sorted((media / "table" / "eval").glob("tasks_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["task", "geneval_shapes/accuracy", "geneval_shapes/partial", "shapes_score"]
    assert [row[0] for row in table["data"]] == [
        "single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"
    ]  # fmt: skip
    panels = [
        json.loads(p.read_text()) for p in sorted((media / "table" / "eval").glob("panel_table_*.json"))
    ]
    assert len(panels) == 2 and all(len(p["data"]) == 6 for p in panels)
    assert [row[1] for row in panels[0]["data"]] == [row[1] for row in panels[1]["data"]]  # the same prompts


def test_the_shipped_editing_model_trains_on_edits_and_is_judged_on_held_out_ones(compose_config):
    """The editing miniature's setting (experiment=suite/editing) for one iteration of each of its algorithms."""
    from g2rpo.shapes.model import EDIT_MODEL_DIR

    assert (EDIT_MODEL_DIR / "model_index.json").is_file(), "the editing model ships with the repository"
    for algo, *options in (
        ["flow_grpo"],
        ["dgpo", "algo.max_timestep_index=2", "algo.num_train_timesteps=2"],
    ):
        cfg = compose_config(
            "experiment=suite/editing", f"algo={algo}", *options, *SHAPES_RUN[1:], "trainer.max_epochs=1",
            "eval.images_per_task=2", name=algo,
        )  # fmt: skip
        train(cfg)
        records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
        evaluated = [r for r in records if "eval/edit_shapes/overall/overall" in r]
        assert [r["step"] for r in evaluated] == [0, 1]  # before and after
        for record in evaluated:
            assert {
                f"eval/edit_shapes/{term}/{kind}"
                for term in ("compliance", "preservation", "unchanged")
                for kind in ("recolor", "reshape", "add", "remove", "swap", "count")
            } <= record.keys()
        (trained,) = [r for r in records if "reward/edit_shapes/mean" in r]
        assert 0.0 <= trained["reward/edit_shapes/mean"] <= 1.0
