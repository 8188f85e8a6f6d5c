"""Plan every paper preset, and validate the planner against real executions on CPU.

    python -m experiments.plans [--presets NAME ...] [--validation-only | --presets-only]

Writes ``experiments/results/plans.md`` (one row per ``conf/experiment/paper_*.yaml``: GPUs, per-GPU peak
memory, the verdict on an 80 GB H100, TFLOP per iteration, seconds per iteration and GPU-hours for the
preset's iterations, beside what the paper reports) with each plan's JSON in ``plans.json``, and
``experiments/results/plan_validation.md`` (planned vs executed FLOPs and peak memory). ``make plans``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import g2rpo.config  # noqa: F401
from g2rpo.plan.gpus import GPUS, gpu
from g2rpo.plan.levers import with_levers
from g2rpo.plan.validate import compare

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
GiB = 2**30
#: what the papers or their code report, where they give a figure (research briefs)
REPORTED = {
    "paper_dance_grpo_flux_hps": "200 it. in ~12 h on 16 H800 ≈ 190 GPU-h (DanceGRPO README)",
    "paper_dgpo_sd35_geneval": "~30× fewer A100-h than Flow-GRPO (Fig. 1; no figure in the text)",
    "paper_flow_grpo_sd35_geneval": "the baseline of DGPO's Fig. 1 (no figure in the text)",
}
#: CPU validation runs: (name, overrides). Small enough to execute for real on 2 cores.
VALIDATION = [
    ("shapes world, Flow-GRPO (make run's model)", []),
    ("tiny SD3, Flow-GRPO", ["model=tiny_sd3"]),
    ("tiny FLUX, G2RPO", ["model=tiny_flux", "algo=g2rpo", "algo.guidance_scale=1"]),
    ("tiny SD3, DGPO, bf16 autocast", ["model=tiny_sd3", "algo=dgpo", "trainer.precision=bf16-mixed"]),
    (
        "SD3.5-M width, 2 layers, 256 px, DGPO",
        [
            "model=sd35_medium_random",
            "model.pipeline.transformer.num_layers=2",
            "model.pipeline.transformer.dual_attention_layers=[0,1]",
            "model.resolution=256",
            "algo=dgpo",
            "curriculum.prompts_per_iteration=1",
            "curriculum.group_size=2",
            "algo.rollout_batch_size=2",
        ],
    ),
]


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def plan_presets(names: list[str]) -> list[dict]:
    plans = []
    for name in names:
        cfg = compose_run([f"experiment={name}"])
        started = time.perf_counter()
        try:
            summary = with_levers(cfg, gpu("H100-SXM"))
        except NotImplementedError as error:
            plans.append({"preset": name, "not_planned": str(error)})
            continue
        summary["preset"] = name
        summary["wall_seconds"] = time.perf_counter() - started
        plans.append(summary)
        print(
            f"{name}: {summary['memory']['peak_bytes'] / GiB:.1f} GiB, {summary['wall_seconds']:.0f} s",
            flush=True,
        )
    return plans


def presets_table(plans: list[dict]) -> str:
    h100 = GPUS["H100-SXM"]
    rows = [
        "| preset | GPUs | sharding | per-GPU peak | fits on H100 80 GB? | TFLOP / iteration | s / iteration (H100) "
        "| iterations | GPU-hours (H100) | reported | plan wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for plan in plans:
        if "not_planned" in plan:
            rows.append(f"| `{plan['preset']}` | | | | not planned: {plan['not_planned']} | | | | | | |")
            continue
        timing = plan["time"]["H100-SXM"]
        verdict = "yes" if timing["fits"] else "**no**"
        fitting = [lever for lever in plan["levers"] if lever["fits"]]
        if not timing["fits"] and fitting:
            verdict += f" (fits with `{fitting[0]['overrides']}`)"
        memory = plan["memory"]
        rows.append(
            f"| `{plan['preset']}` | {plan['world_size']} | {plan['strategy'].split(' (')[0]} "
            f"| {memory['peak_bytes'] / GiB:.1f} GiB ({memory['peak_phase']}) | {verdict} "
            f"| {plan['flops']['iteration'] / 1e12:,.0f} | {timing['seconds_per_iteration']:.1f} | {plan['iterations']} "
            f"| {timing['gpu_hours']:,.0f} | {REPORTED.get(plan['preset'], '')} | {plan['wall_seconds']:.0f} s |"
        )
    return "\n".join(rows) + (
        f"\n\nGPU-hours assume {h100.name} at MFU 0.35 (`plan.mfu`), compute-bound; 'fits' means a per-GPU peak of"
        f" at most 90% of {h100.memory_gib} GiB.\n"
    )


def validation_table(results: list[tuple[str, list[str], dict]]) -> str:
    rows = [
        "| run | overrides | planned FLOPs | executed FLOPs | planned peak | executed peak | planned / executed "
        "| the same above the weights | plan s | execution s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, overrides, r in results:
        rows.append(
            f"| {name} | `{' '.join(overrides) or '(defaults)'}` | {r['planned_flops']:,} | {r['executed_flops']:,} "
            f"| {r['planned_peak_bytes'] / 2**20:,.1f} MiB | {r['executed_peak_bytes'] / 2**20:,.1f} MiB "
            f"| {r['memory_ratio']:.4f} | {r['iteration_memory_ratio']:.4f} | {r['plan_seconds']:.1f} "
            f"| {r['execution_seconds']:.1f} |"
        )
    return "\n".join(rows) + "\n"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", nargs="*", help="preset names (default: every conf/experiment/paper_*.yaml)"
    )
    parser.add_argument("--validation-only", action="store_true")
    parser.add_argument("--presets-only", action="store_true")
    args = parser.parse_args()
    header = f"Generated by `python -m experiments.plans` on {date.today()} ({machine()}).\n\n"
    if not args.validation_only:
        names = args.presets or sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("paper_*.yaml"))
        plans = plan_presets(names)
        (RESULTS / "plans.json").write_text(json.dumps(plans, indent=1) + "\n")
        (RESULTS / "plans.md").write_text(
            "# Every paper preset, planned\n\n"
            + header
            + "`python -m g2rpo.plan experiment=<preset>` for each preset: one iteration executed on fake weights"
            " (docs/planning.md). Every figure of each plan is in `plans.json`.\n\n" + presets_table(plans)
        )
    if not args.presets_only:
        results = [(name, overrides, compare(compose_run(overrides))) for name, overrides in VALIDATION]
        (RESULTS / "plan_validation.md").write_text(
            "# The planner against real executions\n\n"
            + header
            + "Each run's iteration planned on fake weights and executed for real on this CPU (random weights)."
            " Executed FLOPs: the same formulas on the operators that ran; executed memory: the CPU allocator's"
            " peak as the profiler records it (`g2rpo/plan/validate.py`).\n\n" + validation_table(results)
        )


if __name__ == "__main__":
    main()
