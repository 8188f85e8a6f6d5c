"""Callbacks: held-out evaluation, sample images (PNG grid in the run dir and W&B images with prompts),
policy export, the curriculum's state as W&B histograms, and a compute budget that ends training."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import make_image_grid
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from g2rpo.evaluation.evaluator import Evaluation, Evaluator
from g2rpo.files import PARTIAL, atomic_write_text, replace_directory

log = logging.getLogger(__name__)


class Evaluate(L.Callback):
    """Held-out evaluation before training, every ``every_n_iterations``, and at the end.

    ``at_start: false`` skips the evaluation before training (or at a resumed iteration): rows of a table
    that all start from one base policy need its evaluation once, not once per row. Each evaluation is
    logged as ``eval/<reward>/<task>`` at the iteration it follows, written with its protocol and one record
    per image to ``<run>/eval/iteration_<n>.json``, and shown in W&B as a panel (the same prompts and noise
    at every evaluation, so images compare across iterations) and per-task tables. The final evaluation's
    images are written in GenEval's layout (``<run>/eval/iteration_<n>_images``) when
    ``save_final_images``. The before/after tables are printed when training ends and written to
    ``<run>/eval.json``.
    """

    def __init__(
        self,
        evaluator: Evaluator,
        every_n_iterations: int = 10,
        filename: str = "eval.json",
        final_num_steps: Sequence[int] = (),
        at_start: bool = True,
        save_final_images: bool = True,
    ) -> None:
        self.evaluator = evaluator
        self.at_start = at_start
        self.every_n_iterations = every_n_iterations
        self.filename = filename
        self.final_num_steps = list(final_num_steps)  # also evaluate the final policy with these ODE steps
        self.save_final_images = save_final_images
        self.history: dict[int, dict] = {}  # iterations trained -> Evaluation.to_json(images=False)
        # (iterations trained, resolution) -> Evaluation.to_json(images=False), sampled at other resolutions
        self.by_resolution: dict[tuple[int, int], dict] = {}
        self.final_by_steps: dict[int, dict] = {}  # ODE steps -> the final policy's Evaluation.to_json()

    def _evaluate(self, pl_module, evaluator: Evaluator, images_dir: Path | None = None) -> Evaluation:
        was_training = pl_module.policy.training
        pl_module.policy.eval()
        with pl_module.evaluation_weights():
            evaluation = evaluator(pl_module.policy, images_dir=images_dir)
        pl_module.policy.train(was_training)
        return evaluation

    def run(self, trainer: L.Trainer, pl_module, iterations: int) -> None:
        """The evaluation after ``iterations`` (once: a second call at the same iteration does nothing)."""
        if iterations in self.history:
            return
        directory = Path(trainer.default_root_dir) / "eval"
        final = iterations == trainer.max_epochs and self.save_final_images and trainer.is_global_zero
        images_dir = directory / f"iteration_{iterations:06d}_images" if final else None
        evaluation = self._evaluate(pl_module, self.evaluator, images_dir)
        self.history[iterations] = evaluation.to_json(images=False)
        for logger in trainer.loggers:
            logger.log_metrics(evaluation.metrics(), step=iterations)
        self._write(directory / f"iteration_{iterations:06d}.json", evaluation)
        log_to_wandb(trainer, evaluation, iterations)
        log.info("\n%s", evaluation.table(f"evaluation after {iterations} iterations"))

    def run_at_resolution(self, trainer: L.Trainer, pl_module, iterations: int, resolution: int) -> None:
        """The evaluation after ``iterations`` sampled at ``resolution`` px instead of the protocol's (a
        progressive schedule's stage resolution), logged as ``eval_<resolution>px/<reward>/<task>`` and written
        to ``<run>/eval/iteration_<n>_<resolution>px.json``; once per iteration and resolution."""
        if (iterations, resolution) in self.by_resolution:
            return
        evaluation = self._evaluate(pl_module, self.evaluator.with_resolution(resolution))
        self.by_resolution[(iterations, resolution)] = evaluation.to_json(images=False)
        for logger in trainer.loggers:
            logger.log_metrics(evaluation.metrics(prefix=f"eval_{resolution}px"), step=iterations)
        directory = Path(trainer.default_root_dir) / "eval"
        self._write(directory / f"iteration_{iterations:06d}_{resolution}px.json", evaluation)
        log.info("\n%s", evaluation.table(f"evaluation at {resolution} px after {iterations} iterations"))

    @rank_zero_only
    def _write(self, path: Path, evaluation: Evaluation) -> None:
        atomic_write_text(path, json.dumps(evaluation.to_json(), indent=1))

    def _run_step_counts(self, trainer: L.Trainer, pl_module, iterations: int) -> None:
        """The final policy sampled with other step counts (robustness to the inference schedule)."""
        for num_steps in self.final_num_steps:
            evaluation = self._evaluate(pl_module, self.evaluator.with_steps(num_steps))
            self.final_by_steps[num_steps] = evaluation.to_json(images=False)
            for logger in trainer.loggers:
                logger.log_metrics(evaluation.metrics(prefix=f"eval_steps{num_steps}"), step=iterations)
            log.info("\n%s", evaluation.table(f"after {iterations} iterations, {num_steps} ODE steps"))

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start:
            self.run(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        done = trainer.current_epoch + 1
        if done % self.every_n_iterations == 0 or done == trainer.max_epochs:
            self.run(trainer, pl_module, done)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.run(trainer, pl_module, trainer.current_epoch)
        self._run_step_counts(trainer, pl_module, trainer.current_epoch)
        self._report(Path(trainer.default_root_dir))

    @rank_zero_only
    def _report(self, run_dir: Path) -> None:
        first, last = min(self.history), max(self.history)
        before = Evaluation(**self.history[first])
        after = Evaluation(**self.history[last])
        lines = [after.table(f"after (iteration {last})"), ""]
        if first != last:
            lines[:0] = [before.table(f"before (iteration {first})"), ""]
        for column in after.scores if first != last else ():
            lines.append(
                f"{column} overall: {before.scores[column]['overall']:.3f} -> {after.scores[column]['overall']:.3f} "
                f"({after.scores[column]['overall'] - before.scores[column]['overall']:+.3f})"
            )
        log.info("\n%s", "\n".join(lines))
        report = {str(k): v for k, v in self.history.items()}
        if self.final_by_steps:
            report["final_by_num_steps"] = {str(k): v for k, v in self.final_by_steps.items()}
        atomic_write_text(run_dir / self.filename, json.dumps(report, indent=2))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {int(k): v for k, v in state_dict["history"].items()}


@rank_zero_only
def log_to_wandb(trainer: L.Trainer, evaluation: Evaluation, iteration: int) -> None:
    """The evaluation's panel (``eval/panel``: images captioned with prompt and scores) and its tables
    (``eval/tasks``: one row per task and a column per score; ``eval/panel_table``: the panel's images with
    their prompt and scores) in every W&B logger."""
    loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if not loggers:
        return
    import wandb

    columns = list(evaluation.scores)
    tasks = [[task, *(evaluation.scores[c].get(task) for c in columns)] for task in evaluation.tasks()]
    pictures = [array.numpy() for array, _ in evaluation.panel]
    captions = [caption for _, caption in evaluation.panel]
    for logger in loggers:
        logger.log_table("eval/tasks", columns=["task", *columns], data=tasks, step=iteration)
        if pictures:
            logger.log_image("eval/panel", pictures, step=iteration, caption=captions)
            rows = [
                [wandb.Image(picture), *caption.split(" | ", 1)]
                for picture, caption in zip(pictures, captions)
            ]
            logger.log_table(
                "eval/panel_table", columns=["image", "prompt", "scores"], data=rows, step=iteration
            )


class SampleImages(L.Callback):
    """Every ``every_n_iterations``: the rollout's first images (``training_step`` returns them as
    ``samples``), captioned with prompt and reward."""

    def __init__(self, every_n_iterations: int = 10, directory: str = "images") -> None:
        self.every_n_iterations = every_n_iterations
        self.directory = directory

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        samples = outputs.get("samples")
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
    """At the end of training, write the policy in its library's format (a diffusers LoRA for LoRA runs).

    The export is written into a staging directory beside ``directory`` and renamed over it once complete,
    so a run killed while exporting leaves the previous export whole, never a truncated weights file. A run
    killed after its last checkpoint but before its export is finished when the same command is re-run:
    Lightning then has no iteration left to train and skips ``on_train_end``, so ``on_fit_end`` exports."""

    def __init__(self, directory: str = "policy") -> None:
        self.directory = directory
        self.exported = False

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        missing = not (Path(trainer.default_root_dir) / self.directory).is_dir()
        if not self.exported and trainer.strategy.broadcast(missing):  # rank 0's view, on every rank
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module) -> None:
        target = Path(trainer.default_root_dir) / self.directory
        staging = target.with_name(f".{target.name}{PARTIAL}")  # one name on every rank
        if trainer.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)  # an export a kill interrupted
        # on every rank: FSDP's shards are gathered, and rank 0 writes
        with pl_module.evaluation_weights():  # the evaluated weights: the EMA when the run keeps one
            pl_module.policy.save_pretrained(staging)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            replace_directory(staging, target)
        self.exported = True


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


class ComputeBudget(L.Callback):
    """Stop training once the denoiser work done reaches ``forward_equivalents``: rows of a table trained for
    equal compute, counted in what ran rather than in seconds (which depend on what else the machine runs).

    An iteration costs ``nfe/curriculum + nfe/rollout + nfe/train`` forwards plus ``backward_weight`` (2: a
    backward pass costs about two forwards) per forward that was differentiated (``nfe/train_backward``),
    summed over ranks. ``spent_before`` charges work done before the run, such as the curation of an offline
    dataset, to its first iteration. Each iteration's cost is logged as ``compute/iteration`` (a curve's x
    axis) and the sum so far as ``compute/forward_equivalents``, which checkpoints keep, so a resumed run
    stops where the uninterrupted one would have. A reward model's forwards are not counted.
    """

    def __init__(
        self, forward_equivalents: float, backward_weight: float = 2.0, spent_before: float = 0.0
    ) -> None:
        if forward_equivalents <= 0 or backward_weight < 0 or spent_before < 0:
            raise ValueError(
                "callbacks.compute_budget: forward_equivalents must be > 0, backward_weight and spent_before >= 0"
            )
        self.forward_equivalents = forward_equivalents
        self.backward_weight = backward_weight
        self.spent_before = spent_before
        self.spent = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.spent >= self.forward_equivalents:  # resumed after the budget was spent: train nothing more
            trainer.should_stop = True

    def iteration_cost(self, metrics: dict) -> float:
        forwards = sum(float(metrics.get(f"nfe/{part}", 0.0)) for part in ("curriculum", "rollout", "train"))
        return forwards + self.backward_weight * float(metrics.get("nfe/train_backward", 0.0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        cost = trainer.world_size * self.iteration_cost(outputs["metrics"])
        if self.spent == 0.0:  # the first iteration carries what was spent before the run
            cost += self.spent_before
        self.spent += cost
        pl_module.log_dict(
            {"compute/iteration": cost, "compute/forward_equivalents": self.spent},
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        if self.spent >= self.forward_equivalents:
            log.info(
                "compute budget reached: %.3g of %.3g forward-equivalents",
                self.spent,
                self.forward_equivalents,
            )
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"spent": self.spent}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spent = state_dict["spent"]
