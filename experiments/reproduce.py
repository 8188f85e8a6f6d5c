"""Run experiment suites and turn their ``metrics.jsonl`` into markdown tables and PNG curves.

    python -m experiments.reproduce [SUITE ...] [--seeds 0 1] [--collect-only | --index-only]
                                    [--launcher-args hydra/launcher=joblib]

A suite (``experiments/suites/<name>.yaml``) defines its table rows (after the commands it ``prepare``s), each by its Hydra overrides on top of
the suite's own (usually ``experiment=suite/<base>``, a ``conf/experiment/suite/*.yaml``), with seeds, the
columns to summarise, the curves to plot and optionally a speed-up table. Each row runs as one Hydra
``--multirun`` over the seeds (so any Hydra launcher can run them: local, joblib, submitit/SLURM) into
``outputs/reproduce/<suite>/<overrides>``; run directories are deterministic, so re-running a suite
resumes unfinished runs and skips finished ones. Results: ``experiments/results/<suite>.md`` and ``.png``,
the one copy of each table, and ``experiments/results/README.md``, their index (written on every call).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from g2rpo.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "experiments" / "suites"
RESULTS = ROOT / "experiments" / "results"
REDUCERS = ("count", "first", "first_mean", "last", "max", "mean_last", "sum")


@dataclass
class Column:
    key: str  # a metrics.jsonl key
    label: str
    # first | last | max | sum | count (records that have the key) | first_mean / mean_last (mean of the
    # first / last `window`)
    reduce: str = "last"
    window: int = 5
    format: str = ".3f"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCERS:
            raise ValueError(
                f"column {self.label!r}: reduce={self.reduce!r}; choose one of {', '.join(REDUCERS)}"
            )

    def summarise(self, records: list[dict]) -> float:
        values = [r[self.key] for r in records if self.key in r and math.isfinite(r[self.key])]
        if self.reduce == "count":
            return float(len(values))
        if not values:
            return math.nan
        if self.reduce == "first":
            return values[0]
        if self.reduce == "first_mean":
            return statistics.fmean(values[: self.window])
        if self.reduce == "last":
            return values[-1]
        if self.reduce == "max":
            return max(values)
        if self.reduce == "sum":
            return math.fsum(values)
        return statistics.fmean(values[-self.window :])


@dataclass
class Curve:
    key: str = "reward/total/mean"
    # "step", or metrics keys summed per step and accumulated: time/iteration_s, [nfe/rollout, nfe/train]
    x: str | list[str] = "step"
    label: str = ""
    x_label: str = ""

    def series(self, records: list[dict]) -> tuple[list[float], list[float]]:
        """``(x, y)`` at the steps that log ``key`` (every step for training metrics, evaluations only for
        ``eval`` keys), with ``x`` the cost spent when it was measured: through step ``n`` for a training
        metric of step ``n``, before it for an evaluation logged at ``n`` ("after n iterations")."""
        spent = progress(records, self.x, before=self.key.startswith("eval"))
        points = [
            (c, r[self.key]) for c, r in zip(spent, records) if math.isfinite(r.get(self.key, math.nan))
        ]
        return [c for c, _ in points], [v for _, v in points]


def progress(records: list[dict], x: str | list[str], before: bool = False) -> list[float]:
    """The step number, or the running total of the metrics ``x`` (one key or several summed) through each
    record, or up to it (``before``)."""
    if x == "step":
        return [float(r["step"]) for r in records]
    keys = [x] if isinstance(x, str) else list(x)
    own = [math.fsum(r.get(k, 0.0) for k in keys) for r in records]
    total = list(itertools.accumulate(own))
    return [t - o for t, o in zip(total, own)] if before else total


@dataclass
class Speedup:
    """Cost to reach the baseline's final score, per row: DGPO's "N x faster" measured side by side."""

    key: str  # the score, e.g. eval/geneval_shapes/accuracy/overall
    baseline: str  # the label of the row whose ``key`` is the target (per seed)
    costs: list[Curve]  # cost axes: ``x`` and ``x_label`` of each (``key`` is ignored)
    target: str = "last"  # the baseline's final score, or its best ("max": CurES's "peak accuracy")

    def __post_init__(self) -> None:
        if self.target not in ("last", "max"):
            raise ValueError(f"speedup.target={self.target!r}; choose last or max")

    def reached_at(self, records: list[dict], target: float, cost: Curve) -> float:
        """The cost at the first evaluation scoring ``>= target`` (NaN if none does)."""
        x, y = dataclasses.replace(cost, key=self.key).series(records)
        return next((c for c, v in zip(x, y) if v >= target - 1e-9), math.nan)


@dataclass
class Suite:
    name: str
    title: str
    # {label: <row label>, overrides: [<Hydra override>, ...][, at: start][, runs: <suite>]}; a row with
    # ``runs`` reads that suite's runs (a base evaluated there, with the same evaluation) and is not run here
    rows: list[dict]
    seeds: list[int]
    columns: list[Column]
    curves: list[Curve] = field(default_factory=lambda: [Curve()])
    summary: str = ""  # one line for the index of results
    description: str = ""
    overrides: list[str] = field(default_factory=list)  # every row's, after the row's own
    runs: str = ""  # another suite's run directory to share (same overrides), e.g. an ablation of its rows
    speedup: Speedup | list[Speedup] | None = None  # one table per baseline
    # commands run once before the rows, each ``[module, arg, ...]`` run as ``python -m module args``; they must be
    # resumable (a finished one returns at once), as a dataset curated for the rows (`python -m g2rpo.curate`)
    prepare: list[list[str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Suite:
        spec = yaml.safe_load(path.read_text())
        spec["columns"] = [Column(**c) for c in spec["columns"]]
        curves = spec.pop("curves", None) or [spec.pop("curve", {})]
        spec["curves"] = [Curve(**c) for c in curves]
        if "speedup" in spec:
            specs = spec["speedup"] if isinstance(spec["speedup"], list) else [spec["speedup"]]
            spec["speedup"] = [Speedup(**{**s, "costs": [Curve(**c) for c in s["costs"]]}) for s in specs]
        return cls(name=path.stem, **spec)

    @property
    def speedups(self) -> list[Speedup]:
        if self.speedup is None:
            return []
        return self.speedup if isinstance(self.speedup, list) else [self.speedup]

    @property
    def output_dir(self) -> Path:
        return ROOT / "outputs" / "reproduce" / (self.runs or self.name)


def normalized(overrides: list[str]) -> tuple[str, ...]:
    """Overrides as Hydra's sweeper passes them to a run, and so as its ``.hydra/overrides.yaml`` records
    them (``[1, 3]`` -> ``[1,3]``, ``2.0e-3`` -> ``0.002``)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return tuple(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed)


def row_key(row: dict) -> tuple[str, tuple[str, ...]]:
    """The row's key in ``collect``'s runs: the suite it borrows runs from ("" for its own) and its overrides."""
    return row.get("runs", ""), normalized(row["overrides"])


def run(suite: Suite, launcher_args: list[str]) -> None:
    """Each row as one Hydra multirun over the seeds, its own overrides first (``collect`` reads them back
    as those before ``seed=``); finished runs resume to their end at once."""
    for module, *args in suite.prepare:
        command = [sys.executable, "-m", module, *args]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    seeds = ",".join(str(s) for s in suite.seeds)
    rows = {row_key(row): row["overrides"] for row in suite.rows if "runs" not in row}
    for overrides in rows.values():
        command = [
            sys.executable,
            "-m",
            "g2rpo.run",
            "--multirun",
            *overrides,
            f"seed={seeds}",
            f"hydra.sweep.dir={suite.output_dir}",
            "trainer.enable_progress_bar=false",
            *suite.overrides,
            *launcher_args,
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)


def collect(suite: Suite) -> dict[tuple, list[dict]]:
    """``(row_key, seed) -> metrics records`` for every finished run directory of the suite, and of the
    suites its rows borrow from."""
    runs = {(("", row), seed): r for (row, seed), r in _collect_dir(suite.output_dir).items()}
    for other in dict.fromkeys(row["runs"] for row in suite.rows if "runs" in row):
        borrowed = _collect_dir(ROOT / "outputs" / "reproduce" / other)
        runs.update({((other, row), seed): r for (row, seed), r in borrowed.items()})
    return runs


def _collect_dir(output_dir: Path) -> dict[tuple[tuple[str, ...], int], list[dict]]:
    """``(row overrides, seed) -> records``: a run's row is the overrides it was given before its seed."""
    runs = {}
    for overrides_file in sorted(output_dir.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text())
        row = tuple(itertools.takewhile(lambda o: not o.startswith("seed="), overrides))
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            runs[(row, config["seed"])] = read_metrics(metrics)
    return runs


def _mean_std(values: list[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:{fmt}}"
    return f"{statistics.fmean(finite):{fmt}} ± {statistics.stdev(finite):{fmt}}"


def table(suite: Suite, runs: dict) -> str:
    header = ["method", *[c.label for c in suite.columns], "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in suite.rows:
        per_seed = [runs[(row_key(row), s)] for s in suite.seeds if (row_key(row), s) in runs]
        columns = suite.columns
        if row.get("at") == "start":  # the model before training: the run's first evaluation
            columns = [
                dataclasses.replace(c, reduce="first") if c.key.startswith("eval/") else None
                for c in suite.columns
            ]
        cells = [_mean_std([c.summarise(r) for r in per_seed], c.format) if c else "—" for c in columns]
        lines.append("| " + " | ".join([row["label"], *cells, str(len(per_seed))]) + " |")
    return "\n".join(lines)


def plot(suite: Suite, runs: dict, path: Path) -> None:
    """One panel per curve: the mean over seeds (truncated to the shortest seed) with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(suite.curves), figsize=(6.4 * len(suite.curves), 4.0), dpi=120)
    for axis, curve in zip(np.atleast_1d(axes), suite.curves):
        for row in suite.rows:
            if row.get("at") == "start":
                continue
            series = [curve.series(runs[(row_key(row), s)]) for s in suite.seeds if (row_key(row), s) in runs]
            series = [(x, y) for x, y in series if y]
            if not series:
                continue
            length = min(len(y) for _, y in series)
            x = np.mean([x[:length] for x, _ in series], axis=0)
            y = np.array([y[:length] for _, y in series])
            mean, std = y.mean(axis=0), y.std(axis=0)
            axis.plot(x, mean, marker="o" if length < 30 else None, label=f"{row['label']} (n={len(series)})")
            axis.fill_between(x, mean - std, mean + std, alpha=0.2)
        x_label = curve.x if isinstance(curve.x, str) else " + ".join(curve.x)
        axis.set_xlabel(curve.x_label or x_label)
        axis.set_ylabel(curve.label or curve.key)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(textwrap.fill(suite.title, 100 * len(suite.curves)), fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def speedup_table(suite: Suite, runs: dict, speedup: Speedup | None = None) -> str:
    """Per row: the cost at which it first reaches the baseline's final (or best) score in the same seed,
    and the baseline's own cost to reach it divided by the row's ("N x faster"); ``speedup`` defaults to
    the suite's first."""
    speedup = speedup or suite.speedups[0]
    baseline = row_key(
        next(r for r in suite.rows if r["label"] == speedup.baseline and r.get("at") != "start")
    )
    header = ["method", *[f"{c.x_label} to reach it" for c in speedup.costs],
              *[f"speed-up ({c.x_label})" for c in speedup.costs], "seeds reaching it"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    targets = {s: Column(key=speedup.key, label="", reduce=speedup.target).summarise(runs[(baseline, s)])
               for s in suite.seeds if (baseline, s) in runs}  # fmt: skip
    baseline_costs = [
        statistics.fmean(speedup.reached_at(runs[(baseline, s)], t, c) for s, t in targets.items())
        if targets
        else math.nan
        for c in speedup.costs
    ]
    for row in suite.rows:
        if row.get("at") == "start":
            continue
        seeds = [s for s in targets if (row_key(row), s) in runs]
        reached = [[speedup.reached_at(runs[(row_key(row), s)], targets[s], c) for s in seeds]
                   for c in speedup.costs]  # fmt: skip
        costs = [statistics.fmean(r) if r and all(math.isfinite(v) for v in r) else math.nan for r in reached]
        hits = sum(math.isfinite(v) for v in reached[0]) if reached else 0
        cells = [f"{c:.3g}" if math.isfinite(c) else "not reached" for c in costs]
        ratios = [
            f"{b / c:.2f}x" if math.isfinite(c) and c > 0 else "—" for b, c in zip(baseline_costs, costs)
        ]
        lines.append("| " + " | ".join([row["label"], *cells, *ratios, f"{hits}/{len(seeds)}"]) + " |")
    target = statistics.fmean(targets.values()) if targets else math.nan
    return (
        f"Target: {speedup.baseline}'s {'best' if speedup.target == 'max' else 'final'} `{speedup.key}` in the same "
        f"seed (mean {target:.3f}).\n\n" + "\n".join(lines)
    )


def seeds_found(suite: Suite, runs: dict) -> list[int]:
    """The suite's seeds that have a run: a partial pass (``--seeds 0``) reports what it measured."""
    return [
        s for s in suite.seeds if any((row_key(row), s) in runs for row in suite.rows if "runs" not in row)
    ]


def definition(suite: Suite) -> str:
    """The suite's file, its command and each row's overrides: what a reader needs to rerun one row."""
    command = " ".join(["python -m g2rpo.run <row> seed=<seed>", *suite.overrides])
    shared = f", in the run directories of {suite.runs}" if suite.runs else ""
    prepared = "".join(f"`python -m {' '.join(step)}`, then " for step in suite.prepare)
    lines = [
        f"Suite `experiments/suites/{suite.name}.yaml`: `python -m experiments.reproduce {suite.name}` runs "
        f"{prepared}each row as `{command}`{shared}, where `<row>` is:",
        "",
    ]
    for row in suite.rows:
        overrides = f"`{' '.join(row['overrides'])}`" if row["overrides"] else "no overrides"
        if row.get("at") == "start":
            overrides = f"the first evaluation of {overrides}"
        lines.append(
            f"- {row['label']}: {overrides}" + (f" (runs of {row['runs']})" if "runs" in row else "")
        )
    return "\n".join(lines)


def page(suite: Suite, results: str, seeds: list[int]) -> str:
    """The suite's results page: what it replays, its row definitions, the tables and the curves."""
    return "\n".join(
        [
            f"**{suite.title}**",
            "",
            suite.description.strip(),
            "",
            definition(suite),
            "",
            results,
            "",
            f"Mean ± std over seeds {seeds}.",
            "",
            f"![{suite.title}]({suite.name}.png)",
            "",
        ]
    )


def report(suite: Suite, runs: dict) -> str:
    """Write ``experiments/results/<suite>.md`` and ``.png``; returns the page."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(suite, runs, RESULTS / f"{suite.name}.png")
    results = "\n\n".join([table(suite, runs), *(speedup_table(suite, runs, s) for s in suite.speedups)])
    body = page(suite, results, seeds_found(suite, runs))
    (RESULTS / f"{suite.name}.md").write_text(body)
    return body


def index(suites: list[Suite]) -> str:
    """``experiments/results/README.md``: each suite's page, with its one-line summary."""
    lines = [
        "# Results",
        "",
        "Each page is written by `python -m experiments.reproduce SUITE` from the runs of",
        "`experiments/suites/SUITE.yaml` (this index by every call; `--index-only` writes just it).",
        "",
    ]
    lines += [
        "Two pages come from `python -m experiments.plans` (`make plans`), plans on fake weights rather than runs:",
        "[every paper preset, planned](plans.md) (per-GPU memory, fit, TFLOP, time and GPU-hours) and",
        "[the planner against real executions](plan_validation.md) (docs/planning.md).",
        "",
    ]
    lines += [f"- [{s.title}]({s.name}.md)" + (f": {s.summary}" if s.summary else "") for s in suites]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suites", nargs="*", help="suite names (default: every experiments/suites/*.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--collect-only", action="store_true", help="only rebuild tables from existing runs")
    mode.add_argument("--index-only", action="store_true", help="only rewrite experiments/results/README.md")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="run and report only these seeds (default: the suite's own)"
    )
    parser.add_argument(
        "--launcher-args", nargs="*", default=[], help="extra Hydra overrides, e.g. a launcher"
    )
    args = parser.parse_args(argv)
    suites = {p.stem: Suite.load(p) for p in sorted(SUITES.glob("*.yaml"))}
    if unknown := set(args.suites) - set(suites):
        parser.error(f"no suite {', '.join(sorted(unknown))}; choose from {', '.join(suites)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "README.md").write_text(index(list(suites.values())))
    print("wrote experiments/results/README.md")
    if args.index_only:
        return
    for name in args.suites or suites:
        suite = suites[name]
        if args.seeds:
            suite = dataclasses.replace(suite, seeds=args.seeds)
        if not args.collect_only:
            run(suite, args.launcher_args)
        print(report(suite, collect(suite)))
        print(f"wrote experiments/results/{name}.md, .png")


if __name__ == "__main__":
    main()
