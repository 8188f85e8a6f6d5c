"""The first minutes on a GPU: every algorithm trains 2 iterations of an SD3.5-Medium-sized model, checked.

    python -m experiments.gpu_check [--algos flow_grpo dgpo ...] [--out experiments/results/gpu_check.md]
    make gpu-check

Per algorithm: ``model=sd35_medium_random`` (SD3.5-M's transformer and VAE with random weights, no
download) at 512 px, LoRA, bf16 (``trainer=gpu``), groups of 24, 2 iterations through ``g2rpo.run.train``.
Checked: every logged loss is finite, the trainable weights changed (a callback compares them before and
after), and the log-probabilities recomputed before the first update match the rollout's
(``train/logprob_gap_before_update`` under ``module.logprob_tolerance``: the ratio is 1 on-policy).
Printed: images per second of each phase (the second iteration), peak CUDA memory, and the planner's
estimate of both for the same run (``g2rpo.plan``). Without a CUDA device it says so and exits 0. About 8
minutes on one H100 or H200. Pair-GRPO needs a Janus-Pro policy and is not in the list.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

import g2rpo.config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ["flow_grpo", "dance_grpo", "mix_grpo", "g2rpo", "dgpo"]
#: torch.cuda.get_device_name() fragments -> the planner's GPU table
GPU_NAMES = {"H100": "H100-SXM", "H200": "H200", "A100": "A100-80GB", "B200": "B200"}


class WeightsChanged(L.Callback):
    """Records the largest change of any trainable weight between the start and the end of fitting."""

    largest_change: float | None = None

    def on_fit_start(self, trainer, module) -> None:
        self.initial = [p.detach().float().clone() for p in module.policy.trainable_parameters()]

    def on_fit_end(self, trainer, module) -> None:
        changes = [
            (p.detach().float() - p0).abs().max().item()
            for p, p0 in zip(module.policy.trainable_parameters(), self.initial)
        ]
        WeightsChanged.largest_change = max(changes, default=0.0)


def overrides(algo: str, run_dir: Path) -> list[str]:
    return [
        f"algo={algo}",
        "model=sd35_medium_random",
        "model.resolution=512",
        "trainer=gpu",
        "trainer.max_epochs=2",
        "curriculum.group_size=24",
        "curriculum.prompts_per_iteration=1",
        "reward=jpeg_compressibility",
        "data=animals",
        "logger=none",
        "callbacks.evaluate=null",
        "trainer.enable_progress_bar=false",
        "ckpt_path=null",
        f"run_dir={run_dir}",
        "run_name=gpu_check",
        "+callbacks.weights_changed._target_=experiments.gpu_check.WeightsChanged",
    ]


def check(algo: str, workdir: Path, gpu_name: str) -> dict:
    from g2rpo.loggers import read_metrics
    from g2rpo.plan.gpus import gpu
    from g2rpo.plan.planner import plan_run
    from g2rpo.run import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides(algo, workdir / algo))
    plan = plan_run(cfg, gpu(gpu_name))
    torch.cuda.reset_peak_memory_stats()
    WeightsChanged.largest_change = None
    train(cfg)
    peak = torch.cuda.max_memory_allocated()
    records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    last = records[-1]
    losses = {key: r[key] for r in records for key in r if key.startswith("train/") and "loss" in key}
    gap = max((r.get("train/logprob_gap_before_update", 0.0) for r in records), default=0.0)
    images = plan["per_rank"]["images"]
    measured = {
        phase: images / last[f"time/{phase}_s"]
        for phase in ("rollout", "reward", "train")
        if last.get(f"time/{phase}_s")
    }
    planned_seconds = plan["time"][gpu_name]["seconds_per_phase"]
    return {
        "algo": algo,
        "finite_losses": all(math.isfinite(v) for v in losses.values()) and bool(losses),
        "weights_changed": (WeightsChanged.largest_change or 0.0) > 0,
        "logprob_gap": gap,
        "gap_ok": gap <= cfg.module.logprob_tolerance,
        "images_per_s": measured,
        "planned_images_per_s": {
            "rollout": images / planned_seconds["rollout"] if planned_seconds.get("rollout") else None,
            "train": images / planned_seconds["training"] if planned_seconds.get("training") else None,
        },
        "peak_gib": peak / 2**30,
        "planned_peak_gib": plan["memory"]["peak_bytes"] / 2**30,
    }


def _pair(result: dict, phase: str) -> str:
    got, planned = result["images_per_s"].get(phase), result["planned_images_per_s"].get(phase)
    return f"{got:.2f} ({planned:.2f})" if got and planned else (f"{got:.2f}" if got else "-")


def table(results: list[dict], device: str) -> str:
    rows = [
        f"GPU check on {device}, torch {torch.__version__}: 2 iterations per algorithm, SD3.5-M-sized random model, "
        "512 px, LoRA, bf16, G = 24. Planned: `g2rpo.plan` at MFU 0.35.\n",
        "| algo | finite losses | weights changed | logprob gap | rollout img/s (planned) | train img/s (planned) "
        "| reward img/s | peak CUDA GiB (planned) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['algo']} | {r['finite_losses']} | {r['weights_changed']} | {r['logprob_gap']:.1e} "
            f"| {_pair(r, 'rollout')} | {_pair(r, 'train')} | {r['images_per_s'].get('reward', 0):.1f} "
            f"| {r['peak_gib']:.1f} ({r['planned_peak_gib']:.1f}) |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algos", nargs="*", default=ALGOS)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpu_check.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; skipped (nothing was run)")
        return 0
    device = torch.cuda.get_device_name()
    gpu_name = next((plan for key, plan in GPU_NAMES.items() if key in device), "H100-SXM")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for algo in args.algos:
            results.append(check(algo, Path(workdir), gpu_name))
            print(results[-1], flush=True)
    text = table(results, device)
    print(text)
    args.out.write_text("# GPU check\n\n" + text)
    failed = [r["algo"] for r in results if not (r["finite_losses"] and r["weights_changed"] and r["gap_ok"])]
    if failed:
        print(f"gpu-check FAILED for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
