"""An iteration's optimiser steps, under Lightning's manual optimisation, on one process, DDP or FSDP.

The algorithm splits the rollout into minibatches of loss units; each minibatch is one optimiser step
(``manual_backward`` per unit, clip, ``optimizer.step()`` through Lightning). Every rank takes the same
steps and backward syncs: a rank with fewer minibatches joins with empty ones, and under FSDP, where every
forward of a sharded module is a collective, a rank with fewer units in a minibatch repeats one of its own
at zero weight. A step whose gradient norm is not finite is skipped: a NaN or infinite loss makes the norm
non-finite, so one check per step covers both, and metrics stay on the device until the end (no host sync
per forward/backward).

fp16 mixed precision (``trainer.precision=16-mixed``, Flow-GRPO's official SD3.5 choice) adds torch's
``GradScaler``, held by Lightning's precision plugin: ``manual_backward`` multiplies the loss by the scale
``s``, and ``optimizer.step()`` unscales the gradients, steps and updates ``s``. Lightning calls
``scaler.unscale_`` inside that step, after the point where we clip, and a second ``unscale_`` before it
is an error; so the clip runs on the still-scaled gradients with the threshold ``s * max_grad_norm`` and
reports the norm divided by ``s``: the clip of the unscaled gradients (``s`` is a power of two). A step
with a non-finite norm is skipped as above, and backs the scale off as the scaler's own skip would
(``unscale_`` finds the inf, ``update()`` halves ``s``), so the next step is tried at a smaller scale.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from g2rpo.advantages import Advantages
from g2rpo.distributed import all_max, all_sum, world

log = logging.getLogger(__name__)


class NoLearningSignal(RuntimeError):
    """Iteration after iteration had no sample whose reward could teach the policy anything."""


class Optimization:
    """Runs an iteration's steps for an :class:`~g2rpo.module.RLModule`, clipping the total gradient norm to
    ``max_grad_norm``; warns when the log-probs before any update differ from the rollout's by more than
    ``logprob_tolerance``, and stops the run after ``max_skipped_steps`` iterations in a row that could not
    train: every step skipped (non-finite losses or gradients), or no sample with a learning signal (every
    reward NaN, or every group's rewards equal). Such a run would otherwise go on, and exit 0, without
    ever changing the policy."""

    def __init__(self, max_grad_norm: float | None, logprob_tolerance: float, max_skipped_steps: int) -> None:
        self.max_grad_norm = max_grad_norm
        self.logprob_tolerance = logprob_tolerance
        self.max_skipped_steps = max_skipped_steps
        self.stalled_in_a_row = 0

    def __call__(
        self,
        module: LightningModule,
        rollout,
        advantages: Advantages,
        generator: torch.Generator,
        iteration: int,
    ) -> dict[str, float]:
        """One optimiser step per minibatch; ``module.after_optimizer_step()`` after each one taken."""
        policy, algorithm = module.policy, module.algorithm
        optimizer = module.optimizers()
        scaler = grad_scaler(module)
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = defaultdict(int)
        grad_norms: list[float] = []
        steps = skipped = 0
        minibatches = algorithm.minibatches(rollout, advantages, generator)
        minibatches += [[]] * (all_max(len(minibatches)) - len(minibatches))
        padding = next((units[0] for units in minibatches if units), None)
        for index, units in enumerate(minibatches):
            units, weights = _weighted(units, padding, module.sharded)
            if not units:
                module.manual_backward(sum(p.sum() for p in policy.trainable_parameters()) * 0.0)
            for position, (unit, weight) in enumerate(zip(units, weights)):
                out = algorithm.loss(policy, rollout, advantages, unit)
                with _gradient_sync(module, position == len(units) - 1):
                    module.manual_backward(out.loss * weight * module.loss_weight)
                if not weight:
                    continue
                metrics = dict(out.metrics)
                if index == 0 and "logprob_gap" in metrics:
                    metrics["logprob_gap_before_update"] = metrics["logprob_gap"]
                for key, value in metrics.items():
                    sums[key] = sums[key] + value if key in sums else value.detach().clone()
                    counts[key] += 1
            grad_norm = self._clip_gradients(module, scaler)
            if math.isfinite(grad_norm):
                optimizer.step()  # fp16: Lightning unscales, steps and updates the loss scale
                module.after_optimizer_step()
                steps += 1
                grad_norms.append(grad_norm)
            else:
                skipped += 1
                if scaler is not None:
                    scaler.unscale_(optimizer.optimizer)  # records the inf: update() backs the scale off
                    scaler.update()
            optimizer.zero_grad(set_to_none=True)

        # over every rank's samples, in one reduction: those with a finite reward, and those among them in a
        # group whose rewards differ
        valid = advantages.valid
        scored, learnable = all_sum(torch.stack([valid.sum(), (valid & ~advantages.zero_std).sum()])).tolist()
        signal, no_reward = learnable > 0, scored == 0
        self._check_progress(steps, skipped, signal, no_reward, iteration)
        metrics = {f"train/{key}": float(total) / counts[key] for key, total in sums.items()}
        self._check_logprob_gap(metrics.get("train/logprob_gap_before_update", 0.0), iteration)
        metrics["train/optimizer_steps"] = steps
        metrics["train/skipped_steps"] = skipped
        if grad_norms:
            metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            metrics["train/loss_scale"] = scaler.get_scale()
        return metrics

    def _clip_gradients(self, module: LightningModule, scaler: torch.amp.GradScaler | None) -> float:
        """Clip the total gradient norm to ``max_grad_norm`` and return it before the clip, unscaled. Under
        fp16 the gradients still carry the loss scale ``s``: the norm and the threshold are both ``s``
        times the unscaled ones, so the clip is the same and the norm is divided by ``s``."""
        scale = scaler.get_scale() if scaler is not None else 1.0
        max_norm = self.max_grad_norm * scale if self.max_grad_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(module.policy.trainable_parameters(), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm) / scale

    def _check_progress(
        self, steps: int, skipped: int, signal: bool, no_reward: bool, iteration: int
    ) -> None:
        if skipped:
            log.warning(
                "iteration %d: skipped %d optimiser step(s) with a non-finite loss or gradient",
                iteration,
                skipped,
            )
        if not signal:
            why = (
                "no sample to learn from: every reward was NaN"
                if no_reward
                else "no sample to learn from: every group's rewards were equal"
            )
            log.warning("iteration %d: %s (reward/invalid_count, advantage/zero_std_frac)", iteration, why)
        elif skipped and not steps:
            why = "only non-finite losses or gradients"
        else:
            self.stalled_in_a_row = 0
            return
        self.stalled_in_a_row += 1
        if self.stalled_in_a_row < self.max_skipped_steps:
            return
        message = (
            f"{self.stalled_in_a_row} iterations in a row had {why}; stopping (module.max_skipped_steps="
            f"{self.max_skipped_steps}). The last good checkpoint is kept: "
        )
        if signal:
            raise FloatingPointError(
                message + "lower the learning rate, then re-run the same command to resume."
            )
        raise NoLearningSignal(
            message
            + (
                "the reward failed on every sample: check the reward (server, model files, the prompts' "
                "metadata), then re-run the same command to resume."
                if no_reward
                else "the reward gives every sample of a prompt the same score (saturated, or constant on "
                "these prompts): check it, or use harder prompts or larger groups."
            )
        )

    def _check_logprob_gap(self, gap: float, iteration: int) -> None:
        if gap > self.logprob_tolerance:
            log.warning(
                "iteration %d: mean |logp_old - logp| before any update is %.2e (> %.0e): rollout and training "
                "compute different log-probs (precision, batch shape, or a non-deterministic kernel); the "
                "ratio is not 1 on-policy",
                iteration,
                gap,
                self.logprob_tolerance,
            )


def grad_scaler(module: LightningModule) -> torch.amp.GradScaler | None:
    """The loss scaler of fp16 mixed precision (``trainer.precision=16-mixed``); None otherwise (bf16 and
    fp32 need none)."""
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _weighted(units: list, padding, sharded: bool) -> tuple[list, list[float]]:
    """A minibatch's units and their loss weights. The step's gradient is the mean over every rank's units;
    DDP and FSDP average over ranks, so each loss is scaled by world_size / (units on all ranks). FSDP: a
    rank with fewer units than another repeats ``padding`` (one of its own) at zero weight."""
    _, world_size = world()
    scale = world_size / max(int(all_sum(torch.tensor([len(units)]))), 1)
    weights = [scale] * len(units)
    if sharded and (missing := all_max(len(units)) - len(units)):
        if padding is None:
            raise RuntimeError(
                f"trainer=fsdp: rank {world()[0]} has no loss unit to train this iteration while other "
                "ranks do (every sample's reward was NaN?); sharded forwards need every rank"
            )
        units, weights = [*units, *[padding] * missing], [*weights, *[0.0] * missing]
    return units, weights


def _gradient_sync(module: LightningModule, enabled: bool) -> AbstractContextManager:
    """Accumulate without the gradient all-reduce (DDP) or reduce-scatter (FSDP) until a step's last
    backward."""
    if enabled or world()[1] == 1:
        return nullcontext()
    if isinstance(module.trainer.strategy, DDPStrategy):
        return module.trainer.strategy.block_backward_sync()
    return _fsdp_gradient_sync_off(module.policy)


@contextmanager
def _fsdp_gradient_sync_off(policy: nn.Module) -> Iterator[None]:
    sharded = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(True, recurse=False)
