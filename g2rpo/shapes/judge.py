"""The shapes judge: the unified model taught to say which of two images fits a caption better, as a reward.

UniPic's Skywork-ImgReward recipe (a VLM judge trained by GRPO on pairwise preferences, then used to score
images) in the shapes world: the unified model (:mod:`g2rpo.shapes.unified`) with the judge's tokens reads
``<bos> [image A] [image B] caption <|judge|>`` and answers ``<answer>A</answer>`` or ``<answer>B</answer>``
(``make judge-model`` trains it: :mod:`g2rpo.shapes.training.judge`). As a reward (``reward=judge``) it is
read, not sampled: ``P(A)`` against ``P(B)`` of the verdict token after ``<answer>``, turned into per-image
scores by :class:`~g2rpo.rewards.preference.PairwiseJudgeReward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from g2rpo.data import PromptDataset
from g2rpo.randomness import TOKEN, keyed
from g2rpo.rewards.preference import PairwiseJudgeReward, exact_format, parse_verdict
from g2rpo.shapes.policy import UnifiedPolicy
from g2rpo.shapes.unified import UnifiedModel, load_unified_model

JUDGE_MODEL_DIR = Path(__file__).parent / "weights" / "judge"


def load_judge(path: str | None = None, dtype: str = "float32") -> UnifiedModel:
    """The trained judge (shipped in ``g2rpo/shapes/weights/judge``, or ``path``)."""
    directory = Path(path) if path else JUDGE_MODEL_DIR
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"reward: no shapes judge at {directory}. It ships with the repository; regenerate it with "
            "`make judge-model` (about 15 minutes on 2 CPU cores)."
        )
    model = load_unified_model(str(directory), dtype)
    model.check_judges()
    return model


class ShapesJudge:
    """``prefer``: the probability that image A fits the caption better, ``P(A) / (P(A) + P(B))`` of the
    verdict token after ``caption <|judge|> <answer>``."""

    def __init__(self, model: UnifiedModel) -> None:
        model.check_judges()
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def prefer(self, images: Tensor, others: Tensor, prompts: Sequence[str]) -> Tensor:
        model = self.model
        rows = [[*model.judge_prefix(p), model.open_id] for p in prompts]
        ids = torch.full((len(rows), max(map(len, rows))), model.eos_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        pixels = [x.to(model.device).float() * 2 - 1 for x in (images, others)]
        logits = model.compare_logits(*pixels, ids.to(model.device))
        at = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
        verdict = logits[torch.arange(len(rows), device=logits.device), at][:, model.choice_ids].float()
        return torch.softmax(verdict, dim=-1)[:, 0].cpu()


def judge_reward(
    path: str | None = None, max_opponents: int | None = None, batch_size: int = 64, seed: int = 0
) -> PairwiseJudgeReward:
    """``reward=judge``: the shipped (or ``path``'s) judge as a per-image reward."""
    return PairwiseJudgeReward(ShapesJudge(load_judge(path)), max_opponents, batch_size, seed)


@torch.no_grad()
def judge_accuracy(model: UnifiedModel, pairs: PromptDataset, batch_size: int = 128, seed: int = 0) -> dict:
    """How well a judge ranks ``pairs`` (``data=judge_pairs``):

    - ``accuracy``: ``P(A) > P(B)`` names the preferred image, pairs shown as the data shows them;
    - ``accuracy_debiased``: the same after averaging over both orders (the reward's rule);
    - ``format_greedy`` / ``format_sampled``: the fraction of greedy / temperature-1 verdicts in the exact
      format, and ``accuracy_greedy`` / ``accuracy_sampled`` the fraction whose verdict is right.
    """
    judge, policy = ShapesJudge(model), UnifiedPolicy(model)
    images = torch.stack([m["image"] for m in pairs.metadata])
    others = torch.stack([m["other_image"] for m in pairs.metadata])
    preferred_a = torch.tensor([m["preferred"] == "A" for m in pairs.metadata])
    p_forward, p_backward, texts = [], [], {"greedy": [], "sampled": []}
    generators = keyed(torch.Generator().manual_seed(seed), list(range(len(pairs))), TOKEN)
    for start in range(0, len(pairs), batch_size):
        rows = slice(start, start + batch_size)
        captions = pairs.prompts[rows]
        p_forward.append(judge.prefer(images[rows], others[rows], captions))
        p_backward.append(judge.prefer(others[rows], images[rows], captions))
        inputs = {"images": images[rows], "other_images": others[rows], "questions": captions}
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            rollout = policy.sample_tokens("compare", inputs, generators[rows], temperature=temperature)
            texts[name].extend(rollout.texts)
    forward, backward = torch.cat(p_forward), torch.cat(p_backward)
    result = {
        "pairs": len(pairs),
        "accuracy": float(((forward > 0.5) == preferred_a).float().mean()),
        "accuracy_debiased": float((((forward + 1 - backward) / 2 > 0.5) == preferred_a).float().mean()),
        "mean_p_a": float(forward.mean()),
    }
    for name, decoded in texts.items():
        result[f"format_{name}"] = float(np.mean([exact_format(t) for t in decoded]))
        result[f"accuracy_{name}"] = float(
            np.mean([parse_verdict(t) == m["preferred"] for t, m in zip(decoded, pairs.metadata)])
        )
    return result
