"""Exponential moving averages of the trainable weights, on diffusers' ``EMAModel``.

Two uses: the evaluation EMA every run keeps (Flow-GRPO's and DGPO's decay 0.9 every 8 steps, in
:class:`g2rpo.module.RLModule`), and DGPO's fast rollout model ``theta^-`` (decay ``min(0.3, 0.001 step)``,
:class:`RampedEMA`). diffusers supplies the update, store/restore and state dict; only the ramp differs. Checkpoints hold an
average's whole tensors (:func:`g2rpo.checkpoint.save`); :func:`restore` shards them again like the live
weights under FSDP.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from g2rpo.distributed import sharded_like


class RampedEMA(EMAModel):
    """``decay = min(max_decay, ramp * n)`` at update ``n`` (DGPO's ``theta^-``): a copy of the weights at
    first, slowly lagging more. diffusers' own warm-ups are ``(1 + n) / (10 + n)`` and a power law."""

    def __init__(self, parameters: Sequence[nn.Parameter], max_decay: float, ramp: float) -> None:
        super().__init__(parameters, decay=max_decay)
        self.ramp = ramp

    def get_decay(self, optimization_step: int) -> float:
        return min(self.decay, self.ramp * optimization_step)


@contextmanager
def swapped_in(ema: EMAModel, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Run with the EMA weights in ``parameters``, and put the trained ones back afterwards."""
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def restore(
    ema: EMAModel, state: dict, parameters: Sequence[nn.Parameter], device: torch.device | str
) -> None:
    """Load ``ema`` from a checkpoint's ``state`` (whole tensors) and shard its weights as the ``parameters``
    they shadow (FSDP; unsharded ones stay whole), on ``device``."""
    ema.load_state_dict(state)
    ema.shadow_params = sharded_like(ema.shadow_params, parameters)
    ema.to(device)
