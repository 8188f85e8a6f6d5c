"""``python -m g2rpo.run [overrides]``: compose the config, build every part, and fit.

Each part is a config group instantiated through its ``_target_``; the run directory is named by the
overrides, so re-running a command resumes it from its newest readable checkpoint (``g2rpo.resume``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

import g2rpo.config  # noqa: F401  (registers schemas and resolvers before Hydra composes)
import g2rpo.preflight
import g2rpo.resume
from g2rpo.checkpoint import AtomicCheckpointIO
from g2rpo.files import atomic_write_text
from g2rpo.loggers import JsonlLogger, read_metrics

log = logging.getLogger(__name__)

for noisy in (
    r".*does not have many workers.*",  # the loader only paces iterations; prompts come from the curriculum
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*module\(s\) in eval mode at the start of training.*",  # frozen VAE / text encoders, on purpose
    r".*Checkpoint directory .* exists and is not empty.*",  # a resume: g2rpo.resume says from which file
):
    warnings.filterwarnings("ignore", message=noisy)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)


def train(cfg: DictConfig) -> dict[str, float]:
    """Build the run described by ``cfg`` and train it; returns the last value of every logged metric."""
    g2rpo.preflight.check(cfg)  # a hub model: its weights, a GPU, a real reward, before anything loads
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    # before any model loads: callbacks name the checkpoint directories, and a resume checks its config
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    # a progressive schedule (conf/schedule), after Evaluate, whose evaluations it adds to
    if cfg.get("schedule"):
        callbacks.append(instantiate(cfg.schedule, _convert_="all"))
    checkpoint_dirs = [Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    ckpt_path = g2rpo.resume.resume_point(
        cfg.ckpt_path, checkpoint_dirs, run_dir, config, list(cfg.get("resume_accepts") or [])
    )
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    algorithm = instantiate(cfg.algo, _convert_="object")
    curriculum = instantiate(cfg.curriculum, _convert_="object")
    dataset = instantiate(cfg.data)
    reward = instantiate(cfg.reward)
    policy = instantiate(cfg.model)
    # _partial_: instantiate would turn dataclass arguments (the algorithm) back into configs
    module = instantiate(cfg.module, _partial_=True)(
        policy=policy,
        algorithm=algorithm,
        reward=reward,
        dataset=dataset,
        curriculum=curriculum,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        gold=instantiate(cfg.gold) if cfg.get("gold") else None,
        config=config,
    )
    loggers = [JsonlLogger(run_dir)] + [instantiate(node) for node in (cfg.logger or {}).values()]
    # checkpoints are written atomically, and a failed write stops the run (g2rpo.checkpoint)
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    for logger in loggers:
        logger.log_hyperparams(config)
    try:
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)  # a checkpoint never runs code
    finally:
        _finish_wandb()
    _summarise(run_dir)
    last: dict[str, float] = {}
    for record in read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []:
        last.update(record)
    return last


def _summarise(run_dir: Path, window: int = 5) -> None:
    """Where the run's outputs are, and how its reward moved (first vs last iterations)."""
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    rewards = [r["reward/total/mean"] for r in records if "reward/total/mean" in r]
    if rewards:
        first, last = rewards[:window], rewards[-window:]
        log.info(
            "reward/total/mean: %.4f (mean of the first %d iterations) -> %.4f (last %d), %d iterations",
            sum(first) / len(first),
            len(first),
            sum(last) / len(last),
            len(last),
            len(rewards),
        )
    log.info("run directory: %s (metrics.jsonl, checkpoints/, images/, policy/, config.yaml)", run_dir)
    for offline_run in sorted(run_dir.glob("wandb/offline-run-*")):
        log.info("upload the W&B run with: wandb sync %s", offline_run)


def _finish_wandb() -> None:
    """Close the W&B run so that the next job of a --multirun starts its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The value of ``optimized_metric`` is what a sweeper (Optuna) optimises."""
    metrics = train(cfg)
    if cfg.optimized_metric not in metrics:
        raise KeyError(
            f"optimized_metric={cfg.optimized_metric!r} was never logged; logged keys include "
            f"{sorted(metrics)[:12]} (metrics.jsonl)"
        )
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
