"""Pre-rollouts: sample the current policy on some prompts and score the samples (CurES's difficulty probe)."""

from __future__ import annotations

import torch
from torch import Tensor

from g2rpo.algos.token_grpo import TokenGRPO
from g2rpo.curriculum.base import Probed
from g2rpo.distributed import gather_objects, world
from g2rpo.policies.base import FlowPolicy, Policy
from g2rpo.policies.tokens import TokenPolicy
from g2rpo.randomness import PROBE, seeded
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.rollout import ode_rollout, sde_rollout
from g2rpo.sampling import sde_step
from g2rpo.types import PromptBatch, SDERollout


def probe_for(policy: Policy, algorithm, reward: RewardEnsemble, generator: torch.Generator):
    """The probe of what the algorithm samples: token GRPO's answers (text, REINFORCE++) :class:`TokenProbe`;
    images :class:`PolicyProbe` (Pair-GRPO too: a unified model's prompts are captions, probed as images)."""
    if isinstance(algorithm, TokenGRPO) and isinstance(policy, TokenPolicy):
        return TokenProbe(policy, algorithm, reward, generator)
    return PolicyProbe(policy, reward, generator)


class PolicyProbe:
    """Draws samples of the current policy and scores them, with the sampler settings the curriculum asks for.

    Success rates are a property of the policy's sample distribution, which the probability-flow ODE and
    the Flow-SDE share (the SDE is built to keep the ODE's marginals), so plain probes use the cheaper,
    algorithm-independent ODE. Gradient norms need a log-likelihood: those probes sample the Flow-SDE
    (noise ``a = noise_level``) and differentiate the trajectory's summed per-step log-probabilities, the
    diffusion analogue of a response's summed token log-likelihood in CurES's code.

    Across data-parallel ranks, each rank probes a slice and the results are gathered: every rank sees
    what one rank would have seen. ``grad_norms`` also returns each sample's score-function gradient norm
    (Flow-SDE samples with noise ``noise_level``).
    """

    def __init__(self, policy: FlowPolicy, reward: RewardEnsemble, generator: torch.Generator) -> None:
        self.policy = policy
        self.reward = reward
        self.generator = generator

    def __call__(
        self,
        batch: PromptBatch,
        *,
        num_steps: int,
        guidance_scale: float,
        batch_size: int,
        noise_level: float = 0.7,
        grad_norms: bool = False,
    ) -> Probed:
        rank, size = world()
        mine = batch.select(torch.arange(len(batch)).chunk(size)[rank]) if size > 1 else batch
        probed = self._probe(mine, num_steps, guidance_scale, batch_size, noise_level, grad_norms)
        if size == 1:
            return probed
        parts = gather_objects(probed)  # every rank probes a slice; noise is keyed by sample, not by rank
        norms = [part.grad_norms for part in parts]
        return Probed(
            rewards=torch.cat([part.rewards for part in parts]),
            grad_norms=torch.cat(norms) if grad_norms else None,
        )

    def _probe(self, batch, num_steps, guidance_scale, batch_size, noise_level, grad_norms) -> Probed:
        settings = dict(num_steps=num_steps, guidance_scale=guidance_scale, batch_size=batch_size)
        if not grad_norms:
            rollout = ode_rollout(self.policy, batch, generator=self.generator, **settings)
            return Probed(rewards=self._score(rollout.images, batch))
        rollout = sde_rollout(
            self.policy, batch, noise_levels=torch.full((num_steps,), noise_level), sde_type="sde",
            train_steps=torch.zeros(len(batch), 0, dtype=torch.long), generator=self.generator, **settings,
        )  # fmt: skip
        return Probed(
            rewards=self._score(rollout.images, batch),
            grad_norms=self._grad_norms(rollout, guidance_scale, noise_level),
        )

    def _score(self, images: Tensor, batch: PromptBatch) -> Tensor:
        with torch.no_grad():
            return self.reward(images, batch.prompts, batch.metadata).total.cpu()

    def _grad_norms(self, rollout: SDERollout, guidance_scale: float, noise_level: float) -> Tensor:
        """``||grad_theta sum_i log pi(x_{i+1} | x_i)||`` per sample, one backward each (per-sample norms
        cannot come out of one batched backward)."""
        parameters = [p for p in self.policy.trainable_parameters() if p.requires_grad]  # not those paused
        norms = []
        for j in range(len(rollout)):
            cond = rollout.cond.select(rollout.cond_index[j : j + 1])
            log_likelihood = torch.zeros((), device=rollout.latents.device)
            for i in range(len(rollout.sigmas) - 1):
                x = rollout.latents[j : j + 1, i]
                v = self.policy.velocity(x, rollout.sigmas[i], cond, guidance_scale)
                step = sde_step(
                    x, v, rollout.sigmas[i], rollout.sigmas[i + 1], noise_level,
                    prev_sample=rollout.latents[j : j + 1, i + 1],
                )  # fmt: skip
                log_likelihood = log_likelihood + step.log_prob.nansum()
            grads = torch.autograd.grad(log_likelihood, parameters, allow_unused=True)
            norms.append(torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)))
        return torch.stack(norms).detach().cpu()


class TokenProbe:
    """Pre-rollouts of a token policy: the algorithm's own sampling (its temperature and length) and scoring,
    from a stream of their own (``PROBE``), so no pre-rollout repeats a training sample's draws.

    ``grad_norms`` also returns each response's ``||grad_theta sum_t log pi(y_t | x, y_<t)||`` over the
    trainable parameters, one backward each: CurES's code takes it on the embeddings of a full model
    (brief A.3); a LoRA's trainable set is the analogue here. Flow settings (steps, CFG) do not apply.
    """

    def __init__(self, policy: TokenPolicy, algorithm, reward: RewardEnsemble, generator: torch.Generator):
        self.policy, self.algorithm, self.reward = policy, algorithm, reward
        self.generator = seeded(generator.initial_seed(), PROBE)

    def __call__(self, batch: PromptBatch, *, grad_norms: bool = False, **flow_settings) -> Probed:
        rank, size = world()
        mine = batch.select(torch.arange(len(batch)).chunk(size)[rank]) if size > 1 else batch
        with torch.no_grad():
            rollout = self.algorithm.rollout(self.policy, mine, self.generator)
            rewards = self.algorithm.score(self.reward, rollout).total.cpu()
        probed = Probed(rewards=rewards, grad_norms=self._grad_norms(rollout) if grad_norms else None)
        if size == 1:
            return probed
        parts = gather_objects(probed)
        return Probed(
            rewards=torch.cat([part.rewards for part in parts]),
            grad_norms=torch.cat([part.grad_norms for part in parts]) if grad_norms else None,
        )

    def _grad_norms(self, rollout) -> Tensor:
        parameters = [p for p in self.policy.trainable_parameters() if p.requires_grad]
        norms = []
        for j in range(len(rollout)):
            log_likelihood = self.policy.token_log_probs(rollout.select(torch.tensor([j]))).sum()
            grads = torch.autograd.grad(log_likelihood, parameters, allow_unused=True)
            norms.append(torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)))
        return torch.stack(norms).detach().cpu()
