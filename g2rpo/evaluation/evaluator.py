"""Held-out evaluation: a prompt set sampled under a pinned :class:`~g2rpo.evaluation.protocol.Protocol`,
every reward's scores per task, and the images kept for the panel and for disk.

Flow policies sample the deterministic Euler ODE on their own grid (the eval protocol of Flow-GRPO, DGPO and
the FLUX papers); token policies (Janus-Pro) sample their image tokens at the protocol's temperature and CFG
scale. A reward may report several named scores through ``scores(images, prompts, metadata) -> dict``
(GenEval: strict accuracy and partial credit); each becomes a column. ``overall`` is the mean of the task
means (GenEval's ``summary_scores.py``) or the mean over images (preference-model tables).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from g2rpo.data import PromptDataset, source_images
from g2rpo.evaluation.layout import write_images
from g2rpo.evaluation.protocol import Protocol, image_seed
from g2rpo.policies.base import FlowPolicy
from g2rpo.policies.tokens import TokenPolicy
from g2rpo.rewards.base import RewardFunction, reads_sources
from g2rpo.rollout import ode_rollout
from g2rpo.types import PromptBatch


@dataclass
class Item:
    """One image to sample: image ``k`` of ``prompt``, whose noise seed is ``seed``."""

    prompt: str
    metadata: dict
    task: str
    k: int
    seed: int


@dataclass
class Evaluation:
    """``scores[column][task]`` means, with ``overall``; ``images`` one record per image (prompt, task, k,
    seed, scores); ``panel`` the panel's images and captions for loggers (not serialised)."""

    scores: dict[str, dict[str, float]]
    num_images: int
    protocol: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    panel: list[tuple[Tensor, str]] = field(default_factory=list, repr=False, compare=False)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {
            f"{prefix}/{column}/{task}": v
            for column, tasks in self.scores.items()
            for task, v in tasks.items()
        }

    def tasks(self) -> list[str]:
        """Rows: the union of every column's tasks (a unified model's understanding column has its own)."""
        tasks = list(
            dict.fromkeys(task for scores in self.scores.values() for task in scores if task != "overall")
        )
        return tasks + (["overall"] if any("overall" in s for s in self.scores.values()) else [])

    def table(self, title: str = "") -> str:
        columns = list(self.scores)
        tasks = self.tasks()
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

    def to_json(self, images: bool = True) -> dict:
        """``images=False`` leaves out the per-image records (a run's history of evaluations keeps the tables)."""
        record = {"scores": self.scores, "num_images": self.num_images, "protocol": self.protocol}
        return {**record, "images": self.images} if images else record


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


def items(dataset: PromptDataset, protocol: Protocol) -> list[Item]:
    """The images a protocol samples, each with its ``k`` (the how-many-th image of its prompt text)."""
    if protocol.images_per_task is not None:
        prompts, metadata, tasks = balanced_prompts(dataset, protocol.images_per_task)
    else:
        repeat = protocol.images_per_prompt
        prompts = [p for p in dataset.prompts for _ in range(repeat)]
        metadata = [m for m in dataset.metadata for _ in range(repeat)]
        tasks = [m.get("tag", "all") for m in metadata]
    seen: dict[str, int] = {}
    chosen = []
    for prompt, meta, task in zip(prompts, metadata, tasks, strict=True):
        k = seen[prompt] = seen.get(prompt, -1) + 1
        chosen.append(Item(prompt, meta, task, k, image_seed(protocol.seed, prompt, k)))
    return chosen


def sampler_name(policy: Any, protocol: Protocol) -> str:
    if isinstance(policy, FlowPolicy):
        return "euler_ode"
    if isinstance(policy, TokenPolicy):
        return f"image_tokens(temperature={protocol.temperature})"
    raise TypeError(f"evaluation samples flow or token policies, not {type(policy).__name__}")


@torch.no_grad()
def generate(policy: Any, chosen: list[Item], protocol: Protocol, batch_size: int) -> Tensor:
    """The images of ``chosen``, ``[N, 3, H, W]`` in [0, 1]; ``policy.nfe`` is left as it was (evaluation is
    not training cost)."""
    nfe = policy.nfe
    prompts = [item.prompt for item in chosen]
    generators = [torch.Generator().manual_seed(item.seed) for item in chosen]
    if isinstance(policy, FlowPolicy):
        if protocol.noise == "set":
            noise = policy.initial_noise(len(chosen), torch.Generator().manual_seed(protocol.seed))
        else:
            noise = policy.initial_noise(len(chosen), generators)
        index = torch.arange(len(chosen))
        # the metadata travels: an edit's source image is in it
        batch = PromptBatch(prompts, [item.metadata for item in chosen], group_ids=index, prompt_ids=index)
        images = ode_rollout(
            policy, batch, num_steps=protocol.num_steps, guidance_scale=protocol.guidance_scale,
            batch_size=batch_size, generator=generators[0], initial_noise=noise,
        ).images  # fmt: skip
    else:
        if protocol.noise != "prompt":
            raise ValueError(
                "eval.noise=set is for flow policies; token policies draw per image (noise=prompt)"
            )
        images = torch.cat(
            [
                policy.sample_tokens(
                    "image",
                    {"prompts": [prompts[i] for i in chunk.tolist()]},
                    [generators[i] for i in chunk.tolist()],
                    temperature=protocol.temperature,
                    guidance_scale=protocol.guidance_scale,
                ).images
                for chunk in torch.arange(len(chosen)).split(batch_size)
            ]
        )
    policy.nfe = nfe
    return images.float().cpu()


def panel_indices(chosen: list[Item], size: int) -> list[int]:
    """The first image (``k == 0``) of the first prompts, taken round-robin over tasks: the same images at every
    evaluation of a run (fixed prompts, fixed noise), so a panel shows how they change."""
    by_task: dict[str, list[int]] = {}
    for index, item in enumerate(chosen):
        if item.k == 0:
            by_task.setdefault(item.task, []).append(index)
    columns = list(by_task.values())
    order = [
        column[row]
        for row in range(max(map(len, columns), default=0))
        for column in columns
        if row < len(column)
    ]
    return order[:size]


class Evaluator:
    """Sample a prompt set under a pinned protocol (:mod:`g2rpo.evaluation.protocol`), then every reward per task.

    ``resolution`` pins the sampling resolution (a transformer policy trained at another one samples at it for
    the evaluation); ``null`` takes the policy's. ``panel_size`` images form the panel that loggers show at every evaluation.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        rewards: Mapping[str, RewardFunction],
        num_steps: int = 40,
        guidance_scale: float = 4.5,
        images_per_prompt: int | None = None,
        images_per_task: int | None = None,
        noise: str = "prompt",
        seed: int = 0,
        temperature: float = 1.0,
        overall: str = "tasks",
        resolution: int | None = None,
        batch_size: int = 16,
        panel_size: int = 16,
    ) -> None:
        if not rewards:
            raise ValueError("evaluation needs at least one reward (eval.rewards)")
        self.dataset, self.rewards = dataset, dict(rewards)
        self.protocol = Protocol(
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            images_per_prompt=images_per_prompt,
            images_per_task=images_per_task,
            noise=noise,
            seed=seed,
            temperature=temperature,
            overall=overall,
            resolution=resolution,
        )
        self.batch_size, self.panel_size = batch_size, panel_size

    def with_steps(self, num_steps: int) -> Evaluator:
        """This evaluation with another step count (the final policy's robustness to the inference schedule)."""
        other = copy.copy(self)
        other.protocol = replace(self.protocol, num_steps=num_steps)
        return other

    def with_resolution(self, resolution: int) -> Evaluator:
        """This evaluation sampled at another resolution (a progressive schedule's stage trains at its own)."""
        other = copy.copy(self)
        other.protocol = replace(self.protocol, resolution=resolution)
        return other

    def _at_resolution(self, policy: Any) -> contextlib.AbstractContextManager:
        """The policy sampling at the protocol's resolution: a transformer policy switches for the evaluation;
        a policy that samples one size only must already be at it."""
        wanted = self.protocol.resolution
        if wanted is None or getattr(policy, "resolution", wanted) == wanted:
            return contextlib.nullcontext()
        if hasattr(policy, "sampling_resolution"):
            return policy.sampling_resolution(wanted)
        raise ValueError(
            f"eval.resolution={wanted}, but {type(policy).__name__} samples {policy.resolution} px images only: "
            "set eval.resolution=null to evaluate at its own resolution"
        )

    def __call__(self, policy: Any, images_dir: str | Path | None = None) -> Evaluation:
        chosen = items(self.dataset, self.protocol)
        with self._at_resolution(policy):
            images = generate(policy, chosen, self.protocol, self.batch_size)
        if self.protocol.resolution not in (None, images.shape[-1]):
            raise ValueError(
                f"eval.resolution={self.protocol.resolution}, but {type(policy).__name__} sampled "
                f"{images.shape[-1]} px images: set eval.resolution=null to evaluate at its own resolution"
            )
        flow = isinstance(policy, FlowPolicy)
        protocol = replace(  # what was used: the ODE's steps or the tokens' temperature
            self.protocol,
            num_steps=self.protocol.num_steps if flow else None,
            temperature=None if flow else self.protocol.temperature,
            resolution=images.shape[-1],
            sampler=sampler_name(policy, self.protocol),
        )
        prompts = [item.prompt for item in chosen]
        metadata = [item.metadata for item in chosen]
        if images_dir is not None:
            write_images(images_dir, images, prompts, metadata, [item.k for item in chosen])
        columns = self._score(images, prompts, metadata)
        tasks = [item.task for item in chosen]
        scores = {column: summarise(values, tasks, protocol.overall) for column, values in columns.items()}
        records = [
            {
                "prompt": item.prompt,
                "task": item.task,
                "k": item.k,
                "seed": item.seed,
                **{column: _finite_or_none(values[i]) for column, values in columns.items()},
            }
            for i, item in enumerate(chosen)
        ]
        panel = [
            (
                (images[i] * 255).round().byte().permute(1, 2, 0),
                f"{chosen[i].prompt} | " + ", ".join(f"{c} {_fmt(columns[c][i])}" for c in columns),
            )
            for i in panel_indices(chosen, self.panel_size)
        ]
        return Evaluation(scores, len(chosen), protocol.to_json(), records, panel)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, Tensor]:
        columns: dict[str, Tensor] = {}
        # an edit's source images, for the rewards that read them (as RewardEnsemble gives them in training)
        sources = (
            source_images(metadata, images.shape[-1], images.device)
            if any(map(reads_sources, self.rewards.values()))
            else None
        )
        for name, reward in self.rewards.items():
            edit = {"sources": sources} if sources is not None and reads_sources(reward) else {}
            named = getattr(reward, "scores", None)
            if callable(named):
                for key, values in named(images, prompts, metadata, **edit).items():
                    columns[f"{name}/{key}"] = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
            else:
                values = reward(images, prompts, metadata, **edit)
                if not isinstance(values, Tensor):
                    values = [math.nan if v is None else float(v) for v in values]
                columns[name] = torch.as_tensor(values, dtype=torch.float32).detach().flatten().cpu()
        for column, values in columns.items():
            if values.shape[0] != images.shape[0]:
                raise ValueError(
                    f"eval reward {column!r} returned {values.shape[0]} scores for {images.shape[0]} images"
                )
        return columns


def summarise(values: Tensor, tasks: list[str], overall: str) -> dict[str, float]:
    """Per-task means (NaN, an unscorable image, left out) and ``overall``: the mean of the task means or the
    mean over images."""
    names = list(dict.fromkeys(tasks))
    index = torch.tensor([names.index(t) for t in tasks])
    per_task = {task: float(values[index == k].nanmean()) for k, task in enumerate(names)}
    if overall == "tasks":
        per_task["overall"] = sum(per_task.values()) / len(per_task)
    else:
        per_task["overall"] = float(values.nanmean())
    return per_task


def _finite_or_none(value: Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Tensor) -> str:
    return f"{float(value):.3f}"


class UnifiedEvaluator:
    """A unified model's evaluation: image generation (``generation``, or ``None``) and an understanding column
    ``understanding(policy) -> {task: score, "overall": ...}`` (the shapes world's VQA accuracy; MMMU, MMStar
    and POPE for PairUni)."""

    def __init__(
        self,
        generation: Evaluator | None,
        understanding: Callable[[Any], dict[str, float]],
        column: str = "understanding/accuracy",
    ) -> None:
        self.generation, self.understanding, self.column = generation, understanding, column

    def with_steps(self, num_steps: int) -> UnifiedEvaluator:
        generation = None if self.generation is None else self.generation.with_steps(num_steps)
        return UnifiedEvaluator(generation, self.understanding, self.column)

    def __call__(self, policy: Any, images_dir: str | Path | None = None) -> Evaluation:
        evaluation = self.generation(policy, images_dir) if self.generation is not None else Evaluation({}, 0)
        evaluation.scores[self.column] = dict(self.understanding(policy))
        return evaluation
