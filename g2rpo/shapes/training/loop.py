"""What the shapes world's two pretraining scripts share (:mod:`g2rpo.shapes.training.base`, the base model,
and :mod:`g2rpo.shapes.training.unified`, the unified model).

- Batches are a function of ``(seed, step)`` only (:class:`StepBatches`), so a run is deterministic on a
  given machine and thread count, and a resumed run restarts its data stream at the resumed step.
- An EMA of the trained weights (diffusers' ``EMAModel``) is the result: snapshots every ``export_every``
  steps and at the end.
- A run resumes from its last Lightning checkpoint (:func:`fit`), EMA, loss curve, wall time and the
  global torch RNG (timesteps and noise) included, so a resumed run ends where an uninterrupted one does.
- The command lines share their common options and start-up (:func:`arguments`, :func:`start`), as does
  the shapes_score trainer (:mod:`g2rpo.shapes.training.score`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from torch.utils.data import DataLoader, IterableDataset

from g2rpo.checkpoint import AtomicCheckpointIO

log = logging.getLogger(__name__)


def arguments(
    doc: str, *, steps: int, lr: float, out: Path, checkpoints: Path | None = None
) -> argparse.ArgumentParser:
    """A parser with the options every shapes training script has (``--steps``, ``--lr``, ``--seed``,
    ``--threads``, ``--out``) and, given a ``checkpoints`` folder, ``--export-every`` and ``--checkpoints``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=out)
    if checkpoints is not None:
        parser.add_argument("--export-every", type=int, default=0, help="also export snapshots every N steps")
        parser.add_argument(
            "--checkpoints",
            type=Path,
            default=checkpoints,
            help="Lightning checkpoints (every 100 steps); an interrupted run resumes from the last one",
        )
    return parser


def start(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, then log to the console, use ``--threads`` CPU threads and seed every generator."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    return args


def rectified_flow_inputs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD3's training inputs (Esser et al. 2024, eq. 1): ``(noisy, sigma, velocity)`` with logit-normal
    ``sigma``, ``noisy = (1 - sigma) x0 + sigma noise`` and the target velocity ``noise - x0``."""
    sigma = compute_density_for_timestep_sampling(
        "logit_normal", images.shape[0], logit_mean=0.0, logit_std=1.0
    )
    noise = torch.randn_like(images)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * images + s * noise, sigma, noise - images


class StepBatches(IterableDataset):
    """Endless batches, ``batch(step)`` a function of ``(seed, step)``; a resumed run sets ``start``."""

    start = 0

    def batch(self, step: int):
        raise NotImplementedError

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


class EMAPretraining(L.LightningModule):
    """A pretraining module whose result is the EMA of ``trainable()``. Subclasses build their modules, then
    call :meth:`start_ema`, and set ``self.losses`` (floats by name) in ``training_step`` for the curve."""

    def __init__(
        self,
        lr: float,
        warmup_steps: int = 200,
        weight_decay: float = 0.0,
        export_every: int = 0,
        out: Path | None = None,
    ) -> None:
        super().__init__()
        self.lr, self.warmup_steps, self.weight_decay = lr, warmup_steps, weight_decay
        self.export_every, self.out = export_every, out
        self.started = time.time()
        self.curve: list[dict] = []  # every 100 steps: the step's losses and the wall time so far
        self.losses: dict[str, float] = {}
        self.resumed_rng: torch.Tensor | None = None

    def trainable(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def export(self, directory: Path, step: int) -> None:
        """Save the EMA weights to ``directory`` in the model's own format, then :meth:`record_export`."""
        raise NotImplementedError

    def record_export(self, directory: Path, step: int) -> None:
        """``training.json`` beside an export: its step, the wall time and the loss curve so far."""
        info = {"steps": step, "seconds": self.seconds(), "curve": self.curve}
        (directory / "training.json").write_text(json.dumps(info, indent=2))
        log.info("exported step %d to %s", step, directory)

    def start_ema(self, decay: float) -> None:
        self.ema = EMAModel(self.trainable(), decay=decay, use_ema_warmup=True, power=2 / 3)

    def warmup(self, step: int) -> float:
        """The learning-rate factor of a linear warm-up over ``warmup_steps``, then constant."""
        return min(1.0, (step + 1) / self.warmup_steps)

    def seconds(self) -> float:
        return round(time.time() - self.started, 1)

    def optimizer_step(self, *args, **kwargs) -> None:
        # The EMA and the curve follow the update here, not in on_train_batch_end: Lightning's checkpoint
        # callback runs before that hook, and would save them one step behind the weights.
        super().optimizer_step(*args, **kwargs)
        self.ema.step(self.trainable())
        step = self.ema.optimization_step  # the updates so far, restored with the EMA on resumption
        if step % 100 == 0 and self.losses:
            self.curve.append({"step": step, **self.losses, "seconds": self.seconds()})
            losses = ", ".join(f"{name} {value:.4f}" for name, value in self.losses.items())
            log.info("step %d: %s, %.0f s", step, losses, self.seconds())

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step
        if self.export_every and step % self.export_every == 0 and self.out is not None:
            self.export(self.out.parent / f"{self.out.name}-step{step}", step)

    def on_train_start(self) -> None:
        if self.resumed_rng is not None:
            # here rather than on loading: creating the data iterator draws from the global RNG, once per run
            torch.set_rng_state(self.resumed_rng)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["seconds"] = time.time() - self.started  # wall time survives a resumption
        checkpoint["curve"] = self.curve
        checkpoint["torch_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ema.load_state_dict(checkpoint["ema"])
        # checkpoints written before the curve and wall time were saved resume without them
        self.started = time.time() - checkpoint.get("seconds", 0.0)
        self.curve = checkpoint.get("curve", [])
        self.resumed_rng = checkpoint.get("torch_rng")


def fit(
    module: EMAPretraining,
    batches: StepBatches,
    steps: int,
    checkpoints: Path,
    gradient_clip_val: float | None = None,
    checkpoint_every: int = 100,
) -> L.Trainer:
    """Train ``steps`` steps on the CPU, checkpointing every ``checkpoint_every`` into ``checkpoints`` and
    resuming from its ``last.ckpt`` when there is one."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        gradient_clip_val=gradient_clip_val,
        logger=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(
                checkpoints, every_n_train_steps=checkpoint_every, save_last=True
            )
        ],
        deterministic=True,
        log_every_n_steps=50,
        enable_model_summary=True,
        plugins=[AtomicCheckpointIO()],  # a kill never leaves a truncated last.ckpt
    )
    last = checkpoints / "last.ckpt"
    if last.is_file():
        # the data stream restarts at the checkpoint's step: set before Lightning creates (and prefetches
        # from) the iterator, which happens before any hook of the resumed run could set it
        batches.start = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    trainer.fit(
        module,
        DataLoader(batches, batch_size=None),
        ckpt_path=last if last.is_file() else None,
        weights_only=True,
    )
    return trainer
