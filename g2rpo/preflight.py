"""Before a real model is built: stop within seconds, naming everything its run lacks.

A hub model (SD3.5, FLUX.1, Janus-Pro) trains only with its weights on disk, on a CUDA GPU, and on a reward
and prompts made for real images. Without this check the run would spend minutes loading 10-20 GB before
failing on the first missing piece, or worse, train SD3.5 on the 32x32 shapes world's reward on a CPU.
Everything missing is reported at once, with the command that fixes each, and, when the GPU is what is
missing, the plan's estimate of the run on this machine (``g2rpo.plan``: one iteration on fake weights,
priced at this CPU's measured matmul throughput).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

#: the loaders of hub weights, and the node that holds their ``path``
HUB_LOADERS = {
    "g2rpo.policies.load_sd3_pipeline": "pipeline",
    "g2rpo.policies.sd3.load_sd3_pipeline": "pipeline",
    "g2rpo.policies.load_flux_pipeline": "pipeline",
    "g2rpo.policies.flux.load_flux_pipeline": "pipeline",
    "g2rpo.policies.janus.load_janus": "janus",
}
#: a file every snapshot of the model has
INDEX_FILE = {"pipeline": "model_index.json", "janus": "config.json"}


class PreflightError(RuntimeError):
    """The run cannot start here; the message lists why and how to fix each."""


def hub_model(cfg: DictConfig) -> tuple[str, str] | None:
    """``(node, path)`` of the model's hub weights, or None for a model built in code (shapes, tiny)."""
    for node in ("pipeline", "janus"):
        part = cfg.model.get(node)
        if part is not None and HUB_LOADERS.get(part.get("_target_")) == node:
            return node, str(part.path)
    return None


def weights_present(node: str, path: str) -> bool:
    """A local directory, or a snapshot in the Hugging Face cache (never the network)."""
    if Path(path).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(path, INDEX_FILE[node]), str)


def _shapes_world(node: DictConfig | None) -> bool:
    return node is not None and "g2rpo.shapes" in str(node)


def problems(cfg: DictConfig) -> list[str]:
    """What a hub model's run lacks here (empty: it can start)."""
    model = hub_model(cfg)
    if model is None:
        return []
    node, path = model
    found = []
    if not weights_present(node, path):
        found.append(
            f"the weights of {path}: download them once with `hf download {path}` (accept the licence on the Hub "
            f"and `hf auth login` first), or set model.{node}.path to a local copy"
        )
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator == "cpu":
        found.append(
            "a GPU trainer: trainer=cpu runs in fp32 on the CPU; use trainer=gpu (bf16), ddp or fsdp"
        )
    elif not torch.cuda.is_available():
        found.append(f"a CUDA GPU: trainer.accelerator={accelerator} but torch finds no CUDA device here")
    if _shapes_world(cfg.reward.get("rewards")):
        found.append(
            "a reward for real images: this reward scores the 32x32 shapes world; e.g. reward=pickscore, "
            "reward=hps, reward=ocr, reward=geneval (docs/rewards.md)"
        )
    if _shapes_world(cfg.data):
        found.append(
            "real prompts: data=shapes is the shapes world's; e.g. data=animals or data=prompt_file data.path=..."
        )
    return found


def cpu_flops_per_second(size: int = 1024, repeats: int = 3) -> float:
    """This machine's float32 matmul throughput, measured (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def estimate_here(cfg: DictConfig) -> str:
    """The plan of this run, priced on this machine: seconds per iteration at its matmul throughput."""
    from g2rpo.plan.gpus import gpu
    from g2rpo.plan.planner import plan_run

    try:
        summary = plan_run(cfg, gpu("H100-SXM"))
    except Exception as error:  # the estimate is a courtesy: never hide the real problems behind it
        return f"(no plan: {type(error).__name__}: {error})"
    flops = summary["flops"]["per_rank_iteration"]
    here = flops / cpu_flops_per_second()
    h100 = summary["time"]["H100-SXM"]["seconds_per_iteration"]
    return (
        f"the plan of this run (python -m g2rpo.plan <the same overrides>): {flops / 1e12:,.0f} TFLOP and "
        f"{summary['memory']['peak_bytes'] / 2**30:.1f} GiB per rank and iteration: about {here / 3600:,.1f} hours "
        f"per iteration on this machine's {os.cpu_count()} CPU cores, {h100:.1f} s on an H100 "
        f"({'fits' if summary['fits'] else 'does not fit'} in its memory)"
    )


def check(cfg: DictConfig) -> None:
    """Raise :class:`PreflightError` listing everything a hub model's run lacks here."""
    found = problems(cfg)
    if not found:
        return
    lines = [f"model: {hub_model(cfg)[1]} cannot train here; it needs:"]
    lines += [f"  - {problem}" for problem in found]
    if any("GPU" in problem for problem in found):
        lines.append(f"  {estimate_here(cfg)}")
    raise PreflightError("\n".join(lines))
