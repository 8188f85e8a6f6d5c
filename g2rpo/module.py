"""The Lightning module: one ``training_step`` is one RL iteration, and one Lightning epoch.

    prompts (curriculum; CurES first probes the policy) -> rollout (no_grad) -> rewards -> advantages
    -> minibatches of loss units -> manual_backward / clip / step (g2rpo.optimization) -> log

The curriculum draws prompts inside ``training_step`` because it learns from the previous iteration's
rewards; the dataloader only paces iterations. Every random draw of an iteration comes from generators
seeded by ``(seed, iteration)``, and each sample's and group's noise from a stream keyed by its index in
the batch (``g2rpo.randomness``), so a run resumed from a checkpoint repeats exactly what the uninterrupted
run would have done, whatever the rollout batch size or the number of ranks. Checkpoints hold only the
training state (``g2rpo.checkpoint``); frozen weights are rebuilt from the model config. The module owns
the weight averages that follow the optimiser steps: the evaluation EMA, and the algorithm's (DGPO's
theta^-) through its ``on_optimizer_step``.

Under ``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``) ``configure_model`` shards the policy with
FSDP2. Every forward of a sharded module is a collective, so every rank must run the same forwards: the
batch must split into equal shares (equal group sizes), and ``g2rpo.optimization`` pads minibatches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch
from diffusers.training_utils import EMAModel
from torch import Tensor
from torch.utils.data import DataLoader

import g2rpo.checkpoint
import g2rpo.resume
from g2rpo.advantages import Advantages
from g2rpo.algos.base import Algorithm
from g2rpo.curriculum import Curriculum, probe_for
from g2rpo.data import PromptDataset
from g2rpo.distributed import gather_objects, gather_scored, mean_over_ranks, rank_slice
from g2rpo.ema import swapped_in
from g2rpo.hacking import GoldRewards, image_statistics
from g2rpo.optimization import Optimization
from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import iteration_generator
from g2rpo.rewards.base import RewardEnsemble

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """The rollout's first images, which ``training_step`` returns for the image-logging callback."""

    images: Tensor
    prompts: list[str]
    rewards: Tensor


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
        gold: GoldRewards | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only (g2rpo.checkpoint)
        self.policy = policy
        self.algorithm = algorithm
        self.reward = reward
        self.dataset = dataset
        self.curriculum = curriculum
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.optimization = Optimization(max_grad_norm, logprob_tolerance, max_skipped_steps)
        self.num_logged_images = num_logged_images
        # logged beside the trained reward, never trained on (g2rpo.hacking)
        self.gold = gold.excluding(reward.rewards) if gold is not None else None
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
        # the factor on every unit's loss: a progressive schedule's stage weight of the task trained (g2rpo.schedule)
        self.loss_weight = 1.0
        self.fsdp_cpu_offload = fsdp_cpu_offload
        self.sharded = False
        self.run_config = config  # the resolved run config, kept in checkpoints (g2rpo.resume compares it)

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

    def on_train_start(self) -> None:
        """A resumed run goes on with the config's optimiser settings and schedule, not the checkpoint's."""
        if self.trainer.ckpt_path is not None:
            g2rpo.resume.apply_optimizer_config(self)

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

    def training_step(self, batch, batch_idx: int) -> dict:
        iteration = self.current_epoch
        # Identical on every rank: the prompts, and the seeds of each sample's and group's own noise stream
        # (g2rpo/randomness.py), so a sample's rollout does not depend on the rank or chunk that draws it.
        sampling = iteration_generator(self.seed, iteration)
        training = iteration_generator(self.seed, iteration, 0)  # timesteps, training noise, minibatch order

        started = time.perf_counter()
        self.policy.nfe = 0
        everyone = self.curriculum.sample(
            self.dataset, sampling, probe_for(self.policy, self.algorithm, self.reward, sampling)
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
        # a text-only rollout has no image statistics nor gold rewards; images are the first scored outputs
        # (Pair-GRPO's answers follow them)
        drawn = None if rollout.images is None else scored.select(torch.arange(len(rollout.images)))
        if drawn is not None:
            metrics.update(image_statistics(rollout.images, drawn.groups.ids))
        if not advantages.valid.all():
            log.warning(
                "iteration %d: %d of %d samples have a NaN reward; they are left out of the advantage "
                "statistics and of training",
                iteration,
                int((~advantages.valid).sum()),
                len(advantages.valid),
            )

        clock = time.perf_counter()
        self.policy.nfe = self.policy.nfe_backward = 0
        metrics.update(self._optimize(rollout, advantages, training, iteration))
        metrics.update(
            {
                "samples/rollout": len(everyone),
                "nfe/curriculum": nfe_curriculum,
                "nfe/rollout": nfe_rollout,
                "nfe/train": self.policy.nfe,
                "nfe/train_backward": self.policy.nfe_backward,
                "time/curriculum_s": curriculum_seconds,
                "time/rollout_s": rollout_seconds,
                "time/reward_s": reward_seconds,
                "time/train_s": time.perf_counter() - clock,
                "time/iteration_s": time.perf_counter() - started,
            }
        )
        metrics = mean_over_ranks(metrics)
        metrics.update(all_rewards.metrics())
        if self.gold is not None and drawn is not None:
            metrics.update(self.gold.metrics(rollout.images, drawn))
        metrics.update(self.curriculum.update(all_scored, all_rewards))
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(scored))
        if self.scheduler_factory is not None:
            self.lr_schedulers().step()
        self.log("reward", metrics["reward/total/mean"], prog_bar=True, logger=False, batch_size=len(scored))
        # this iteration's metrics, for callbacks (the trainer's callback_metrics also hold earlier iterations')
        outputs = {"metrics": metrics}
        shown = slice(0, self.num_logged_images)
        # a text-only rollout (token GRPO on answers) has no image to show
        if rollout.images is not None:
            outputs["samples"] = Samples(
                rollout.images[shown].cpu(), scored.prompts[shown], rewards.total[shown].cpu()
            )
        return outputs

    @staticmethod
    def _check_equal_shares(samples: int) -> None:
        shares = gather_objects(samples)
        if len(set(shares)) > 1:  # raised on every rank alike: none is left waiting in a collective
            raise ValueError(
                f"trainer=fsdp: the ranks drew {shares} samples this iteration; sharded forwards are collective, "
                "so every rank must roll out as many samples. Use equal group sizes (CurES's allocation varies "
                "them: use trainer=ddp with it)."
            )

    def _optimize(self, rollout, advantages: Advantages, generator: torch.Generator, iteration: int) -> dict:
        return self.optimization(self, rollout, advantages, generator, iteration)

    def after_optimizer_step(self) -> None:
        """The weight averages follow each optimiser step: the evaluation EMA, and the algorithm's own
        (DGPO's theta^-)."""
        self._update_ema()
        self.algorithm.on_optimizer_step(self.policy)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        g2rpo.checkpoint.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        g2rpo.checkpoint.restore(self, checkpoint)
