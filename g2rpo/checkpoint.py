"""The training checkpoint: what RLModule adds to Lightning's file, and how ``python -m g2rpo.evaluate
checkpoint=...`` reads the policy back out of it.

Beyond Lightning's own keys (epoch, loops, optimiser, callbacks), a checkpoint holds

    state_dict   the trainable weights only (the LoRA adapter or the fine-tuned transformer), named
                 ``policy.<parameter>``; frozen weights are rebuilt from the model config
    ema          the evaluation EMA (diffusers' ``EMAModel`` state), when the run keeps one
    curriculum   the curriculum's state
    algorithm    the algorithm's own state (DGPO: its update count and theta^-)
    config       the run's resolved config, which a resume compares with its own (``g2rpo.resume``)

as whole tensors: under FSDP each rank holds a shard, and rank 0 alone writes the file. Every value is a
tensor or a plain Python value, so reading needs no unpickling of code (``weights_only=True``), and every
file is written atomically (:class:`AtomicCheckpointIO`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import torch
from diffusers.training_utils import EMAModel
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO

from g2rpo import ema
from g2rpo.distributed import full_tensors
from g2rpo.files import atomic_write
from g2rpo.policies.base import FlowPolicy

POLICY = "policy."  # RLModule.policy's weights in the state dict


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written: the run stops rather than go on without one."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic and loud for local paths.

    Lightning's own (``fabric.utilities.cloud_io._atomic_save``) stages the file in ``$TMPDIR`` and moves it,
    which across filesystems is a copy that a kill leaves truncated, and it swallows a ``PermissionError``,
    so a run whose checkpoint directory became unwritable went on, and exited 0, with a stale ``last.ckpt``.
    Here the file is written beside its name and renamed over it (:func:`g2rpo.files.atomic_write`), and
    a failure raises :class:`CheckpointWriteError`. Remote paths (``s3://``...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not isinstance(fsspec.core.url_to_fs(str(path))[0], LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_write(Path(path), lambda stream: torch.save(checkpoint, stream))
        except OSError as error:
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {error}. The run stops here rather than train on "
                "without one. Free space or fix the directory's permissions, then re-run the same command: it "
                f"resumes from the newest readable checkpoint in {Path(path).parent}."
            ) from error


def trainable_keys(module: LightningModule) -> set[str]:
    """The state-dict keys of the policy's trainable weights, paused ones included (a progressive schedule's
    frozen stage still carries the weights that earlier stages trained)."""
    return {POLICY + name for name, _ in module.policy.named_trainable_parameters()}


def save(module: LightningModule, checkpoint: dict) -> None:
    """Fill Lightning's ``checkpoint`` (``on_save_checkpoint``): keep only the trainable weights, add the
    rest of the training state."""
    trainable = trainable_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    checkpoint["curriculum"] = module.curriculum.state_dict()
    if module.ema is not None:
        checkpoint["ema"] = full_tensors(module.ema.state_dict())
    checkpoint["algorithm"] = full_tensors(module.algorithm.state_dict())
    if module.run_config is not None:
        checkpoint["config"] = module.run_config


def restore(module: LightningModule, checkpoint: dict) -> None:
    """Resume ``module`` from ``checkpoint`` (``on_load_checkpoint``; Lightning loads the weights)."""
    weights = checkpoint.get("state_dict")  # absent under FSDP: its strategy has loaded them already
    missing = sorted(trainable_keys(module) - weights.keys()) if weights is not None else []
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}): "
            "it was written by a different model or LoRA configuration. Use another run directory, "
            "or ckpt_path=null to start fresh."
        )
    module.curriculum.load_state_dict(checkpoint.get("curriculum", {}))
    module.algorithm.load_state_dict(checkpoint.get("algorithm", {}))
    if module.ema is not None and "ema" in checkpoint:
        ema.restore(module.ema, checkpoint["ema"], module.policy.trainable_parameters(), module.device)


def load_policy(policy: FlowPolicy, path: Path) -> None:
    """Load a checkpoint's trainable weights into a rebuilt policy: their evaluation EMA when the run kept
    one, as the run's own evaluations used."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    weights = {k.removeprefix(POLICY): v for k, v in state.items() if k.startswith(POLICY)}
    missing = set(weights) - set(policy.state_dict())
    if missing:
        raise ValueError(f"checkpoint {path} does not fit this model: unexpected keys {sorted(missing)[:5]}")
    policy.load_state_dict(weights, strict=False)
    if "ema" in checkpoint:
        parameters = policy.trainable_parameters()
        average = EMAModel(parameters)
        average.load_state_dict(checkpoint["ema"])
        if [p.shape for p in average.shadow_params] != [p.shape for p in parameters]:
            raise ValueError(f"checkpoint {path}: its EMA weights do not fit this model's trainable weights")
        average.copy_to(parameters)
