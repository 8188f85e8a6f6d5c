"""Pairwise preferences: the rewards that train a judge, and the reward a trained judge gives images.

UniPic's Skywork-ImgReward (arXiv 2508.03320, its reward models) is a VLM judge trained by GRPO with
``r = r_theta + r_format``: a pairwise-ranking score and a format score. Here, for a verdict text on a pair
whose preferred image is known (``metadata["preferred"]`` in ``{"A", "B"}``):

- :class:`RankingCorrect` pays 1 when the verdict names the preferred image, 0 otherwise (also when no
  verdict can be read);
- :class:`VerdictFormat` pays 1 when the text is exactly ``<answer>A</answer>`` or ``<answer>B</answer>``.

``reward=judge_training`` weighs the two. :class:`PairwiseJudgeReward` then turns a trained judge's pairwise
preferences into per-image scores within each prompt's group (``reward=judge``).
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

EXACT = re.compile(r"<answer>([AB])</answer>")
REASONED = re.compile(r"(?:(?!<answer>).)*<answer>([AB])</answer>", re.DOTALL)  # one verdict, at the end
LENIENT = re.compile(r"<answer>\s*([AB])\s*</answer>", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """``"A"`` or ``"B"`` from the first ``<answer>...</answer>`` holding one of them (spaces and case
    forgiven), else None."""
    match = LENIENT.search(text)
    return match.group(1).upper() if match else None


def exact_format(text: str, reasoning: bool = False) -> bool:
    """Whether the whole text is ``<answer>A</answer>`` or ``<answer>B</answer>``, nothing around it; with
    ``reasoning``, any text without an ``<answer>`` tag may come before the verdict, nothing after it."""
    return (REASONED if reasoning else EXACT).fullmatch(text) is not None


class RankingCorrect:
    """1 when the verdict (:func:`parse_verdict`) names ``metadata["preferred"]``, else 0; NaN for a sample
    without a preference."""

    def __call__(self, texts: Sequence[str], prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        return torch.tensor(
            [
                float("nan")
                if meta.get("preferred") is None
                else float(parse_verdict(text) == meta["preferred"])
                for text, meta in zip(texts, metadata, strict=True)
            ]
        )


class VerdictFormat:
    """1 when the text is exactly the verdict format (:func:`exact_format`), else 0. ``reasoning``: the
    verdict may follow free reasoning (a judge prompted to think first, as the Qwen2.5-VL judge's default
    instruction allows)."""

    def __init__(self, reasoning: bool = False) -> None:
        self.reasoning = reasoning

    def __call__(self, texts: Sequence[str], prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        return torch.tensor([float(exact_format(text, self.reasoning)) for text in texts])


class Judge(Protocol):
    def prefer(self, images: Tensor, others: Tensor, prompts: Sequence[str]) -> Tensor:
        """``[N]`` probability that ``images[i]`` (shown as A) matches ``prompts[i]`` better than
        ``others[i]`` (shown as B); images ``[N, 3, H, W]`` in [0, 1]."""
        ...


class PairwiseJudgeReward:
    """Per-image scores from a pairwise judge: each image's debiased win rate within its group.

    The rule: images with the same prompt in the batch form a group. For every two members ``i != j`` the
    judge is asked in both orders, ``p_ij = P(i preferred | i shown as A, j as B)`` and ``p_ji``; the
    position-debiased probability that ``i`` beats ``j`` is ``q_ij = (p_ij + 1 - p_ji) / 2`` (so
    ``q_ij + q_ji = 1``, and a judge that always says "A" gives 1/2). An image's score is the mean of
    ``q_ij`` over its opponents: every other member, or, with ``max_opponents``, that many members it draws
    (without replacement, from a generator keyed by ``seed``, the prompt and its place in the group) plus
    any member that drew it. An image alone in its group scores 0.5: it has no
    opponent, and its group's advantage is 0 whatever it scores.

    Probabilities, not sampled verdicts: the judge's ``P(A)`` vs ``P(B)`` of the verdict token makes the
    reward deterministic. ``batch_size`` pairs go through the judge at a time.
    """

    def __init__(self, judge: Judge, max_opponents: int | None = None, batch_size: int = 64, seed: int = 0):
        if max_opponents is not None and max_opponents < 1:
            raise ValueError(f"reward.max_opponents must be >= 1 or null (all), got {max_opponents}")
        self.judge = judge
        self.max_opponents = max_opponents
        self.batch_size = batch_size
        self.seed = seed

    def pairs(self, prompts: Sequence[str]) -> list[tuple[int, int]]:
        """The unordered pairs ``(i, j)``, ``i < j``, judged (each in both orders)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            groups[prompt].append(index)
        chosen: set[tuple[int, int]] = set()
        for prompt, members in groups.items():
            for position, i in enumerate(members):
                others = [j for j in members if j != i]
                if self.max_opponents is not None and len(others) > self.max_opponents:
                    key = zlib.crc32(f"{self.seed}/{prompt}/{position}".encode())  # stable across processes
                    generator = torch.Generator().manual_seed(key)
                    picked = torch.randperm(len(others), generator=generator)[: self.max_opponents]
                    others = [others[k] for k in picked.tolist()]
                chosen.update((min(i, j), max(i, j)) for j in others)
        return sorted(chosen)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        pairs = self.pairs(prompts)
        wins = torch.zeros(len(prompts), dtype=torch.float64)
        games = torch.zeros(len(prompts), dtype=torch.float64)
        for start in range(0, len(pairs), self.batch_size):
            chunk = torch.tensor(pairs[start : start + self.batch_size])
            first, second = chunk[:, 0], chunk[:, 1]
            captions = [prompts[i] for i in first.tolist()]
            forward = self.judge.prefer(images[first], images[second], captions).double().cpu()
            backward = self.judge.prefer(images[second], images[first], captions).double().cpu()
            first_wins = (forward + 1 - backward) / 2
            wins.index_add_(0, first, first_wins)
            wins.index_add_(0, second, 1 - first_wins)
            games.index_add_(0, first, torch.ones_like(first_wins))
            games.index_add_(0, second, torch.ones_like(first_wins))
        return torch.where(games > 0, wins / games.clamp_min(1), torch.full_like(wins, 0.5)).float()
