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

from typing import Any

import torch
from torch import Tensor

from g2rpo.policies.base import Policy
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
