"""One RL iteration of a run, built from its config, executed on fake weights with its costs recorded.

The parts are the run's own: ``cfg.algo``, ``cfg.curriculum``, ``cfg.model`` (through :mod:`g2rpo.plan.fake`),
``cfg.optimizer`` and the EMA of ``cfg.module``, and the iteration is the module's: prompts from the
curriculum, this rank's whole groups (``rank_slice``), ``algorithm.rollout`` under ``no_grad``,
``algorithm.score``, ``algorithm.advantages``, then per step of ``algorithm.minibatches`` a backward per
loss unit, gradient clipping, the optimiser step and the weight averages (``on_optimizer_step``, the EMA).
Only Lightning's glue is left out (logging, the finite-gradient check that reads a value). The optimiser
state, the EMA and the algorithm's own averages exist before the measured iteration, as in any iteration
after the first.

Rewards: a CLIP-family reward model runs its image and text towers on fake weights (its PIL preprocessing
is replaced by 224 px pixel tensors); a served reward (``RemoteReward``) costs nothing on the trainer's
GPUs; any other reward is a CPU-side rule. Scores are stand-in uniform draws, so that advantages, masks
and minibatches are real values: the costs of an iteration do not depend on reward values.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from g2rpo.curriculum import PolicyProbe
from g2rpo.data import PromptDataset
from g2rpo.distributed import rank_slice
from g2rpo.plan import fake
from g2rpo.plan.meter import Meter
from g2rpo.plan.replay import Replay
from g2rpo.preflight import HUB_LOADERS
from g2rpo.randomness import iteration_generator
from g2rpo.types import RewardOutput

#: the loaders whose hub weights the planner replaces by a shipped architecture
LOADERS = {target for target, node in HUB_LOADERS.items() if node == "pipeline"}
#: hub models whose architecture ships with the planner (``g2rpo/plan/architectures``)
HUB_ARCHITECTURES = {
    "stabilityai/stable-diffusion-3.5-medium": "sd35_medium",
    "black-forest-labs/FLUX.1-dev": "flux1_dev",
}
#: CLIP-family rewards and the tower they run (HPSv2.1 and PickScore: OpenCLIP ViT-H-14; G2RPO's DFN5B
#: ClipCosine is a ViT-H-14 too; CLIP score and the aesthetic predictor: OpenAI ViT-L/14)
REWARD_ARCHITECTURES = {
    "HPSv2": "clip_vit_h14",
    "PickScore": "clip_vit_h14",
    "ClipCosine": "clip_vit_h14",
    "ClipScore": "clip_vit_l14",
    "LaionAesthetic": "clip_vit_l14",
}
PHASES = ("prompts", "rollout", "reward", "training")


def planned_dtype(dtype: str | None) -> str | None:
    """fp16 weights are planned as bf16 (the same bytes): CPU autocast, which executes the plan, refuses
    fp16 operands."""
    return "bfloat16" if dtype == "float16" else dtype


def fake_model_config(model: DictConfig, architecture: str | None = None) -> DictConfig:
    """``cfg.model`` with a hub loader replaced by the shipped architecture on meta weights."""
    node = copy.deepcopy(model)
    if node.get("janus") is not None:
        raise NotImplementedError(
            "Janus-Pro policies are not planned yet: their autoregressive rollout has a new shape at every "
            "token, which replay cannot shortcut (docs/planning.md)"
        )
    if node.get("compile"):
        node.compile = False  # planned eagerly: compiling fuses kernels, it does not change the FLOPs planned
    pipeline = node.get("pipeline")
    if pipeline is None:
        return node
    target = pipeline.get("_target_")
    if target in LOADERS:
        name = architecture or HUB_ARCHITECTURES.get(pipeline.path)
        if name is None:
            raise ValueError(
                f"plan: no shipped architecture for model.pipeline.path={pipeline.path!r}; pass "
                f"plan.architecture=<one of {sorted(p.stem for p in fake.ARCHITECTURES.glob('*.json'))}>"
            )
        replacement: dict[str, Any] = {
            "_target_": "g2rpo.plan.fake.pipeline",
            "name": name,
            "dtype": planned_dtype(pipeline.get("dtype", "bfloat16")),
        }
        if "text_encoder_3" in pipeline:
            replacement["text_encoder_3"] = pipeline.text_encoder_3
        node.pipeline = OmegaConf.create(replacement)
    elif "dtype" in pipeline:
        pipeline.dtype = planned_dtype(pipeline.dtype)
    return node


@dataclass
class RewardModel:
    """A reward model whose towers run in the plan."""

    model: nn.Module
    image_size: int
    on_gpu: bool


class PlannedReward:
    """The run's reward ensemble (names, weights, aggregate) with each model's forward executed on fake
    weights and stand-in scores (see the module docstring)."""

    def __init__(self, reward: DictConfig, mode, generator: torch.Generator) -> None:
        self.weights = {name: float((reward.get("weights") or {}).get(name, 1.0)) for name in reward.rewards}
        self.aggregate = reward.get("aggregate", "reward")
        self.generator = generator
        self.models: dict[str, RewardModel] = {}
        self.kinds: dict[str, str] = {}
        self.meter: Meter | None = None
        for name, node in reward.rewards.items():
            cls = get_class(node._target_)
            if cls.__name__ in REWARD_ARCHITECTURES:
                spec = fake.architecture(REWARD_ARCHITECTURES[cls.__name__])
                with fake.meta_parameters():
                    tower = fake.component(spec["model"])
                dtype = planned_dtype(node.get("dtype", "float32"))
                tower = fake.materialize(tower.to(getattr(torch, dtype)).eval().requires_grad_(False), mode)
                on_gpu = str(node.get("device", "cpu")).startswith("cuda")
                self.models[name] = RewardModel(tower, spec["image_size"], on_gpu)
                self.kinds[name] = f"{cls.__name__} ({spec['model']['class']}, {'GPU' if on_gpu else 'CPU'})"
            elif cls.__name__ == "RemoteReward":
                self.kinds[name] = "served (RemoteReward): not on the trainer's GPUs"
            else:
                self.kinds[name] = f"{cls.__name__}: not a GPU model (not costed)"

    def __call__(self, images, prompts, metadata=()) -> RewardOutput:
        batch = len(prompts)
        for reward in self.models.values():
            tracking = nullcontext() if reward.on_gpu or self.meter is None else self.meter.suspended()
            with tracking, torch.no_grad():
                size = reward.image_size
                pixels = images.new_empty(batch, 3, size, size)
                reward.model.get_image_features(pixel_values=pixels)
                ids = torch.zeros(
                    batch, reward.model.config.text_config.max_position_embeddings, dtype=torch.long
                )
                reward.model.get_text_features(input_ids=ids)
        scores = {name: torch.rand(batch, generator=self.generator) for name in self.weights}
        return RewardOutput(scores, self.weights, self.aggregate)


@dataclass
class Parts:
    algorithm: Any
    curriculum: Any
    dataset: PromptDataset
    reward: PlannedReward
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any
    world_size: int


def devices_per_node(trainer: DictConfig, gpus_per_node: int) -> int:
    """``trainer.devices``, with ``auto`` meaning ``gpus_per_node``."""
    devices = trainer.get("devices", 1)
    return gpus_per_node if devices in ("auto", -1) else int(devices)


def world_size(trainer: DictConfig, gpus_per_node: int) -> int:
    return devices_per_node(trainer, gpus_per_node) * int(trainer.get("num_nodes", 1))


def placeholder_prompts(count: int) -> PromptDataset:
    """Prompts only set token counts, and every pipeline pads to its maximum length: any text will do."""
    return PromptDataset(prompts=[f"object {i}" for i in range(count)])


def build(
    cfg: DictConfig, gpus_per_node: int = 8, architecture: str | None = None, real: bool = False
) -> Parts:
    """The run's parts on fake weights (``real=True``: on real ones, for validating the plan on CPU)."""
    mode = fake.new_fake_mode()
    algorithm = instantiate(cfg.algo, _convert_="object")
    curriculum = instantiate(cfg.curriculum, _convert_="object")
    prompts_needed = max(int(cfg.curriculum.get("prompts_per_iteration", 1)), 1) * 4
    dataset = placeholder_prompts(max(prompts_needed, 256))
    reward = PlannedReward(cfg.reward, mode, torch.Generator().manual_seed(cfg.seed))
    if real:
        policy = instantiate(cfg.model)
        if algorithm.uses_reference:
            policy.enable_reference()
    else:
        with fake.meta_parameters():
            policy = instantiate(fake_model_config(cfg.model, architecture))
            if algorithm.uses_reference:
                policy.enable_reference()
        fake.materialize(policy, mode)
    optimizer = instantiate(cfg.optimizer)(policy.trainable_parameters())
    return Parts(
        algorithm,
        curriculum,
        dataset,
        reward,
        policy,
        optimizer,
        None,
        world_size(cfg.trainer, gpus_per_node),
    )


@dataclass
class Execution:
    """What one iteration did, per phase: FLOPs, peak bytes, and the meter that saw it."""

    flops: dict[str, int] = field(default_factory=dict)
    images: int = 0
    prompts: int = 0
    units: int = 0
    optimizer_steps: int = 0
    meter: Meter | None = None
    replay: Replay | None = None


def _autocast(cfg: DictConfig):
    """The trainer's autocast, on the CPU that executes the plan. fp16 autocast (``16-mixed``, Flow-GRPO's
    SD3.5 presets) is planned as bf16, as fp16 weights are (:func:`planned_dtype`): the same bytes."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision.startswith("bf16") or precision in ("16", "16-mixed"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def _as_rank0_of(world_size: int):
    with mock.patch("g2rpo.distributed.world", return_value=(0, world_size)):
        yield


def label_state(meter: Meter, parts: Parts) -> None:
    """Name the storages that exist before the iteration (weights by module, the averages, the optimiser)."""
    policy = parts.policy
    for name, child in policy.named_children():
        if name == "reference_copy" and child is not None:
            meter.add(child.parameters(), "reference copy")
            continue
        trainable = [p for p in child.parameters() if p.requires_grad]
        frozen = [p for p in child.parameters() if not p.requires_grad]
        meter.add(frozen, f"frozen weights: {name}")
        meter.add(trainable, f"trained weights: {name}")
        meter.add(child.buffers(), f"frozen weights: {name}")
    for reward in parts.reward.models.values():
        if reward.on_gpu:
            meter.add(reward.model.parameters(), "reward models")
            meter.add(reward.model.buffers(), "reward models")


def warm_up(cfg: DictConfig, parts: Parts, meter: Meter) -> None:
    """The state every iteration after the first starts with: AdamW's moments, the evaluation EMA, the
    algorithm's averages (DGPO's theta^-)."""
    from diffusers.training_utils import EMAModel

    trainable = parts.policy.trainable_parameters()
    if cfg.module.get("ema_decay") is not None:
        parts.ema = EMAModel(trainable, decay=cfg.module.ema_decay)
        meter.label(parts.ema.shadow_params, "EMA")
    for p in trainable:
        p.grad = torch.zeros_like(p)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    meter.label(
        [
            t
            for state in parts.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ],
        "optimizer state",
    )
    parts.algorithm.on_optimizer_step(parts.policy)
    for serial, _ in list(meter.live.values()):
        meter.labels.setdefault(serial, "algorithm state")


def execute(cfg: DictConfig, parts: Parts, iteration: int = 0, replayed: bool = True) -> Execution:
    """One iteration (as :meth:`g2rpo.module.RLModule.training_step` with ``g2rpo.optimization``), measured."""
    result = Execution()
    meter = Meter()
    result.meter = meter
    parts.reward.meter = meter
    policy, algorithm = parts.policy, parts.algorithm
    sampling = iteration_generator(cfg.seed, iteration)
    training = iteration_generator(cfg.seed, iteration, 0)
    max_norm = cfg.module.get("max_grad_norm") or float("inf")

    @contextmanager
    def phase(name: str):
        meter.phase = name
        yield
        result.flops[name] = meter.flops[name]

    replay = Replay(meter)
    result.replay = replay
    denoisers = [
        m
        for m in (getattr(policy, "trained", None), getattr(policy, "reference_copy", None))
        if m is not None
    ]
    with meter, _autocast(cfg), replay.around(denoisers) if replayed else nullcontext():
        label_state(meter, parts)
        warm_up(cfg, parts, meter)
        with phase("prompts"):
            everyone = parts.curriculum.sample(
                parts.dataset, sampling, PolicyProbe(policy, parts.reward, sampling)
            )
            with _as_rank0_of(parts.world_size):
                prompts = rank_slice(everyone)
        result.prompts = prompts.groups.count
        with phase("rollout"), torch.no_grad():
            rollout = algorithm.rollout(policy, prompts, sampling, iteration)
        result.images = len(rollout.scored)
        with phase("reward"):
            rewards = algorithm.score(parts.reward, rollout)
        advantages = algorithm.advantages(rewards, rollout)
        with phase("training"):
            for units in algorithm.minibatches(rollout, advantages, training):
                for unit in units:
                    out = algorithm.loss(policy, rollout, advantages, unit)
                    (out.loss / len(units)).backward()
                    replay.after_backward()
                    result.units += 1
                meter.label([p.grad for p in policy.trainable_parameters()], "gradients")
                torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), max_norm)
                parts.optimizer.step()
                result.optimizer_steps += 1
                if parts.ema is not None:
                    parts.ema.step(policy.trainable_parameters())
                algorithm.on_optimizer_step(policy)
                parts.optimizer.zero_grad(set_to_none=True)
    return result


def parameter_counts(parts: Parts) -> dict[str, dict[str, int]]:
    """Parameters per module of the policy (and of the reward models): total and trainable."""
    counts: dict[str, dict[str, int]] = {}
    for name, child in parts.policy.named_children():
        if child is None:
            continue
        params = list(child.parameters())
        counts[name] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    for name, reward in parts.reward.models.items():
        counts[f"reward: {name}"] = {
            "total": sum(p.numel() for p in reward.model.parameters()),
            "trainable": 0,
        }
    return counts
