"""Math reasoning accuracy of a text policy on held-out sets, the columns of CurES's Table 1 (arXiv 2510.01037).

Each question is answered ``samples_per_question`` times and every answer scored by the verifier's
correctness (its format reward left out); a set's accuracy is the mean over all its answers: Pass@1 with one sample, Average@n with n (the paper: Pass@1
for MATH500, GSM8K, Minerva and OlympiadBench, Average@16 for AIME24 and AMC23, temperature 1.0, at most 3072
new tokens). Sample ``k`` of question ``q`` of set ``s`` draws its tokens from a generator keyed by
``(seed, s, q, k)``, so the numbers do not depend on the batch size or on which other sets are evaluated.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch

from g2rpo.data import PromptDataset
from g2rpo.randomness import TOKEN, seeded
from g2rpo.reasoning.verifier import MathVerifyReward


class ReasoningAccuracy:
    """``policy -> {set: accuracy, "overall": mean over sets}`` (and ``{set}/format``, the fraction of answers
    with a ``\\boxed{}`` answer, with ``report_format``): the ``understanding`` of
    :class:`~g2rpo.evaluation.evaluator.UnifiedEvaluator` for a text policy (``generation=None``).

    ``samples_per_question``: one count for every set, or a count per set name (1 where a set is not named).
    ``temperature`` 0 decodes greedily; ``batch_size`` answers are sampled per call of the policy.
    """

    def __init__(
        self,
        sets: Mapping[str, PromptDataset],
        verifier: MathVerifyReward,
        max_new_tokens: int,
        samples_per_question: Mapping[str, int] | int = 1,
        temperature: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        report_format: bool = True,
    ) -> None:
        if not sets:
            raise ValueError("reasoning evaluation: no sets given")
        self.sets = dict(sets)
        if isinstance(samples_per_question, int):
            samples = dict.fromkeys(self.sets, samples_per_question)
        else:
            samples = dict(samples_per_question)
            unknown = sorted(set(samples) - set(self.sets))
            if unknown:
                raise ValueError(
                    f"samples_per_question names {unknown}, which are not among the sets {sorted(self.sets)}"
                )
            samples = {name: int(samples.get(name, 1)) for name in self.sets}
        bad = {name: n for name, n in samples.items() if n < 1}
        if bad:
            raise ValueError(f"samples_per_question must be >= 1, got {bad}")
        if batch_size < 1 or max_new_tokens < 1 or temperature < 0:
            raise ValueError(
                f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1, "
                f"temperature={temperature} >= 0"
            )
        self.samples = samples
        self.verifier = verifier
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.seed = seed
        self.report_format = report_format

    def answers(self, policy: Any, name: str) -> tuple[list[str], list[int]]:
        """Every answer to set ``name`` (sample ``k`` of question ``q`` at ``q * n + k``) and its question."""
        dataset, n = self.sets[name], self.samples[name]
        key = zlib.crc32(name.encode())  # stable across processes, unlike hash()
        items = [(q, k) for q in range(len(dataset)) for k in range(n)]
        texts: list[str] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            rollout = policy.sample_tokens(
                "text",
                {"questions": [dataset.prompts[q] for q, _ in chunk]},
                [seeded(self.seed, TOKEN, key, q, k) for q, k in chunk],
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
            )
            if len(rollout.texts) != len(chunk):
                raise ValueError(
                    f"{type(policy).__name__}.sample_tokens returned {len(rollout.texts)} texts for "
                    f"{len(chunk)} questions"
                )
            texts.extend(rollout.texts)
        return texts, [q for q, _ in items]

    @torch.no_grad()
    def __call__(self, policy: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, dataset in self.sets.items():
            texts, questions = self.answers(policy, name)
            metadata = [dataset.metadata[q] for q in questions]
            results[name] = float(self.verifier.correctness(texts, metadata).mean())
            if self.report_format:
                results[f"{name}/format"] = sum(map(self.verifier.has_format, texts)) / len(texts)
        results["overall"] = sum(results[name] for name in self.sets) / len(self.sets)
        return results
