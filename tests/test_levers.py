"""`make bench`'s lever measurement (experiments/levers.py) on the tiny model: what each variant trains."""

from __future__ import annotations

import pytest
import torch

from experiments import levers

TINY = [
    "model=tiny_sd3",
    "reward=jpeg_compressibility",
    "data=animals",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
    "algo.num_steps=4",
    "algo.rollout_batch_size=3",
]


def test_levers_compare_padded_and_exact_micro_batches_and_cfg_free_on_the_same_learning_samples(capsys):
    figures = levers.main([*TINY, "--iterations", "0", "--repeats", "1", "--equal-groups", "1",
                           "--levers", "exact micro-batches", "CFG-free", "bf16 autocast"])  # fmt: skip
    micro = figures["exact micro-batches"]
    assert micro["learning"] == [4, 4]  # one group of 4 has equal rewards: 4 of 8 samples teach
    assert micro["trained"] == [6, 4]  # padded refills to 2 micro-batches of 3; exact trains the 4 kept
    assert len(figures["CFG-free"]["rollout_images_s"]) == 2
    out = capsys.readouterr().out
    assert "on/off     rollout x" in out and "needs a CUDA device" in out and "bf16 autocast" not in figures


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_levers_skip_cleanly_without_cuda(capsys):
    assert levers.main(["trainer=gpu", "--iterations", "0"]) == {}
    assert "skipped: trainer=gpu and no CUDA device" in capsys.readouterr().out
