"""The understanding reward: does a sampled answer equal the reference answer?

PairUni scores understanding rollouts by accuracy, ``r_und = Acc(y_pred, y_true)`` (arXiv 2510.25682v3,
sec. 3.3); its reasoning outputs put the answer in ``<answer>...</answer>``, which is read when present.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torch import Tensor

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def normalize(text: str, first_word: bool) -> str:
    """Lower case, no surrounding punctuation, single spaces; optionally the first word alone."""
    if match := ANSWER_TAG.search(text):
        text = match.group(1)
    words = [w.strip(string.punctuation) for w in text.lower().split()]
    words = [w for w in words if w]
    return (words[0] if words else "") if first_word else " ".join(words)


class AnswerMatch:
    """1 when the normalised answer equals ``metadata["answer"]``, else 0 (NaN when a sample has none).

    ``first_word``: compare the first word only, for worlds whose answers are one word (the shapes VQA),
    so an answer followed by more words still counts as the answer it starts with.
    """

    def __init__(self, first_word: bool = False) -> None:
        self.first_word = first_word

    def __call__(self, texts: Sequence[str], metadata: Sequence[dict]) -> Tensor:
        scores = [
            float("nan")
            if meta.get("answer") is None
            else float(normalize(text, self.first_word) == normalize(str(meta["answer"]), self.first_word))
            for text, meta in zip(texts, metadata, strict=True)
        ]
        return torch.tensor(scores)
