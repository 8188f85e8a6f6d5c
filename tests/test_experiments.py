"""The reproduction harness: run each suite row, collect metrics.jsonl from run dirs, write tables, curves,
the results pages and their index."""

import collections
import dataclasses
import json

import pytest
import yaml
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from experiments import reproduce
from experiments.reproduce import Column, Suite, row_key
from g2rpo.config import run_name


def _row(label, *overrides, **fields):
    return {"label": label, "overrides": list(overrides), **fields}


def _write_run(root, overrides, seed, records, suite_overrides=()):
    """A finished run as a suite's multirun leaves it: the row's overrides as the sweeper passes them, the seed,
    then the rest."""
    task = [
        *reproduce.normalized(overrides),
        f"seed={seed}",
        "trainer.enable_progress_bar=false",
        *suite_overrides,
    ]
    run = root / run_name(",".join(sorted(task)))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump(task))
    (run / ".hydra/config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def _fake_run(root, overrides, seed, rewards):
    lines = [{"step": i, "reward/total/mean": r, "time/iteration_s": 1.5} for i, r in enumerate(rewards)]
    lines.append({"step": 0, "reward/total/mean": rewards[0], "time/iteration_s": 1.5})  # a resumed duplicate
    _write_run(root, overrides, seed, lines, suite_overrides=["experiment=suite/demo"])


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    suite = Suite(
        name="demo",
        title="Demo",
        rows=[_row("A", "algo=a"), _row("B", "algo=a", "algo.beta=0.1")],
        seeds=[0, 1],
        columns=[
            Column(key="reward/total/mean", label="start", reduce="first"),
            Column(key="reward/total/mean", label="end", reduce="mean_last", window=2),
            Column(key="time/iteration_s", label="wall s", reduce="sum", format=".1f"),
        ],
        overrides=["experiment=suite/demo"],
    )
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    _fake_run(tmp_path / "runs", ["algo=a"], 0, [0.0, 0.5, 1.0])
    _fake_run(tmp_path / "runs", ["algo=a"], 1, [0.0, 0.7, 1.2])
    _fake_run(tmp_path / "runs", ["algo=a", "algo.beta=0.1"], 0, [0.0, 0.1, 0.2])
    return suite


def test_table_aggregates_seeds_and_dedupes_resumed_steps(suite):
    runs = reproduce.collect(suite)
    a, b = (row_key(row) for row in suite.rows)
    assert set(runs) == {(a, 0), (a, 1), (b, 0)}
    assert [r["step"] for r in runs[(a, 0)]] == [0, 1, 2]
    lines = reproduce.table(suite, runs).splitlines()
    assert lines[0] == "| method | start | end | wall s | seeds |"
    assert lines[2] == "| A | 0.000 ± 0.000 | 0.850 ± 0.141 | 4.5 ± 0.0 | 2 |"
    assert lines[3] == "| B | 0.000 | 0.150 | 4.5 | 1 |"


def test_report_writes_the_results_page_with_its_row_definitions_and_png(suite, tmp_path):
    body = reproduce.report(suite, reproduce.collect(suite))
    assert (tmp_path / "results/demo.png").stat().st_size > 1000
    assert (tmp_path / "results/demo.md").read_text() == body
    assert "](demo.png)" in body and "| A |" in body
    assert "over seeds [0, 1]" in body
    assert "`experiments/suites/demo.yaml`" in body
    assert "`python -m g2rpo.run <row> seed=<seed> experiment=suite/demo`" in body
    assert "- B: `algo=a algo.beta=0.1`" in body.splitlines()


def test_the_index_links_every_suites_page_with_its_summary(suite, tmp_path, monkeypatch):
    other = dataclasses.replace(suite, name="other", title="Other", summary="")
    text = reproduce.index([dataclasses.replace(suite, summary="what demo checks"), other])
    assert "- [Demo](demo.md): what demo checks" in text.splitlines()
    assert "- [Other](other.md)" in text.splitlines()
    monkeypatch.setattr(reproduce, "SUITES", tmp_path / "suites")
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites/demo.yaml").write_text(yaml.safe_dump({"title": "Demo", "rows": [], "seeds": [0],
                                                               "columns": [], "summary": "s"}))  # fmt: skip
    reproduce.main(["--index-only"])
    assert (tmp_path / "results/README.md").read_text().splitlines()[-1] == "- [Demo](demo.md): s"
    assert not (tmp_path / "results/demo.md").exists()


def test_a_partial_pass_reports_only_the_seeds_it_ran(suite):
    runs = reproduce.collect(suite)
    assert reproduce.seeds_found(dataclasses.replace(suite, seeds=[1, 2]), runs) == [1]
    lines = reproduce.table(dataclasses.replace(suite, seeds=[1]), runs).splitlines()
    assert lines[2:] == ["| A | 0.000 | 0.950 | 4.5 | 1 |", "| B | n/a | n/a | n/a | 0 |"]


def test_suites_in_the_repository_load_and_define_their_rows():
    """Every row has a unique label and a list of overrides (test_config composes each); what a suite points
    at exists: the suites whose runs it reads, its speed-up baseline, its base config and its page."""
    for path in reproduce.SUITES.glob("*.yaml"):
        suite = Suite.load(path)
        labels = [row["label"] for row in suite.rows]
        assert len(set(labels)) == len(labels), path
        assert suite.summary and "\n" not in suite.summary, path
        for row in suite.rows:
            assert isinstance(row["overrides"], list) and set(row) <= {"label", "overrides", "at", "runs"}, (
                row
            )
            assert (reproduce.SUITES / f"{row.get('runs', suite.name)}.yaml").is_file(), row
        assert not suite.runs or (reproduce.SUITES / f"{suite.runs}.yaml").is_file()
        for speedup in suite.speedups:
            assert speedup.baseline in labels
        for override in suite.overrides:
            if override.startswith("experiment="):
                assert (CONF_DIR / "experiment" / f"{override.split('=', 1)[1]}.yaml").is_file(), override
        assert (reproduce.RESULTS / f"{suite.name}.md").is_file(), path


def test_rows_that_share_a_run_directory_have_their_own_run_names():
    """A row's runs are found by its overrides, in directories Hydra names from them less ``exclude_keys``
    (trainer.max_epochs): two different rows of one directory must not collide, and a row shared between
    suites must name the same runs."""
    suites = {path.stem: Suite.load(path) for path in reproduce.SUITES.glob("*.yaml")}
    names = collections.defaultdict(dict)  # run directory -> run name -> row overrides
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for suite in suites.values():
            assert not suite.runs or suite.overrides == suites[suite.runs].overrides, suite.name
            for row in suite.rows:
                owner = suites[row.get("runs", suite.runs or suite.name)]
                overrides = [*reproduce.normalized(row["overrides"]), "seed=0", *owner.overrides]
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
                name = cfg.hydra.job.override_dirname
                assert names[owner.name].setdefault(name, row_key(row)[1]) == row_key(row)[1], (
                    suite.name,
                    row,
                )
    assert len(names["g2rpo_table_joint"]) == 6  # the joint table's 4 rows and the granularity ablation's 2


def test_unknown_reducer_is_rejected():
    with pytest.raises(ValueError, match="first, first_mean"):
        Column(key="x", label="x", reduce="median")


def test_a_start_row_reports_the_first_evaluation_and_a_suite_can_share_runs(tmp_path, monkeypatch):
    records = [
        {"step": 0, "eval/score": 0.2},
        {"step": 0, "time/iteration_s": 2.0},
        {"step": 1, "time/iteration_s": 2.0, "eval/score": 0.5},
    ]
    _write_run(tmp_path / "outputs/reproduce/other", ["algo=a"], 0, records)
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    suite = Suite(
        name="ablation",
        title="Ablation",
        rows=[_row("base", "algo=a", at="start"), _row("A", "algo=a")],
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
        _write_run(tmp_path / "runs", [f"algo={name}"], 0, records)
    spec = {
        "title": "Speed",
        "rows": [_row("Flow", "algo=flow"), _row("DGPO", "algo=dgpo"), _row("Other", "algo=other")],
        "seeds": [0],
        "columns": [{"key": "eval/score", "label": "score"}],
        "curves": [{"key": "eval/score", "x": "time/iteration_s"}, {"key": "eval/score", "x": ["nfe"]}],
        "speedup": {
            "key": "eval/score",
            "baseline": "Flow",
            "costs": [{"x": "time/iteration_s", "x_label": "s"}, {"x": ["nfe"], "x_label": "NFE"}],
        },
    }
    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump(spec))
    suite = Suite.load(path)
    runs = reproduce.collect(suite)
    assert suite.curves[0].series(runs[(row_key(suite.rows[0]), 0)]) == ([0.0, 20.0, 40.0], [0.5, 0.6, 0.7])
    lines = reproduce.speedup_table(suite, runs).splitlines()
    assert lines[0].startswith("Target: Flow's final `eval/score` in the same seed (mean 0.700)")
    assert lines[4:] == [
        "| Flow | 40 | 400 | 1.00x | 1.00x | 1/1 |",
        "| DGPO | 10 | 200 | 4.00x | 2.00x | 1/1 |",
        "| Other | not reached | not reached | — | — | 0/1 |",
    ]
    body = reproduce.report(suite, runs)
    assert "speed-up (s)" in body and (tmp_path / "results/speed.png").stat().st_size > 1000

    # one table per baseline: DGPO against its paper's baseline and against a faster one
    spec["speedup"] = [spec["speedup"], {**spec["speedup"], "baseline": "DGPO"}]
    path.write_text(yaml.safe_dump(spec))
    suite = Suite.load(path)
    body = reproduce.report(suite, runs)
    assert "Target: Flow's final" in body and "Target: DGPO's final" in body
    lines = reproduce.speedup_table(suite, runs, suite.speedups[1]).splitlines()
    assert lines[4:] == [
        "| Flow | not reached | not reached | — | — | 0/1 |",
        "| DGPO | 10 | 200 | 1.00x | 1.00x | 1/1 |",
        "| Other | not reached | not reached | — | — | 0/1 |",
    ]


def test_speedup_can_target_the_baselines_best_score(tmp_path, monkeypatch):
    """CurES's "steps to reach the baseline's peak": the target is the baseline's best evaluation."""
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    peaked = [{"step": i, "eval/score": s} for i, s in enumerate([0.5, 0.8, 0.7, 0.7])]
    curriculum = [{"step": i, "eval/score": s} for i, s in enumerate([0.5, 0.75, 0.81])]
    for overrides, records in [([], peaked), (["curriculum=cures"], curriculum)]:
        _write_run(tmp_path / "runs", overrides, 0, records)
    rows = [_row("Uniform"), _row("CurES", "curriculum=cures")]
    costs = [reproduce.Curve(x="step", x_label="iterations")]
    for target, expected in (("max", ["| Uniform | 1 | 1.00x | 1/1 |", "| CurES | 2 | 0.50x | 1/1 |"]),
                             ("last", ["| Uniform | 1 | 1.00x | 1/1 |", "| CurES | 1 | 1.00x | 1/1 |"])):  # fmt: skip
        speedup = reproduce.Speedup(key="eval/score", baseline="Uniform", costs=costs, target=target)
        suite = Suite(name="c", title="C", rows=rows, seeds=[0], columns=[], speedup=speedup)
        lines = reproduce.speedup_table(suite, reproduce.collect(suite)).splitlines()
        assert lines[0].startswith(f"Target: Uniform's {'best' if target == 'max' else 'final'} `eval/score`")
        assert lines[4:] == expected
    with pytest.raises(ValueError, match="speedup.target"):
        reproduce.Speedup(key="k", baseline="b", costs=[], target="mean")


def test_a_row_can_borrow_another_suites_runs_and_is_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    _write_run(
        tmp_path / "outputs/reproduce/joint", ["algo=a"], 0, [{"step": 0, "eval/score": 0.2}], ["reward=j"]
    )
    _write_run(
        tmp_path / "outputs/reproduce/score", ["algo=a"], 0, [{"step": 3, "eval/score": 0.7}], ["reward=s"]
    )
    suite = Suite(
        name="score",
        title="Score",
        rows=[_row("base", "algo=a", at="start", runs="joint"), _row("A", "algo=a")],
        seeds=[0, 1],
        columns=[Column(key="eval/score", label="score")],
        overrides=["reward=s"],
    )
    runs = reproduce.collect(suite)
    assert reproduce.table(suite, runs).splitlines()[2:] == ["| base | 0.200 | 1 |", "| A | 0.700 | 1 |"]
    commands = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda command, **_: commands.append(command))
    suite.rows.insert(0, _row("base of b", "algo=b", at="start", runs="joint"))
    reproduce.run(suite, [])
    assert len(commands) == 1 and "algo=a" in commands[0] and "algo=b" not in commands[0]


def test_each_row_runs_as_a_multirun_over_the_seeds_and_is_found_by_its_overrides(tmp_path, monkeypatch):
    """One command per distinct row, its overrides first and the seeds next: ``collect`` reads a run's row back
    as the overrides before its seed, as Hydra's sweeper writes them (``[1, 3]`` becomes ``[1,3]``)."""
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    rows = [_row("base", "algo=g", at="start"), _row("G", "algo=g"), _row("G13", "algo=g", "algo.g=[1, 3]")]
    suite = Suite(name="s", title="S", rows=rows, seeds=[0, 1], columns=[Column(key="eval/score", label="score")],
                  overrides=["experiment=suite/s"])  # fmt: skip
    commands = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda command, **_: commands.append(command))
    reproduce.run(suite, ["hydra/launcher=joblib"])
    assert [c[c.index("--multirun") + 1 :] for c in commands] == [
        ["algo=g", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false",
         "experiment=suite/s", "hydra/launcher=joblib"],
        ["algo=g", "algo.g=[1, 3]", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'runs'}",
         "trainer.enable_progress_bar=false", "experiment=suite/s", "hydra/launcher=joblib"],
    ]  # fmt: skip
    assert reproduce.normalized(["algo.g=[1, 3]", "lr=2.0e-3"]) == ("algo.g=[1,3]", "lr=0.002")
    _write_run(tmp_path / "runs", ["algo=g"], 0, [{"step": 0, "eval/score": 0.1}], ["experiment=suite/s"])
    _write_run(tmp_path / "runs", ["algo=g", "algo.g=[1,3]"], 0, [{"step": 0, "eval/score": 0.3}])
    runs = reproduce.collect(suite)
    assert reproduce.table(suite, runs).splitlines()[2:] == [
        "| base | 0.100 | 1 |",
        "| G | 0.100 | 1 |",
        "| G13 | 0.300 | 1 |",
    ]


def test_prepare_commands_run_once_before_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(Suite, "output_dir", property(lambda self: tmp_path / "runs"))
    suite = Suite(name="s", title="S", rows=[_row("G", "algo=g")], seeds=[0, 1],
                  columns=[Column(key="eval/score", label="score")],
                  prepare=[["g2rpo.curate", "curate.output=x"]])  # fmt: skip
    commands = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda command, **_: commands.append(command))
    reproduce.run(suite, [])
    assert commands[0][1:] == ["-m", "g2rpo.curate", "curate.output=x"]
    assert len(commands) == 2 and "--multirun" in commands[1]
    assert "`python -m g2rpo.curate curate.output=x`, then each row" in reproduce.definition(suite)


def test_count_reducer_counts_the_records_that_have_the_key():
    records = [
        {"step": 0, "eval/score": 0.1},
        {"step": 0, "time/iteration_s": 2.0},
        {"step": 1, "time/iteration_s": 9.0},
    ]
    assert Column(key="time/iteration_s", label="it", reduce="count").summarise(records) == 2
    assert Column(key="missing", label="none", reduce="count").summarise(records) == 0
