"""The interface of a policy that samples tokens: text answers, or the image codes of an autoregressive
image generator (Janus-Pro). Token GRPO (:mod:`g2rpo.algos.token_grpo`) drives it exactly as the flow
algorithms drive a :class:`~g2rpo.policies.base.FlowPolicy`: sample under ``no_grad`` with the log-probs of
what was sampled, then recompute those log-probs with gradients during the update.

A policy can implement both interfaces over shared weights (a unified model): the understanding side samples
``task="answer"`` tokens, the generation side is a flow policy or ``task="image"`` tokens.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

TOKEN_TASKS = ("answer", "image")


def _cat(values: list[Any]) -> Any:
    """Per-sample tensors or lists of several rollouts, concatenated (``None`` stays ``None``)."""
    if values[0] is None:
        return None
    if isinstance(values[0], Tensor):
        return torch.cat(values)
    return [item for value in values for item in value]


def _pad(tensor: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]))


def select_rows(value: Any, rows: Tensor) -> Any:
    """Rows of a per-sample tensor or list (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[rows.to(value.device)]
    return [value[i] for i in rows.tolist()]


@dataclass
class TokenRollout:
    """Sampled token sequences with their log-probabilities under the sampling policy.

    ``inputs`` holds what the policy needs to rebuild each sample's context (``answer``: ``images`` [B, 3, H,
    W] in [0, 1] and ``questions``; ``image``: ``prompts``), one entry per sample.
    """

    task: str  # "answer" | "image"
    inputs: dict[str, Any]
    tokens: Tensor  # [B, T] long, padded after the end token
    mask: Tensor  # [B, T] bool: generated tokens, through the end token
    log_probs: Tensor  # [B, T] fp32 log pi_old(o_t | context, o_<t), 0 where ~mask
    texts: list[str] | None = None  # decoded answers (answer task)
    images: Tensor | None = None  # [B, 3, H, W] in [0, 1] (image task)
    temperature: float = 1.0  # the sampling temperature: log-probs are of the tempered distribution
    guidance_scale: float = 1.0  # CFG of the sampling (image task); log-probs are of the guided distribution
    extras: dict[str, Any] = field(
        default_factory=dict
    )  # policy-specific per-sample tensors (select()ed too)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def cat(cls, parts: list[TokenRollout]) -> TokenRollout:
        """Rollouts of the same task concatenated along the batch, sequences padded to the longest."""
        if len(parts) == 1:
            return parts[0]
        length = max(part.tokens.shape[1] for part in parts)
        first = parts[0]
        return cls(
            task=first.task,
            inputs={key: _cat([part.inputs[key] for part in parts]) for key in first.inputs},
            tokens=torch.cat([_pad(part.tokens, length) for part in parts]),
            mask=torch.cat([_pad(part.mask, length) for part in parts]),
            log_probs=torch.cat([_pad(part.log_probs, length) for part in parts]),
            texts=_cat([part.texts for part in parts]),
            images=_cat([part.images for part in parts]),
            temperature=first.temperature,
            guidance_scale=first.guidance_scale,
            extras={key: _cat([part.extras[key] for part in parts]) for key in first.extras},
        )

    def select(self, rows: Tensor) -> TokenRollout:
        picked = {
            f.name: select_rows(getattr(self, f.name), rows)
            for f in fields(self)
            if f.name not in ("task", "inputs", "extras", "temperature", "guidance_scale")
        }
        return TokenRollout(
            task=self.task,
            temperature=self.temperature,
            guidance_scale=self.guidance_scale,
            inputs={key: select_rows(value, rows) for key, value in self.inputs.items()},
            extras={key: select_rows(value, rows) for key, value in self.extras.items()},
            **picked,
        )


class TokenPolicy(nn.Module):
    """A model under training that samples tokens.

    ``nfe`` counts sequences pushed through the network (one per decoding step and sequence; a CFG forward
    of ``B`` sequences counts ``2B``), as :class:`~g2rpo.policies.base.FlowPolicy` counts denoiser forwards.
    """

    nfe: int = 0

    def sample_tokens(
        self,
        task: str,
        inputs: dict[str, Any],
        generators: list[torch.Generator],
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        guidance_scale: float = 1.0,
    ) -> TokenRollout:
        """Sample one sequence per entry of ``inputs``, sample ``i`` drawing from ``generators[i]`` (so it does
        not depend on the batch it is sampled in), and return it with its per-token log-probs."""
        raise NotImplementedError

    def token_log_probs(self, rollout: TokenRollout) -> Tensor:
        """``[B, T]`` log-probs of ``rollout.tokens`` under the current weights (differentiable), computed
        exactly as during sampling (``rollout.temperature`` and ``rollout.guidance_scale``), 0 where
        ``~rollout.mask``."""
        raise NotImplementedError

    def reference(self) -> AbstractContextManager:
        """Context in which the policy runs the frozen reference model (for KL terms)."""
        raise NotImplementedError

    def enable_reference(self) -> None:
        """Make ``reference()`` available; called once before training when an algorithm needs it."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
