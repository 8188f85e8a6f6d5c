"""The Lightning module: one ``training_step`` is one RL iteration, and one Lightning epoch.

    prompts (curriculum; CurES first probes the policy) -> rollout (no_grad) -> rewards -> advantages
    -> minibatches of loss units -> manual_backward / clip / step -> log

The curriculum draws prompts inside ``training_step`` because it learns from the previous iteration's
rewards; the dataloader only paces iterations. Every random draw of an iteration comes from generators
seeded by ``(seed, iteration)``, and each sample's and group's noise from a stream keyed by its index in
the batch (``g2rpo.randomness``), so a run resumed from a checkpoint repeats exactly what the uninterrupted
run would have done, whatever the rollout batch size or the number of ranks. Checkpoints hold only the
trainable weights (the LoRA adapter or the fine-tuned transformer), their evaluation EMA, the optimiser and
the curriculum state; frozen weights are rebuilt from the model config.

Under ``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``) ``configure_model`` shards the policy with
FSDP2. Every forward of a sharded module is a collective, so every rank must run the same forwards: the
batch must split into equal shares (equal group sizes), and a rank with fewer loss units in a minibatch
repeats one of its own at zero weight.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from g2rpo.advantages import Advantages
from g2rpo.algos.base import Algorithm
from g2rpo.curriculum import Curriculum, PolicyProbe
from g2rpo.data import PromptDataset
from g2rpo.distributed import (
    all_max,
    all_sum,
    full_tensors,
    gather_objects,
    gather_scored,
    rank_slice,
    sharded_like,
    world,
)
from g2rpo.ema import swapped_in
from g2rpo.policies.base import FlowPolicy
from g2rpo.rewards.base import RewardEnsemble

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """The last rollout's images, for the image-logging callback."""

    images: Tensor
    prompts: list[str]
    rewards: Tensor


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that logged it (every rank logs the same keys, except algorithm
    metrics of a rank that had nothing to train); ``.../max`` and ``.../min`` are the extremes over ranks."""
    gathered = gather_objects(metrics)
    if len(gathered) == 1:
        return metrics
    keys = dict.fromkeys(key for part in gathered for key in part)
    reduce = {"max": np.max, "min": np.min}
    return {
        key: float(
            reduce.get(key.rsplit("/", 1)[-1], np.mean)([part[key] for part in gathered if key in part])
        )
        for key in keys
    }


def iteration_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a well-mixed hash of ``key`` (e.g. seed, iteration[, stream])."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


class RLModule(L.LightningModule):
    def __init__(
        self,
        policy: FlowPolicy,
        algorithm: Algorithm,
        reward: RewardEnsemble,
        dataset: PromptDataset,
        curriculum: Curriculum,
        optimizer: Callable,
        scheduler: Callable | None = None,
        seed: int = 0,
        max_grad_norm: float | None = 1.0,
        logprob_tolerance: float = 1e-3,
        max_skipped_steps: int = 3,
        num_logged_images: int = 16,
        ema_decay: float | None = 0.9,
        ema_update_every: int = 8,
        fsdp_cpu_offload: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only (see on_save_checkpoint)
        self.policy = policy
        self.algorithm = algorithm
        self.reward = reward
        self.dataset = dataset
        self.curriculum = curriculum
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.max_grad_norm = max_grad_norm
        self.logprob_tolerance = logprob_tolerance
        self.max_skipped_steps = max_skipped_steps
        self.num_logged_images = num_logged_images
        self.skipped_in_a_row = 0
        self.last_samples: Samples | None = None
        if algorithm.uses_reference:
            policy.enable_reference()
        if ema_decay is not None and not (0.0 <= ema_decay < 1.0 and ema_update_every >= 1):
            raise ValueError(
                f"module.ema_decay={ema_decay} must be in [0, 1) (or null: no EMA) and "
                f"module.ema_update_every={ema_update_every} >= 1"
            )
        # Flow-GRPO's and DGPO's evaluation EMA of the trainable weights: decay min(n / (9 + n), 0.9) at
        # optimiser step n, updated every 8 steps. Evaluation and the exported policy use it.
        self.ema = EMAModel(policy.trainable_parameters(), decay=ema_decay) if ema_decay is not None else None
        self.ema_update_every = ema_update_every
        self.fsdp_cpu_offload = fsdp_cpu_offload
        self.sharded = False

    def configure_model(self) -> None:
        """FSDP: shard the policy on the mesh of Lightning's ``ModelParallelStrategy`` (no mesh under the
        other strategies: nothing to do). The EMA is re-made over the sharded weights (still the initial ones)."""
        if self.device_mesh is None or self.sharded:
            return
        self.policy.shard(self.device_mesh, cpu_offload=self.fsdp_cpu_offload)
        self.sharded = True
        log.info("FSDP: the policy is sharded over the device mesh %s", self.device_mesh)
        if self.ema is not None:
            self.ema = EMAModel(self.policy.trainable_parameters(), decay=self.ema.decay)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    @contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Swap the EMA weights in (for evaluation and export), and the trained ones back afterwards."""
        if self.ema is None:
            yield
            return
        with swapped_in(self.ema, self.policy.trainable_parameters()):
            yield

    def _update_ema(self) -> None:
        """After optimiser step ``n = global_step``: every ``ema_update_every`` steps, decay
        ``min(n / (9 + n), ema_decay)`` (Flow-GRPO's ``EMAModuleWrapper``; diffusers counts the step)."""
        steps = self.global_step
        if self.ema is None or steps % self.ema_update_every:
            return
        self.ema.optimization_step = steps - 1
        self.ema.step(self.policy.trainable_parameters())

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.policy.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        # stepped once per RL iteration at the end of training_step (manual optimisation steps nothing)
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)

    def training_step(self, batch, batch_idx: int) -> None:
        iteration = self.current_epoch
        # Identical on every rank: the prompts, and the seeds of each sample's and group's own noise stream
        # (g2rpo/randomness.py), so a sample's rollout does not depend on the rank or chunk that draws it.
        sampling = iteration_generator(self.seed, iteration)
        training = iteration_generator(self.seed, iteration, 0)  # timesteps, training noise, minibatch order

        started = time.perf_counter()
        self.policy.nfe = 0
        everyone = self.curriculum.sample(
            self.dataset, sampling, PolicyProbe(self.policy, self.reward, sampling)
        )
        prompts = rank_slice(everyone)  # this rank's whole groups
        if self.sharded:
            self._check_equal_shares(len(prompts))
        nfe_curriculum, curriculum_seconds = self.policy.nfe, time.perf_counter() - started
        clock = time.perf_counter()
        self.policy.nfe = 0
        with torch.no_grad():
            rollout = self.algorithm.rollout(self.policy, prompts, sampling, iteration)
        nfe_rollout, rollout_seconds = self.policy.nfe, time.perf_counter() - clock
        scored = rollout.scored

        clock = time.perf_counter()
        with torch.no_grad():
            rewards = self.algorithm.score(self.reward, rollout)
        reward_seconds = time.perf_counter() - clock
        advantages = self.algorithm.advantages(rewards, rollout)
        all_scored, all_rewards = gather_scored(scored, rewards)  # every rank's, for statistics
        metrics = {
            **advantages.metrics(),
            **self.algorithm.rollout_metrics(rollout, rewards),
        }
        if not advantages.valid.all():
            log.warning(
                "iteration %d: %d of %d samples have a NaN reward; they are left out of the advantage "
                "statistics and of training",
                iteration,
                int((~advantages.valid).sum()),
                len(advantages.valid),
            )

        clock = time.perf_counter()
        self.policy.nfe = 0
        metrics.update(self._optimize(rollout, advantages, training, iteration))
        metrics.update(
            {
                "nfe/curriculum": nfe_curriculum,
                "nfe/rollout": nfe_rollout,
                "nfe/train": self.policy.nfe,
                "time/curriculum_s": curriculum_seconds,
                "time/rollout_s": rollout_seconds,
                "time/reward_s": reward_seconds,
                "time/train_s": time.perf_counter() - clock,
                "time/iteration_s": time.perf_counter() - started,
            }
        )
        metrics = mean_over_ranks(metrics)
        metrics.update(all_rewards.metrics())
        metrics.update(self.curriculum.update(all_scored, all_rewards))
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(scored))
        if self.scheduler_factory is not None:
            self.lr_schedulers().step()
        self.log("reward", metrics["reward/total/mean"], prog_bar=True, logger=False, batch_size=len(scored))
        shown = slice(0, self.num_logged_images)
        # a text-only rollout (token GRPO on answers) has no image to show
        if rollout.images is not None:
            self.last_samples = Samples(
                rollout.images[shown].cpu(), scored.prompts[shown], rewards.total[shown].cpu()
            )

    @staticmethod
    def _check_equal_shares(samples: int) -> None:
        shares = gather_objects(samples)
        if len(set(shares)) > 1:  # raised on every rank alike: none is left waiting in a collective
            raise ValueError(
                f"trainer=fsdp: the ranks drew {shares} samples this iteration; sharded forwards are collective, "
                "so every rank must roll out as many samples. Use equal group sizes (CurES's allocation varies "
                "them: use trainer=ddp with it)."
            )

    def _gradient_sync(self, enabled: bool) -> AbstractContextManager:
        """Accumulate without the gradient all-reduce (DDP) or reduce-scatter (FSDP) until a step's last
        backward."""
        if enabled or world()[1] == 1:
            return nullcontext()
        if isinstance(self.trainer.strategy, DDPStrategy):
            return self.trainer.strategy.block_backward_sync()
        return self._fsdp_gradient_sync_off()

    @contextmanager
    def _fsdp_gradient_sync_off(self) -> Iterator[None]:
        sharded = [m for m in self.policy.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True, recurse=False)

    def _optimize(self, rollout, advantages: Advantages, generator: torch.Generator, iteration: int) -> dict:
        """One optimiser step per minibatch; a step whose gradient is not finite is skipped.

        A NaN or infinite loss makes the gradient norm non-finite, so one check per step covers both, and
        metrics stay on the device until the end (no host sync per forward/backward).
        """
        optimizer = self.optimizers()
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = defaultdict(int)
        grad_norms: list[float] = []
        steps = skipped = 0
        minibatches = self.algorithm.minibatches(rollout, advantages, generator)
        # Every rank takes the same optimiser steps (a rank with fewer minibatches joins with empty ones).
        minibatches += [[]] * (all_max(len(minibatches)) - len(minibatches))
        # FSDP: every rank runs as many forwards per step, padding with one of its units at zero weight
        padding = next((units[0] for units in minibatches if units), None)
        for index, units in enumerate(minibatches):
            # The step's gradient is the mean over every rank's units; DDP and FSDP average over ranks, so
            # each loss is scaled by world_size / (units on all ranks). Only a step's last backward syncs.
            _, world_size = world()
            scale = world_size / max(int(all_sum(torch.tensor([len(units)]))), 1)
            weights = [scale] * len(units)
            if self.sharded and (missing := all_max(len(units)) - len(units)):
                if padding is None:
                    raise RuntimeError(
                        f"trainer=fsdp: rank {world()[0]} has no loss unit to train this iteration while other "
                        "ranks do (every sample's reward was NaN?); sharded forwards need every rank"
                    )
                units, weights = [*units, *[padding] * missing], [*weights, *[0.0] * missing]
            elif not units:
                self.manual_backward(sum(p.sum() for p in self.policy.trainable_parameters()) * 0.0)
            for position, (unit, weight) in enumerate(zip(units, weights)):
                out = self.algorithm.loss(self.policy, rollout, advantages, unit)
                with self._gradient_sync(position == len(units) - 1):
                    self.manual_backward(out.loss * weight)
                if not weight:
                    continue
                metrics = dict(out.metrics)
                if index == 0 and "logprob_gap" in metrics:
                    metrics["logprob_gap_before_update"] = metrics["logprob_gap"]
                for key, value in metrics.items():
                    sums[key] = sums[key] + value if key in sums else value.detach().clone()
                    counts[key] += 1
            grad_norm = self._clip_gradients(optimizer)
            if math.isfinite(grad_norm):
                optimizer.step()
                self._update_ema()
                self.algorithm.on_optimizer_step(self.policy)
                steps += 1
                grad_norms.append(grad_norm)
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)

        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped and not steps else 0
        if skipped:
            log.warning(
                "iteration %d: skipped %d optimiser step(s) with a non-finite loss or gradient",
                iteration,
                skipped,
            )
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} iterations in a row had only non-finite losses or gradients; stopping. "
                "The last good checkpoint is kept: lower the learning rate or check the rewards, then re-run "
                "the same command to resume."
            )
        metrics = {f"train/{key}": float(total) / counts[key] for key, total in sums.items()}
        gap = metrics.get("train/logprob_gap_before_update", 0.0)
        if gap > self.logprob_tolerance:
            log.warning(
                "iteration %d: mean |logp_old - logp| before any update is %.2e (> %.0e): rollout and training "
                "compute different log-probs (precision, batch shape, or a non-deterministic kernel); the "
                "ratio is not 1 on-policy",
                iteration,
                gap,
                self.logprob_tolerance,
            )
        metrics["train/optimizer_steps"] = steps
        metrics["train/skipped_steps"] = skipped
        if grad_norms:
            metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        return metrics

    def _clip_gradients(self, optimizer) -> float:
        """Unscale (fp16 AMP), clip to ``max_grad_norm`` and return the pre-clip total norm."""
        self.trainer.precision_plugin.unscale_gradients(optimizer.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _trainable_keys(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["curriculum"] = self.curriculum.state_dict()
        # whole tensors: under FSDP each rank holds a shard, and rank 0 alone writes the file
        if self.ema is not None:
            checkpoint["ema"] = full_tensors(self.ema.state_dict())
        checkpoint["algorithm"] = full_tensors(self.algorithm.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        weights = checkpoint.get("state_dict")  # absent under FSDP: its strategy has loaded them already
        missing = sorted(self._trainable_keys() - weights.keys()) if weights is not None else []
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}): "
                "it was written by a different model or LoRA configuration. Use another run directory, "
                "or ckpt_path=null to start fresh."
            )
        self.curriculum.load_state_dict(checkpoint.get("curriculum", {}))
        self.algorithm.load_state_dict(checkpoint.get("algorithm", {}))
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.shadow_params = sharded_like(self.ema.shadow_params, self.policy.trainable_parameters())
            self.ema.to(self.device)
