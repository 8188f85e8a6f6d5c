"""The interface of a policy that samples tokens: text answers, or the image codes of an autoregressive
image generator (Janus-Pro). Token GRPO (:mod:`g2rpo.algos.token_grpo`) drives it exactly as the flow
algorithms drive a :class:`~g2rpo.policies.base.FlowPolicy`: sample under ``no_grad`` with the log-probs of
what was sampled, then recompute those log-probs with gradients during the update.

A policy can implement both interfaces over shared weights (a unified model): the understanding side samples
``task="answer"`` tokens, the generation side is a flow policy or ``task="image"`` tokens. A judge samples
``task="compare"`` tokens: which of two images (``images`` A, ``other_images`` B, ``[B, 3, H, W]`` in [0, 1])
matches a caption (``questions``) better, as ``<answer>A</answer>`` or ``<answer>B</answer>``. A text-only
language model samples ``task="text"`` tokens: an answer to each of ``questions``, with no image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from g2rpo.policies.base import Policy
from g2rpo.randomness import rand_per_key
from g2rpo.types import TokenRollout

TOKEN_TASKS = ("answer", "image", "compare", "text")


class TokenPolicy(Policy):
    """A model under training that samples tokens.

    ``nfe`` counts sequences pushed through the network (one per decoding step and sequence; a CFG forward
    of ``B`` sequences counts ``2B``), as :class:`~g2rpo.policies.base.FlowPolicy` counts denoiser forwards.
    """

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


def sample_from(log_probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draws, one per row, from ``[B, V]`` log-probs with ``[B]`` uniforms: each sample consumes
    one number of its own stream, so its draw does not depend on the batch."""
    cdf = log_probs.double().exp().cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def decode(
    next_log_probs: Callable[[], Tensor],
    feed: Callable[[Tensor], None],
    generators: list[torch.Generator],
    steps: int,
    temperature: float,
    end_ids: Tensor,
    pad_id: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The text decoding loop of every policy that answers in words: ``next_log_probs()`` gives the ``[B, V]``
    tempered log-probs of the next token, ``feed(token)`` advances the model's cache by one ``[B]`` token.
    Each row draws from its own generator (temperature 0: argmax); a row that has produced an end token
    pads from then on. Returns ``tokens``, ``mask`` (generated, through the end token) and ``log_probs``
    (0 where ``~mask``), each ``[B, T]``."""
    log_probs_now = next_log_probs()
    device = log_probs_now.device
    uniforms = rand_per_key(generators, steps).to(device)
    end_ids = end_ids.to(device)
    done = torch.zeros(log_probs_now.shape[0], dtype=torch.bool, device=device)
    tokens, log_probs, valid = [], [], []
    for step in range(steps):
        if step:
            log_probs_now = next_log_probs()
        token = (
            log_probs_now.argmax(-1) if temperature == 0 else sample_from(log_probs_now, uniforms[:, step])
        )
        token = token.masked_fill(done, pad_id)
        valid.append(~done)
        tokens.append(token)
        log_probs.append(log_probs_now.gather(-1, token[:, None]).squeeze(-1).masked_fill(done, 0.0))
        done = done | torch.isin(token, end_ids)
        if bool(done.all()) or step == steps - 1:
            break
        feed(token)
    return torch.stack(tokens, dim=1), torch.stack(valid, dim=1), torch.stack(log_probs, dim=1)
