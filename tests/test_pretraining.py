"""The shapes world's pretraining scripts (g2rpo/shapes/training/loop.py): batches are a function of
(seed, step), and a run stopped and resumed from its checkpoint ends with the same EMA export, loss curve
and snapshots as one that was never stopped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from g2rpo.shapes.training.base import FlowMatchingPretraining, RenderedPairs
from g2rpo.shapes.training.loop import fit
from g2rpo.shapes.training.unified import UnifiedBatches, UnifiedPretraining
from g2rpo.shapes.unified import unified_model

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


def unified(out):
    module = UnifiedPretraining(
        unified_model(seed=0, **TINY), lr=1e-3, warmup_steps=2, export_every=2, out=out
    )
    return module, UnifiedBatches(gen_batch=2, und_batch=2, seed=0)


def base(out):
    from g2rpo.shapes.model import shapes_pipeline

    module = FlowMatchingPretraining(
        shapes_pipeline(seed=0), lr=1e-3, warmup_steps=2, export_every=2, out=out
    )
    return module, RenderedPairs(batch_size=2, seed=0)


def editor(out):
    from g2rpo.shapes.model import edit_pipeline, shapes_pipeline
    from g2rpo.shapes.training.edit import RenderedEdits

    pipeline = edit_pipeline(shapes_pipeline(seed=0, num_layers=1, attention_head_dim=8))
    module = FlowMatchingPretraining(pipeline, lr=1e-3, warmup_steps=2, export_every=2, out=out)
    return module, RenderedEdits(batch_size=2, seed=0)


def interrupted_at(module, step: int):
    """Stop the run after ``step`` as a kill would, without changing its total (the cool-down depends on it)."""
    hook = module.on_train_batch_end

    def stop(*args):
        hook(*args)
        if module.global_step >= step:
            module.trainer.should_stop = True

    module.on_train_batch_end = stop
    return module


def weights(directory):
    files = sorted(directory.rglob("*.safetensors"))
    assert files, f"no export in {directory}"
    return {f"{f.relative_to(directory)}/{k}": v for f in files for k, v in load_file(f).items()}


def test_batches_depend_on_seed_and_step_only():
    batches = UnifiedBatches(gen_batch=3, und_batch=3, seed=0)
    again = UnifiedBatches(gen_batch=3, und_batch=3, seed=0)
    assert batches.batch(5)["captions"] == again.batch(5)["captions"]
    assert torch.equal(batches.batch(5)["und_images"], again.batch(5)["und_images"])
    assert batches.batch(5)["questions"] != batches.batch(6)["questions"]
    again.start = 5
    assert next(iter(again))["answers"] == batches.batch(5)["answers"]


@pytest.mark.parametrize("build", [unified, base, editor], ids=["unified", "base", "editor"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, build):
    torch.manual_seed(0)
    straight, batches = build(tmp_path / "straight" / "model")
    fit(straight, batches, 4, tmp_path / "straight" / "ckpt", checkpoint_every=2)
    straight.export(tmp_path / "straight" / "model", 4)

    torch.manual_seed(0)
    first, batches = build(tmp_path / "resumed" / "model")
    fit(interrupted_at(first, 2), batches, 4, tmp_path / "resumed" / "ckpt", checkpoint_every=2)
    assert first.global_step == 2
    torch.manual_seed(1)  # a new process: the global RNG comes from the checkpoint
    resumed, batches = build(tmp_path / "resumed" / "model")
    fit(resumed, batches, 4, tmp_path / "resumed" / "ckpt", checkpoint_every=2)
    resumed.export(tmp_path / "resumed" / "model", 4)

    for name in ("model", "model-step2", "model-step4"):
        a, b = weights(tmp_path / "straight" / name), weights(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    fresh = weights(tmp_path / "straight" / "model-step2")
    assert any(not torch.equal(fresh[k], weights(tmp_path / "straight" / "model")[k]) for k in fresh)
    info = json.loads((tmp_path / "resumed" / "model" / "training.json").read_text())
    assert info["steps"] == 4 and info["seconds"] > 0
