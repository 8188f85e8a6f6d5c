"""GRPO over sampled tokens: text answers, or an autoregressive model's image codes.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, eq. 3), as PairUni writes it for its
understanding and generation rollouts (arXiv 2510.25682v3, eq. 1):

    rho_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    A_i   = (r_i - mean_group(r)) / std_group(r)                       (one advantage per sequence)
    J     = E[ agg_t min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) ] - beta KL(pi_theta || pi_ref)

``aggregation`` decides ``agg``, which neither paper pins down for PairUni:
- ``token`` (default): the mean over every generated token of the micro-batch (DAPO, arXiv 2503.14476,
  eq. 8), so long and short answers weigh per token;
- ``sequence``: the mean over each sequence's tokens, then over sequences (DeepSeekMath eq. 3).

The KL is DeepSeekMath's unbiased per-token estimator (eq. 4), ``exp(ref - logp) - (ref - logp) - 1``;
PairUni trains with ``beta = 0``. The rollout keeps each token's log-probability under the sampling policy,
so the ratio is exactly 1 before the first update (logged as ``logprob_gap``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from g2rpo.advantages import Advantages, GroupNormalization
from g2rpo.algos.base import (
    MICRO_BATCHES,
    Algorithm,
    as_normalization,
    check_choice,
    check_positive,
    micro_batch_weight,
    shuffled_minibatches,
)
from g2rpo.data import read_image
from g2rpo.policies.tokens import TOKEN_TASKS, TokenPolicy
from g2rpo.randomness import TOKEN, keyed
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.types import LossOutput, PromptBatch, RewardOutput, TokenRollout, TrainingUnit

AGGREGATIONS = ("token", "sequence")


def masked_log_probs(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B, T]`` log-probs of ``tokens`` under ``softmax(logits / temperature)``, 0 where ``~mask``."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    picked = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    """Reduce ``[B, T]`` per-token terms to a scalar: ``token`` mean or ``sequence`` mean of means."""
    weights = mask.float()
    if aggregation == "token":
        return (per_token * weights).sum() / weights.sum().clamp_min(1)
    per_sequence = (per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1)
    return per_sequence.mean()


def clipped_token_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregation: str = "token",
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO-clip surrogate per token, aggregated: ``advantages`` ``[B]`` (one per sequence, broadcast over
    its tokens) or ``[B, T]`` (per token, REINFORCE++).

    ``dual_clip = c > 1`` also bounds the loss of a negative advantage by ``-c A`` (Ye et al. 2020, arXiv
    1912.09729, eq. 4; verl's ``clip_ratio_c``, 3 in CurES's scripts), so a huge ratio on a bad token cannot
    dominate the step. Diagnostics as :func:`g2rpo.losses.clipped_surrogate`, averaged over generated tokens.
    """
    log_ratio = torch.where(mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    ratio = torch.exp(log_ratio)
    advantage = advantages.to(log_probs.dtype)
    advantage = advantage[:, None] if advantage.dim() == 1 else advantage
    per_token = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip_range, 1 + clip_range))
    if dual_clip is not None:
        per_token = torch.where(advantage < 0, torch.minimum(per_token, -advantage * dual_clip), per_token)
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        tokens = mask.float().sum().clamp_min(1)
        metrics = {
            "ratio": (ratio * mask).sum() / tokens,
            "clipfrac": (((ratio - 1).abs() > clip_range) & mask).float().sum() / tokens,
            "approx_kl": 0.5 * (log_ratio**2).sum() / tokens,
            "logprob_gap": log_ratio.abs().sum() / tokens,
        }
    return loss, metrics


def token_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """DeepSeekMath's per-token KL estimator ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


def _images(batch: PromptBatch, key: str, task: str) -> Tensor:
    """``metadata[key]`` of every sample, a tensor or a path (g2rpo.data.pair_dataset) read when its sample
    is rolled out."""
    missing = [i for i, meta in enumerate(batch.metadata) if key not in meta]
    if missing:
        raise ValueError(
            f"algo task={task} needs metadata[{key!r}] per sample; samples {missing[:5]} have none: use "
            f"{'a question dataset such as data=shapes_pairs' if task == 'answer' else 'data=judge_pairs'}"
        )
    images = [
        read_image(Path(meta[key]), meta["image_size"]) if isinstance(meta[key], str) else meta[key]
        for meta in batch.metadata
    ]
    return torch.stack(images)


def token_inputs(task: str, batch: PromptBatch) -> dict:
    """What :meth:`TokenPolicy.sample_tokens` needs from a prompt batch: ``answer`` reads each sample's image
    from ``metadata["image"]`` and asks ``prompts`` (the questions); ``compare`` reads images A and B from
    ``metadata["image"]`` and ``metadata["other_image"]`` with ``prompts`` as the captions; ``text`` asks
    ``prompts`` with no image; ``image`` draws ``prompts``."""
    if task == "answer":
        return {"images": _images(batch, "image", task), "questions": batch.prompts}
    if task == "text":
        return {"questions": batch.prompts}
    if task == "compare":
        return {
            "images": _images(batch, "image", task),
            "other_images": _images(batch, "other_image", task),
            "questions": batch.prompts,
        }
    return {"prompts": batch.prompts}


@dataclass
class TokenGRPO(Algorithm[TokenRollout]):
    """Defaults: PairUni's (temperature 1, beta 0, group std), with PPO's clip 0.2 (DeepSeekMath)."""

    task: str = "answer"  # answer (an image's question) | compare (a verdict) | text (text only) | image
    temperature: float = 1.0
    max_new_tokens: int = 4  # answer task: the shapes world's answers are one word and an end token
    guidance_scale: float = 5.0  # image task: CFG of the image-token logits (PairUni: 5); unused for answers
    clip_range: float = 0.2
    beta: float = 0.0
    aggregation: str = "token"  # token | sequence
    dual_clip: float | None = None  # c > 1: a negative advantage's loss is at most -c A (CurES: 3)
    rollout_batch_size: int = 32  # sequences per sampling call; also the training micro-batch
    num_inner_epochs: int = 1
    num_minibatches: int = 2
    micro_batches: str = "exact"  # exact (kept samples only) | padded (whole rollout-shaped micro-batches)
    normalization: GroupNormalization = field(
        default_factory=lambda: GroupNormalization(std="group", drop_zero_std=True)
    )

    def __post_init__(self) -> None:
        self.normalization = as_normalization(self.normalization)
        check_choice("task", self.task, TOKEN_TASKS)
        check_choice("micro_batches", self.micro_batches, MICRO_BATCHES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.temperature <= 0:
            raise ValueError(f"algo.temperature must be > 0 for sampling, got {self.temperature}")
        check_positive(
            self, "clip_range", "rollout_batch_size", "num_inner_epochs", "num_minibatches", "max_new_tokens"
        )
        check_positive(self, "beta", allow_zero=True)
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"algo.dual_clip must be > 1 (or null: off), got {self.dual_clip}")

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    def score(self, reward: RewardEnsemble, rollout: TokenRollout) -> RewardOutput:
        """Text tasks (``answer``, ``compare``) are scored on the decoded texts (rewards such as
        :mod:`g2rpo.rewards.preference`'s read texts where others read images); ``image`` on the images."""
        if self.task == "image":
            return super().score(reward, rollout)
        return reward(rollout.texts, rollout.scored.prompts, rollout.scored.metadata)

    def rollout(
        self, policy: TokenPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> TokenRollout:
        """Sample every sequence from its own stream (keyed by its index in the batch), in chunks."""
        inputs = token_inputs(self.task, batch)
        generators = keyed(generator, batch.sample_ids, TOKEN)
        guidance = self.guidance_scale if self.task == "image" else 1.0
        chunks = []
        for rows in torch.arange(len(batch)).split(self.rollout_batch_size):
            chunk_inputs = {
                key: value[rows] if isinstance(value, Tensor) else [value[i] for i in rows.tolist()]
                for key, value in inputs.items()
            }
            chunks.append(
                policy.sample_tokens(
                    self.task,
                    chunk_inputs,
                    [generators[i] for i in rows.tolist()],
                    temperature=self.temperature,
                    max_new_tokens=self.max_new_tokens,
                    guidance_scale=guidance,
                )
            )
        return dataclasses.replace(TokenRollout.cat(chunks), scored=batch)

    def rollout_metrics(self, rollout: TokenRollout, rewards: RewardOutput) -> dict[str, float]:
        return {"response_length": float(rollout.mask.sum(-1).float().mean())}

    def minibatches(
        self, rollout: TokenRollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[TrainingUnit]]:
        return [
            [TrainingUnit(m, 0) for m in step]
            for step in shuffled_minibatches(
                advantages.train_mask,
                self.rollout_batch_size,
                self.num_minibatches,
                self.num_inner_epochs,
                generator,
                self.micro_batches,
            )  # fmt: skip
        ]

    def loss(
        self, policy: TokenPolicy, rollout: TokenRollout, advantages: Advantages, unit: TrainingUnit
    ) -> LossOutput:
        part = rollout.select(unit.samples)
        log_probs = policy.token_log_probs(part)
        mask = part.mask.to(log_probs.device)
        policy_loss, metrics = clipped_token_loss(
            log_probs,
            part.log_probs.to(log_probs.device),
            advantages.values[unit.samples.to(advantages.values.device)].to(log_probs.device),
            mask,
            self.clip_range,
            self.aggregation,
            self.dual_clip,
        )
        loss = policy_loss
        metrics["policy_loss"] = policy_loss.detach()
        if self.beta > 0:
            with torch.no_grad(), policy.reference():
                ref_log_probs = policy.token_log_probs(part)
            kl = aggregate(token_kl(log_probs, ref_log_probs), mask, self.aggregation)
            loss = loss + self.beta * kl
            metrics["kl"] = kl.detach()
        weight = micro_batch_weight(unit.samples, self.rollout_batch_size, self.micro_batches)
        return LossOutput(loss=loss * weight, metrics=metrics)
