"""MixGRPO (Li et al. 2025, arXiv 2507.21802; official ``Tencent-Hunyuan/MixGRPO``).

DanceGRPO's recipe with a **mixed ODE-SDE rollout** (brief ``flow_grpo_family`` section 4.1):

1. **Sliding noisy window.** Only the ``window_size`` consecutive steps ``[start, start + w)`` are
   stochastic (Flow-SDE, ``a = 0.7``: a large noise is fine because it is injected in a few steps only);
   every other step is the deterministic Euler ODE. Only window steps are trained
   (``training_strategy = "part"``), so the policy gradient costs ``w`` steps instead of ``T - 1``.
2. **Window schedule** (official ``fastvideo/utils/grpo_states.py``, ``GRPOTrainingStates`` with
   ``max_timesteps = T - 2``, ``train_grpo_flux.py:919``). The window is
   ``range(start, min(start + w, T - 2))`` (``get_current_timesteps``, ``grpo_states.py:148``), so it
   shrinks at the end and is empty at the last start, ``T - 2``.
   ``progressive`` (default): the start moves by ``window_stride`` every ``shift_interval`` iterations
   (tau = 25), from high noise to low, over ``0, s, 2s, ... <= T - 2``; ``update_iteration``
   (``grpo_states.py:85-99``) wraps it to 0 only once it exceeds ``T - 2`` (``roll_back``), so ``T - 2``
   itself is a start: ``shift_interval`` iterations with an all-ODE rollout and no update. Without
   roll-back the start is clipped to ``T - 2`` and stays there: the window is empty from then on (the
   official ``is_training_complete``, which its training loop does not call, names this the end of
   training). ``random``: a uniform start in
   ``[0, T - 2 - w]`` each iteration (``grpo_states.py:102``). The start is a function of the iteration
   number, so a resumed run continues the same schedule.
3. As DanceGRPO: one initial noise per group, group-normalised advantages (unbiased std, eps 1e-8,
   clip 5), several rewards normalised one by one and summed (``reward.aggregate: advantage``), ratio
   clip 1e-4, no KL. ``T = 25`` steps.

Not built: MixGRPO-Flash (DPM-Solver++ on a compressed schedule after the window) and the ``decay``
window strategies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from g2rpo.advantages import GroupNormalization
from g2rpo.algos.dance_grpo import dance_normalization
from g2rpo.algos.stepwise import StepwiseGRPO
from g2rpo.policies.base import FlowPolicy
from g2rpo.types import PromptBatch, RewardOutput, SDERollout

WINDOW_STRATEGIES = ("progressive", "random")


@dataclass
class MixGRPO(StepwiseGRPO):
    """Defaults: the official FLUX MixGRPO script (``finetune_flux_grpo_mix.sh``)."""

    num_steps: int = 25
    noise_level: float = 0.7
    sde_type: str = "sde"
    beta: float = 0.0
    num_minibatches: int = 3
    window_size: int = 4  # w: consecutive SDE (and trained) steps
    window_stride: int = 1  # steps the window moves at each shift (prog_overlap_step)
    shift_interval: int = 25  # tau: iterations between shifts (iters_per_group)
    window_strategy: str = "progressive"  # progressive | random
    roll_back: bool = True  # wrap the window to step 0 after the last start
    init_same_noise: bool = True
    normalization: GroupNormalization = field(default_factory=dance_normalization)
    MIN_NUM_STEPS: ClassVar[int] = 3
    MIN_NUM_STEPS_WHY: ClassVar[str] = "a window of at least one SDE step within steps 0 .. T - 3"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_strategy not in WINDOW_STRATEGIES:
            raise ValueError(
                f"algo.window_strategy={self.window_strategy!r} is not valid; choose one of "
                f"{', '.join(WINDOW_STRATEGIES)}"
            )
        if not 1 <= self.window_size <= self.num_steps - 2:
            raise ValueError(
                f"algo.window_size={self.window_size} must be in [1, num_steps - 2 = {self.num_steps - 2}]"
            )
        for name in ("window_stride", "shift_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"algo.{name} must be >= 1, got {getattr(self, name)}")

    def window(self, iteration: int, generator: torch.Generator) -> Tensor:
        """The SDE step indices of this iteration (empty at the progressive schedule's last start)."""
        end = self.num_steps - 2  # the official max_timesteps
        if self.window_strategy == "random":
            start = int(torch.randint(0, end - self.window_size + 1, (), generator=generator))
        else:
            shifts = iteration // self.shift_interval
            starts = range(0, end + 1, self.window_stride)  # wraps once past end, not at it
            start = starts[shifts % len(starts)] if self.roll_back else min(shifts * self.window_stride, end)
        return torch.arange(start, min(start + self.window_size, end))

    def rollout_metrics(self, rollout: SDERollout, rewards: RewardOutput) -> dict[str, float]:
        size = rollout.train_steps.shape[1]
        # only the last start, T - 2, has an empty window
        start = int(rollout.train_steps[0, 0]) if size else self.num_steps - 2
        return {"window/start": float(start), "window/size": float(size)}

    def rollout(
        self, policy: FlowPolicy, batch: PromptBatch, generator: torch.Generator, iteration: int = 0
    ) -> SDERollout:
        window = self.window(iteration, generator)
        noise_levels = torch.zeros(self.num_steps)
        noise_levels[window] = self.noise_level
        initial = self.group_initial_noise(policy, batch, generator) if self.init_same_noise else None
        return self.sample(
            policy, batch, generator, noise_levels=noise_levels, train_steps=window.expand(len(batch), -1),
            initial_noise=initial,
        )  # fmt: skip
