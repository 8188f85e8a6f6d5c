"""A run's plan: its iteration executed on fake weights (:mod:`g2rpo.plan.execute`), turned into per-rank
memory, FLOPs, time on named GPUs and a verdict, with the levers that make a misfit fit.

Per-rank memory. The execution is one rank's share of the iteration (its whole groups) on one process, so
it holds every weight. Under ``trainer=fsdp`` the transformer(s) being trained (and a full-fine-tuning
reference copy) are sharded, one FSDP unit per block (``TransformerPolicy.shard``), over the devices of a
node (across nodes FSDP2 replicates: HSDP): their weights, gradients, optimiser state and weight averages
count ``1 / devices`` per rank, plus what FSDP2 holds unsharded while computing: the root's parameters,
two blocks' (the one computing and the one prefetched) and, in training, one block's unreduced gradients.
``module.fsdp_cpu_offload`` moves the sharded part to host memory. Text encoders, the VAE and reward
models stay whole on every rank, as in a run.

Time. An iteration's phases run one after another; each is priced at ``FLOPs / (peak dense bf16 x mfu)``.
Every denoiser forward here processes over a thousand tokens, far above the roofline's ridge (about 300
FLOP per byte on an H100), so the estimate is compute-bound by construction; ``mfu`` is the one stated
assumption (0.35 by default, a typical figure for bf16 transformer training on H100s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from omegaconf import DictConfig

from g2rpo.plan.execute import Execution, Parts, build, devices_per_node, execute, parameter_counts
from g2rpo.plan.gpus import GPU, GPUS

SHARDED = {
    "frozen weights: transformer",
    "trained weights: transformer",
    "reference copy",
    "EMA",
    "optimizer state",
    "algorithm state",
    "gradients",
}
KINDS = {"gradients": "gradients", "optimizer state": "optimizer state", "activations": "activations"}


def kind(label: str) -> str:
    """The four parts the plan reports: weights (with copies and averages), gradients, optimiser state,
    activations (with the rollout's buffers and every temporary)."""
    return KINDS.get(label, "weights")


@dataclass
class Sharding:
    fsdp: bool
    degree: int  # ranks a sharded tensor is split over (devices per node)
    offload: bool
    root_bytes: int = 0
    block_bytes: int = 0
    block_grad_bytes: int = 0

    def describe(self) -> str:
        if not self.fsdp:
            return "replicated (every rank holds every weight)"
        return f"FSDP2 over {self.degree} devices per node{' with CPU offload' if self.offload else ''}"


def sharding(cfg: DictConfig, parts: Parts, gpus_per_node: int) -> Sharding:
    strategy = cfg.trainer.get("strategy")
    fsdp = isinstance(strategy, DictConfig) and "ModelParallelStrategy" in str(strategy.get("_target_", ""))
    degree = devices_per_node(cfg.trainer, gpus_per_node)
    result = Sharding(fsdp, degree if fsdp else 1, bool(cfg.module.get("fsdp_cpu_offload")) and fsdp)
    policy = parts.policy
    blocks = [
        block
        for name in getattr(policy, "block_lists", ())
        for block in getattr(getattr(policy, "trained", policy), name, [])
    ]
    if fsdp and blocks:

        def nbytes(params) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        result.root_bytes = nbytes(p for p in policy.trained.parameters() if id(p) not in in_blocks)
        result.block_bytes = max(nbytes(block.parameters()) for block in blocks)
        result.block_grad_bytes = max(
            nbytes(p for p in block.parameters() if p.requires_grad) for block in blocks
        )
    return result


def per_rank(breakdown: dict[str, int], shards: Sharding, training: bool) -> dict[str, int]:
    """A phase's peak on one rank, by label (see the module docstring)."""
    out: dict[str, int] = {}
    for label, size in breakdown.items():
        if shards.fsdp and label in SHARDED:
            size = 0 if shards.offload else size // shards.degree
        out[label] = out.get(label, 0) + size
    if shards.fsdp and shards.block_bytes:
        out["FSDP unsharded units"] = (
            shards.root_bytes + 2 * shards.block_bytes + (shards.block_grad_bytes if training else 0)
        )
    return out


def summarise(
    cfg: DictConfig, parts: Parts, run: Execution, gpu: GPU, mfu: float, gpus_per_node: int
) -> dict:
    meter = run.meter
    shards = sharding(cfg, parts, gpus_per_node)
    phases = {}
    for name in meter.peaks:
        if not name:
            continue
        detail = per_rank(meter.breakdown(name), shards, training=name == "training")
        by_kind: dict[str, int] = {}
        for label, size in detail.items():
            by_kind[kind(label)] = by_kind.get(kind(label), 0) + size
        phases[name] = {"peak_bytes": sum(detail.values()), "by_kind": by_kind, "detail": detail}
    worst = max(phases, key=lambda name: phases[name]["peak_bytes"])
    flops_total = sum(run.flops.values())
    iterations = int(cfg.trainer.get("max_epochs", 1))
    timing = {}
    for candidate in GPUS.values():
        seconds = {name: flops / (candidate.bf16_tflops * 1e12 * mfu) for name, flops in run.flops.items()}
        per_iteration = sum(seconds.values())
        timing[candidate.name] = {
            "seconds_per_phase": seconds,
            "seconds_per_iteration": per_iteration,
            "gpu_hours": per_iteration * iterations * parts.world_size / 3600,
            "fits": phases[worst]["peak_bytes"] <= candidate.usable_bytes,
        }
    return {
        "world_size": parts.world_size,
        "strategy": shards.describe(),
        "per_rank": {
            "prompts": run.prompts,
            "images": run.images,
            "loss_units": run.units,
            "optimizer_steps": run.optimizer_steps,
        },
        "iterations": iterations,
        "parameters": parameter_counts(parts),
        "memory": {
            "peak_bytes": phases[worst]["peak_bytes"],
            "peak_phase": worst,
            "by_kind": phases[worst]["by_kind"],
            "detail": phases[worst]["detail"],
            "phases": phases,
            "measure": "bytes of live tensor storages (max_memory_allocated), per rank",
        },
        "flops": {
            "per_phase": dict(run.flops),
            "per_rank_iteration": flops_total,
            "iteration": flops_total * parts.world_size,
            "per_image": flops_total / max(run.images, 1),
        },
        "mfu": mfu,
        "time": timing,
        "gpu": gpu.name,
        "fits": timing[gpu.name]["fits"],
        "usable_bytes": gpu.usable_bytes,
        "rewards": dict(parts.reward.kinds),
        "replay": {"executed_forwards": run.replay.executed, "replayed_forwards": run.replay.replayed}
        if run.replay
        else None,
    }


def executed(
    cfg: DictConfig, gpus_per_node: int = 8, architecture: str | None = None, replayed: bool = True
) -> tuple[Parts, Execution]:
    """The run's parts on fake weights, and its iteration executed on them."""
    parts = build(cfg, gpus_per_node=gpus_per_node, architecture=architecture)
    return parts, execute(cfg, parts, replayed=replayed)


def plan_run(
    cfg: DictConfig,
    gpu: GPU,
    mfu: float = 0.35,
    gpus_per_node: int = 8,
    architecture: str | None = None,
    replayed: bool = True,
) -> dict:
    """Build the run of ``cfg`` on fake weights, execute one iteration and summarise it."""
    started = time.perf_counter()
    parts, run = executed(cfg, gpus_per_node, architecture, replayed)
    summary = summarise(cfg, parts, run, gpu, mfu, gpus_per_node)
    summary["plan_seconds"] = time.perf_counter() - started
    return summary
