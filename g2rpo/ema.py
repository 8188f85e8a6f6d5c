"""Exponential moving averages of the trainable weights, on diffusers' ``EMAModel``.

Two uses: the evaluation EMA every run keeps (Flow-GRPO's and DGPO's decay 0.9 every 8 steps, in
:class:`g2rpo.module.RLModule`), and DGPO's fast rollout model ``theta^-`` (decay ``min(0.3, 0.001 step)``,
:class:`RampedEMA`). diffusers supplies the update, store/restore and state dict; only the ramp differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from diffusers.training_utils import EMAModel
from torch import nn


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
