"""fp16 mixed precision, Flow-GRPO's official SD3.5 setting (``trainer.precision=16-mixed``): torch's loss
scaler under Lightning's manual optimisation (g2rpo/optimization.py), and the fp32 SDE math under fp16
autocast. Lightning turns ``precision="16-mixed"`` into bf16 on ``accelerator=cpu``, so these tests hand it
the precision plugin with a CPU ``GradScaler``: the same plugin and code path as ``16-mixed`` on a GPU."""

import lightning as L
import torch
from conftest import fit_quietly, make_policy
from lightning.pytorch.plugins.precision import MixedPrecision

from g2rpo.algos import FlowGRPO
from g2rpo.curriculum import UniformCurriculum
from g2rpo.data import PromptDataset
from g2rpo.module import RLModule
from g2rpo.rewards import JpegCompressibility, RewardEnsemble
from g2rpo.sampling import sde_step


class Recorder(L.Callback):
    """The total gradient norm after every backward (still scaled under fp16) and the gradients the
    optimiser steps with (unscaled and clipped: a pre-hook of the torch optimiser's ``step``)."""

    def __init__(self) -> None:
        self.backward_norms: list[float] = []
        self.stepped_grads: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer, module) -> None:
        params = list(module.policy.trainable_parameters())
        trainer.optimizers[0].register_step_pre_hook(
            lambda *_: self.stepped_grads.append([p.grad.detach().clone() for p in params])
        )

    def on_after_backward(self, trainer, module) -> None:
        grads = [p.grad for p in module.policy.trainable_parameters() if p.grad is not None]
        self.backward_norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))


def _fit(tmp_path, init_scale: float, max_grad_norm: float | None = 1.0):
    torch.manual_seed(0)
    module = RLModule(
        policy=make_policy(),
        algorithm=FlowGRPO(num_steps=4, rollout_batch_size=4),  # 2 optimiser steps of 3 units each
        reward=RewardEnsemble({"r": JpegCompressibility()}),
        dataset=PromptDataset(["a cat", "a dog", "a fox"]),
        curriculum=UniformCurriculum(prompts_per_iteration=2, group_size=4),
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        max_grad_norm=max_grad_norm,
        ema_decay=None,
    )
    recorder = Recorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer = fit_quietly(
        module,
        tmp_path,
        max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[recorder],
    )
    return trainer, module, recorder


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.detach().flatten() for t in tensors])))


def test_fp16_scales_the_loss_and_clips_the_unscaled_gradients(tmp_path):
    """The same iteration at loss scales 2^10 and 2^16: the gradients after backward are 2^6 apart (the loss
    is scaled), while the reported norm, the clipped gradients the optimiser steps with and the trained
    weights do not depend on the scale (the clip sees unscaled gradients). max_grad_norm 1e-5 is far
    below the norm, so every step is clipped."""
    runs = {scale: _fit(tmp_path / str(scale), scale, max_grad_norm=1e-5) for scale in (2.0**10, 2.0**16)}
    (low_trainer, low_module, low), (high_trainer, high_module, high) = runs.values()
    for trainer, _, recorder in runs.values():
        assert trainer.callback_metrics["train/optimizer_steps"] == 2
        assert trainer.callback_metrics["train/skipped_steps"] == 0
        assert trainer.callback_metrics["train/logprob_gap_before_update"] < 1e-6
        assert len(recorder.stepped_grads) == 2 and len(recorder.backward_norms) == 6
        for grads in recorder.stepped_grads:
            assert abs(_norm(grads) - 1e-5) < 1e-9  # clipped to max_grad_norm in unscaled units

    # each step's last backward holds its accumulated, still-scaled gradient
    for step_end in (2, 5):
        assert abs(high.backward_norms[step_end] / low.backward_norms[step_end] / 2**6 - 1) < 1e-3
    assert low_trainer.callback_metrics["train/loss_scale"] == 2.0**10
    assert high_trainer.callback_metrics["train/loss_scale"] == 2.0**16
    # train/grad_norm: the mean over the steps of the pre-clip norm, unscaled
    for scale, (trainer, _, recorder) in runs.items():
        unscaled = (recorder.backward_norms[2] + recorder.backward_norms[5]) / 2 / scale
        assert abs(float(trainer.callback_metrics["train/grad_norm"]) - unscaled) < 1e-6 * unscaled
    low_norm, high_norm = (float(t.callback_metrics["train/grad_norm"]) for t, _, _ in runs.values())
    assert abs(high_norm - low_norm) < 1e-3 * low_norm
    # equal up to fp16's rounding of the backward (small gradients keep fewer bits at the lower scale)
    for a, b in zip(low.stepped_grads, high.stepped_grads):
        assert _norm([x - y for x, y in zip(a, b)]) < 1e-2 * _norm(a)
    torch.manual_seed(0)
    initial = list(make_policy().trainable_parameters())  # the weights _fit starts from
    low_update = [p - q for p, q in zip(low_module.policy.trainable_parameters(), initial)]
    high_update = [p - q for p, q in zip(high_module.policy.trainable_parameters(), initial)]
    assert 0 < _norm(low_update) <= 2e-5 * (1 + 1e-4)  # two SGD steps (lr 1) of norm 1e-5 each
    assert _norm([x - y for x, y in zip(low_update, high_update)]) < 1e-2 * _norm(low_update)


def test_fp16_skips_a_step_with_infinite_gradients_and_backs_the_scale_off(tmp_path, monkeypatch):
    """An infinite loss in the first of the iteration's two steps: that step is skipped and counted, the
    scale is halved (as GradScaler's own skip does), the second step is taken at the smaller scale, and
    the optimiser step count (global_step, which the EMA schedule reads) counts only the step taken."""
    original, calls = FlowGRPO.loss, []

    def infinite_first_step(self, *args):
        out = original(self, *args)
        calls.append(None)
        if len(calls) <= 3:  # the first minibatch's three units (three trained steps of four)
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(FlowGRPO, "loss", infinite_first_step)
    trainer, module, recorder = _fit(tmp_path, init_scale=2.0**8)
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    assert trainer.callback_metrics["train/optimizer_steps"] == 1
    assert trainer.callback_metrics["train/loss_scale"] == 2.0**7
    assert trainer.global_step == 1
    assert len(recorder.stepped_grads) == 1  # the torch optimiser stepped once, with finite gradients
    assert all(torch.isfinite(g).all() for g in recorder.stepped_grads[0])
    assert all(torch.isfinite(p).all() for p in module.policy.trainable_parameters())


def test_the_sde_math_stays_fp32_under_fp16_autocast():
    """The Flow-SDE step and its log-probability in fp32 whatever the autocast dtype, bit-identical to the
    step outside autocast (the velocity itself comes out of the fp16 transformer)."""
    generator = torch.Generator().manual_seed(0)
    x, x_next = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    v = torch.randn(2, 4, 8, 8, generator=generator).half()
    expected = sde_step(x, v, 0.8, 0.7, 0.7, prev_sample=x_next)
    with torch.autocast("cpu", dtype=torch.float16):
        got = sde_step(x, v, 0.8, 0.7, 0.7, prev_sample=x_next)
    for name in ("prev_sample", "log_prob", "mean"):
        assert getattr(got, name).dtype == torch.float32
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)
