"""``python -m g2rpo.evaluate [checkpoint=...] [model=...] eval=<suite>``: score a checkpoint or a stock model
under a suite's pinned protocol (:mod:`g2rpo.evaluation`), as the in-run evaluation does.

A checkpoint's run supplies the model (its ``config.yaml``); without one, ``model=`` is the stock model. The
suite's ``resolution`` is set on the model before it is built. Writes ``eval.json`` (protocol, per-task
table, one record per image) and the images in GenEval's layout (``images/``), which GenEval's own
``evaluate_images.py`` scores independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import g2rpo.config  # noqa: F401  (schemas and resolvers)
from g2rpo.checkpoint import load_policy
from g2rpo.config import torch_device
from g2rpo.evaluation.evaluator import Evaluation
from g2rpo.files import atomic_write_text
from g2rpo.preflight import check_servers


def evaluate(cfg: DictConfig) -> Evaluation:
    check_servers(cfg, roots=("eval",))  # a suite's served rewards answer before the model loads
    model_cfg = cfg.model
    if cfg.checkpoint:
        checkpoint = Path(cfg.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint={checkpoint}: no such file")
        run_config = checkpoint.parent.parent / "config.yaml"
        if not run_config.is_file():
            raise FileNotFoundError(
                f"checkpoint={checkpoint}: its run's config.yaml ({run_config}) is missing"
            )
        model_cfg = OmegaConf.load(run_config).model
    # the suite's files and rewards before the model: a missing download stops it in seconds, not after a
    # 20 GB load; the seed after, so the policy is built on the same random state as ever
    evaluator = instantiate(cfg.eval)
    L.seed_everything(0, verbose=False)
    policy = instantiate(model_cfg)
    if cfg.checkpoint:
        load_policy(policy, Path(cfg.checkpoint))
    device = torch.device(torch_device(cfg.trainer.accelerator))
    policy = policy.to(device).eval()
    output = Path(cfg.output)
    images_dir = output.parent / "images" if cfg.save_images else None
    evaluation = evaluator(policy, images_dir=images_dir)  # as in training's callback: no autocast
    title = f"{cfg.checkpoint or 'stock model'} on eval={cfg.suite} ({evaluation.num_images} images)"
    print(evaluation.table(title))
    record = {"checkpoint": cfg.checkpoint, "suite": cfg.suite, **evaluation.to_json()}
    atomic_write_text(output, json.dumps(record, indent=2))
    print(
        f"wrote {output}" + (f" and the images in GenEval's layout under {images_dir}" if images_dir else "")
    )
    return evaluation


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
