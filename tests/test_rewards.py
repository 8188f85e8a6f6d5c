"""Reward protocol, JPEG rewards and the weighted ensemble."""

import pytest
import torch

from g2rpo.rewards import JpegCompressibility, JpegIncompressibility, RewardEnsemble


def _flat_and_noisy():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noisy])


def test_jpeg_compressibility_prefers_simple_images():
    scores = JpegCompressibility()(_flat_and_noisy(), ["a", "b"], [{}, {}])
    assert scores.shape == (2,) and scores[0] > scores[1]
    torch.testing.assert_close(JpegIncompressibility()(_flat_and_noisy(), ["a", "b"], [{}, {}]), -scores)


def test_ensemble_weights_and_logs_every_reward():
    images = _flat_and_noisy()
    ensemble = RewardEnsemble(
        {"small": JpegCompressibility(), "large": JpegIncompressibility()}, weights={"small": 2.0}
    )
    out = ensemble(images, ["a", "b"], [{}, {}])
    assert out.weights == {"small": 2.0, "large": 1.0}
    torch.testing.assert_close(out.total, 2.0 * out.scores["small"] + out.scores["large"])
    assert {"reward/small/mean", "reward/large/mean", "reward/total/mean"} <= out.metrics().keys()


def test_none_and_nan_mark_unscorable_samples():
    ensemble = RewardEnsemble({"partial": lambda images, prompts, metadata: [1.0, None]})
    out = ensemble(_flat_and_noisy(), ["a", "b"], [{}, {}])
    assert out.scores["partial"][0] == 1.0 and torch.isnan(out.scores["partial"][1])


def test_ensemble_rejects_bad_configuration_and_outputs():
    with pytest.raises(ValueError, match="reward, advantage"):
        RewardEnsemble({"jpeg": JpegCompressibility()}, aggregate="mean")
    with pytest.raises(ValueError, match="not in reward.rewards"):
        RewardEnsemble({"jpeg": JpegCompressibility()}, weights={"jpg": 1.0})
    wrong_size = RewardEnsemble({"short": lambda images, prompts, metadata: torch.zeros(1)})
    with pytest.raises(ValueError, match="returned 1 scores for 2 images"):
        wrong_size(_flat_and_noisy(), ["a", "b"], [{}, {}])
