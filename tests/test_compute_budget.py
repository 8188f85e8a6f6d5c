"""A compute budget ends training when the denoiser work done reaches it, and survives a resume."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FAST_RUN

from g2rpo.callbacks import ComputeBudget
from g2rpo.loggers import read_metrics
from g2rpo.run import train

BUDGET = "+callbacks.compute_budget={_target_: g2rpo.callbacks.ComputeBudget, forward_equivalents: %d}"


def cost(record: dict) -> float:
    return record["nfe/rollout"] + record["nfe/train"] + 2 * record["nfe/train_backward"]


def test_iteration_cost_weighs_backward_forwards():
    budget = ComputeBudget(100.0)
    metrics = {"nfe/curriculum": 1, "nfe/rollout": 10, "nfe/train": 6, "nfe/train_backward": 4}
    assert budget.iteration_cost(metrics) == 1 + 10 + 6 + 2 * 4
    charged = ComputeBudget(100.0, spent_before=50.0)
    assert charged.spent == 0.0 and charged.spent_before == 50.0
    with pytest.raises(ValueError, match="forward_equivalents"):
        ComputeBudget(0.0)


def test_work_before_the_run_is_charged_to_its_first_iteration():
    budget = ComputeBudget(100.0, spent_before=50.0)
    trainer, logged = SimpleNamespace(world_size=2, should_stop=False), []
    module = SimpleNamespace(log_dict=lambda values, **_: logged.append(values))
    metrics = {"metrics": {"nfe/rollout": 10, "nfe/train": 2, "nfe/train_backward": 1}}
    budget.on_train_batch_end(trainer, module, metrics, None, 0)
    assert logged[-1] == {"compute/iteration": 50 + 2 * 14, "compute/forward_equivalents": 78}
    assert not trainer.should_stop
    budget.on_train_batch_end(trainer, module, metrics, None, 0)
    assert logged[-1] == {"compute/iteration": 28, "compute/forward_equivalents": 106}
    assert trainer.should_stop


def test_budget_stops_training_and_resumes_where_it_stopped(compose_config):
    # Flow-GRPO on 8 samples, T = 4: 64 rollout forwards (CFG) per iteration, training forwards with gradients
    first = compose_config(*FAST_RUN, "trainer.max_epochs=1", BUDGET % 10**9)
    train(first)
    records = read_metrics(Path(first.run_dir) / "metrics.jsonl")
    assert (
        records[0]["nfe/train_backward"] > 0 and records[0]["nfe/train_backward"] <= records[0]["nfe/train"]
    )
    per_iteration = cost(records[0])
    # a budget of 2.5 iterations stops after the third
    budget = int(2.5 * per_iteration)
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=10", BUDGET % budget, name="budget")
    train(cfg)
    records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert len(records) == 3
    assert records[-1]["compute/forward_equivalents"] == pytest.approx(sum(cost(r) for r in records))
    assert [r["compute/iteration"] for r in records] == pytest.approx([cost(r) for r in records])
    # the same command again trains nothing more
    train(compose_config(*FAST_RUN, "trainer.max_epochs=10", BUDGET % budget, name="budget"))
    assert len(read_metrics(Path(cfg.run_dir) / "metrics.jsonl")) == 3
    # a longer budget resumes from the checkpoint with the work already counted
    longer = compose_config(
        *FAST_RUN, "trainer.max_epochs=10", BUDGET % int(4.5 * per_iteration), name="budget"
    )
    train(longer)
    records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert len(records) == 5
    assert records[-1]["compute/forward_equivalents"] == pytest.approx(sum(cost(r) for r in records))
