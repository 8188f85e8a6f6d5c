"""Plot a progressive-schedule run (``experiment=progressive_shapes``) across its stage boundaries: the training
reward per iteration and the held-out GenEval-shapes scores at 32 px and at the stage's own resolution, with each
boundary marked; prints the figures around each boundary (the training reward just before and after the switch,
the held-out scores on both sides).

    python -m g2rpo.run experiment=progressive_shapes logger=none run_dir=outputs/progressive_shapes
    python -m experiments.progressive_plot outputs/progressive_shapes --out experiments/results/progressive.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from g2rpo.loggers import read_metrics

REWARD = "reward/total/mean"
SCORES = ("geneval_shapes/accuracy/overall", "geneval_shapes/partial/overall")


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key``, the last record of each step (a resume may repeat one)."""
    return sorted({int(r["step"]): r[key] for r in records if key in r}.items())


def boundaries(records: list[dict]) -> list[int]:
    """The iterations at which a new stage starts."""
    stages = series(records, "schedule/stage")
    return [step for (step, stage), (_, previous) in zip(stages[1:], stages) if stage != previous]


def eval_prefixes(records: list[dict]) -> list[str]:
    """``eval`` (the protocol's resolution) and every ``eval_<r>px`` logged."""
    found = {key.split("/", 1)[0] for r in records for key in r if key.startswith("eval")}
    return sorted(found, key=lambda prefix: (prefix != "eval", prefix))


def summary(records: list[dict]) -> str:
    rewards = dict(series(records, REWARD))
    lines = []
    for boundary in boundaries(records):
        before = [rewards[s] for s in range(boundary - 3, boundary) if s in rewards]
        after = [rewards[s] for s in range(boundary, boundary + 3) if s in rewards]
        lines.append(
            f"boundary at iteration {boundary}: training reward {sum(before) / len(before):.3f} (mean of the "
            f"{len(before)} before) -> {rewards.get(boundary, float('nan')):.3f} (the first after), "
            f"{sum(after) / len(after):.3f} (mean of the {len(after)} after)"
        )
    for prefix in eval_prefixes(records):
        for score in SCORES:
            points = series(records, f"{prefix}/{score}")
            lines.append(f"{prefix}/{score}: " + ", ".join(f"{step}: {value:.3f}" for step, value in points))
    return "\n".join(lines)


def plot(run: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run / "metrics.jsonl")
    figure, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=80)
    rewards = series(records, REWARD)
    axes[0].plot(
        *zip(*rewards), marker=".", linewidth=1, label="training reward (partial credit, own resolution)"
    )
    axes[0].set_title("training reward per iteration", fontsize=10)
    for prefix in eval_prefixes(records):
        where = "32 px (eval protocol)" if prefix == "eval" else prefix.removeprefix("eval_")
        for score, style in zip(SCORES, ("-", "--")):
            points = series(records, f"{prefix}/{score}")
            if points:
                label = f"{score.split('/')[1]} at {where}"
                axes[1].plot(*zip(*points), style, marker="o", linewidth=1, label=label)
    axes[1].set_title("held-out GenEval-shapes (overall)", fontsize=10)
    resolutions = dict(series(records, "schedule/resolution"))
    for axis in axes:
        for boundary in boundaries(records):
            switch = f"{resolutions.get(boundary - 1, 0):.0f} -> {resolutions.get(boundary, 0):.0f} px"
            axis.axvline(
                boundary, color="red", linestyle=":", linewidth=1, label=f"stage boundary ({switch})"
            )
        axis.set_xlabel("iteration")
        axis.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/progressive.png"))
    args = parser.parse_args()
    plot(args.run, args.out)
    print(summary(read_metrics(args.run / "metrics.jsonl")))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
