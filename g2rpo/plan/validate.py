"""The plan against the same iteration executed for real, on CPU with real tensors.

Planned: the iteration on fake weights (:func:`~g2rpo.plan.execute.execute`), FLOPs and the peak of live
storages. Executed: the same parts built with real (random) weights and the same iteration run on them.
Its FLOPs are counted by the same formulas on the operators that really ran; its memory is what PyTorch's
CPU allocator handed out, as the profiler records it (``profile_memory=True``: each operator's net
allocation and every free outside operators, in time order), i.e. the CPU analogue of CUDA's
``max_memory_allocated``, measured independently of the plan's meter. Both start from the same weights,
whose bytes are counted once for both.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile

from g2rpo.plan.execute import build, execute


def _state_bytes(parts) -> int:
    seen, total = set(), 0
    modules = [parts.policy, *(reward.model for reward in parts.reward.models.values() if reward.on_gpu)]
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            if id(storage) not in seen:
                seen.add(id(storage))
                total += storage.nbytes()
    return total


def allocator_peak(events) -> int:
    """Peak of the allocator's live bytes over a profile, relative to its start."""
    deltas = [
        (
            event.time_range.start,
            event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage,
        )
        for event in events
    ]
    current = peak = 0
    for _, delta in sorted(d for d in deltas if d[1]):
        current += delta
        peak = max(peak, current)
    return peak


def compare(cfg: DictConfig, replayed: bool = True) -> dict:
    """Planned vs executed FLOPs and peak memory of one iteration of ``cfg`` (one process)."""
    started = time.perf_counter()
    planned_parts = build(cfg)
    planned = execute(cfg, planned_parts, replayed=replayed)
    plan_seconds = time.perf_counter() - started

    torch.manual_seed(cfg.seed)
    real_parts = build(cfg, real=True)
    weights = _state_bytes(real_parts)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        executed = execute(cfg, real_parts, replayed=False)
    run_seconds = time.perf_counter() - started
    executed_peak = weights + allocator_peak(profiler.events())
    return {
        "planned_flops": sum(planned.flops.values()),
        "executed_flops": sum(executed.flops.values()),
        "planned_flops_per_phase": dict(planned.flops),
        "executed_flops_per_phase": dict(executed.flops),
        "planned_peak_bytes": planned.meter.peak.bytes,
        "executed_peak_bytes": executed_peak,
        "memory_ratio": planned.meter.peak.bytes / executed_peak,
        # the same, above the weights (which both count alike): how well the iteration's own memory is planned
        "iteration_memory_ratio": (planned.meter.peak.bytes - weights) / max(executed_peak - weights, 1),
        "weights_bytes": weights,
        "plan_seconds": plan_seconds,
        "execution_seconds": run_seconds,
    }
