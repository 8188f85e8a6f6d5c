"""CurES (Zeng, Sun et al., arXiv 2510.01037): which prompts to train on, and how many rollouts each gets.

A Beta posterior over each prompt's success rate ``p`` (Eqs. 22-24; prior Beta(1, 1), as the code's
``(alpha + 1) / (alpha + beta + 2)``) drives two decisions:

* **Prompt sampling** (Eq. 14), the closed form of ``max_rho E[sqrt(2 delta p(1-p))] + alpha H(rho)`` (Eq. 13)::

      rho(x) = softmax_x( sqrt(p(x) (1 - p(x))) / tau )

* **Rollout allocation** (Eqs. 15-21): the minimum-variance (Neyman) split of the iteration's budget ``N``
  over the sampled batch, ``n_i = N sigma_i / sum_j sigma_j``, with (Eq. 21, ``g`` the score-function
  gradient ``grad log pi(y | x_i)``)::

      sigma_i^2 = p(1-p)^2 E_{r=1}||g||^2 + p^2(1-p) E_{r=0}||g||^2 - p^2(1-p)^2 ||E_{r=1} g - E_{r=0} g||^2

  ``sigma_mode: grad_norm`` estimates it from the pre-rollouts' gradient norms as the official code does
  (means of norms in the last term, an empty side counting as 0); ``bernoulli_proxy`` (the default) uses its
  bound ``sigma_i ~ sqrt(p (1 - p))`` when both sides have the same expected squared norm, which needs no
  gradients and keeps the bell shape in ``p`` (derived in our brief, not in the paper). Group sizes are
  rounded by largest remainder and kept in ``[n_min, n_max]``, ``n_min >= 2`` so that every group has a
  baseline.

The prompts are visited in non-overlapping subsets (the paper's T subsets of the data, after GVM). At the
start of each, ``pre_rollouts`` (N' = 4) samples per prompt re-estimate its posterior from scratch, then
``steps_per_subset`` (M = 10) iterations train on it, updating the posterior after every step (Algorithm
1, lines 17-19; the released code skips this online update, brief A.4).

Paper and code disagree on the sampler (brief A.2): ``sampling_mode: paper`` is Eq. 14 with ``tau``;
``code_compat`` is the released per-prompt temperature ``(alpha_i + 1) / 0.01`` (``alpha_i`` the success
count), which makes sampling near-uniform, so the released curriculum acts through allocation alone; the
paper draws with replacement, the code draws distinct prompts per batch (``replacement: false``, our
default). ``sampling_mode: uniform`` and ``sigma_mode: uniform`` switch either half off: the sampling-only
and allocation-only ablation that the paper lacks.

Continuous rewards count as successes above ``success_threshold`` (as the code's 0.5), or, with
``posterior_update: fractional``, add ``r~`` successes and ``1 - r~`` failures with ``r~`` the reward
rescaled from ``reward_range`` into [0, 1] (brief A.7, not from the paper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from g2rpo.curriculum.base import Curriculum, Probe
from g2rpo.data import PromptDataset
from g2rpo.types import PromptBatch, RewardOutput

SAMPLING_MODES = ("paper", "code_compat", "uniform")
SIGMA_MODES = ("bernoulli_proxy", "grad_norm", "uniform")
POSTERIOR_UPDATES = ("binary", "fractional")
CODE_TEMPERATURE_SCALE = 0.01  # the released sampler's t_i = (alpha_i + 1) / 0.01


def sampling_distribution(p: Tensor, successes: Tensor, tau: float, mode: str = "paper") -> Tensor:
    """``rho`` over prompts with posterior means ``p`` (Eq. 14, or the released code's temperatures)."""
    score = torch.sqrt(p * (1 - p))
    if mode == "paper":
        logits = score / tau
    elif mode == "code_compat":
        logits = score / ((successes + 1) / CODE_TEMPERATURE_SCALE)
    elif mode == "uniform":
        logits = torch.zeros_like(p)
    else:
        raise ValueError(f"sampling_mode={mode!r} is not valid; choose one of {', '.join(SAMPLING_MODES)}")
    return torch.softmax(logits.double(), dim=0)


def gradient_sigma(p: Tensor, moments: Tensor) -> Tensor:
    """Eq. 21 from gradient-norm moments ``[m, 4]``: mean ``||g||^2`` of successes and of failures, then mean
    ``||g||`` of each (the code's stand-in for the norm of the mean difference). Clamped at 0 before the
    square root; the released code does not clamp, so a negative estimate gives it a NaN."""
    a, b = p.double(), 1 - p.double()
    square_success, square_failure, norm_success, norm_failure = moments.double().unbind(dim=1)
    variance = (
        a * b**2 * square_success
        + a**2 * b * square_failure
        - a**2 * b**2 * (norm_success - norm_failure) ** 2
    )
    return variance.clamp_min(0).sqrt()


def allocate(weights: Tensor, budget: int, n_min: int, n_max: int) -> Tensor:
    """Integer group sizes ``n_i`` proportional to ``weights`` with ``sum n_i = budget`` and
    ``n_min <= n_i <= n_max``.

    The continuous optimum is ``clamp(c w_i, n_min, n_max)`` for the ``c`` whose sum is ``budget`` (found by
    bisection: the sum is monotone in ``c``); it is rounded by largest remainder (Hamilton's method), so no
    size moves by a whole unit from its exact share. Zero weights get the smallest positive share.
    """
    m = len(weights)
    if not m * n_min <= budget <= m * n_max:
        raise ValueError(f"cannot split {budget} rollouts over {m} prompts with {n_min} <= n_i <= {n_max}")
    w = weights.detach().double().cpu()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"allocation weights must be finite and >= 0, got {w.tolist()}")
    w = torch.ones_like(w) if w.max() == 0 else w.clamp_min(w.max() * 1e-9)

    def shares(c: float) -> Tensor:
        return (c * w).clamp(n_min, n_max)

    low, high = 0.0, budget / float(w.sum())
    while shares(high).sum() < budget:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if shares(middle).sum() < budget else (low, middle)
    exact = shares(high)
    sizes = exact.floor().long()
    remainder = budget - int(sizes.sum())
    fractions = torch.where(sizes < n_max, exact - sizes, torch.full_like(exact, -1.0))
    sizes[torch.argsort(fractions, descending=True, stable=True)[:remainder]] += 1
    return sizes


@dataclass
class ProbeSettings:
    """How pre-rollouts sample (the config takes the algorithm's steps, CFG and batch size); a token
    policy's probe samples as its algorithm does, so these are null there."""

    num_steps: int | None = 10
    guidance_scale: float | None = 4.5
    batch_size: int | None = 8
    noise_level: float = 0.7  # Flow-SDE a, for sigma_mode=grad_norm only (those probes need log-probs)


@dataclass
class CurESCurriculum(Curriculum):
    """Beta-posterior prompt sampling and rollout allocation (CurES); usable with every algorithm."""

    prompts_per_iteration: int = 8  # m, prompts (groups) per iteration
    group_size: int = 8  # the mean group size: the budget N = m x group_size (paper: 8 per prompt)
    n_min: int = 2
    n_max: int = 16
    sampling_mode: str = "paper"  # paper | code_compat | uniform
    tau: float = 0.1  # Eq. 14's temperature; the paper gives no value (scores lie in [0, 0.5])
    replacement: bool = False  # paper: with replacement; code: distinct prompts within a batch
    sigma_mode: str = "bernoulli_proxy"  # bernoulli_proxy | grad_norm | uniform (equal groups)
    pre_rollouts: int = 4  # N' samples per prompt when a subset starts
    subset_size: int | None = 64  # prompts per re-estimation subset (null: the whole dataset)
    steps_per_subset: int = 10  # M iterations per subset
    online_update: bool = True  # Algorithm 1: update the posterior after every step (the code does not)
    success_threshold: float = 0.5  # a reward above this is a success (code: 0.5)
    posterior_update: str = "binary"  # binary | fractional
    reward_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # for the fractional update
    prior: list[float] = field(default_factory=lambda: [1.0, 1.0])  # Beta(alpha_0, beta_0)
    probe: ProbeSettings = field(default_factory=ProbeSettings)

    def __post_init__(self) -> None:
        if isinstance(self.probe, Mapping):
            self.probe = ProbeSettings(**self.probe)
        for name, valid in (
            ("sampling_mode", SAMPLING_MODES),
            ("sigma_mode", SIGMA_MODES),
            ("posterior_update", POSTERIOR_UPDATES),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"curriculum.{name}={getattr(self, name)!r} is not valid; choose one of {', '.join(valid)}"
                )
        if self.prompts_per_iteration < 1 or not 2 <= self.n_min <= self.group_size <= self.n_max:
            raise ValueError(
                "curriculum: need prompts_per_iteration >= 1 and 2 <= n_min <= group_size <= n_max (a group "
                f"of one has no baseline); got {self.prompts_per_iteration}, {self.n_min} <= {self.group_size} "
                f"<= {self.n_max}"
            )
        if self.tau <= 0 or self.steps_per_subset < 1 or self.pre_rollouts < 0:
            raise ValueError("curriculum: need tau > 0, steps_per_subset >= 1 and pre_rollouts >= 0")
        if self.sigma_mode == "grad_norm" and self.pre_rollouts < 1:
            raise ValueError(
                "curriculum.sigma_mode=grad_norm measures gradients on pre-rollouts: pre_rollouts >= 1"
            )
        if len(self.prior) != 2 or min(self.prior) <= 0:
            raise ValueError(
                f"curriculum.prior must be two positive numbers [alpha_0, beta_0], got {self.prior}"
            )
        if len(self.reward_range) != 2 or self.reward_range[0] >= self.reward_range[1]:
            raise ValueError(
                f"curriculum.reward_range must be [low, high] with low < high, got {self.reward_range}"
            )
        if self.subset_size is not None and self.subset_size < (
            1 if self.replacement else self.prompts_per_iteration
        ):
            raise ValueError(
                f"curriculum.subset_size={self.subset_size} is smaller than prompts_per_iteration="
                f"{self.prompts_per_iteration} drawn without replacement"
            )
        self.successes: Tensor | None = None  # [D] (fractional) success counts, prior excluded
        self.failures: Tensor | None = None
        self.gradient_moments: Tensor | None = None  # [D, 4] for sigma_mode=grad_norm
        self.visited: Tensor | None = None  # [D] prompts already given a subset in this pass over the data
        self.subset: Tensor | None = None  # prompt ids of the current subset
        self.steps_in_subset = 0
        self.last: dict[str, Tensor] = {}  # what the last sample drew, for update and diagnostics

    @property
    def budget(self) -> int:
        return self.prompts_per_iteration * self.group_size

    def posterior_mean(self, prompt_ids: Tensor) -> Tensor:
        alpha, beta = self.prior
        successes, failures = self.successes[prompt_ids], self.failures[prompt_ids]
        return (successes + alpha) / (successes + failures + alpha + beta)

    def sample(
        self, dataset: PromptDataset, generator: torch.Generator, probe: Probe | None = None
    ) -> PromptBatch:
        if self.successes is None or len(self.successes) != len(dataset):
            self._reset(len(dataset))
        pre_rollouts = 0
        if self.subset is None or self.steps_in_subset >= self.steps_per_subset:
            pre_rollouts = self._start_subset(dataset, generator, probe)
        if not self.replacement and len(self.subset) < self.prompts_per_iteration:
            raise ValueError(
                f"curriculum.prompts_per_iteration={self.prompts_per_iteration} exceeds the {len(self.subset)} "
                "prompts of the dataset (or set curriculum.replacement=true)"
            )
        p = self.posterior_mean(self.subset)
        rho = sampling_distribution(p, self.successes[self.subset], self.tau, self.sampling_mode)
        picks = torch.multinomial(rho, self.prompts_per_iteration, self.replacement, generator=generator)
        prompt_ids = self.subset[picks]
        sizes = allocate(self._sigma(prompt_ids), self.budget, self.n_min, self.n_max)
        self.steps_in_subset += 1
        self.last = {
            "prompt_ids": prompt_ids,
            "group_size": sizes,
            "p": p[picks],
            "rho": rho,
            "pre_rollouts": torch.tensor(pre_rollouts),
        }
        return PromptBatch.from_groups(dataset.prompts, dataset.metadata, prompt_ids, sizes)

    def _sigma(self, prompt_ids: Tensor) -> Tensor:
        if self.sigma_mode == "uniform":
            return torch.ones(len(prompt_ids), dtype=torch.float64)
        p = self.posterior_mean(prompt_ids)
        if self.sigma_mode == "bernoulli_proxy":
            return torch.sqrt(p * (1 - p))
        return gradient_sigma(p, self.gradient_moments[prompt_ids])

    def _reset(self, num_prompts: int) -> None:
        self.successes = torch.zeros(num_prompts, dtype=torch.float64)
        self.failures = torch.zeros(num_prompts, dtype=torch.float64)
        self.gradient_moments = torch.zeros(num_prompts, 4, dtype=torch.float64)
        self.visited = torch.zeros(num_prompts, dtype=torch.bool)
        self.subset = None
        self.steps_in_subset = 0

    def _start_subset(self, dataset: PromptDataset, generator: torch.Generator, probe: Probe | None) -> int:
        """Draw the next subset among the prompts not yet visited in this pass (a new pass starts when too
        few remain), forget its old estimates, and pre-roll it. Returns the number of pre-rollouts."""
        size = len(dataset) if self.subset_size is None else min(self.subset_size, len(dataset))
        unvisited = (~self.visited).nonzero().flatten()
        if len(unvisited) < size:
            self.visited[:] = False
            unvisited = torch.arange(len(dataset))
        self.subset = unvisited[torch.randperm(len(unvisited), generator=generator)[:size]]
        self.visited[self.subset] = True
        self.steps_in_subset = 0
        self.successes[self.subset] = 0
        self.failures[self.subset] = 0
        self.gradient_moments[self.subset] = 0
        if self.pre_rollouts == 0:
            return 0
        if probe is None:
            raise ValueError("curriculum=cures with pre_rollouts > 0 needs a probe that samples the policy")
        batch = PromptBatch.from_groups(
            dataset.prompts, dataset.metadata, self.subset, torch.full((size,), self.pre_rollouts)
        )
        probed = probe(batch, grad_norms=self.sigma_mode == "grad_norm", **asdict(self.probe))
        finite = torch.isfinite(probed.rewards)
        prompt_ids, successes = batch.prompt_ids[finite], self._successes(probed.rewards[finite])
        self.successes.index_add_(0, prompt_ids, successes)
        self.failures.index_add_(0, prompt_ids, 1 - successes)
        if probed.grad_norms is not None:
            self._record_gradients(prompt_ids, successes > 0.5, probed.grad_norms[finite].double())
        return len(batch)

    def _record_gradients(self, prompt_ids: Tensor, succeeded: Tensor, norms: Tensor) -> None:
        """Per prompt: mean ``||g||^2`` and mean ``||g||`` over its successful and its failed pre-rollouts."""
        for column, side in ((0, succeeded), (1, ~succeeded)):
            count = torch.zeros_like(self.successes).index_add_(
                0, prompt_ids[side], torch.ones_like(norms[side])
            )
            for offset, values in ((0, norms[side] ** 2), (2, norms[side])):
                total = torch.zeros_like(self.successes).index_add_(0, prompt_ids[side], values)
                self.gradient_moments[:, column + offset] = torch.where(
                    count > 0, total / count.clamp_min(1), self.gradient_moments[:, column + offset]
                )

    def _successes(self, rewards: Tensor) -> Tensor:
        rewards = rewards.double().cpu()
        if self.posterior_update == "binary":
            return (rewards > self.success_threshold).double()
        low, high = self.reward_range
        return ((rewards - low) / (high - low)).clamp(0, 1)

    def update(self, batch: PromptBatch, rewards: RewardOutput) -> dict[str, float]:
        """The posterior update ``alpha += s_i, beta += n_i - s_i`` (Eq. 24) for the prompts just trained.

        When an algorithm scores several images per sample (G2RPO's continuations), the prompt's ``n_i``
        rollouts count as ``n_i`` trials at the success rate of all its scored images, so that no
        prompt's posterior sharpens faster because of how many images its algorithm scores.
        """
        metrics = super().update(batch, rewards)
        if not self.last:
            return metrics
        if self.online_update:
            total = rewards.total.detach().cpu()
            finite = torch.isfinite(total)
            ids = batch.prompt_ids.cpu()[finite]
            images = torch.zeros_like(self.successes).index_add_(
                0, ids, torch.ones(len(ids), dtype=torch.float64)
            )
            hits = torch.zeros_like(self.successes).index_add_(0, ids, self._successes(total[finite]))
            drawn = torch.zeros_like(self.successes).index_add_(
                0, self.last["prompt_ids"], self.last["group_size"].double()
            )
            trials = torch.minimum(drawn, images)
            rate = hits / images.clamp_min(1)
            self.successes += trials * rate
            self.failures += trials * (1 - rate)
        p_subset = self.posterior_mean(self.subset)
        quantiles = torch.quantile(p_subset, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        sizes, p = self.last["group_size"].double(), self.last["p"]
        middle = (p - 0.5).abs() <= 0.25
        rho = self.last["rho"]
        entropy = (
            -(rho * rho.clamp_min(1e-300).log()).sum() / math.log(len(rho))
            if len(rho) > 1
            else rho.new_ones(())
        )
        metrics.update(
            {
                "curriculum/p_mean": float(p_subset.mean()),
                "curriculum/p_q10": float(quantiles[0]),
                "curriculum/p_q50": float(quantiles[1]),
                "curriculum/p_q90": float(quantiles[2]),
                "curriculum/sampled_p_mean": float(p.mean()),
                "curriculum/group_size_min": float(sizes.min()),
                "curriculum/group_size_max": float(sizes.max()),
                "curriculum/group_size_p_mid": float(sizes[middle].mean()) if middle.any() else float("nan"),
                "curriculum/group_size_p_extreme": float(sizes[~middle].mean())
                if (~middle).any()
                else float("nan"),
                "curriculum/sampling_entropy": float(entropy),
                "curriculum/pre_rollouts": float(self.last["pre_rollouts"]),
            }
        )
        return metrics

    def diagnostics(self) -> dict[str, Tensor]:
        if self.subset is None or not self.last:
            return {}
        return {
            "p": self.posterior_mean(self.subset).float(),
            "sampled_p": self.last["p"].float(),
            "group_size": self.last["group_size"].float(),
        }

    def state_dict(self) -> dict:
        if self.successes is None:
            return {}
        return {
            "successes": self.successes,
            "failures": self.failures,
            "gradient_moments": self.gradient_moments,
            "visited": self.visited,
            "subset": self.subset,
            "steps_in_subset": self.steps_in_subset,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.successes = state["successes"].double().cpu()
        self.failures = state["failures"].double().cpu()
        self.gradient_moments = state["gradient_moments"].double().cpu()
        self.visited = state["visited"].bool().cpu()
        self.subset = None if state["subset"] is None else state["subset"].long().cpu()
        self.steps_in_subset = int(state["steps_in_subset"])
