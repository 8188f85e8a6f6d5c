"""Reward hacking made visible while it happens: gold rewards, image statistics, and a monitor that warns.

A policy that learns its reward model's blind spots raises the trained reward while what the reward was
meant to measure gets worse. Three signals expose it, all logged every iteration:

* ``gold/...``: rewards the run does *not* train on, scored on the same rollout (:class:`GoldRewards`);
  a gold reward that falls while the trained one rises is the signature of hacking.
* ``images/...``: cheap statistics of the rollout's images (:func:`image_statistics`); hacks often show as
  a drift in brightness, saturation, colours or edges (UniRL issue #407: an OCR reward that blanked the
  background showed in the dark-pixel fraction, edge density, colour entropy and brightness).
* ``hacking/...``: the flags of :class:`RewardHackingMonitor`, which also warns in the Python log and, under
  W&B, raises a ``wandb.alert`` (recorded offline and sent by ``wandb sync``).

Every statistic is a mean over images of a per-image value in [0, 1] (diversity: over groups).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from g2rpo.distributed import gather_objects
from g2rpo.rewards.base import RewardFunction
from g2rpo.types import PromptBatch

log = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights, as PIL's "L" conversion
DARK = 0.1  # a pixel is dark below this luma (25 of 255)
EDGE = 0.1  # a pixel is on an edge when a channel changes by more than this to a neighbour
COLOUR_LEVELS = 8  # per channel: 8^3 = 512 colour bins for the colour entropy
CHUNK = 16  # images per chunk, bounding the float32 copies of large (1024^2) images


def luma(images: Tensor) -> Tensor:
    """``[B, H, W]`` luma of ``[B, 3, H, W]`` images in [0, 1]."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, weights)


def brightness(images: Tensor) -> Tensor:
    """``[B]``: each image's mean luma ``0.299 R + 0.587 G + 0.114 B`` (0 black, 1 white)."""
    return luma(images).mean(dim=(-2, -1))


def saturation(images: Tensor) -> Tensor:
    """``[B]``: each image's mean HSV saturation ``(max - min) / max`` over channels (0 where max is 0):
    0 for greys, 1 for pure hues."""
    high, low = images.amax(dim=1), images.amin(dim=1)
    return torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high)).mean(
        dim=(-2, -1)
    )


def dark_fraction(images: Tensor) -> Tensor:
    """``[B]``: the fraction of each image's pixels whose luma is below ``DARK`` (0.1)."""
    return (luma(images) < DARK).float().mean(dim=(-2, -1))


def edge_density(images: Tensor) -> Tensor:
    """``[B]``: the fraction of pixels on an edge. Pixel ``(i, j)`` (``i < H - 1``, ``j < W - 1``) is on an
    edge when some channel differs by more than ``EDGE`` (0.1) from its right or its lower neighbour; colour
    edges of equal luma count. 0 for a flat image, 1 for a one-pixel checkerboard."""
    right = (images[..., :-1, 1:] - images[..., :-1, :-1]).abs().amax(dim=1)
    down = (images[..., 1:, :-1] - images[..., :-1, :-1]).abs().amax(dim=1)
    return (torch.maximum(right, down) > EDGE).float().mean(dim=(-2, -1))


def colour_entropy(images: Tensor) -> Tensor:
    """``[B]``: the Shannon entropy of each image's colour histogram, normalised to [0, 1]. Each channel is
    quantised to ``COLOUR_LEVELS`` (8) levels, giving 512 colour bins; the entropy in bits is divided by
    ``log2(512) = 9``. 0 for a single colour; a few flat shapes on a background stay low."""
    levels = (images.clamp(0, 1) * COLOUR_LEVELS).long().clamp_max(COLOUR_LEVELS - 1)
    bins = COLOUR_LEVELS**3
    colour = (levels[:, 0] * COLOUR_LEVELS + levels[:, 1]) * COLOUR_LEVELS + levels[:, 2]  # [B, H, W]
    offsets = torch.arange(images.shape[0], device=images.device)[:, None] * bins
    counts = torch.bincount((colour.flatten(1) + offsets).flatten(), minlength=images.shape[0] * bins)
    p = counts.view(images.shape[0], bins).float() / colour[0].numel()
    entropy = -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)
    return entropy / math.log2(bins)


def group_diversity(images: Tensor, group_ids: Tensor) -> Tensor:
    """``[G']``: for each group of at least two members, the mean over its pairs of images of their RMS
    distance ``sqrt(mean((a - b)^2))`` over pixels and channels (0: identical members, 1: black vs white).
    Groups of one member are left out: they have no pair."""
    group_ids = group_ids.to(images.device)
    out = []
    for group in torch.unique(group_ids):
        members = images[group_ids == group].flatten(1).float()
        if members.shape[0] > 1:
            out.append(torch.pdist(members).mean() / math.sqrt(members.shape[1]))
    return torch.stack(out) if out else images.new_zeros(0)


PER_IMAGE: dict[str, Callable[[Tensor], Tensor]] = {
    "brightness": brightness,
    "saturation": saturation,
    "colour_entropy": colour_entropy,
    "edge_density": edge_density,
    "dark_fraction": dark_fraction,
}


@torch.no_grad()
def image_statistics(images: Tensor, group_ids: Tensor) -> dict[str, float]:
    """``images/<statistic>``: the batch mean of each per-image statistic, and ``images/diversity``, the mean
    over groups of :func:`group_diversity`. ``images`` are ``[B, 3, H, W]`` in [0, 1]."""
    sums = dict.fromkeys(PER_IMAGE, 0.0)
    for chunk in images.split(CHUNK):
        chunk = chunk.float()
        for name, statistic in PER_IMAGE.items():
            sums[name] += float(statistic(chunk).sum())
    metrics = {f"images/{name}": total / images.shape[0] for name, total in sums.items()}
    diversity = group_diversity(images, group_ids)
    if diversity.numel():
        metrics["images/diversity"] = float(diversity.mean())
    return metrics


class GoldRewards:
    """Rewards logged beside the trained one but never trained on, scored on each iteration's rollout.

    Each is logged as ``gold/<name>/mean`` (over the rollout's images) and ``gold/<name>/<task>`` per task,
    the task being the prompt metadata's ``tag`` (the GenEval task). A reward with a
    ``scores(images, prompts, metadata) -> dict`` method (GenEval: strict ``accuracy`` and ``partial``
    credit) logs each of its scores: ``gold/geneval_shapes/accuracy/position``. NaN scores (prompts a reward
    cannot score) are left out of the means.
    """

    def __init__(self, rewards: Mapping[str, RewardFunction]) -> None:
        self.rewards = dict(rewards)

    def excluding(self, trained: Iterable[str]) -> GoldRewards | None:
        """Without the rewards the run trains on (by name: a trained reward is no gold standard); None when
        nothing is left."""
        trained = set(trained)
        left_out = sorted(trained & self.rewards.keys())
        if left_out:
            log.info("gold rewards %s are trained on: not logged as gold", left_out)
        kept = {name: fn for name, fn in self.rewards.items() if name not in trained}
        return GoldRewards(kept) if kept else None

    def scores(self, images: Tensor, batch: PromptBatch) -> dict[str, Tensor]:
        """``{column: [B] scores}`` of this rank's images, on the CPU."""
        columns = {}
        for name, reward in self.rewards.items():
            if hasattr(reward, "scores"):
                for key, values in reward.scores(images, batch.prompts, batch.metadata).items():
                    columns[f"{name}/{key}"] = values
            else:
                columns[name] = reward(images, batch.prompts, batch.metadata)
        return {
            column: torch.as_tensor(v, dtype=torch.float32).detach().cpu().flatten()
            for column, v in columns.items()
        }

    @torch.no_grad()
    def metrics(self, images: Tensor, batch: PromptBatch) -> dict[str, float]:
        """The ``gold/...`` metrics of the whole iteration: every rank scores its own images, then the scores
        are gathered (every rank must call this)."""
        tags = [meta.get("tag") for meta in batch.metadata]
        parts = gather_objects((self.scores(images, batch), tags))
        tags = [tag for _, part in parts for tag in part]
        metrics = {}
        for column in parts[0][0]:
            values = torch.cat([scores[column] for scores, _ in parts])
            metrics.update(_means(f"gold/{column}", values, tags))
        return metrics


def _means(prefix: str, values: Tensor, tags: Sequence[str | None]) -> dict[str, float]:
    """``prefix/mean`` over the finite values and ``prefix/<tag>`` per tag; keys without a finite value are
    not logged."""
    out = {}
    finite = torch.isfinite(values)
    if finite.any():
        out[f"{prefix}/mean"] = float(values[finite].mean())
    for tag in sorted({t for t in tags if t is not None}):
        mine = finite & torch.tensor([t == tag for t in tags])
        if mine.any():
            out[f"{prefix}/{tag}"] = float(values[mine].mean())
    return out


def welch(base: Sequence[float], recent: Sequence[float]) -> float:
    """Welch's t statistic of ``mean(recent) - mean(base)``: the change in units of its standard error
    ``sqrt(var(base) / n_base + var(recent) / n_recent)`` (sample variances). Infinite for a change of
    noiseless series, 0 for no change."""
    base_t, recent_t = torch.tensor(base, dtype=torch.float64), torch.tensor(recent, dtype=torch.float64)
    change = float(recent_t.mean() - base_t.mean())
    error = math.sqrt(float(base_t.var() / len(base) + recent_t.var() / len(recent)))
    if error == 0:
        return math.copysign(math.inf, change) if change else 0.0
    return change / error


class RewardHackingMonitor(L.Callback):
    """Warns when the trained reward rises while a gold reward falls, or when an image statistic drifts.

    Every iteration it reads the trained reward (``reward``, a logged metric) and every ``gold/...`` and
    ``images/...`` metric, and compares, per metric, the mean of its *recent* window (its last ``window``
    values) with its *base* window (its first ``window`` values: the policy at the start of training, the
    base model's statistics). A metric is judged once it has ``2 * window`` values, so the windows never
    overlap. Two rules:

    * gold: ``t(reward) > z`` and ``t(gold) < -z``, with ``t`` Welch's statistic (:func:`welch`) of the
      recent mean against the base mean: both changes are ``z`` standard errors away from no change, so the
      iteration-to-iteration noise of each (a task seen in few prompts is noisy) sets its own bar.
    * drift: ``|mean(recent) - mean(base)| > max(k * std(base), min_drift)``: the recent images are ``k``
      standard deviations of the base iterations' values away from them, and by at least ``min_drift`` (the
      statistics are in [0, 1]), so that a statistic the base model holds still (no dark pixel) does not
      fire on any trace.

    Each metric judged logs a flag ``hacking/<metric>`` (1 while its rule holds), and ``hacking/warning`` is 1
    while any does. A flag turning on is logged as a warning with its numbers and, under W&B, raised as a
    ``wandb.alert``. The values seen are checkpointed, so a resumed run keeps its base windows.
    """

    def __init__(
        self,
        reward: str = "reward/total/mean",
        window: int = 5,
        z: float = 2.0,
        k: float = 3.0,
        min_drift: float = 0.02,
    ) -> None:
        if window < 2:
            raise ValueError(
                f"callbacks.hacking.window={window} must be >= 2 (a window's variance needs 2 values)"
            )
        self.reward, self.window, self.z, self.k, self.min_drift = reward, window, z, k, min_drift
        self.history: dict[str, dict[int, float]] = {}  # metric -> iteration -> value
        self.active: set[str] = set()  # flags on at the last iteration
        self.first_fired: dict[str, int] = {}  # flag -> iteration it first turned on

    def record(self, iteration: int, metrics: Mapping[str, float]) -> None:
        if self.reward not in metrics:
            known = sorted(key for key in metrics if key.startswith("reward/"))
            raise ValueError(f"callbacks.hacking.reward={self.reward!r} is not logged; choose one of {known}")
        for key, value in metrics.items():
            if (key == self.reward or key.startswith(("gold/", "images/"))) and math.isfinite(value):
                self.history.setdefault(key, {})[iteration] = float(value)

    def _windows(self, key: str) -> tuple[list[float], list[float]] | None:
        values = [value for _, value in sorted(self.history.get(key, {}).items())]
        if len(values) < 2 * self.window:
            return None
        return values[: self.window], values[-self.window :]

    def judge(self) -> dict[str, tuple[bool, str]]:
        """``{flag: (whether its rule holds, the numbers)}`` for every metric with enough values."""
        out = {}
        reward = self._windows(self.reward)
        if reward is not None:
            t_reward = welch(*reward)
            for key in self.history:
                gold = self._windows(key) if key.startswith("gold/") else None
                if gold is not None:
                    t_gold = welch(*gold)
                    out[f"hacking/{key}"] = (
                        t_reward > self.z and t_gold < -self.z,
                        f"{key} {_mean(gold[0]):.4f} -> {_mean(gold[1]):.4f} (t = {t_gold:+.1f}) while "
                        f"{self.reward} {_mean(reward[0]):.4f} -> {_mean(reward[1]):.4f} (t = {t_reward:+.1f})",
                    )
        for key in self.history:
            windows = self._windows(key) if key.startswith("images/") else None
            if windows is not None:
                base, recent = windows
                spread = float(torch.tensor(base, dtype=torch.float64).std())
                change = _mean(recent) - _mean(base)
                out[f"hacking/{key}"] = (
                    abs(change) > max(self.k * spread, self.min_drift),
                    f"{key} {_mean(base):.4f} -> {_mean(recent):.4f} ({change:+.4f}; base std {spread:.4f})",
                )
        return out

    def update(self, iteration: int, metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, str]]:
        """Record an iteration's metrics and judge them: the flags to log, and the numbers of each flag that
        has just turned on."""
        self.record(iteration, metrics)
        verdicts = self.judge()
        flags = {flag: float(holds) for flag, (holds, _) in verdicts.items()}
        flags["hacking/warning"] = float(any(flags.values()))
        active = {flag for flag, (holds, _) in verdicts.items() if holds}
        turned_on = {flag: verdicts[flag][1] for flag in sorted(active - self.active)}
        for flag in turned_on:
            self.first_fired.setdefault(flag, iteration)
        self.active = active
        return flags, turned_on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        iteration = trainer.current_epoch
        metrics = {key: float(value) for key, value in outputs["metrics"].items()}  # this iteration's only
        flags, turned_on = self.update(iteration, metrics)
        pl_module.log_dict(flags, on_step=True, on_epoch=False, batch_size=1)
        if turned_on:
            self._warn(trainer, iteration, turned_on)

    @rank_zero_only
    def _warn(self, trainer: L.Trainer, iteration: int, turned_on: Mapping[str, str]) -> None:
        """One warning (and one W&B alert) per iteration, listing every flag that has just turned on."""
        title = f"reward hacking? iteration {iteration}: {len(turned_on)} new signal(s)"
        rules = (
            f"means of the first and the last {self.window} iterations; gold: both |t| > {self.z}, "
            f"drift: > max({self.k} base std, {self.min_drift})"
        )
        text = "\n".join([f"{title} ({rules})", *(f"  {numbers}" for numbers in turned_on.values())])
        log.warning(text)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.first_fired:
            first = min(self.first_fired.values())
            log.warning(
                "reward hacking signals in this run, from iteration %d: %s",
                first,
                ", ".join(
                    f"{flag} ({i})" for flag, i in sorted(self.first_fired.items(), key=lambda f: f[1])
                ),
            )

    def state_dict(self) -> dict:
        return {"history": self.history, "active": sorted(self.active), "first_fired": self.first_fired}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {
            key: {int(i): v for i, v in values.items()} for key, values in state_dict["history"].items()
        }
        self.active = set(state_dict["active"])
        self.first_fired = dict(state_dict["first_fired"])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
