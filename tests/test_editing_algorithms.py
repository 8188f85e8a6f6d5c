"""Every algorithm trains the editing models unchanged: one iteration of each (and of CurES) on the shapes
world's edits, with the tiny FLUX.1-Kontext (distilled guidance, no true CFG) and the tiny Qwen-Image-Edit
(true CFG 4, as Flow-GRPO trains it: both rows carry the source)."""

import pytest
from conftest import FAST_RUN

from g2rpo.loggers import read_metrics
from g2rpo.policies import FluxKontextPolicy, QwenImageEditPolicy
from g2rpo.run import train

ALGOS = {
    "flow_grpo": ["algo=flow_grpo"],
    "dance_grpo": ["algo=dance_grpo", "algo.num_steps=4", "algo.timestep_fraction=0.5"],
    "mix_grpo": ["algo=mix_grpo", "algo.num_steps=4", "algo.window_size=1"],
    "g2rpo": ["algo=g2rpo", "algo.num_steps=4"],
    "dgpo": ["algo=dgpo", "algo.max_timestep_index=3"],
    "cures": ["algo=flow_grpo", "curriculum=cures"],
}
EDITORS = {
    "kontext": (FluxKontextPolicy, ["model=tiny_flux_kontext", "algo.guidance_scale=1.0"]),
    "qwen": (QwenImageEditPolicy, ["model=tiny_qwen_image_edit", "algo.guidance_scale=4.0"]),
}


@pytest.mark.parametrize("editor", EDITORS.values(), ids=EDITORS.keys())
@pytest.mark.parametrize("algo", ALGOS.values(), ids=ALGOS.keys())
def test_every_algorithm_trains_on_edits(compose_config, monkeypatch, algo, editor):
    policy_class, model = editor
    encoded = []
    original = policy_class.encode_source
    monkeypatch.setattr(
        policy_class,
        "encode_source",
        lambda self, images: encoded.append(len(images)) or original(self, images),
    )
    cfg = compose_config(*FAST_RUN, *model, "data=edit_shapes", "data.per_type=2", "reward=edit_shapes", *algo,
                         "trainer.max_epochs=1")  # fmt: skip
    train(cfg)
    (record,) = read_metrics(cfg.run_dir + "/metrics.jsonl")
    assert 0.0 <= record["reward/edit_shapes/mean"] <= 1.0 and record["reward/invalid_count"] == 0
    assert encoded  # the rollout conditioned on the sources
