"""Typed config schemas and resolvers, registered before Hydra composes.

A dataclass that a config group instantiates (``algo``, ``curriculum``) doubles as that group's schema:
``schema(cls)`` adds the ``_target_`` field, and the group's YAML lists it first in its defaults
(``/schema/algo/flow_grpo@_here_``). Hydra then rejects an unknown field or an ill-typed value on the
command line at compose time, naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from g2rpo.algos import (
    DGPO,
    G2RPO,
    RFT,
    DanceGRPO,
    FlowGRPO,
    MixGRPO,
    PairGRPO,
    REINFORCEPlusPlus,
    TokenGRPO,
)
from g2rpo.curriculum import CurESCurriculum, UniformCurriculum

SCHEMAS = {
    "algo": {
        "flow_grpo": FlowGRPO,
        "dance_grpo": DanceGRPO,
        "mix_grpo": MixGRPO,
        "g2rpo": G2RPO,
        "dgpo": DGPO,
        "pair_grpo": PairGRPO,
        "rft": RFT,
        "token_grpo": TokenGRPO,
        "rpp": REINFORCEPlusPlus,
    },
    "curriculum": {"uniform": UniformCurriculum, "cures": CurESCurriculum},
}


def schema(cls: type) -> type:
    """``cls`` with a ``_target_`` field pointing at itself, usable as a Hydra structured config."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    return dataclasses.make_dataclass(
        f"{cls.__name__}Config", [("_target_", str, dataclasses.field(default=target))], bases=(cls,)
    )


#: the longest run directory name, in UTF-8 bytes: Linux allows 255 in a file name; the rest is margin
MAX_RUN_NAME_BYTES = 200


def run_name(override_dirname: str) -> str:
    """The run directory's name: the command-line overrides (``algo=dgpo,seed=1``), or ``default``.

    Deterministic, so the same command finds the same directory and resumes from its last checkpoint. Past
    :data:`MAX_RUN_NAME_BYTES` (a long override list would fail with "File name too long"), the name keeps
    its readable start, cut at a character boundary, and ends with 16 hex digits of the whole name's sha256,
    so that two long override lists still name two directories.
    """
    name = re.sub(r"[/\\]+", "_", override_dirname) or "default"
    if len(name.encode()) <= MAX_RUN_NAME_BYTES:
        return name
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:16]
    start = name.encode()[: MAX_RUN_NAME_BYTES - len(digest) - 1].decode(errors="ignore")  # whole characters
    return f"{start}-{digest}"


def torch_device(accelerator: str) -> str:
    """The torch device of a Lightning accelerator, for the parts the trainer does not place (reward models):
    ``gpu``/``cuda`` -> ``cuda`` (each rank's current device), anything else -> ``cpu``."""
    return "cuda" if accelerator in ("gpu", "cuda") else "cpu"


def register() -> None:
    store = ConfigStore.instance()
    for group, entries in SCHEMAS.items():
        for name, cls in entries.items():
            store.store(group=f"schema/{group}", name=name, node=schema(cls))
    if not OmegaConf.has_resolver("g2rpo.run_name"):
        OmegaConf.register_new_resolver("g2rpo.run_name", run_name)
    if not OmegaConf.has_resolver("g2rpo.torch_device"):
        OmegaConf.register_new_resolver("g2rpo.torch_device", torch_device)


register()
