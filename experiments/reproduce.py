"""Run experiment suites and turn their ``metrics.jsonl`` into markdown tables and PNG curves.

    python -m experiments.reproduce [SUITE ...] [--seeds 0 1] [--collect-only] [--launcher-args hydra/launcher=joblib]

A suite (``experiments/suites/<name>.yaml``) names experiment configs (``conf/experiment/*.yaml``, one
table row each), seeds, the columns to summarise and the curve to plot. Runs go through Hydra's
``--multirun`` (so any Hydra launcher can run them: local, joblib, submitit/SLURM) into
``outputs/reproduce/<suite>/<overrides>``; run directories are deterministic, so re-running a suite
resumes unfinished runs and skips finished ones. Results: ``experiments/results/<suite>.md`` and
``.png``, and the README block between ``<!-- results:<suite>:start -->`` and ``<!-- ...:end -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from g2rpo.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "experiments" / "suites"
RESULTS = ROOT / "experiments" / "results"
REDUCERS = ("first", "first_mean", "last", "max", "mean_last", "sum")


@dataclass
class Column:
    key: str  # a metrics.jsonl key
    label: str
    reduce: str = (
        "last"  # first | last | max | sum | first_mean / mean_last (mean of the first / last `window`)
    )
    window: int = 5
    format: str = ".3f"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCERS:
            raise ValueError(
                f"column {self.label!r}: reduce={self.reduce!r}; choose one of {', '.join(REDUCERS)}"
            )

    def summarise(self, records: list[dict]) -> float:
        values = [r[self.key] for r in records if self.key in r and math.isfinite(r[self.key])]
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
    x: str = "step"  # "step", or a metrics key accumulated over steps (e.g. time/iteration_s, nfe/rollout)
    label: str = ""
    x_label: str = ""


@dataclass
class Suite:
    name: str
    title: str
    rows: list[dict]  # {experiment: <conf/experiment name>, label: <row label>[, at: start]}
    seeds: list[int]
    columns: list[Column]
    curve: Curve = field(default_factory=Curve)
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    runs: str = ""  # another suite's run directory to share (same overrides), e.g. an ablation of its rows

    @classmethod
    def load(cls, path: Path) -> Suite:
        spec = yaml.safe_load(path.read_text())
        spec["columns"] = [Column(**c) for c in spec["columns"]]
        spec["curve"] = Curve(**spec.get("curve", {}))
        return cls(name=path.stem, **spec)

    @property
    def output_dir(self) -> Path:
        return ROOT / "outputs" / "reproduce" / (self.runs or self.name)


def run(suite: Suite, launcher_args: list[str]) -> None:
    """All rows x seeds as one Hydra multirun; finished runs resume to their end at once."""
    experiments = ",".join(dict.fromkeys(row["experiment"] for row in suite.rows))
    seeds = ",".join(str(s) for s in suite.seeds)
    command = [
        sys.executable,
        "-m",
        "g2rpo.run",
        "--multirun",
        f"experiment={experiments}",
        f"seed={seeds}",
        f"hydra.sweep.dir={suite.output_dir}",
        "trainer.enable_progress_bar=false",
        *suite.overrides,
        *launcher_args,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def collect(suite: Suite) -> dict[tuple[str, int], list[dict]]:
    """``(experiment, seed) -> metrics records`` for every finished run directory of the suite."""
    runs = {}
    for overrides_file in sorted(suite.output_dir.glob("*/.hydra/hydra.yaml")):
        run_dir = overrides_file.parent.parent
        hydra_cfg = yaml.safe_load(overrides_file.read_text())["hydra"]
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            runs[(hydra_cfg["runtime"]["choices"]["experiment"], config["seed"])] = read_metrics(metrics)
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
        per_seed = [runs[(row["experiment"], s)] for s in suite.seeds if (row["experiment"], s) in runs]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for row in suite.rows:
        curves = []
        for seed in suite.seeds:
            records = runs.get((row["experiment"], seed))
            if records:
                y = [r.get(suite.curve.key, math.nan) for r in records]
                x = (
                    [r["step"] for r in records]
                    if suite.curve.x == "step"
                    else np.cumsum([r.get(suite.curve.x, 0.0) for r in records]).tolist()
                )
                curves.append((x, y))
        if not curves:
            continue
        length = min(len(x) for x, _ in curves)
        x = np.mean([c[0][:length] for c in curves], axis=0)
        y = np.array([c[1][:length] for c in curves])
        mean, std = np.nanmean(y, axis=0), np.nanstd(y, axis=0)
        axis.plot(x, mean, label=f"{row['label']} (n={len(curves)})")
        axis.fill_between(x, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel(suite.curve.x_label or suite.curve.x)
    axis.set_ylabel(suite.curve.label or suite.curve.key)
    axis.set_title(suite.title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def seeds_found(suite: Suite, runs: dict) -> list[int]:
    """The suite's seeds that have a run: a partial pass (``--seeds 0``) reports what it measured."""
    return [s for s in suite.seeds if any((row["experiment"], s) in runs for row in suite.rows)]


def report(suite: Suite, runs: dict) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(suite, runs, RESULTS / f"{suite.name}.png")
    overrides = " ".join(suite.overrides)
    command = f"python -m experiments.reproduce {suite.name}"
    body = "\n".join(
        [
            f"**{suite.title}**",
            "",
            suite.description.strip(),
            "",
            table(suite, runs),
            "",
            f"Mean ± std over seeds {seeds_found(suite, runs)}. Command: `{command}`"
            + (f" (runs with `{overrides}`)" if overrides else "")
            + ".",
            "",
            f"![{suite.title}](experiments/results/{suite.name}.png)",
        ]
    )
    (RESULTS / f"{suite.name}.md").write_text(body.replace("](experiments/results/", "](") + "\n")
    return body


def update_readme(name: str, body: str, readme: Path = ROOT / "README.md") -> bool:
    """Replace the README block between this suite's markers; False if the README has no such block."""
    start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suites", nargs="*", help="suite names (default: every experiments/suites/*.yaml)")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild tables from existing runs")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="run and report only these seeds (default: the suite's own)"
    )
    parser.add_argument(
        "--launcher-args", nargs="*", default=[], help="extra Hydra overrides, e.g. a launcher"
    )
    args = parser.parse_args(argv)
    names = args.suites or sorted(p.stem for p in SUITES.glob("*.yaml"))
    for name in names:
        suite = Suite.load(SUITES / f"{name}.yaml")
        if args.seeds:
            suite = dataclasses.replace(suite, seeds=args.seeds)
        if not args.collect_only:
            run(suite, args.launcher_args)
        body = report(suite, collect(suite))
        print(body)
        where = "README.md and " if update_readme(name, body) else ""
        print(f"wrote {where}experiments/results/{name}.md, .png")


if __name__ == "__main__":
    main()
