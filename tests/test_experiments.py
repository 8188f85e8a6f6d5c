"""The reproduction harness: collect metrics.jsonl from run dirs, write tables, curves and README blocks."""

import dataclasses
import json

import pytest
import yaml

from experiments import reproduce
from experiments.reproduce import Column, Suite


def _write_run(root, experiment, seed, records):
    run = root / f"experiment={experiment},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"experiment": experiment}}}})
    )
    (run / ".hydra/config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def _fake_run(root, experiment, seed, rewards):
    lines = [{"step": i, "reward/total/mean": r, "time/iteration_s": 1.5} for i, r in enumerate(rewards)]
    lines.append({"step": 0, "reward/total/mean": rewards[0], "time/iteration_s": 1.5})  # a resumed duplicate
    _write_run(root, experiment, seed, lines)


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    suite = Suite(
        name="demo",
        title="Demo",
        rows=[{"experiment": "a", "label": "A"}, {"experiment": "b", "label": "B"}],
        seeds=[0, 1],
        columns=[
            Column(key="reward/total/mean", label="start", reduce="first"),
            Column(key="reward/total/mean", label="end", reduce="mean_last", window=2),
            Column(key="time/iteration_s", label="wall s", reduce="sum", format=".1f"),
        ],
    )
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    _fake_run(tmp_path / "runs", "a", 0, [0.0, 0.5, 1.0])
    _fake_run(tmp_path / "runs", "a", 1, [0.0, 0.7, 1.2])
    _fake_run(tmp_path / "runs", "b", 0, [0.0, 0.1, 0.2])
    return suite


def test_table_aggregates_seeds_and_dedupes_resumed_steps(suite):
    runs = reproduce.collect(suite)
    assert set(runs) == {("a", 0), ("a", 1), ("b", 0)}
    assert [r["step"] for r in runs[("a", 0)]] == [0, 1, 2]
    lines = reproduce.table(suite, runs).splitlines()
    assert lines[0] == "| method | start | end | wall s | seeds |"
    assert lines[2] == "| A | 0.000 ± 0.000 | 0.850 ± 0.141 | 4.5 ± 0.0 | 2 |"
    assert lines[3] == "| B | 0.000 | 0.150 | 4.5 | 1 |"


def test_report_writes_markdown_png_and_readme_block(suite, tmp_path):
    body = reproduce.report(suite, reproduce.collect(suite))
    assert (tmp_path / "results/demo.png").stat().st_size > 1000
    assert "](demo.png)" in (tmp_path / "results/demo.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:demo:start -->\nold\n<!-- results:demo:end -->\noutro\n")
    assert reproduce.update_readme("demo", body, readme)
    text = readme.read_text()
    assert "old" not in text and "| A |" in text and text.startswith("intro") and text.endswith("outro\n")
    assert not reproduce.update_readme("other", body, readme)
    assert "over seeds [0, 1]" in body


def test_a_partial_pass_reports_only_the_seeds_it_ran(suite):
    runs = reproduce.collect(suite)
    assert reproduce.seeds_found(dataclasses.replace(suite, seeds=[1, 2]), runs) == [1]
    lines = reproduce.table(dataclasses.replace(suite, seeds=[1]), runs).splitlines()
    assert lines[2:] == ["| A | 0.000 | 0.950 | 4.5 | 1 |", "| B | n/a | n/a | n/a | 0 |"]


def test_suites_in_the_repository_load_and_name_existing_experiments():
    for path in reproduce.SUITES.glob("*.yaml"):
        suite = Suite.load(path)
        for row in suite.rows:
            assert (reproduce.ROOT / "conf/experiment" / f"{row['experiment']}.yaml").is_file(), row


def test_unknown_reducer_is_rejected():
    with pytest.raises(ValueError, match="first, first_mean"):
        Column(key="x", label="x", reduce="median")


def test_a_start_row_reports_the_first_evaluation_and_a_suite_can_share_runs(tmp_path, monkeypatch):
    run = tmp_path / "outputs/reproduce/other/experiment=a,seed=0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"experiment": "a"}}}})
    )
    (run / ".hydra/config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    records = [
        {"step": 0, "eval/score": 0.2},
        {"step": 0, "time/iteration_s": 2.0},
        {"step": 1, "time/iteration_s": 2.0, "eval/score": 0.5},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    suite = Suite(
        name="ablation",
        title="Ablation",
        rows=[{"experiment": "a", "label": "base", "at": "start"}, {"experiment": "a", "label": "A"}],
        seeds=[0],
        columns=[
            Column(key="eval/score", label="score"),
            Column(key="time/iteration_s", label="s", reduce="sum", format=".0f"),
        ],
        runs="other",
    )
    assert suite.output_dir == tmp_path / "outputs/reproduce/other"
    lines = reproduce.table(suite, reproduce.collect(suite)).splitlines()
    assert lines[2:] == ["| base | 0.200 | — | 1 |", "| A | 0.500 | 4 | 1 |"]


def test_evaluation_curves_cost_what_was_spent_before_them_and_speedup_compares_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    baseline = [  # evaluation "after n iterations" is logged at step n, before iteration n trains
        {"step": 0, "eval/score": 0.5, "time/iteration_s": 10.0, "nfe": 100},
        {"step": 1, "time/iteration_s": 10.0, "nfe": 100},
        {"step": 2, "eval/score": 0.6, "time/iteration_s": 10.0, "nfe": 100},
        {"step": 3, "time/iteration_s": 10.0, "nfe": 100},
        {"step": 4, "eval/score": 0.7},
    ]
    fast = [
        {"step": 0, "eval/score": 0.5, "time/iteration_s": 5.0, "nfe": 100},
        {"step": 1, "time/iteration_s": 5.0, "nfe": 100},
        {"step": 2, "eval/score": 0.75, "time/iteration_s": 5.0, "nfe": 100},
    ]
    slow = [
        {"step": 0, "eval/score": 0.5, "time/iteration_s": 5.0, "nfe": 1},
        {"step": 1, "eval/score": 0.55},
    ]
    for name, records in [("flow", baseline), ("dgpo", fast), ("other", slow)]:
        _write_run(tmp_path / "runs", name, 0, records)
    spec = {
        "title": "Speed",
        "rows": [
            {"experiment": "flow", "label": "Flow"},
            {"experiment": "dgpo", "label": "DGPO"},
            {"experiment": "other", "label": "Other"},
        ],
        "seeds": [0],
        "columns": [{"key": "eval/score", "label": "score"}],
        "curves": [{"key": "eval/score", "x": "time/iteration_s"}, {"key": "eval/score", "x": ["nfe"]}],
        "speedup": {
            "key": "eval/score",
            "baseline": "flow",
            "costs": [{"x": "time/iteration_s", "x_label": "s"}, {"x": ["nfe"], "x_label": "NFE"}],
        },
    }
    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump(spec))
    suite = Suite.load(path)
    runs = reproduce.collect(suite)
    assert suite.curves[0].series(runs[("flow", 0)]) == ([0.0, 20.0, 40.0], [0.5, 0.6, 0.7])
    lines = reproduce.speedup_table(suite, runs).splitlines()
    assert lines[0].startswith("Target: Flow's final `eval/score` in the same seed (mean 0.700)")
    assert lines[4:] == [
        "| Flow | 40 | 400 | 1.00x | 1.00x | 1/1 |",
        "| DGPO | 10 | 200 | 4.00x | 2.00x | 1/1 |",
        "| Other | not reached | not reached | — | — | 0/1 |",
    ]
    body = reproduce.report(suite, runs)
    assert "speed-up (s)" in body and (tmp_path / "results/speed.png").stat().st_size > 1000


def test_speedup_can_target_the_baselines_best_score(tmp_path, monkeypatch):
    """CurES's "steps to reach the baseline's peak": the target is the baseline's best evaluation."""
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    peaked = [{"step": i, "eval/score": s} for i, s in enumerate([0.5, 0.8, 0.7, 0.7])]
    curriculum = [{"step": i, "eval/score": s} for i, s in enumerate([0.5, 0.75, 0.81])]
    for name, records in [("uniform", peaked), ("cures", curriculum)]:
        _write_run(tmp_path / "runs", name, 0, records)
    rows = [{"experiment": "uniform", "label": "Uniform"}, {"experiment": "cures", "label": "CurES"}]
    costs = [reproduce.Curve(x="step", x_label="iterations")]
    for target, expected in (("max", ["| Uniform | 1 | 1.00x | 1/1 |", "| CurES | 2 | 0.50x | 1/1 |"]),
                             ("last", ["| Uniform | 1 | 1.00x | 1/1 |", "| CurES | 1 | 1.00x | 1/1 |"])):  # fmt: skip
        speedup = reproduce.Speedup(key="eval/score", baseline="uniform", costs=costs, target=target)
        suite = Suite(name="c", title="C", rows=rows, seeds=[0], columns=[], speedup=speedup)
        lines = reproduce.speedup_table(suite, reproduce.collect(suite)).splitlines()
        assert lines[0].startswith(f"Target: Uniform's {'best' if target == 'max' else 'final'} `eval/score`")
        assert lines[4:] == expected
    with pytest.raises(ValueError, match="speedup.target"):
        reproduce.Speedup(key="k", baseline="b", costs=[], target="mean")


def test_a_row_can_borrow_another_suites_runs_and_is_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    _write_run(tmp_path / "outputs/reproduce/joint", "a", 0, [{"step": 0, "eval/score": 0.2}])
    _write_run(tmp_path / "outputs/reproduce/score", "a", 0, [{"step": 3, "eval/score": 0.7}])
    suite = Suite(
        name="score",
        title="Score",
        rows=[
            {"experiment": "a", "label": "base", "at": "start", "runs": "joint"},
            {"experiment": "a", "label": "A"},
        ],
        seeds=[0, 1],
        columns=[Column(key="eval/score", label="score")],
    )
    runs = reproduce.collect(suite)
    assert reproduce.table(suite, runs).splitlines()[2:] == ["| base | 0.200 | 1 |", "| A | 0.700 | 1 |"]
    commands = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda command, **_: commands.append(command))
    suite.rows.insert(0, {"experiment": "b", "label": "base of b", "at": "start", "runs": "joint"})
    reproduce.run(suite, [])
    assert "experiment=a" in commands[0]


def test_count_reducer_counts_the_records_that_have_the_key():
    records = [
        {"step": 0, "eval/score": 0.1},
        {"step": 0, "time/iteration_s": 2.0},
        {"step": 1, "time/iteration_s": 9.0},
    ]
    assert Column(key="time/iteration_s", label="it", reduce="count").summarise(records) == 2
    assert Column(key="missing", label="none", reduce="count").summarise(records) == 0
