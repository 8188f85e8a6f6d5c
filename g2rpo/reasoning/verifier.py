"""The math reward: is a response's final answer equivalent to the reference answer?

CurES (arXiv 2510.01037) trains Qwen2.5-Math by GRPO / REINFORCE++ on a binary reward: the policy is asked to
"output the final answer within \\boxed{}", each response is scored by ``math_verify``, and a response counts
as correct ("Accepted" in its curriculum statistics) when its score is above ``correct_threshold = 0.5``
(brief: ``shared/research/cures_pairuni_unipic.md``, A.3 and A.5). :class:`MathVerifyReward` gives that score:
1 when the last ``\\boxed{...}`` of the response is equivalent to the gold answer, else 0, so any threshold in
(0, 1) reads it as CurES does.

Why math-verify and not string match: the same number has many spellings (``\\frac{1}{2}``, ``\\dfrac12``,
``0.5``; ``2\\sqrt{2}`` and ``\\sqrt{8}``; ``x^2+2x+1`` and ``(x+1)^2``; ``\\{1, 2\\}`` and ``2, 1``). A string
match marks right answers wrong, and that noise is not zero-mean: it punishes whichever spelling the data set
did not use, which the policy then learns to avoid. math-verify parses both sides to SymPy (LaTeX or plain
expressions) and compares them numerically and symbolically, with a string comparison as its last resort.

Its timeouts use ``signal.alarm``, which works only in the main thread; elsewhere they are switched off
(``timeout_seconds=None`` is passed), so a pathological expression can then take as long as SymPy takes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from numbers import Real

import torch
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from torch import Tensor

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# gold and boxed answers are wrapped in \boxed{} again so that math-verify reads them with its boxed rules
GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
ANSWER_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
# a percent sign is dropped, as the MATH grader's normaliser does (and LaTeX percent numbers do not parse
# under latex2sympy2_extended 1.11.0's antlr 4.9.3 grammar)
PERCENT = re.compile(r"\\?%\s*$")


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces balanced, escaped ``\\{`` skipped),
    stripped; None when there is none, it is empty, or it is never closed (a response cut off mid-answer)."""
    starts = list(BOXED.finditer(text))
    if not starts:
        return None
    start = index = starts[-1].end()
    depth = 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[start:index].strip() or None
        index += 1
    return None


def extract_answer(text: str) -> str | None:
    """A solution's final answer: the last ``\\boxed{}`` / ``\\fbox{}`` (MATH, CurES's prompt), else the text
    after the last ``####`` up to the line's end (GSM8K), else None."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        lines = text.rsplit("####", 1)[1].strip().splitlines()
        answer = lines[0].strip().rstrip(".").strip() if lines else ""
        return answer or None
    return None


def _clean(answer: str) -> str:
    """An extracted answer as it is parsed: no surrounding ``$``, no trailing percent sign."""
    return PERCENT.sub("", answer.strip().strip("$").strip()).strip()


def _gold_text(gold: object, index: int, key: str) -> str:
    """A metadata gold answer (a string, possibly a whole solution, or a number) as the answer's text."""
    if isinstance(gold, bool) or not isinstance(gold, (str, Real)):
        raise ValueError(
            f"sample {index}: metadata[{key!r}] must be a string or a number, got {type(gold).__name__} "
            f"{gold!r}"
        )
    if isinstance(gold, Real) and not isinstance(gold, str):
        return str(int(gold)) if float(gold).is_integer() else repr(float(gold))
    text = extract_answer(gold) if BOXED.search(gold) or "####" in gold else gold
    text = _clean(text or "")
    if not text:
        raise ValueError(f"sample {index}: metadata[{key!r}] = {gold!r} holds no answer")
    return text


def _timeout(seconds: int | None) -> int | None:
    """math-verify's signal-based timeout where it works (the main thread), else None (switched off)."""
    return seconds if threading.current_thread() is threading.main_thread() else None


class MathVerifyReward:
    """1 when the response's final answer is equivalent to ``metadata[i][answer_key]`` under math-verify,
    else 0, plus ``format_reward`` when the response has a ``\\boxed{}`` answer at all.

    ``require_boxed`` (CurES's prompt and code): only the last ``\\boxed{}`` is read, and a response without
    one scores 0. With ``require_boxed=False`` a GSM8K ``#### answer`` is read too, and, failing both,
    math-verify's own extraction (an "answer is" phrase, else the last expression). A response with no
    answer scores 0, not NaN: it is the policy's failure. A sample without a gold answer is a data error and
    raises. ``timeout_seconds`` bounds each parse and comparison (in the main thread only).
    """

    def __init__(
        self,
        format_reward: float = 0.0,
        require_boxed: bool = True,
        answer_key: str = "answer",
        timeout_seconds: int | None = 5,
    ) -> None:
        self.format_reward = float(format_reward)
        self.require_boxed = require_boxed
        self.answer_key = answer_key
        self.timeout_seconds = timeout_seconds

    def has_format(self, text: str) -> bool:
        """Whether the response gives a final answer in the required format (a closed, non-empty box)."""
        return boxed_answer(text) is not None

    def gold(self, metadata: Sequence[dict]) -> list[str]:
        """Every sample's gold answer text; raises naming the first sample without one."""
        golds = []
        for index, meta in enumerate(metadata):
            if meta.get(self.answer_key) is None:
                raise ValueError(
                    f"sample {index}: no gold answer under metadata[{self.answer_key!r}] (its keys are "
                    f"{sorted(meta)}); give every prompt its answer, or set the reward's answer_key"
                )
            golds.append(_gold_text(meta[self.answer_key], index, self.answer_key))
        return golds

    def correct(self, response: str, gold: list) -> bool:
        """Whether ``response``'s answer is equivalent to ``gold`` (math-verify's parse of the gold)."""
        timeout = _timeout(self.timeout_seconds)
        answer = boxed_answer(response) if self.require_boxed else extract_answer(response)
        if answer is not None:
            answer = _clean(answer)
            parsed = (
                parse("\\boxed{" + answer + "}", ANSWER_CONFIG, parsing_timeout=timeout) if answer else []
            )
        elif self.require_boxed:
            return False
        else:
            parsed = parse(response, parsing_timeout=timeout)
        return bool(parsed) and verify(gold, parsed, timeout_seconds=timeout)

    def correctness(self, texts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        """``Tensor[B]``: 1 where a response's answer is equivalent to its gold answer, else 0 (no format
        reward: an evaluation's accuracy)."""
        if len(texts) != len(metadata):
            raise ValueError(f"{len(texts)} responses but {len(metadata)} metadata entries")
        timeout = _timeout(self.timeout_seconds)
        parsed: dict[str, list] = {}  # a group's responses share one gold answer: parse it once
        scores = []
        for text, gold in zip(texts, self.gold(metadata)):
            if gold not in parsed:
                parsed[gold] = parse("\\boxed{" + gold + "}", GOLD_CONFIG, parsing_timeout=timeout)
            scores.append(float(self.correct(text, parsed[gold])))
        return torch.tensor(scores, dtype=torch.float32)

    def __call__(self, texts: Sequence[str], prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        scores = self.correctness(texts, metadata)
        if self.format_reward:
            scores += self.format_reward * torch.tensor([float(self.has_format(t)) for t in texts])
        return scores
