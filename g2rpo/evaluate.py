"""Evaluation: deterministic ODE samples on a prompt split, scored per task like GenEval's table.

``python -m g2rpo.evaluate`` scores the base model (``model=``) or a training checkpoint
(``checkpoint=outputs/<run>/checkpoints/last.ckpt``, whose run's ``config.yaml`` supplies the model) and
writes ``eval.json``; the :class:`g2rpo.callbacks.Evaluate` callback runs the same evaluation during
training.

Every image of an evaluation starts from noise fixed by ``seed``, so two models are compared on identical
noise (a paired comparison: far less variance than fresh samples). A reward may report several named scores
through a ``scores(images, prompts, metadata) -> dict`` method (GenEval: strict accuracy and partial credit);
each becomes a column. Per-task means are torchmetrics ``MeanMetric``s, so they reduce across ranks; the
overall score is the mean over tasks, as GenEval's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics.aggregation import MeanMetric

import g2rpo.config  # noqa: F401  (schemas and resolvers)
from g2rpo.checkpoint import load_policy
from g2rpo.data import PromptDataset
from g2rpo.policies.base import FlowPolicy
from g2rpo.rewards.base import RewardFunction
from g2rpo.rollout import ode_sample


@dataclass
class Evaluation:
    """``scores[column][task]`` means, with ``overall`` the mean over tasks."""

    scores: dict[str, dict[str, float]]
    num_images: int
    settings: dict = field(default_factory=dict)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {
            f"{prefix}/{column}/{task}": v
            for column, tasks in self.scores.items()
            for task, v in tasks.items()
        }

    def table(self, title: str = "") -> str:
        """Rows are the union of every column's tasks (a unified model's understanding column has question
        types, its generation columns GenEval tasks); a column without a row's task shows blank."""
        columns = list(self.scores)
        tasks = list(
            dict.fromkeys(task for scores in self.scores.values() for task in scores if task != "overall")
        )
        tasks += ["overall"] if any("overall" in scores for scores in self.scores.values()) else []
        width = max([len(t) for t in tasks] + [4])
        lines = [title] if title else []
        lines.append(f"{'task':<{width}}  " + "  ".join(f"{c:>{max(len(c), 6)}}" for c in columns))
        for task in tasks:
            cells = "  ".join(
                f"{self.scores[c][task]:>{max(len(c), 6)}.3f}"
                if task in self.scores[c]
                else " " * max(len(c), 6)
                for c in columns
            )
            lines.append(f"{task:<{width}}  {cells}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"scores": self.scores, "num_images": self.num_images, "settings": self.settings}


def balanced_prompts(dataset: PromptDataset, images_per_task: int) -> tuple[list[str], list[dict], list[str]]:
    """``images_per_task`` samples per task (its prompts cycled in order), as GenEval weighs tasks equally."""
    by_task: dict[str, list[int]] = {}
    for index, meta in enumerate(dataset.metadata):
        by_task.setdefault(meta.get("tag", "all"), []).append(index)
    chosen = [(task, ids[i % len(ids)]) for task, ids in by_task.items() for i in range(images_per_task)]
    return (
        [dataset.prompts[i] for _, i in chosen],
        [dataset.metadata[i] for _, i in chosen],
        [task for task, _ in chosen],
    )


class Evaluator:
    """ODE sampling of a prompt set, then every reward per task."""

    def __init__(
        self,
        dataset: PromptDataset,
        rewards: Mapping[str, RewardFunction],
        num_steps: int = 20,
        guidance_scale: float = 4.5,
        images_per_task: int = 64,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        if not rewards:
            raise ValueError("evaluation needs at least one reward (eval.rewards)")
        self.dataset, self.rewards = dataset, dict(rewards)
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.images_per_task, self.batch_size, self.seed = images_per_task, batch_size, seed

    @torch.no_grad()
    def __call__(self, policy: FlowPolicy) -> Evaluation:
        prompts, metadata, tasks = balanced_prompts(self.dataset, self.images_per_task)
        nfe = policy.nfe  # evaluation cost is not training cost
        images = ode_sample(
            policy,
            prompts,
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )
        policy.nfe = nfe
        columns: dict[str, torch.Tensor] = {}
        for name, reward in self.rewards.items():
            if hasattr(reward, "scores"):
                for key, values in reward.scores(images, prompts, metadata).items():
                    columns[f"{name}/{key}"] = values
            else:
                columns[name] = torch.as_tensor(reward(images, prompts, metadata), dtype=torch.float32)
        task_names = list(dict.fromkeys(tasks))
        task_index = torch.tensor([task_names.index(t) for t in tasks])
        scores: dict[str, dict[str, float]] = {}
        for column, values in columns.items():
            values = values.detach().float().cpu()
            per_task = {}
            for k, task in enumerate(task_names):
                metric = MeanMetric(nan_strategy="ignore")
                metric.update(values[task_index == k])
                per_task[task] = float(metric.compute())
            per_task["overall"] = sum(per_task.values()) / len(per_task)
            scores[column] = per_task
        settings = {
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "images_per_task": self.images_per_task,
            "seed": self.seed,
        }
        return Evaluation(scores, len(prompts), settings)


class UnifiedEvaluator:
    """A unified model's held-out evaluation: the generation evaluation, plus an ``understanding`` column of
    answer accuracy per question type (``understanding(policy) -> {qtype: accuracy, "overall": ...}``)."""

    def __init__(self, generation: Evaluator, understanding: Callable[[Any], dict[str, float]]) -> None:
        self.generation, self.understanding = generation, understanding

    def __call__(self, policy) -> Evaluation:
        evaluation = self.generation(policy)
        evaluation.scores["understanding/accuracy"] = dict(self.understanding(policy))
        return evaluation


def evaluate(cfg: DictConfig) -> Evaluation:
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
    L.seed_everything(cfg.eval.seed, verbose=False)
    policy = instantiate(model_cfg)
    if cfg.checkpoint:
        load_policy(policy, Path(cfg.checkpoint))
    evaluator = instantiate(cfg.eval)
    evaluation = evaluator(policy.eval())
    title = f"{cfg.checkpoint or 'base model'} on {cfg.split_name} prompts ({evaluation.num_images} images)"
    print(evaluation.table(title))
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"checkpoint": cfg.checkpoint, **evaluation.to_json()}, indent=2))
    print(f"wrote {output}")
    return evaluation


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
