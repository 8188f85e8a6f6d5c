"""Before a real model is built: stop within seconds, naming everything its run lacks.

Every run first checks what no machine could train (:func:`config_problems`): an optimiser or scheduler
setting torch rejects, ``trainer=fsdp`` with CurES's varying group sizes. Those would otherwise fail after the
model has loaded, or mid-run. Its last check (:func:`server_problems`) asks every served reward's server
whether it is up: otherwise the first request would go out after the model load and the first rollout.

A hub model (SD3.5, FLUX.1, Qwen-Image, Janus-Pro) trains only with its weights on disk, on a CUDA GPU, and
on a reward and prompts made for real images. Without this check the run would spend minutes loading 10-60 GB
before failing on the first missing piece, or worse, train SD3.5 on the 32x32 shapes world's reward on a CPU.
Everything missing is reported at once, with the command that fixes each, and, when the GPU is what is
missing, the plan's estimate of the run on this machine (``g2rpo.plan``: one iteration on fake weights,
priced at this CPU's measured matmul throughput).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

#: the loaders of hub weights, and the node that holds their ``path``
HUB_LOADERS = {
    "g2rpo.policies.load_sd3_pipeline": "pipeline",
    "g2rpo.policies.sd3.load_sd3_pipeline": "pipeline",
    "g2rpo.policies.load_flux_pipeline": "pipeline",
    "g2rpo.policies.flux.load_flux_pipeline": "pipeline",
    "g2rpo.policies.load_flux_kontext_pipeline": "pipeline",
    "g2rpo.policies.flux.load_flux_kontext_pipeline": "pipeline",
    "g2rpo.policies.load_qwen_image_pipeline": "pipeline",
    "g2rpo.policies.qwen_image.load_qwen_image_pipeline": "pipeline",
    "g2rpo.policies.load_qwen_image_edit_pipeline": "pipeline",
    "g2rpo.policies.qwen_image.load_qwen_image_edit_pipeline": "pipeline",
    "g2rpo.policies.janus.load_janus": "janus",
    "g2rpo.policies.qwen_vl.load_qwen_vl": "qwen_vl",
}
#: a file every snapshot of the model has
INDEX_FILE = {"pipeline": "model_index.json", "janus": "config.json", "qwen_vl": "config.json"}


class PreflightError(RuntimeError):
    """The run cannot start here; the message lists why and how to fix each."""


def hub_model(cfg: DictConfig) -> tuple[str, str] | None:
    """``(node, path)`` of the model's hub weights, or None for a model built in code (shapes, tiny)."""
    for node in INDEX_FILE:
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


#: how torch's optimisers name a field in their ValueError, where the name is not the argument's own
TORCH_PHRASES = {"learning rate": "lr", "beta parameter": "betas", "betas": "betas", "epsilon": "eps"}
#: what a field of the default optimiser (AdamW) accepts
OPTIMIZER_VALUES = {
    "lr": "a learning rate >= 0, e.g. optimizer.lr=3e-4",
    "betas": "two coefficients in [0, 1), e.g. optimizer.betas=[0.9,0.999]",
    "eps": "a small value >= 0, e.g. optimizer.eps=1e-8",
    "weight_decay": "a value >= 0, e.g. optimizer.weight_decay=1e-4",
}


def _field_named(message: str, node: DictConfig) -> str | None:
    """The field of ``node`` that torch's error ``message`` is about: an argument it names (the longest first,
    so ``lr_decay`` before ``lr``), else one of :data:`TORCH_PHRASES`; None when it names none."""
    text = message.lower().replace("_", " ")
    for key in sorted((str(k) for k in node if not str(k).startswith("_")), key=len, reverse=True):
        if re.search(rf"\b{re.escape(key.lower().replace('_', ' '))}\b", text):
            return key
    return next((field for phrase, field in TORCH_PHRASES.items() if phrase in text), None)


def _built(group: str, node: DictConfig, *args: object) -> tuple[object | None, str | None]:
    """``instantiate(node)(*args)``, or the problem naming the field torch (or Hydra) rejected."""
    try:
        return instantiate(node)(*args), None
    except Exception as error:  # Hydra's InstantiationException, torch's ValueError and TypeError
        while error.__cause__ is not None:  # Hydra wraps the constructor's error
            error = error.__cause__
        message = f"{type(error).__name__}: {error}"
        field = _field_named(str(error), node)
        if field is None:
            settings = OmegaConf.to_container(node, resolve=True)
            return (
                None,
                f"{group}: {message} (the {group} config: {settings}); fix the {group}.* field it is about",
            )
        value = node.get(field, "(the default)")
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if "unexpected keyword argument" in message:
            fix = f"remove it (~{group}.{field}) or correct its name"
        else:
            fix = "set " + OPTIMIZER_VALUES.get(field, "a value it accepts")
        return None, f"{group}.{field}={value}: {node.get('_target_')} rejects it ({message}); {fix}"


def optimizer_problems(cfg: DictConfig) -> list[str]:
    """Build ``cfg.optimizer`` on one dummy parameter and ``cfg.scheduler`` on it (milliseconds): a setting
    torch rejects is named now, with its field, rather than after the model has loaded."""
    optimizer, problem = _built("optimizer", cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    if problem is not None:
        return [problem]
    if cfg.get("scheduler"):
        _, problem = _built("scheduler", cfg.scheduler, optimizer)
        if problem is not None:
            return [problem]
    return []


def _target_name(node: object) -> str:
    """The class name of a config node's ``_target_`` ('' for none)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return str(target).rsplit(".", 1)[-1] if target else ""


def sharding_problems(cfg: DictConfig) -> list[str]:
    """``trainer=fsdp`` runs collective sharded forwards, so every rank must roll out as many samples; CurES
    gives groups between ``n_min`` and ``n_max`` samples, which would stop the run at its first unequal draw."""
    trainer, curriculum = cfg.trainer, cfg.get("curriculum")
    if (
        _target_name(trainer.get("strategy")) != "ModelParallelStrategy"
        or _target_name(curriculum) != "CurESCurriculum"
    ):
        return []
    if curriculum.n_min >= curriculum.n_max:
        return []  # every group has n_min samples
    if str(trainer.get("devices")) == "1" and str(trainer.get("num_nodes", 1)) == "1":
        return []  # one rank: nothing to be unequal to
    return [
        f"trainer=fsdp with curriculum=cures: FSDP's sharded forwards are collective, so every rank must roll out "
        f"as many samples, but CurES sizes each group between curriculum.n_min={curriculum.n_min} and "
        f"curriculum.n_max={curriculum.n_max}. Use trainer=ddp with curriculum=cures (or equal group sizes: "
        f"curriculum.n_min=curriculum.n_max)"
    ]


def config_problems(cfg: DictConfig) -> list[str]:
    """What keeps ``cfg`` from training on any machine (empty: nothing)."""
    return optimizer_problems(cfg) + sharding_problems(cfg)


#: the clients of served rewards (class names): each has a ``check()`` that asks its server whether it is up
SERVED_CLIENTS = ("RemoteReward", "RemoteNamedReward", "ChatClient")
#: the config nodes whose rewards first score after the model has loaded (the trained, gold and evaluation
#: rewards; a data set's clients, such as Pair-GRPO's completer, already run before the model loads)
SERVED_ROOTS = ("reward", "gold", "callbacks")


def _served(node: object, path: str) -> Iterator[tuple[str, dict]]:
    """``(config path, node)`` of every served-reward client under a resolved config ``node``."""
    if isinstance(node, dict):
        if str(node.get("_target_", "")).rsplit(".", 1)[-1] in SERVED_CLIENTS:
            yield path, node
            return
        for key, value in node.items():
            yield from _served(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _served(value, f"{path}[{index}]")


def server_problems(cfg: DictConfig, roots: tuple[str, ...] = SERVED_ROOTS) -> list[str]:
    """The served rewards under ``cfg``'s ``roots`` whose server does not answer its client's ``check()``
    (seconds at most each)."""
    from g2rpo.rewards.http import RewardServerError

    found = []
    for root in roots:
        try:
            node = OmegaConf.to_container(cfg[root], resolve=True) if cfg.get(root) else None
        except Exception:  # a config that does not resolve fails when built, with its own message
            continue
        for path, client in _served(node, root):
            try:
                served = instantiate(client)
            except Exception as error:  # e.g. an api_key_env that names an unset variable
                found.append(f"{path}: {getattr(error, '__cause__', None) or error}")
                continue
            try:
                served.check()
            except RewardServerError as error:
                found.append(f"{path}: {error}")
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
    """Raise :class:`PreflightError` listing what keeps any run of ``cfg`` from training, else everything a hub
    model's run lacks here, else the served rewards whose server does not answer."""
    found = config_problems(cfg)
    if found:
        raise PreflightError(
            "\n".join(["the config cannot train:", *(f"  - {problem}" for problem in found)])
        )
    found = problems(cfg)
    if found:
        lines = [f"model: {hub_model(cfg)[1]} cannot train here; it needs:"]
        lines += [f"  - {problem}" for problem in found]
        if any("GPU" in problem for problem in found):
            lines.append(f"  {estimate_here(cfg)}")
        raise PreflightError("\n".join(lines))
    check_servers(cfg)


def check_servers(cfg: DictConfig, roots: tuple[str, ...] = SERVED_ROOTS) -> None:
    """Raise :class:`PreflightError` listing the served rewards under ``roots`` whose server does not answer."""
    found = server_problems(cfg, roots)
    if found:
        lines = ["a reward server does not answer (nothing is loaded until it does):"]
        raise PreflightError("\n".join([*lines, *(f"  - {problem}" for problem in found)]))
