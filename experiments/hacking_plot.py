"""Plot runs' reward-hacking signals from their ``metrics.jsonl``: per run (one row each), the trained reward,
gold rewards and image statistics per iteration, with the first iteration of any ``hacking/...`` flag marked.

    python -m experiments.hacking_plot RUN_DIR [RUN_DIR ...] --labels "..." [...] \\
        --gold gold/geneval_shapes/accuracy/mean --images images/edge_density \\
        --out docs/images/reward_hacking_shapes.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from g2rpo.loggers import read_metrics


def first_flags(records: list[dict]) -> dict[str, int]:
    """Each ``hacking/...`` flag (but ``hacking/warning``, their union) and the first iteration it was on."""
    first: dict[str, int] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("hacking/") and key != "hacking/warning" and value == 1:
                first.setdefault(key, int(record["step"]))
    return first


def plot(
    runs: list[Path], labels: list[str], reward: str, gold: list[str], images: list[str], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("trained reward", [reward]),
        ("gold rewards (not trained on)", gold),
        ("image statistics", images),
    ]
    figure, axes = plt.subplots(len(runs), len(panels), figsize=(13, 3.3 * len(runs)), dpi=72, squeeze=False)
    for row, (run, label) in enumerate(zip(runs, labels, strict=True)):
        records = [r for r in read_metrics(run / "metrics.jsonl") if reward in r]
        flags = first_flags(records)
        for axis, (name, keys) in zip(axes[row], panels):
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:  # a run logs no gold reward that it trains on
                    axis.plot(*zip(*points), marker=".", linewidth=1, label=key.split("/", 1)[1])
            if flags:
                first = min(flags.values())
                axis.axvline(
                    first, color="red", linestyle="--", linewidth=1, label=f"first warning ({first})"
                )
            axis.set_title(f"{label}: {name}" if axis is axes[row][0] else name, fontsize=9)
            axis.set_xlabel("iteration")
            axis.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--labels", nargs="+", required=True, help="one per run")
    parser.add_argument("--reward", default="reward/total/mean")
    parser.add_argument("--gold", nargs="+", default=[])
    parser.add_argument("--images", nargs="+", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    plot(args.runs, args.labels, args.reward, args.gold, args.images, args.out)
    for run in args.runs:
        records = read_metrics(run / "metrics.jsonl")
        for flag, iteration in sorted(first_flags(records).items(), key=lambda item: item[1]):
            print(f"{run}: {flag} first on at iteration {iteration}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
