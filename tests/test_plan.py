"""g2rpo.plan: the iteration on fake weights costs what the real iteration costs, and real-size plans hold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from omegaconf import OmegaConf

from g2rpo.plan import fake
from g2rpo.plan.execute import _autocast, build, execute, fake_model_config
from g2rpo.plan.gpus import GPUS, gpu
from g2rpo.plan.levers import candidates, with_levers
from g2rpo.plan.meter import Meter
from g2rpo.plan.planner import summarise
from g2rpo.plan.validate import compare

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


@pytest.mark.parametrize(
    "overrides",
    [
        ["curriculum.prompts_per_iteration=2", "curriculum.group_size=4"],  # the shapes world (make run's model)
        ["model=tiny_flux", "algo=g2rpo", "algo.guidance_scale=1", "algo.num_steps=6",
         "curriculum.prompts_per_iteration=1", "curriculum.group_size=3"],
        ["model=tiny_sd3", "algo=dgpo", "trainer.precision=bf16-mixed"],
        pytest.param(
            [
                "model=sd35_medium_random", "model.pipeline.transformer.num_layers=2",
                "model.pipeline.transformer.dual_attention_layers=[0,1]", "model.resolution=256", "algo=dgpo",
                "curriculum.prompts_per_iteration=1", "curriculum.group_size=2", "algo.rollout_batch_size=2",
            ],
            marks=pytest.mark.slow,  # ~50 s; its figures are in experiments/results/plan_validation.md
        ),
    ],
    ids=["shapes", "tiny-flux-g2rpo", "tiny-sd3-dgpo-bf16", "sd35-width-2-layers"],
)  # fmt: skip
def test_the_plan_matches_the_real_execution(compose_config, overrides):
    """Planned (fake weights, replayed repeats) vs executed (real weights, every op): the same FLOPs, and
    the peak within 10% of what the CPU allocator handed out."""
    result = compare(compose_config(*overrides))
    assert result["planned_flops"] == result["executed_flops"] > 0
    assert result["planned_flops_per_phase"] == result["executed_flops_per_phase"]
    assert 0.9 <= result["memory_ratio"] <= 1.1, result
    assert 0.9 <= result["iteration_memory_ratio"] <= 1.1, result


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny_sd3", "algo=dgpo", "algo.rollout_batch_size=2"],  # LoRA
        [
            "model=tiny_flux",
            "model.lora=null",
            "algo=g2rpo",
            "algo.guidance_scale=1",
            "algo.rollout_batch_size=1",
            "algo.num_steps=6",
            "curriculum.prompts_per_iteration=1",
            "curriculum.group_size=3",
        ],
    ],
    ids=["lora-dgpo", "full-g2rpo"],
)
def test_replaying_repeats_changes_no_figure(compose_config, overrides):
    """Sampling and training forwards replayed by their recorded cost give the figures of executing them all
    (full fine-tuning: gradients that accumulate are not all allocated at once)."""
    cfg = compose_config(*overrides)
    runs = [execute(cfg, build(cfg), replayed=replayed) for replayed in (True, False)]
    assert runs[0].replay.replayed > 0 and runs[1].replay.replayed == 0
    assert runs[0].flops == runs[1].flops
    assert {k: p.bytes for k, p in runs[0].meter.peaks.items()} == {
        k: p.bytes for k, p in runs[1].meter.peaks.items()
    }


def test_the_flops_of_a_training_step_match_the_analytic_count():
    """SD3.5-Medium, full fine-tuning, one image at 512 px: ~6 x parameters x tokens (each MMDiT stream's
    linear layers over its own tokens) plus attention (4 T^2 d forward, twice that backward), within 15%."""
    mode = fake.new_fake_mode()
    transformer = fake.materialize(fake.pipeline("sd35_medium", text_encoder_3=False).transformer, mode)
    transformer.requires_grad_(True)
    image_tokens, text_tokens, width = 1024, 77 + 128, 1536
    with mode:
        inputs = {
            "hidden_states": torch.empty(1, 16, 64, 64, dtype=torch.bfloat16),
            "encoder_hidden_states": torch.empty(1, text_tokens, 4096, dtype=torch.bfloat16),
            "pooled_projections": torch.empty(1, 2048, dtype=torch.bfloat16),
            "timestep": torch.empty(1),
        }
    meter = Meter()
    with meter:
        transformer(**inputs, return_dict=False)[0].float().sum().backward()
    linear = {"image": 0, "text": 0}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "time_text_embed" not in name and "norm" not in name:
            stream = "text" if ("context" in name or "add_" in name) else "image"
            linear[stream] += module.weight.numel()
    joint_layers, dual_layers = 24, 13
    attention = (
        3 * 4 * width * ((image_tokens + text_tokens) ** 2 * joint_layers + image_tokens**2 * dual_layers)
    )
    analytic = 6 * (linear["image"] * image_tokens + linear["text"] * text_tokens) + attention
    counted = meter.flops[""]
    assert abs(counted / analytic - 1) < 0.15, (counted, analytic)


@pytest.fixture(scope="module")
def planned():
    """Real-size plans: SD3.5-M LoRA DGPO on 8 GPUs (DDP), FLUX.1-dev full fine-tuning G2RPO on 16 (FSDP)."""
    from hydra import compose, initialize_config_dir

    import g2rpo.config  # noqa: F401

    plans = {}
    for name in ("paper_dgpo_sd35_ocr", "paper_g2rpo_flux_hps"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={name}"])
        plans[name] = (cfg, with_levers(cfg, gpu("H100-SXM"), levers=False))
    return plans


def test_sd35_lora_dgpo_plan(planned):
    cfg, plan = planned["paper_dgpo_sd35_ocr"]
    transformer = plan["parameters"]["transformer"]
    assert 2.24e9 < transformer["total"] < 2.35e9  # 2.24 B base + the LoRA adapters (r 64)
    assert 30e6 < transformer["trainable"] < 45e6
    assert plan["world_size"] == 8 and plan["strategy"].startswith("replicated")
    assert plan["per_rank"]["images"] == cfg.curriculum.group_size * cfg.curriculum.prompts_per_iteration // 8
    memory = plan["memory"]
    assert memory["peak_phase"] == "training"
    # every frozen weight is held (T5-XXL, CLIPs, VAE, transformer in bf16: ~16 GiB) before any activation
    assert 14 * GiB < memory["by_kind"]["weights"] < 18 * GiB
    assert sum(memory["by_kind"].values()) == memory["peak_bytes"]
    # rollout: 10 steps, CFG doubles the batch: about 20 transformer forwards of ~2.2 TFLOP per image
    per_image_rollout = plan["flops"]["per_phase"]["rollout"] / plan["per_rank"]["images"]
    assert 20 * 2.0e12 < per_image_rollout < 20 * 2.6e12
    assert plan["time"]["B200"]["seconds_per_iteration"] < plan["time"]["A100-80GB"]["seconds_per_iteration"]


def test_flux_full_fine_tuning_g2rpo_plan_under_fsdp(planned):
    cfg, plan = planned["paper_g2rpo_flux_hps"]
    transformer = plan["parameters"]["transformer"]
    assert 11.8e9 < transformer["total"] == transformer["trainable"] < 12.0e9
    assert plan["world_size"] == 16 and plan["strategy"].startswith("FSDP2 over 8")
    training = plan["memory"]["phases"]["training"]
    detail = training["detail"]
    # bf16 weights, gradients and AdamW's two moments of 11.9 B parameters, each split over 8 devices
    assert detail["trained weights: transformer"] == pytest.approx(11.9e9 * 2 / 8, rel=0.02)
    assert detail["gradients"] == pytest.approx(11.9e9 * 2 / 8, rel=0.02)
    assert detail["optimizer state"] == pytest.approx(11.9e9 * 4 / 8, rel=0.02)
    assert 0 < detail["FSDP unsharded units"] < 3 * GiB
    assert plan["fits"], plan["memory"]["peak_bytes"] / GiB


def test_levers_for_a_misfit(planned):
    """FLUX full fine-tuning without FSDP does not fit an H100; FSDP (priced on the same execution) does."""
    cfg, _ = planned["paper_g2rpo_flux_hps"]
    levers = {lever.overrides: lever for lever in candidates(cfg)}
    assert "model.lora=<conf/model/flux_dev.yaml's lora>" in levers
    assert "trainer=fsdp" not in levers  # already sharded
    ddp = cfg.copy()
    ddp.trainer.strategy = "ddp"
    ddp_levers = {lever.overrides: lever for lever in candidates(ddp)}
    assert not ddp_levers["trainer=fsdp"].executed


def test_cpu_reward_is_not_on_the_gpu(compose_config):
    cfg = compose_config("model=tiny_sd3", "reward=pickscore")
    parts = build(cfg)
    assert "CPU" in parts.reward.kinds["pickscore"]
    plan = summarise(cfg, parts, execute(cfg, parts), GPUS["H100-SXM"], 0.35, 8)
    assert "reward models" not in plan["memory"]["detail"]


def test_the_command_writes_its_plan(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "g2rpo.plan",
            "model=tiny_sd3",
            f"plan.out={out}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "peak memory per rank" in result.stdout and "fits on H100-SXM" in result.stdout
    plan = json.loads(out.read_text())
    assert plan["overrides"][0] == "model=tiny_sd3"
    assert set(plan["time"]) == set(GPUS)


def test_fp16_autocast_is_planned_as_bf16_autocast():
    """The Flow-GRPO SD3.5 presets train under 16-mixed: planned as bf16 autocast (the same bytes, as fp16
    weights are planned as bf16), not as fp32 activations."""
    for precision in ("16-mixed", "bf16-mixed"):
        context = _autocast(OmegaConf.create({"trainer": {"precision": precision}}))
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    assert not isinstance(_autocast(OmegaConf.create({"trainer": {"precision": "32-true"}})), torch.autocast)


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ValueError, match="H100-SXM"):
        gpu("V100")


def test_unknown_architecture_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="flux1_dev"):
        fake.architecture("sdxl")


def test_a_compiled_model_is_planned_eagerly():
    """Compiling fuses kernels; the bytes and FLOPs planned are the eager model's, and dynamo cannot trace
    fake weights."""
    model = OmegaConf.create({"_target_": "g2rpo.policies.SD3Policy", "compile": True, "pipeline": None})
    assert fake_model_config(model).compile is False and model.compile is True
