"""UniPic's progressive schedule (Skywork UniPic, arXiv 2508.03320, Table 1) as a Lightning callback over stages.

Each stage trains ``iterations`` RL iterations with its own generation resolution, trainable subset (fnmatch
globs over the policy's trainable parameter names), learning rate and its schedule over the stage (constant or
cosine, after a linear warm-up over ``warmup_ratio`` of it), loss weight per task and evaluation-EMA decay.

The settings are a pure function of the iteration: they are applied again at the start of every iteration, so a
run resumed from a checkpoint in the middle of the schedule is in the right stage, with nothing saved of its own.
For the same reason a setting left null takes the run's config value, never the previous stage's.

Freezing: the optimiser, the evaluation EMA and checkpoints hold the policy's whole trainable set (what the model
config trains: the LoRA adapters, or the transformer under full fine-tuning), as without a schedule. A stage
trains a subset and pauses the rest (:meth:`g2rpo.policies.base.Policy.train_only`: ``requires_grad`` False, so
no gradient is computed, and AdamW skips a parameter without one: no update, no weight decay, moments kept). A
stage cannot train a weight that the model config freezes; to unfreeze the transformer later (UniPic's LLM), make
the model fully fine-tuned and let the early stages train a subset.

Loss weights: Pair-GRPO multiplies its ``side_weights`` (understanding, generation) by the stage's; every other
algorithm trains one task, and each of its losses is multiplied by that task's weight (``RLModule.loss_weight``):
token GRPO on images trains generation, on answers understanding; a flow algorithm trains editing when its
prompts are edits, generation otherwise. A weight for a task the algorithm does not train is logged and unused.

Evaluation (with the :class:`~g2rpo.callbacks.Evaluate` callback): at each stage boundary, before the switch at
the protocol's resolution and at the ending stage's, and after the switch at the new stage's (same weights: what
the resolution change alone does); at the start, the end and whenever Evaluate evaluates, also at the stage's
own resolution when the protocol pins another one (``eval_<r>px/...``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from g2rpo.algos import PairGRPO
from g2rpo.algos.pair_grpo import SIDES
from g2rpo.algos.token_grpo import TokenGRPO
from g2rpo.callbacks import Evaluate
from g2rpo.types import source_of

log = logging.getLogger(__name__)

TASKS = ("understanding", "generation", "editing")
SCHEDULES = ("constant", "cosine")
KEY = "schedule.stages"


@dataclass(frozen=True)
class Stage:
    """One stage; null fields take the run's config value (see the module docstring)."""

    iterations: int
    resolution: Mapping[str, int] | None = (
        None  # {generation: px}; understanding only for a policy that has one
    )
    trainable: Sequence[str] | None = (
        None  # fnmatch globs over the trainable parameter names; null: all of them
    )
    lr: float | None = None
    schedule: str = "constant"  # constant | cosine, over the stage's iterations
    warmup_ratio: float = 0.0  # the first round(warmup_ratio * iterations) iterations ramp the lr up linearly
    loss_weights: Mapping[str, float] | None = None  # {understanding|generation|editing: weight}, 1 if absent
    ema_decay: float | None = None

    def check(self, key: str) -> None:
        """Raise ``ValueError`` naming the first invalid field as ``<key>.<field>``."""
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"{key}.iterations={self.iterations!r} must be a positive integer")
        for task, size in (self.resolution or {}).items():
            if task not in ("generation", "understanding"):
                raise ValueError(
                    f"{key}.resolution.{task}: a resolution is per task: generation or understanding"
                )
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{key}.resolution.{task}={size!r} must be a positive integer (pixels)")
        if self.trainable is not None and (
            isinstance(self.trainable, str) or not self.trainable or not all(self.trainable)
        ):
            raise ValueError(
                f"{key}.trainable={self.trainable!r} must be a non-empty list of globs (null: all trainable weights)"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"{key}.lr={self.lr!r} must be positive (null: the optimizer's lr)")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"{key}.schedule={self.schedule!r} is not valid; choose one of {', '.join(SCHEDULES)}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"{key}.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        for task, weight in (self.loss_weights or {}).items():
            if task not in TASKS:
                raise ValueError(f"{key}.loss_weights.{task}: unknown task; the tasks are {', '.join(TASKS)}")
            if not weight >= 0:
                raise ValueError(f"{key}.loss_weights.{task}={weight!r} must be non-negative")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{key}.ema_decay={self.ema_decay!r} must be in [0, 1) (null: the module's)")

    def lr_factor(self, step: int) -> float:
        """The lr multiplier at the stage's ``step``-th iteration (0-based): ``(step + 1) / (w + 1)`` over the
        ``w`` warm-up iterations, then 1 (constant) or a half cosine from 1 towards 0 over the remaining ones,
        never reaching 0 inside the stage."""
        warmup = round(self.warmup_ratio * self.iterations)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (self.iterations - warmup)))


def build_stage(fields: Mapping, index: int) -> Stage:
    key = f"{KEY}[{index}]"
    known = {f.name for f in dataclasses.fields(Stage)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {unknown}; a stage has {', '.join(sorted(known))}")
    if "iterations" not in fields:
        raise ValueError(f"{key}.iterations is missing: every stage says how many iterations it trains")
    stage = Stage(**fields)
    stage.check(key)
    return stage


def trained_tasks(algorithm, dataset) -> tuple[str, ...]:
    """The tasks whose losses an algorithm trains, which the stages' ``loss_weights`` scale."""
    if isinstance(algorithm, PairGRPO):
        return SIDES
    if isinstance(algorithm, TokenGRPO):
        return ("generation",) if algorithm.task == "image" else ("understanding",)
    edits = len(dataset.metadata) > 0 and source_of(dataset.metadata[0]) is not None
    return ("editing",) if edits else ("generation",)


@dataclass
class Settings:
    """What a stage sets at one iteration (logged as ``schedule/*``)."""

    stage: int  # 0-based
    resolution: int | None
    lr: float


class ProgressiveSchedule(L.Callback):
    """The stages run in order; the run's ``trainer.max_epochs`` may stop before their sum, not go past it."""

    def __init__(self, stages: Sequence[Mapping], evaluate: bool = True) -> None:
        if not stages:
            raise ValueError(f"{KEY} is empty: give at least one stage")
        self.stages = [build_stage(fields, i) for i, fields in enumerate(stages)]
        self.ends = [sum(s.iterations for s in self.stages[: i + 1]) for i in range(len(self.stages))]
        self.evaluate = evaluate
        self.trained_names: list[frozenset[str]] = []  # per stage, resolved from the globs in setup

    @property
    def total(self) -> int:
        return self.ends[-1]

    def locate(self, iteration: int) -> tuple[int, int]:
        """``(stage index, step inside it)`` of the 0-based ``iteration``; past the end, the last stage's end."""
        for index, end in enumerate(self.ends):
            if iteration < end:
                return index, iteration - (end - self.stages[index].iterations)
        return len(self.stages) - 1, self.stages[-1].iterations - 1

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Check the stages against the run and keep its config values (before anything changes them)."""
        if trainer.max_epochs is not None and trainer.max_epochs > self.total:
            raise ValueError(
                f"trainer.max_epochs={trainer.max_epochs} runs past the schedule's {self.total} iterations "
                f"({' + '.join(str(s.iterations) for s in self.stages)}): lengthen the last stage"
            )
        if pl_module.scheduler_factory is not None:
            raise ValueError(
                "the progressive schedule sets the learning rate of every stage: set scheduler=null"
            )
        policy = pl_module.policy
        self.base_resolution = getattr(policy, "resolution", None)
        self.base_lr = pl_module.optimizer_factory([nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"]
        self.base_ema_decay = pl_module.ema.decay if pl_module.ema is not None else None
        algorithm = pl_module.algorithm
        self.base_side_weights = dict(algorithm.side_weights) if isinstance(algorithm, PairGRPO) else None
        self.tasks = trained_tasks(algorithm, pl_module.dataset)
        names = [name for name, _ in policy.named_trainable_parameters()]
        self.trained_names = []
        for index, s in enumerate(self.stages):
            key = f"{KEY}[{index}]"
            self._check_resolution(policy, s, key)
            if s.trainable is not None and trainer.world_size > 1:
                raise ValueError(
                    f"{key}.trainable: training a subset is supported on one process only (DDP and FSDP build "
                    "their gradient buckets once, over every trainable weight)"
                )
            self.trained_names.append(frozenset(self._match(names, s.trainable, key)))
            if s.ema_decay is not None and pl_module.ema is None:
                raise ValueError(
                    f"{key}.ema_decay={s.ema_decay}: the run keeps no EMA (module.ema_decay=null)"
                )
            unused = sorted(set(s.loss_weights or {}) - set(self.tasks))
            if unused:
                log.info("%s.loss_weights: %s trains %s; the weights of %s do not apply", key,
                         type(algorithm).__name__, "/".join(self.tasks), ", ".join(unused))  # fmt: skip

    def _check_resolution(self, policy, stage: Stage, key: str) -> None:
        sizes = dict(stage.resolution or {})
        if "understanding" in sizes and not hasattr(policy, "understanding_resolution"):
            raise ValueError(
                f"{key}.resolution.understanding: {type(policy).__name__} has no understanding resolution"
            )
        size = sizes.get("generation")
        if size is None or size == self.base_resolution:
            return
        if not hasattr(policy, "sampling_resolution"):
            raise ValueError(
                f"{key}.resolution.generation={size}: {type(policy).__name__} samples {self.base_resolution} px only"
            )
        try:
            with policy.sampling_resolution(size):
                pass
        except ValueError as error:
            raise ValueError(f"{key}.resolution.generation={size}: {error}") from error

    @staticmethod
    def _match(names: list[str], globs: Sequence[str] | None, key: str) -> list[str]:
        if globs is None:
            return names
        for index, pattern in enumerate(globs):
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"{key}.trainable[{index}]={pattern!r} matches no trainable parameter; they are named like "
                    f"{names[:3]} ({len(names)} in all)"
                )
        return [name for name in names if any(fnmatch.fnmatchcase(name, g) for g in globs)]

    def settings(self, iteration: int) -> Settings:
        index, step = self.locate(iteration)
        stage = self.stages[index]
        resolution = (stage.resolution or {}).get("generation", self.base_resolution)
        return Settings(index, resolution, (stage.lr or self.base_lr) * stage.lr_factor(step))

    def apply(self, pl_module, iteration: int) -> Settings:
        """Put the policy, optimiser, loss weights and EMA in the state of ``iteration``'s stage."""
        settings = self.settings(iteration)
        stage = self.stages[settings.stage]
        policy = pl_module.policy
        if settings.resolution is not None:
            policy.resolution = settings.resolution
        policy.train_only(self.trained_names[settings.stage])
        for group in pl_module.optimizers().optimizer.param_groups:
            group["lr"] = settings.lr
        weights = dict(stage.loss_weights or {})
        if self.base_side_weights is not None:
            pl_module.algorithm.side_weights = {
                side: self.base_side_weights[side] * weights.get(side, 1.0) for side in SIDES
            }
        else:
            pl_module.loss_weight = weights.get(self.tasks[0], 1.0)
        if pl_module.ema is not None:
            pl_module.ema.decay = stage.ema_decay if stage.ema_decay is not None else self.base_ema_decay
        return settings

    def _evaluator(self, trainer: L.Trainer) -> Evaluate | None:
        found = [c for c in trainer.callbacks if isinstance(c, Evaluate)] if self.evaluate else []
        return found[0] if found else None

    def _at_own_resolution(
        self, trainer: L.Trainer, pl_module, iterations: int, resolution: int | None
    ) -> None:
        """Evaluate also at ``resolution`` when the protocol pins another one."""
        evaluate = self._evaluator(trainer)
        if evaluate is None or resolution is None:
            return
        pinned = evaluate.evaluator.protocol.resolution
        if pinned is not None and pinned != resolution:
            evaluate.run_at_resolution(trainer, pl_module, iterations, resolution)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        settings = self.apply(pl_module, trainer.current_epoch)
        evaluate = self._evaluator(trainer)
        if evaluate is not None and evaluate.at_start:
            self._at_own_resolution(trainer, pl_module, trainer.current_epoch, settings.resolution)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        iteration = trainer.current_epoch
        settings = self.apply(pl_module, iteration)
        metrics = {"schedule/stage": settings.stage + 1, "schedule/lr": settings.lr}
        if settings.resolution is not None:
            metrics["schedule/resolution"] = settings.resolution
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=iteration)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        done = trainer.current_epoch + 1
        evaluate = self._evaluator(trainer)
        if evaluate is None:
            return
        ending = self.settings(done - 1)
        if done in self.ends[:-1]:  # a boundary: before the switch, then after it
            evaluate.run(trainer, pl_module, done)
            self._at_own_resolution(trainer, pl_module, done, ending.resolution)
            starting = self.apply(pl_module, done)
            self._at_own_resolution(trainer, pl_module, done, starting.resolution)
        elif done in evaluate.history:  # Evaluate evaluated this iteration: at the stage's resolution too
            self._at_own_resolution(trainer, pl_module, done, ending.resolution)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        done = trainer.current_epoch
        self._at_own_resolution(trainer, pl_module, done, self.settings(max(done - 1, 0)).resolution)
