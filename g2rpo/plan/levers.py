"""The levers that make a run fit, each re-planned: what a user of this field tries after an OOM.

Executed again (they change what runs): gradient checkpointing, LoRA instead of full fine-tuning (the
model's own LoRA config), half the sampling / training micro-batch, no T5 (SD3), CFG-free rollouts.
Priced on the same execution (they change only where tensors live): FSDP over the devices of a node, and
FSDP with the shards offloaded to host memory.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from g2rpo.plan.gpus import GPU
from g2rpo.plan.planner import executed, plan_run, summarise

CONF = Path(__file__).resolve().parents[2] / "conf"
#: the model config whose LoRA a full fine-tuning lever takes, by shipped architecture
LORA_FROM = {"g2rpo.policies.FluxPolicy": "flux_dev", "g2rpo.policies.SD3Policy": "sd35_medium"}
FSDP = {
    "_target_": "lightning.pytorch.strategies.ModelParallelStrategy",
    "save_distributed_checkpoint": False,
}


@dataclass
class Lever:
    name: str
    overrides: str
    change: Callable[[DictConfig], None]
    executed: bool = True


def _set(**values) -> Callable[[DictConfig], None]:
    def change(cfg: DictConfig) -> None:
        with open_dict(cfg):
            for dotted, value in values.items():
                OmegaConf.update(cfg, dotted, value, force_add=True)

    return change


def candidates(cfg: DictConfig) -> list[Lever]:
    model, algo = cfg.model, cfg.algo
    levers = []
    if model.get("gradient_checkpointing") is False:
        levers.append(
            Lever(
                "gradient checkpointing",
                "model.gradient_checkpointing=true",
                _set(**{"model.gradient_checkpointing": True}),
            )
        )
    if "lora" in model and model.lora is None and model.get("_target_") in LORA_FROM:
        source = LORA_FROM[model._target_]
        lora = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{source}.yaml").lora)
        levers.append(
            Lever(
                "LoRA instead of full fine-tuning",
                f"model.lora=<conf/model/{source}.yaml's lora>",
                _set(**{"model.lora": lora}),
            )
        )
    batch = algo.get("rollout_batch_size")
    if batch and batch > 1:
        levers.append(
            Lever(
                "half the micro-batch",
                f"algo.rollout_batch_size={batch // 2}",
                _set(**{"algo.rollout_batch_size": batch // 2}),
            )
        )
    pipeline = model.get("pipeline") or {}
    if pipeline.get("text_encoder_3") is True:
        levers.append(
            Lever(
                "no T5 (the pipeline feeds zeros)",
                "model.pipeline.text_encoder_3=false",
                _set(**{"model.pipeline.text_encoder_3": False}),
            )
        )
    if (algo.get("guidance_scale") or 1.0) > 1.0:
        levers.append(
            Lever("CFG-free rollouts", "algo.guidance_scale=1", _set(**{"algo.guidance_scale": 1.0}))
        )
    strategy = cfg.trainer.get("strategy")
    fsdp = isinstance(strategy, DictConfig) and "ModelParallelStrategy" in str(strategy.get("_target_", ""))
    if not fsdp:
        levers.append(
            Lever(
                "FSDP over the node's devices",
                "trainer=fsdp",
                _set(**{"trainer.strategy": FSDP}),
                executed=False,
            )
        )
    if not cfg.module.get("fsdp_cpu_offload"):
        levers.append(
            Lever(
                "FSDP with CPU offload",
                "trainer=fsdp module.fsdp_cpu_offload=true",
                _set(**{"trainer.strategy": FSDP, "module.fsdp_cpu_offload": True}),
                executed=False,
            )
        )
    return levers


def with_levers(
    cfg: DictConfig,
    gpu: GPU,
    mfu: float = 0.35,
    gpus_per_node: int = 8,
    architecture: str | None = None,
    replayed: bool = True,
    levers: bool = True,
) -> dict:
    """The plan of ``cfg``; for a misfit (and ``levers``), each lever's plan beside it."""
    started = time.perf_counter()
    parts, run = executed(cfg, gpus_per_node, architecture, replayed)
    summary = summarise(cfg, parts, run, gpu, mfu, gpus_per_node)
    summary["levers"] = []
    summary["plan_seconds"] = time.perf_counter() - started
    if summary["fits"] or not levers:
        return summary
    for lever in candidates(cfg):
        changed = copy.deepcopy(cfg)
        lever.change(changed)
        if lever.executed:
            result = plan_run(changed, gpu, mfu, gpus_per_node, architecture, replayed)
        else:
            result = summarise(changed, parts, run, gpu, mfu, gpus_per_node)
        summary["levers"].append(
            {
                "lever": lever.name,
                "overrides": lever.overrides,
                "peak_bytes": result["memory"]["peak_bytes"],
                "peak_phase": result["memory"]["peak_phase"],
                "fits": result["fits"],
                "seconds_per_iteration": result["time"][gpu.name]["seconds_per_iteration"],
            }
        )
    summary["levers_seconds"] = time.perf_counter() - started - summary["plan_seconds"]
    return summary
