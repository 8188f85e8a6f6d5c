"""REINFORCE++ (Hu et al., arXiv 2501.03262), the second base estimator of CurES's Table 1 ("RPP"):
REINFORCE with PPO's clipped ratio, a token-level KL penalty in the reward, and advantages normalised over
the whole batch instead of per prompt group.

Per sampled token ``t`` of response ``y`` to ``x`` (paper eqs. 1-3; verl's ``reinforce_plus_plus``)::

    r_t = 1[t = last] r(x, y) - beta_r KL_t,     KL_t = log pi_old(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)
    A_t = sum_{s >= t} r_s                     (the return, gamma = 1)
    A_t <- (A_t - mean) / std                  (over every generated token of the batch, all ranks)

then the PPO-clip surrogate per token (:func:`~g2rpo.algos.token_grpo.clipped_token_loss`, with verl's dual
clip ``c = 3`` as CurES's scripts use it). The KL estimate is ``k1`` on the sampled tokens, taken once per
iteration from the rollout's log-probs, so it shapes the advantage and carries no gradient of its own.

``baseline: group`` subtracts each prompt group's mean reward first (REINFORCE++-baseline, the paper's
later version; verl's ``reinforce_plus_plus_baseline``). Every valid sample trains: a group whose rewards
are all equal still has a non-zero advantage against the batch's mean (``drop_zero_std`` does not apply).

CurES's released scripts differ from the estimator's paper in one knob: they put the KL in the loss
(``use_kl_loss``, ``low_var_kl`` i.e. k3, 0.001) and not in the reward. ``kl_reward_coef=0 beta=0.001`` is
that setting; the default follows the REINFORCE++ paper with CurES's coefficient, 0.001.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from g2rpo.advantages import Advantages, GroupNormalization, segment_mean
from g2rpo.algos.base import check_choice, check_positive
from g2rpo.algos.token_grpo import TokenGRPO
from g2rpo.distributed import all_sum
from g2rpo.policies.tokens import TokenPolicy
from g2rpo.types import PromptBatch, RewardOutput, TokenRollout

BASELINES = ("none", "group")
WHITEN_EPS = 1e-8  # verl's masked_whiten


def token_returns(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``[B, T]`` undiscounted returns of the token rewards ``r_t = 1[t = last] r - kl_coef KL_t``: the
    sequence reward minus the KL still to come, ``r - kl_coef sum_{s >= t} KL_s``; 0 after the sequence."""
    weights = mask.to(torch.float64)
    penalty = (kl.to(torch.float64) * weights).flip(-1).cumsum(-1).flip(-1)
    return (rewards.to(torch.float64)[:, None] - kl_coef * penalty) * weights


def whiten(values: Tensor, mask: Tensor) -> Tensor:
    """``(v - mean) / sqrt(var + 1e-8)`` over the masked entries of every rank (the unbiased variance, as
    verl's ``masked_whiten``), 0 elsewhere."""
    weights = mask.to(values.dtype)
    count, total = all_sum(torch.stack([weights.sum(), (values * weights).sum()]))
    mean = total / count.clamp_min(1)
    squares = all_sum(((values - mean) ** 2 * weights).sum().reshape(1))[0]
    variance = squares / (count - 1).clamp_min(1)
    return (values - mean) * torch.rsqrt(variance + WHITEN_EPS) * weights


@dataclass
class REINFORCEPlusPlus(TokenGRPO):
    """Defaults: the REINFORCE++ paper's estimator with CurES's verl settings (clip 0.2, dual clip 3,
    token-mean loss, KL coefficient 0.001). ``normalization`` is not used: the batch whitening replaces it."""

    task: str = "text"
    kl_reward_coef: float = 0.001  # beta_r, KL_t in the token rewards (paper); 0: off (CurES's scripts)
    baseline: str = "none"  # none (REINFORCE++) | group (REINFORCE++-baseline)
    dual_clip: float | None = 3.0
    normalization: GroupNormalization = field(
        default_factory=lambda: GroupNormalization(std="none", drop_zero_std=False)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("baseline", self.baseline, BASELINES)
        check_positive(self, "kl_reward_coef", allow_zero=True)

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0 or self.kl_reward_coef > 0

    def rollout(
        self, policy: TokenPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> TokenRollout:
        """The token GRPO rollout, plus the reference's log-probs of the sampled tokens for ``KL_t``."""
        rollout = super().rollout(policy, batch, generator, iteration)
        if self.kl_reward_coef == 0:
            return rollout
        parts = []
        with torch.no_grad(), policy.reference():
            for rows in torch.arange(len(rollout)).split(self.rollout_batch_size):
                parts.append(policy.token_log_probs(rollout.select(rows)).cpu())
        extras = {**rollout.extras, "ref_log_probs": torch.cat(parts)}
        return dataclasses.replace(rollout, extras=extras)

    def advantages(self, rewards: RewardOutput, rollout: TokenRollout) -> Advantages:
        total = rewards.total.detach().double().cpu()
        valid = torch.isfinite(total)
        total = torch.where(valid, total, torch.zeros_like(total))
        groups = rollout.scored.groups
        if self.baseline == "group":
            ids = groups.ids.cpu()
            total = total - segment_mean(total, ids, groups.count, valid.double())[ids]
        mask = rollout.mask.cpu() & valid[:, None]
        kl = (
            rollout.log_probs.cpu().double() - rollout.extras["ref_log_probs"].double()
            if self.kl_reward_coef > 0
            else torch.zeros(mask.shape, dtype=torch.float64)
        )
        values = whiten(token_returns(total, kl, mask, self.kl_reward_coef), mask).float()
        return Advantages(
            values=values,
            valid=valid,
            zero_std=torch.zeros_like(valid),
            train_mask=valid,
            num_groups=groups.count,
            num_zero_std_groups=0,
        )

    def rollout_metrics(self, rollout: TokenRollout, rewards: RewardOutput) -> dict[str, float]:
        mask = rollout.mask
        metrics = super().rollout_metrics(rollout, rewards)
        if "ref_log_probs" in rollout.extras:
            kl = (rollout.log_probs - rollout.extras["ref_log_probs"]) * mask
            metrics["kl_k1"] = float(kl.sum() / mask.sum().clamp_min(1))
        return metrics
