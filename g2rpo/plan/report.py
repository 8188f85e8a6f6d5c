"""A plan as text: what ``python -m g2rpo.plan`` prints (the JSON it writes holds every figure)."""

from __future__ import annotations

GiB = 2**30


def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def _count(value: int) -> str:
    return f"{value / 1e9:.2f} B" if value >= 1e8 else f"{value / 1e6:.1f} M"


def render(summary: dict) -> str:
    memory, flops, share = summary["memory"], summary["flops"], summary["per_rank"]
    gpu = summary["gpu"]
    lines = [
        f"plan of {' '.join(summary.get('overrides', [])) or 'the default run'}",
        f"  {summary['world_size']} ranks, {summary['strategy']}; per rank and iteration: {share['prompts']} "
        f"prompts, {share['images']} scored images, {share['loss_units']} loss units, "
        f"{share['optimizer_steps']} optimiser steps; {summary['iterations']} iterations",
        "parameters (total / trainable)",
    ]
    for name, counts in summary["parameters"].items():
        lines.append(f"  {name:<24} {_count(counts['total']):>9} / {_count(counts['trainable'])}")
    kinds = ", ".join(f"{kind} {_gib(size)}" for kind, size in memory["by_kind"].items())
    verdict = "fits" if summary["fits"] else "DOES NOT FIT"
    lines += [
        f"peak memory per rank: {_gib(memory['peak_bytes'])} in {memory['peak_phase']} ({kinds})",
        f"  {verdict} on {gpu} ({_gib(summary['usable_bytes'])} usable)",
        "  by phase: " + ", ".join(f"{name} {_gib(p['peak_bytes'])}" for name, p in memory["phases"].items()),
        "FLOPs per rank and iteration: "
        + ", ".join(f"{name} {value / 1e12:,.1f} T" for name, value in flops["per_phase"].items())
        + f"; {flops['per_image'] / 1e12:,.2f} TFLOP per scored image; {flops['iteration'] / 1e15:,.2f} PFLOP per"
        " iteration (all ranks)",
        f"time per iteration at MFU {summary['mfu']:.2f} (compute-bound), GPU-hours for {summary['iterations']} iterations:",
    ]
    for name, timing in summary["time"].items():
        phases = ", ".join(f"{p} {s:.1f}" for p, s in timing["seconds_per_phase"].items() if s)
        lines.append(
            f"  {name:<10} {timing['seconds_per_iteration']:8.1f} s ({phases})  {timing['gpu_hours']:9.1f} GPU-h"
            f"  {'fits' if timing['fits'] else 'does not fit'}"
        )
    lines.append("rewards: " + "; ".join(f"{name}: {kind}" for name, kind in summary["rewards"].items()))
    for lever in summary.get("levers", []):
        lines.append(
            f"  lever {lever['lever']:<34} {lever['overrides']:<52} {_gib(lever['peak_bytes']):>10} "
            f"{'fits' if lever['fits'] else 'does not fit'}, {lever['seconds_per_iteration']:.1f} s/iteration"
        )
    if summary.get("plan_seconds") is not None:
        lines.append(f"planned in {summary['plan_seconds']:.0f} s on this machine")
    return "\n".join(lines)
