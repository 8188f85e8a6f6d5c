"""End to end: the composed default config trains, logs, checkpoints and exports; NaNs are handled."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST_RUN, fit_quietly, make_policy
from hydra.utils import instantiate

from g2rpo.algos import FlowGRPO
from g2rpo.checkpoint import load_policy
from g2rpo.curriculum import UniformCurriculum
from g2rpo.data import PromptDataset
from g2rpo.loggers import read_metrics
from g2rpo.module import RLModule
from g2rpo.optimization import NoLearningSignal
from g2rpo.rewards import JpegCompressibility, RewardEnsemble
from g2rpo.run import train

EXPECTED_METRICS = {
    "reward/jpeg_compressibility/mean",
    "reward/total/mean",
    "advantage/zero_std_frac",
    "train/policy_loss",
    "train/kl",
    "train/clipfrac",
    "train/logprob_gap_before_update",
    "train/grad_norm",
    "train/lr",
    "nfe/rollout",
    "nfe/train",
    "time/rollout_s",
    "time/train_s",
}


def test_default_config_trains_and_leaves_a_complete_run_dir(compose_config):
    cfg = compose_config(*FAST_RUN, "logger=wandb")
    train(cfg)
    run = Path(cfg.run_dir)

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert records[-1].keys() >= EXPECTED_METRICS
    assert records[0]["train/logprob_gap_before_update"] < 1e-6
    assert records[0]["nfe/rollout"] == 8 * 4 * 2  # 8 images x 4 steps x CFG

    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["state_dict"]
    assert all("lora" in key for key in checkpoint["state_dict"])  # trainable weights only
    assert "curriculum" in checkpoint

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["algo"]["_target_"] == "g2rpo.algos.flow_grpo.FlowGRPO"
    assert resolved["algo"]["clip_range"] == 1e-4 and resolved["run_dir"] == str(run)
    assert (run / "policy/pytorch_lora_weights.safetensors").is_file()
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert sorted(p.name for p in (run / "images").iterdir()) == [
        "iteration_000000.png",
        "iteration_000001.png",
    ]


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_other_loggers(compose_config, logger):
    cfg = compose_config(*FAST_RUN, f"logger={logger}", "trainer.max_epochs=1")
    train(cfg)
    run = Path(cfg.run_dir)
    assert len(read_metrics(run / "metrics.jsonl")) == 1
    assert (run / "csv/metrics.csv").is_file() == (logger == "csv")
    assert not (run / "wandb").exists()


def test_full_finetuning_run_checkpoints_the_transformer(compose_config):
    cfg = compose_config(*FAST_RUN, "model.lora=null", "trainer.max_epochs=1")
    train(cfg)
    state = torch.load(Path(cfg.run_dir) / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith("policy.transformer.") for k in state)  # no frozen reference copy
    assert (Path(cfg.run_dir) / "policy/transformer/config.json").is_file()


def _module(reward, algorithm=None, **kwargs):
    return RLModule(
        policy=make_policy(),
        algorithm=algorithm or FlowGRPO(num_steps=4, rollout_batch_size=4),
        reward=RewardEnsemble({"r": reward}),
        dataset=PromptDataset(["a cat", "a dog", "a fox"]),
        curriculum=UniformCurriculum(prompts_per_iteration=2, group_size=4),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        **kwargs,
    )


def _fit(module, tmp_path, epochs):
    return fit_quietly(module, tmp_path, max_epochs=epochs)


def test_nan_rewards_are_reported_and_excluded(tmp_path, caplog):
    def half_unscorable(images, prompts, metadata):
        scores = JpegCompressibility()(images)
        scores[::2] = float("nan")
        return scores

    trainer = _fit(_module(half_unscorable), tmp_path, epochs=1)
    assert trainer.callback_metrics["reward/invalid_count"] == 4
    assert torch.isfinite(trainer.callback_metrics["train/policy_loss"])
    assert "have a NaN reward" in caplog.text


def test_non_finite_losses_skip_the_step_then_stop_the_run(tmp_path, monkeypatch):
    module = _module(JpegCompressibility())
    before = [p.detach().clone() for p in module.policy.trainable_parameters()]
    original = FlowGRPO.loss

    def nan_loss(self, *args):
        out = original(self, *args)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FlowGRPO, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match="3 iterations in a row"):
        _fit(module, tmp_path, epochs=10)
    after = module.policy.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # no NaN ever reached the weights


@pytest.mark.parametrize(
    ("scores", "why"),
    [
        (lambda images: torch.full((len(images),), float("nan")), "every reward was NaN"),
        (lambda images: torch.ones(len(images)), "every group's rewards were equal"),
    ],
    ids=["all-nan", "all-flat"],
)
def test_a_run_that_cannot_learn_stops_after_max_skipped_steps(tmp_path, scores, why):
    def reward(images, prompts, metadata):
        return scores(images)

    with pytest.raises(NoLearningSignal, match=f"3 iterations in a row had no sample to learn from: {why}"):
        _fit(_module(reward), tmp_path, epochs=10)


def test_evaluation_ema_follows_flow_grpos_schedule_and_is_checkpointed(tmp_path, monkeypatch):
    module = _module(JpegCompressibility(), ema_decay=0.9, ema_update_every=2)
    initial = [p.detach().clone() for p in module.policy.trainable_parameters()]
    after_step = []  # (optimiser step n, the weights after it)
    update = RLModule._update_ema

    def record(self):
        after_step.append(
            (self.global_step, [p.detach().clone() for p in self.policy.trainable_parameters()])
        )
        update(self)

    monkeypatch.setattr(RLModule, "_update_ema", record)
    _fit(module, tmp_path, epochs=2)  # 8 samples in micro-batches of 4: 2 optimiser steps per iteration
    assert [n for n, _ in after_step] == [1, 2, 3, 4]

    expected = initial
    for n, weights in after_step:
        if n % 2 == 0:
            decay = min(n / (9 + n), 0.9)
            expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    trained = [p.detach().clone() for p in module.policy.trainable_parameters()]
    for shadow, value in zip(module.ema.shadow_params, expected):
        torch.testing.assert_close(shadow, value)
    assert not all(torch.equal(s, t) for s, t in zip(module.ema.shadow_params, trained))

    with module.evaluation_weights():
        for p, value in zip(module.policy.trainable_parameters(), expected):
            torch.testing.assert_close(p.detach(), value)
    assert all(torch.equal(p, t) for p, t in zip(module.policy.trainable_parameters(), trained))

    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    resumed = _module(JpegCompressibility(), ema_decay=0.9, ema_update_every=2)
    resumed.on_load_checkpoint({**checkpoint, "state_dict": dict(module.state_dict())})
    for a, b in zip(resumed.ema.shadow_params, module.ema.shadow_params):
        torch.testing.assert_close(a, b)
    assert resumed.ema.optimization_step == module.ema.optimization_step


def test_evaluation_reads_a_checkpoints_ema_weights_without_unpickling_code(compose_config):
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=1", "module.ema_update_every=1")
    train(cfg)
    path = Path(cfg.run_dir) / "checkpoints/last.ckpt"
    shadow = torch.load(path, weights_only=True)["ema"]["shadow_params"]
    policy = instantiate(cfg.model)
    assert not all(torch.equal(p, s) for p, s in zip(policy.trainable_parameters(), shadow))
    load_policy(policy, path)
    for p, s in zip(policy.trainable_parameters(), shadow, strict=True):
        assert torch.equal(p.detach(), s)


def test_an_invalid_ema_decay_is_rejected():
    with pytest.raises(ValueError, match="module.ema_decay=1.5"):
        _module(JpegCompressibility(), ema_decay=1.5)


def test_a_learning_rate_schedule_steps_once_per_iteration(compose_config):
    schedule = (
        "{_target_: torch.optim.lr_scheduler.LinearLR, _partial_: true, start_factor: 1.0, end_factor: 0.0,"
        " total_iters: 4}"
    )
    cfg = compose_config(*FAST_RUN, "trainer.max_epochs=3", f"scheduler={schedule}")
    train(cfg)
    rates = [record["train/lr"] for record in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")]
    assert rates == pytest.approx([3e-4, 2.25e-4, 1.5e-4])  # 3e-4 x (1 - n / 4) at iteration n
