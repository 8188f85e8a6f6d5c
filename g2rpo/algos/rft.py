"""Reward-filtered fine-tuning: the flow-matching loss on the samples a reward keeps.

The baseline every GRPO-family method must beat. Samples are scored, those that pass a filter are kept,
and the policy is fitted to them by the loss it was pretrained with (rectified flow, SD3's form, Esser et
al. 2024, arXiv 2403.03206, eqs. 1-3 with the velocity target):

    x_sigma = (1 - sigma) x_0 + sigma eps,      L = E_{x_0 kept, sigma, eps} || v_theta(x_sigma, sigma, c) - (eps - x_0) ||^2

with ``sigma`` drawn by SD3's logit-normal density (``diffusers.training_utils.compute_density_for_timestep_sampling``)
and moved by the model's own shift, as diffusers' SD3 training script does. Dropped samples get no gradient:
they are not in any training unit.

Two sources of kept samples (``source``):

- ``offline``: a dataset curated once by ``python -m g2rpo.curate`` (UniPic's stage 4, arXiv 2508.03320
  sec. 3.3: keep reward >= 0.9, then a second check), read from ``dataset``; each iteration fits the next
  ``offline_batch_size`` kept samples of a seeded shuffle (a new shuffle per pass). Their stored scores are
  logged as the iteration's rewards; the reward ensemble is not called.
- ``online``: RAFT (Dong et al. 2023, arXiv 2304.06767, Alg. 1): every iteration samples ``G`` images per
  prompt with the deterministic sampler, scores them, keeps the best ``top_k`` of each group and/or those
  with reward ``>= threshold``, and fits them.

The filter (both may be set; a sample must pass both): ``threshold`` compares the ensemble's weighted total;
``top_k`` ranks within the sample's group (ties broken by index: deterministic). A NaN reward never passes.
The text is dropped with probability ``text_dropout`` (UniPic's MAR ``label_drop_prob`` 0.1), so that the
fitted policy keeps its unconditional branch for CFG.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from g2rpo.advantages import Advantages
from g2rpo.algos.base import Algorithm, check_choice, check_num_steps, check_positive, split_evenly
from g2rpo.algos.dgpo import SAMPLERS, drop_text
from g2rpo.curation import CuratedSample, read_kept
from g2rpo.data import read_image
from g2rpo.distributed import rank_slice
from g2rpo.policies.base import FlowPolicy
from g2rpo.randomness import CHOICE, SAMPLE, keyed, seeded
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.rollout import clean_samples
from g2rpo.sampling import mean_over_dims
from g2rpo.types import LossOutput, ODERollout, PromptBatch, RewardOutput, TrainingUnit

log = logging.getLogger(__name__)

SOURCES = ("online", "offline")
TIMESTEP_DENSITIES = ("logit_normal", "uniform", "mode")


def keep_mask(total: Tensor, group_ids: Tensor, threshold: float | None, top_k: int | None) -> Tensor:
    """``[B]`` bool: the samples that pass the filter (reward ``>= threshold`` and among the ``top_k`` best
    of their group); NaN rewards never pass."""
    total = total.float().cpu()
    group_ids = group_ids.cpu()
    keep = torch.isfinite(total)
    if threshold is not None:
        keep &= total >= threshold
    if top_k is not None:
        ranked = torch.zeros_like(keep)
        for group in torch.unique(group_ids).tolist():
            members = ((group_ids == group) & torch.isfinite(total)).nonzero().flatten()
            # stable descending sort: equal rewards keep their order in the batch
            order = torch.sort(total[members], descending=True, stable=True).indices
            ranked[members[order[:top_k]]] = True
        keep &= ranked
    return keep


def shifted(u: Tensor, shift: float) -> Tensor:
    """The model's time shift ``s u / (1 + (s - 1) u)`` (SD3's ``shift``; identity for ``s = 1``)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class RFTUnit(TrainingUnit):
    """A micro-batch of kept samples, each at its own noise level with its own noise."""

    u: Tensor | None = None  # [b] the drawn time in [0, 1], before the model's shift
    noise: Tensor | None = None  # [b, C, h, w]
    text_dropped: Tensor | None = None  # [b] bool


@dataclass
class RFT(Algorithm[ODERollout]):
    """Defaults: UniPic's filter (keep reward >= 0.9), SD3's logit-normal(0, 1) noise levels."""

    source: str = "online"  # online (RAFT: sample, score, keep, fit each iteration) | offline (curated data)
    dataset: str | None = None  # offline: a directory written by `python -m g2rpo.curate`
    offline_batch_size: int = 32  # offline: kept samples fitted per iteration
    threshold: float | None = 0.9  # keep reward total >= threshold (UniPic); null: no threshold
    top_k: int | None = None  # keep the best k of each group (RAFT: 1); null: no ranking
    num_steps: int = 10  # online rollout steps
    sampler: str = "dpm_solver"  # dpm_solver | euler | sde (as DGPO's rollouts)
    flow_shift: float | None = None  # DPM-Solver's and the training noise levels' shift; null: the model's
    guidance_scale: float = 4.5  # CFG in rollouts; training fits the conditional velocity
    sde_noise_level: float = 0.7  # sampler=sde only
    timestep_density: str = "logit_normal"  # logit_normal (SD3) | uniform | mode (diffusers' names)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    text_dropout: float = 0.1  # UniPic's MAR label_drop_prob
    # CFG of the fitted velocity: 1 fits the conditional branch (SD/UniPic fine-tuning); the rollouts' scale fits
    # the guided velocity the sampler follows, so sampling with that CFG moves towards the kept samples
    train_guidance_scale: float = 1.0
    rollout_batch_size: int = 32  # images per sampling forward
    batch_size: int = 16  # kept samples per training forward
    num_minibatches: int = 2  # optimiser steps per pass over the kept samples
    num_inner_epochs: int = 1  # passes over the kept samples per iteration
    shuffle_seed: int = 0  # offline: seeds the order of the kept samples (the presets pass ${seed})

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("timestep_density", self.timestep_density, TIMESTEP_DENSITIES)
        check_num_steps(self.num_steps, 1, "a rollout needs a step")
        check_positive(self, "offline_batch_size", "rollout_batch_size", "batch_size", "num_minibatches",
                       "num_inner_epochs", "logit_std")  # fmt: skip
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"algo.top_k={self.top_k} must be >= 1, or null (no ranking)")
        if self.source == "online" and self.threshold is None and self.top_k is None:
            raise ValueError(
                "algo=rft online keeps nothing out: set algo.threshold (UniPic: 0.9) and/or algo.top_k (RAFT: 1)"
            )
        if self.source == "offline" and self.dataset is None:
            raise ValueError(
                "algo.source=offline needs algo.dataset: a directory made by `python -m g2rpo.curate` "
                "(make curate-shapes writes outputs/curated/shapes)"
            )
        if not 0 <= self.text_dropout < 1:
            raise ValueError(f"algo.text_dropout={self.text_dropout} must be in [0, 1)")
        if self.train_guidance_scale < 1 or (self.train_guidance_scale > 1 and self.text_dropout > 0):
            raise ValueError(
                f"algo.train_guidance_scale={self.train_guidance_scale} must be >= 1, and a guided fit "
                "(> 1) trains both branches through CFG already: set algo.text_dropout=0"
            )
        self._kept: list[CuratedSample] | None = None

    # ---- rollout: sampled (online) or read (offline) -------------------------------------------------

    def kept_samples(self) -> list[CuratedSample]:
        if self._kept is None:
            self._kept = read_kept(self.dataset)
            log.info("algo=rft offline: %d kept samples in %s", len(self._kept), self.dataset)
        return self._kept

    def offline_rows(self, iteration: int, seed: int) -> list[int]:
        """The kept samples of ``iteration``: consecutive slices of a seeded shuffle, reshuffled every pass."""
        total = len(self.kept_samples())
        start = iteration * self.offline_batch_size
        orders: dict[int, Tensor] = {}
        rows = []
        for position in range(start, start + self.offline_batch_size):
            epoch, index = divmod(position, total)
            if epoch not in orders:
                orders[epoch] = torch.randperm(total, generator=seeded(seed, epoch))
            rows.append(int(orders[epoch][index]))
        return rows

    def rollout(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> ODERollout:
        if self.source == "offline":
            return self._read(policy, iteration)
        return clean_samples(
            policy, batch, sampler=self.sampler, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
            batch_size=self.rollout_batch_size, generator=generator, flow_shift=self.shift(policy),
            sde_noise_level=self.sde_noise_level,
            negative=self.text_dropout > 0 or self.train_guidance_scale > 1,
        )  # fmt: skip

    def _read(self, policy: FlowPolicy, iteration: int) -> ODERollout:
        """The iteration's curated samples as a rollout: their images encoded to latents, one group each."""
        kept = self.kept_samples()
        picked = [kept[row] for row in self.offline_rows(iteration, self.shuffle_seed)]
        batch = PromptBatch(
            prompts=[sample.prompt for sample in picked],
            metadata=[{**sample.metadata, "curated_scores": sample.scores} for sample in picked],
            group_ids=torch.arange(len(picked)),
            prompt_ids=torch.tensor([sample.prompt_id for sample in picked]),
        )
        batch = rank_slice(batch)  # every rank reads the iteration's rows; each fits its own share
        picked = [picked[int(i)] for i in batch.sample_ids]
        images = torch.stack(
            [read_image(Path(self.dataset) / sample.image, policy.resolution) for sample in picked]
        ).to(policy.device)
        prompts, cond_index, metadata = batch.unique()
        negative = self.text_dropout > 0 or self.train_guidance_scale > 1
        cond = policy.encode(prompts, negative=negative, sources=policy.sources(metadata))
        return ODERollout(
            images=images,
            samples=policy.encode_images(images).float(),
            sigmas=torch.tensor([1.0, 0.0]),
            cond=cond,
            cond_index=cond_index.to(policy.device),
            scored=batch,
        )

    # ---- rewards and the filter ----------------------------------------------------------------------

    def score(self, reward: RewardEnsemble, rollout: ODERollout) -> RewardOutput:
        """Online: the ensemble. Offline: the scores stored by the curation (the reward is not called)."""
        if self.source == "online":
            return super().score(reward, rollout)
        rows = rollout.scored.metadata
        names = list(rows[0]["curated_scores"])
        scores = {name: torch.tensor([float(row["curated_scores"][name]) for row in rows]) for name in names}
        weights = {name: reward.weights.get(name, 1.0) for name in names}
        return RewardOutput(scores=scores, weights=weights, aggregate=reward.aggregate)

    def advantages(self, rewards: RewardOutput, rollout: ODERollout) -> Advantages:
        """Not advantages: a weight of 1 on each kept sample and 0 elsewhere (offline samples were kept by
        the curation)."""
        total = rewards.total
        valid = torch.isfinite(total)
        if self.source == "offline":
            kept = valid.clone()
        else:
            kept = keep_mask(total, rollout.scored.groups.ids, self.threshold, self.top_k).to(valid.device)
        groups = rollout.scored.groups
        return Advantages(
            values=kept.float(),
            valid=valid,
            zero_std=torch.zeros_like(valid),
            train_mask=kept,
            num_groups=groups.count,
            num_zero_std_groups=0,
        )

    def rollout_metrics(self, rollout: ODERollout, rewards: RewardOutput) -> dict[str, float]:
        total = rewards.total.float()
        kept = self.advantages(rewards, rollout).train_mask
        if self.source == "online" and not bool(kept.any()):
            log.warning("algo=rft: no sample passed the filter this iteration; nothing is fitted")
        return {
            "rft/kept_frac": kept.float().mean().item(),
            "rft/kept": float(kept.sum()),
            "rft/kept_reward_mean": total[kept].mean().item() if kept.any() else math.nan,
        }

    # ---- training units and the loss ----------------------------------------------------------------

    def shift(self, policy: FlowPolicy) -> float:
        """The time shift of training noise levels: ``flow_shift``, else the model's static ``shift`` (as
        diffusers' SD3 and FLUX training scripts, which index the scheduler's shifted sigmas)."""
        return self.flow_shift if self.flow_shift is not None else policy.scheduler_config.get("shift", 1.0)

    def minibatches(
        self, rollout: ODERollout, advantages: Advantages, generator: torch.Generator
    ) -> list[list[RFTUnit]]:
        """Kept samples, shuffled, in micro-batches; each sample's noise level, noise and text dropout come
        from a stream keyed by the sample (so a sample trains alike on whichever rank holds it)."""
        kept = advantages.train_mask.cpu().nonzero().flatten()
        if kept.numel() == 0:
            return []
        sample_ids = rollout.scored.sample_ids[kept].tolist()
        # each pass draws the next values of the sample's own streams
        noise_streams = dict(zip(sample_ids, keyed(generator, sample_ids, SAMPLE)))
        choice_streams = dict(zip(sample_ids, keyed(generator, sample_ids, CHOICE)))
        shape = tuple(rollout.samples.shape[1:])
        steps = []
        for _ in range(self.num_inner_epochs):
            order = kept[torch.randperm(kept.numel(), generator=generator)]
            streams = [noise_streams[i] for i in rollout.scored.sample_ids[order].tolist()]
            u = torch.cat([compute_density_for_timestep_sampling(
                self.timestep_density, 1, self.logit_mean, self.logit_std, self.mode_scale, generator=g
            ) for g in streams])  # fmt: skip
            noise = torch.stack([randn_tensor(shape, generator=g) for g in streams])
            dropped = torch.cat(
                [torch.rand(1, generator=choice_streams[i]) < self.text_dropout
                 for i in rollout.scored.sample_ids[order].tolist()]
            )  # fmt: skip
            units = [
                RFTUnit(order[chunk], 0, u[chunk], noise[chunk], dropped[chunk])
                for chunk in torch.arange(order.numel()).split(self.batch_size)
            ]
            steps.extend(split_evenly(units, self.num_minibatches))
        return steps

    def loss(
        self, policy: FlowPolicy, rollout: ODERollout, advantages: Advantages, unit: RFTUnit
    ) -> LossOutput:
        samples = unit.samples.to(rollout.samples.device)
        x0 = rollout.samples[samples]
        eps = unit.noise.to(x0.device, x0.dtype)
        sigmas = shifted(unit.u.to(x0.device, x0.dtype), self.shift(policy))
        sigma = sigmas.view(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - sigma) * x0 + sigma * eps
        cond = drop_text(rollout.cond.select(rollout.cond_index[samples]), unit.text_dropped)
        v = policy.velocity(x_t, sigmas, cond, self.train_guidance_scale)
        per_sample = mean_over_dims((v - (eps - x0)) ** 2)
        loss = per_sample.mean()
        return LossOutput(
            loss=loss,
            metrics={"flow_matching_loss": loss.detach(), "sigma": sigmas.detach().mean()},
        )
