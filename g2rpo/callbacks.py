"""Callbacks: sample images (PNG grid in the run dir and W&B images with prompts), policy export, and the
curriculum's state as W&B histograms."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import make_image_grid
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class SampleImages(L.Callback):
    """Every ``every_n_iterations``: the rollout's first images, captioned with prompt and reward."""

    def __init__(self, every_n_iterations: int = 10, directory: str = "images") -> None:
        self.every_n_iterations = every_n_iterations
        self.directory = directory

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        samples = getattr(pl_module, "last_samples", None)
        iteration = trainer.current_epoch
        if samples is None or iteration % self.every_n_iterations:
            return
        pictures = VaeImageProcessor.numpy_to_pil(samples.images.permute(0, 2, 3, 1).float().numpy())
        captions = [
            f"{prompt} | reward {reward:.3f}" for prompt, reward in zip(samples.prompts, samples.rewards)
        ]
        columns = math.ceil(math.sqrt(len(pictures)))
        rows = math.ceil(len(pictures) / columns)
        pictures += [pictures[0].copy().point(lambda _: 255)] * (rows * columns - len(pictures))
        directory = Path(trainer.default_root_dir) / self.directory
        directory.mkdir(parents=True, exist_ok=True)
        make_image_grid(pictures, rows, columns).save(directory / f"iteration_{iteration:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", pictures[: len(captions)], step=iteration, caption=captions)


class ExportPolicy(L.Callback):
    """At the end of training, write the policy in its library's format (a diffusers LoRA for LoRA runs)."""

    def __init__(self, directory: str = "policy") -> None:
        self.directory = directory

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # on every rank: FSDP's shards are gathered, and rank 0 writes
        with pl_module.evaluation_weights():  # the evaluated weights: the EMA when the run keeps one
            pl_module.policy.save_pretrained(Path(trainer.default_root_dir) / self.directory)


class CurriculumHistograms(L.Callback):
    """Every ``every_n_iterations``: the curriculum's per-prompt state in W&B (CurES: a histogram of the
    subset's posterior means ``p``, and the sampled batch's group sizes against ``p``). The quantiles and
    the allocation by ``p`` also go to every logger as scalars (``curriculum/*``)."""

    def __init__(self, every_n_iterations: int = 10) -> None:
        self.every_n_iterations = every_n_iterations

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        iteration = trainer.current_epoch
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or iteration % self.every_n_iterations:
            return
        diagnostics = pl_module.curriculum.diagnostics()
        if not diagnostics:
            return
        import wandb

        payload = {
            f"curriculum/{name}": wandb.Histogram(values.numpy()) for name, values in diagnostics.items()
        }
        if {"sampled_p", "group_size"} <= diagnostics.keys():
            points = zip(diagnostics["sampled_p"].tolist(), diagnostics["group_size"].tolist())
            table = wandb.Table(columns=["p", "group_size"], data=[list(point) for point in points])
            payload["curriculum/group_size_vs_p"] = wandb.plot.scatter(
                table, "p", "group_size", title="CurES allocation: group size vs posterior p"
            )
        for logger in loggers:
            logger.log_metrics(payload, step=iteration)
