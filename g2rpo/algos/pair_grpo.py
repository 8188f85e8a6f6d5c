"""Pair-GRPO: GRPO on pairs of aligned understanding and generation items (PairUni, arXiv 2510.25682v3).

A unified model both answers questions about images (understanding) and draws images from captions
(generation). PairUni trains it on *pairs* p = (understanding item, generation item) that are semantically
aligned (built by the PairUG procedure, :mod:`g2rpo.shapes.pairug`), and scales every advantage of a pair by
how well the two items match:

1. **Rollouts per side** (eq. 2): each pair draws K text answers to its question and K images of its
   caption; the same ``group_ids`` index both sides (a curriculum may vary K per pair, as CurES does).
2. **Advantages per (pair, task)** (eq. 1-2): each side is normalised within its own group,
   ``A = (r - mean) / std``; understanding is scored by answer accuracy, generation by the reward ensemble.
3. **Pair weight** (eq. 3): ``w_p = 1`` for an aligned pair (one image's completed quadruple) and
   ``w_p = sqrt(s_p)`` for a retrieved pair of similarity ``s_p``; ``weight_fn`` selects ``none`` (1),
   ``linear`` (s_p) or ``sqrt`` (the paper's, Table 7). Every advantage of the pair, on both sides, is
   multiplied: ``A~ = w_p A``.
4. **One objective** (eq. 4): the understanding and generation PPO-clip losses are summed and take one
   optimiser step together: optimiser step k trains minibatch k of each side, and each side's loss is the
   mean over its own units there, so the step's loss is ``L_und + L_gen`` (``side_weights`` scales them;
   1:1 in the paper). ``beta_KL = 0`` on both sides (sec. 4.1).

The sides are algorithms of their own: understanding is :class:`~g2rpo.algos.token_grpo.TokenGRPO` over
answer tokens; generation is Flow-GRPO for a flow model (the shapes world's unified model: PairUni notes that
diffusion backbones swap in a diffusion-RL log-prob) or ``TokenGRPO(task=image)`` for Janus-Pro's image
tokens. The paper leaves token vs sequence aggregation open (``understanding.aggregation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from g2rpo.advantages import Advantages
from g2rpo.algos.base import Algorithm
from g2rpo.algos.token_grpo import TokenGRPO
from g2rpo.pairing import WEIGHT_FNS, pair_weight
from g2rpo.rewards.answer import AnswerMatch
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.types import LossOutput, PromptBatch, RewardOutput, Rollout, TokenRollout, TrainingUnit

SIDES = ("generation", "understanding")


def pair_weights(metadata: list[dict], weight_fn: str) -> Tensor:
    """``w_p`` of each sample's pair (eq. 3, :func:`g2rpo.pairing.pair_weight`)."""
    if any("pair" not in meta for meta in metadata):
        raise ValueError("algo=pair_grpo needs pair data (metadata['pair']): use data=shapes_pairs")
    return torch.tensor(
        [pair_weight(meta["pair"]["kind"], meta["pair"]["similarity"], weight_fn) for meta in metadata]
    )


def understanding_batch(batch: PromptBatch) -> PromptBatch:
    """Each sample's question about its pair's image (same group, prompt and sample ids as ``batch``)."""
    pairs = [meta["pair"] for meta in batch.metadata]
    return PromptBatch(
        prompts=[pair["question"] for pair in pairs],
        metadata=[
            {
                "image": pair["image"],
                "image_size": pair.get("image_size"),
                "answer": pair["answer"],
                "qtype": pair["qtype"],
                "pair": pair,
            }
            for pair in pairs
        ],
        group_ids=batch.group_ids,
        prompt_ids=batch.prompt_ids,
        sample_ids=batch.sample_ids,
    )


@dataclass
class PairRollout:
    """Both sides' rollouts of one iteration. Scored: the generation side's outputs, then the answers; a
    side's groups are (pair, task) groups."""

    generation: Rollout  # SDERollout or SingularRollout (flow side), TokenRollout (image tokens)
    understanding: TokenRollout  # its ``scored`` holds each sample's question (:func:`understanding_batch`)
    batch: PromptBatch  # the sampled pairs, one entry per group member
    weights: Tensor  # [B] w_p of each sample's pair

    @property
    def images(self) -> Tensor:
        return self.generation.images

    @property
    def scored(self) -> PromptBatch:
        return PromptBatch.concat([self.generation.scored, self.understanding.scored])

    def __len__(self) -> int:
        return len(self.batch)


@dataclass
class PairRewards(RewardOutput):
    """One ``pair`` score over the scored outputs (what the module logs and the curriculum sees) and each
    side's own rewards, which its advantages are computed from."""

    sides: dict[str, RewardOutput] = field(default_factory=dict)


@dataclass
class PairAdvantages(Advantages):
    """The scored batch's advantages (generation rows, then understanding rows) and each side's own."""

    sides: dict[str, Advantages] = field(default_factory=dict)


@dataclass
class PairUnit(TrainingUnit):
    """A side's training unit, with the factor that turns the module's mean over units into a per-side mean."""

    side: str = "generation"
    scale: float = 1.0


def weighted(advantages: Advantages, weights: Tensor) -> Advantages:
    """``A~ = w_p A`` (eq. 3); which samples train is unchanged."""
    return dataclasses.replace(advantages, values=advantages.values * weights.to(advantages.values))


@dataclass
class PairGRPO(Algorithm[PairRollout]):
    """PairUni's defaults: sqrt weighting, beta 0, group-std advantages per side, losses summed 1:1."""

    generation: Any = None  # an Algorithm over images: FlowGRPO (flow models) or TokenGRPO(task=image)
    understanding: Any = None  # TokenGRPO(task=answer)
    weight_fn: str = "sqrt"  # none | linear | sqrt
    side_weights: dict = field(default_factory=lambda: {"generation": 1.0, "understanding": 1.0})
    answer_reward: Any = None  # scores answers; default: exact match of the first word

    def __post_init__(self) -> None:
        if self.weight_fn not in WEIGHT_FNS:
            raise ValueError(
                f"algo.weight_fn={self.weight_fn!r} is not valid; choose one of {', '.join(WEIGHT_FNS)}"
            )
        if not isinstance(self.generation, Algorithm):
            raise ValueError("algo.generation must be an algorithm over images (e.g. g2rpo.algos.FlowGRPO)")
        if self.understanding is None:
            self.understanding = TokenGRPO()
        if not isinstance(self.understanding, TokenGRPO) or self.understanding.task != "answer":
            raise ValueError("algo.understanding must be a TokenGRPO with task=answer")
        self.answer_reward = self.answer_reward or AnswerMatch(first_word=True)
        self.side_weights = dict(self.side_weights)
        if set(self.side_weights) != set(SIDES) or min(self.side_weights.values()) < 0:
            raise ValueError(f"algo.side_weights needs non-negative weights for exactly {SIDES}")

    @property
    def uses_reference(self) -> bool:
        return self.generation.uses_reference or self.understanding.uses_reference

    def rollout(
        self, policy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> PairRollout:
        return PairRollout(
            generation=self.generation.rollout(policy, batch, generator, iteration),
            understanding=self.understanding.rollout(
                policy, understanding_batch(batch), generator, iteration
            ),
            batch=batch,
            weights=pair_weights(batch.metadata, self.weight_fn),
        )

    def score(self, reward: RewardEnsemble, rollout: PairRollout) -> PairRewards:
        """Images by the reward ensemble (the generation side's own rule), answers by ``answer_reward``."""
        answers = rollout.understanding
        sides = {
            "generation": self.generation.score(reward, rollout.generation),
            "understanding": RewardOutput(
                scores={"answer": self.answer_reward(answers.texts, answers.scored.metadata).float()},
                weights={"answer": 1.0},
            ),
        }
        total = torch.cat([sides[side].total.cpu() for side in SIDES])
        return PairRewards(scores={"pair": total}, weights={"pair": 1.0}, sides=sides)

    def advantages(self, rewards: PairRewards, rollout: PairRollout) -> PairAdvantages:
        """Each side normalised in its own groups by its own rule, then scaled by the pair weights."""
        sides = {
            side: getattr(self, side).advantages(rewards.sides[side], getattr(rollout, side))
            for side in SIDES
        }
        # a side may score several outputs per sample (G2RPO): their pair is the sample's
        scored_weights = {
            "generation": pair_weights(rollout.generation.scored.metadata, self.weight_fn),
            "understanding": rollout.weights,
        }
        sides = {side: weighted(sides[side], scored_weights[side]) for side in SIDES}
        return PairAdvantages(
            values=torch.cat([sides[side].values.cpu() for side in SIDES]),
            valid=torch.cat([sides[side].valid.cpu() for side in SIDES]),
            zero_std=torch.cat([sides[side].zero_std.cpu() for side in SIDES]),
            train_mask=torch.cat([sides[side].train_mask.cpu() for side in SIDES]),
            num_groups=sum(sides[side].num_groups for side in SIDES),
            num_zero_std_groups=sum(sides[side].num_zero_std_groups for side in SIDES),
            sides=sides,
        )

    def rollout_metrics(self, rollout: PairRollout, rewards: PairRewards) -> dict[str, float]:
        metrics = {
            f"reward/generation/{key.split('/', 1)[1]}": value
            for key, value in rewards.sides["generation"].metrics().items()
        }
        correct = rewards.sides["understanding"].total.cpu()
        metrics["reward/understanding/accuracy"] = correct.nanmean().item()
        qtypes = [meta["qtype"] for meta in rollout.understanding.scored.metadata]
        for qtype in dict.fromkeys(qtypes):
            rows = torch.tensor([q == qtype for q in qtypes])
            metrics[f"reward/understanding/{qtype}"] = correct[rows].nanmean().item()
        metrics["pair/weight_mean"] = rollout.weights.mean().item()
        metrics["pair/aligned_frac"] = sum(
            meta["pair"]["kind"] == "aligned" for meta in rollout.batch.metadata
        ) / len(rollout)
        for side in SIDES:
            metrics.update(
                {
                    f"{side}/{key}": value
                    for key, value in getattr(self, side)
                    .rollout_metrics(getattr(rollout, side), rewards.sides[side])
                    .items()
                }
            )
        return metrics

    def minibatches(
        self, rollout: PairRollout, advantages: PairAdvantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        """Step k holds minibatch k of each side; a unit's ``scale`` makes the module's mean over the step's
        units equal ``sum_side side_weight * mean over that side's units`` (eq. 4's sum)."""
        per_side = {
            side: getattr(self, side).minibatches(getattr(rollout, side), advantages.sides[side], generator)
            for side in SIDES
        }
        steps = []
        for k in range(max(len(units) for units in per_side.values())):
            chosen = {side: per_side[side][k] if k < len(per_side[side]) else [] for side in SIDES}
            total = sum(len(units) for units in chosen.values())
            steps.append(
                [
                    PairUnit(
                        unit.samples,
                        unit.index,
                        side=side,
                        scale=self.side_weights[side] * total / len(units),
                    )  # fmt: skip
                    for side, units in chosen.items()
                    for unit in units
                ]
            )
        return steps

    def loss(self, policy, rollout: PairRollout, advantages: PairAdvantages, unit: PairUnit) -> LossOutput:
        side = getattr(self, unit.side)
        out = side.loss(
            policy,
            getattr(rollout, unit.side),
            advantages.sides[unit.side],
            TrainingUnit(unit.samples, unit.index),
        )
        metrics = {f"{unit.side}/{key}": value for key, value in out.metrics.items()}
        if "logprob_gap" in out.metrics:  # the module's on-policy check reads it, whichever side
            metrics["logprob_gap"] = out.metrics["logprob_gap"]
        return LossOutput(loss=out.loss * unit.scale, metrics=metrics)

    def on_optimizer_step(self, policy) -> None:
        for side in SIDES:
            getattr(self, side).on_optimizer_step(policy)

    def state_dict(self) -> dict:
        return {side: getattr(self, side).state_dict() for side in SIDES}

    def load_state_dict(self, state: Mapping) -> None:
        for side in SIDES:
            getattr(self, side).load_state_dict(state.get(side, {}))
