"""Reward-filtered fine-tuning: the filter, the flow-matching loss on kept samples only, offline and online."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN, make_policy
from PIL import Image

from g2rpo.algos.rft import RFT, keep_mask, shifted
from g2rpo.curation import CuratedSample, sample_line
from g2rpo.loggers import read_metrics
from g2rpo.randomness import iteration_generator
from g2rpo.rewards.base import RewardEnsemble
from g2rpo.rewards.jpeg import JpegCompressibility
from g2rpo.run import train
from g2rpo.sampling import mean_over_dims
from g2rpo.types import PromptBatch, RewardOutput


def test_keep_mask_threshold_top_k_and_nan():
    total = torch.tensor([0.95, 0.2, 0.9, float("nan"), 0.5, 0.5, 0.1, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert keep_mask(total, groups, 0.9, None).tolist() == [1, 0, 1, 0, 0, 0, 0, 1]
    # best of each group; ties keep the earlier sample
    assert keep_mask(total, groups, None, 1).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert keep_mask(total, groups, None, 2).tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    # both: among the 2 best AND above the threshold
    assert keep_mask(total, groups, 0.6, 2).tolist() == [1, 0, 1, 0, 0, 0, 0, 1]


def test_time_shift():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shifted(u, 1.0), u)
    assert shifted(u, 3.0).tolist() == pytest.approx([0.0, 0.5, 0.75, 1.0])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="algo.dataset"):
        RFT(source="offline")
    with pytest.raises(ValueError, match="algo.threshold"):
        RFT(threshold=None, top_k=None)
    with pytest.raises(ValueError, match="source"):
        RFT(source="both")
    with pytest.raises(ValueError, match="text_dropout=0"):
        RFT(train_guidance_scale=4.5)


def online_rollout(policy, algo, batch):
    return algo.rollout(policy, batch, iteration_generator(0, 0))


@pytest.mark.parametrize("train_guidance_scale", [1.0, 3.0])
def test_loss_is_flow_matching_on_kept_samples_only(train_guidance_scale):
    """The conditional velocity's flow-matching loss, or with ``train_guidance_scale`` the guided one's."""
    torch.manual_seed(0)
    policy = make_policy()
    algo = RFT(num_steps=2, threshold=0.5, batch_size=8, num_minibatches=1, text_dropout=0.0,
               train_guidance_scale=train_guidance_scale)  # fmt: skip
    batch = PromptBatch.from_groups(["a cat", "a dog"], [{}, {}], torch.arange(2), torch.tensor([3, 3]))
    rollout = online_rollout(policy, algo, batch)
    rewards = RewardOutput({"r": torch.tensor([0.9, 0.1, 0.6, 0.2, 0.7, 0.0])}, {"r": 1.0})
    advantages = algo.advantages(rewards, rollout)
    assert advantages.train_mask.tolist() == [True, False, True, False, True, False]
    (step,) = algo.minibatches(rollout, advantages, iteration_generator(0, 0, 0))
    (unit,) = step
    assert sorted(unit.samples.tolist()) == [0, 2, 4]  # dropped samples are in no unit

    out = algo.loss(policy, rollout, advantages, unit)
    # by hand: x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, conditional velocity, mean over samples
    x0 = rollout.samples[unit.samples]
    sigma = shifted(unit.u, policy.scheduler_config.get("shift", 1.0))
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * unit.noise
    cond = rollout.cond.select(rollout.cond_index[unit.samples])
    with torch.no_grad():
        v = policy.velocity(x_t, sigma, cond, train_guidance_scale)
        expected = mean_over_dims((v - (unit.noise - x0)) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), expected)

    # the loss does not depend on a dropped sample's content
    rollout.samples[1] += 10.0
    torch.testing.assert_close(algo.loss(policy, rollout, advantages, unit).loss.detach(), expected)


def test_noise_follows_the_sample_not_the_batch():
    """Each kept sample's noise level and noise come from its own stream: the same whichever others are kept."""
    torch.manual_seed(0)
    policy = make_policy()
    algo = RFT(num_steps=2, threshold=0.5, batch_size=8, num_minibatches=1, num_inner_epochs=2)
    batch = PromptBatch.from_groups(["a cat", "a dog"], [{}, {}], torch.arange(2), torch.tensor([2, 2]))
    rollout = online_rollout(policy, algo, batch)

    def draws(scores):
        advantages = algo.advantages(RewardOutput({"r": torch.tensor(scores)}, {"r": 1.0}), rollout)
        steps = algo.minibatches(rollout, advantages, iteration_generator(0, 0, 0))
        return [{int(s): float(u) for s, u in zip(unit.samples, unit.u)} for step in steps for unit in step]

    both, one = draws([1.0, 1.0, 0.0, 0.0]), draws([1.0, 0.0, 0.0, 0.0])
    assert both[0][0] == one[0][0] and both[1][0] == one[1][0]
    assert both[0][0] != both[1][0]  # the second pass draws new values


def write_curated(directory: Path, policy_images: torch.Tensor, prompts: list[str], kept: list[bool]) -> None:
    (directory / "images").mkdir(parents=True)
    with open(directory / "samples.jsonl", "w") as stream:
        for index, (image, prompt, keep) in enumerate(zip(policy_images, prompts, kept)):
            name = CuratedSample.image_name(index, 0)
            pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels).save(directory / name)
            stream.write(
                sample_line(
                    CuratedSample(
                        prompt=prompt, metadata={"tag": "t"}, prompt_id=index, sample=0, image=name,
                        scores={"jpeg_compressibility": 0.95 if keep else 0.1}, total=0.95 if keep else 0.1,
                        kept=keep,
                    )
                )
            )  # fmt: skip


def test_offline_reads_kept_samples_and_encodes_their_images(tmp_path):
    torch.manual_seed(0)
    policy = make_policy()
    images = torch.rand(4, 3, 32, 32)
    write_curated(tmp_path, images, ["a cat", "a dog", "a bird", "a fish"], [True, False, True, True])
    algo = RFT(source="offline", dataset=str(tmp_path), offline_batch_size=4)
    rollout = algo.rollout(
        policy, PromptBatch(["unused"], [{}], torch.tensor([0]), torch.tensor([0])), None, 0
    )
    assert len(rollout) == 4  # wraps around the 3 kept samples into the next shuffled pass
    assert set(rollout.scored.prompts) == {"a cat", "a bird", "a fish"}
    stored = {"a cat": 0, "a bird": 2, "a fish": 3}
    first = stored[rollout.scored.prompts[0]]
    quantized = (images[first] * 255).round() / 255
    torch.testing.assert_close(
        rollout.samples[0], policy.encode_images(quantized[None])[0], atol=1e-5, rtol=0
    )
    rewards = algo.score(RewardEnsemble({"jpeg_compressibility": JpegCompressibility()}), rollout)
    assert rewards.scores["jpeg_compressibility"].tolist() == pytest.approx([0.95] * 4)
    assert algo.advantages(rewards, rollout).train_mask.all()
    # the shuffle is seeded: the same rows for the same seed and iteration, others for the next one
    again = RFT(source="offline", dataset=str(tmp_path), offline_batch_size=4)
    assert again.offline_rows(0, 0) == algo.offline_rows(0, 0)
    # every pass over the kept samples visits each once
    rows = algo.offline_rows(0, 0)[:3]
    assert sorted(rows) == [0, 1, 2]


def test_online_rft_trains_from_the_command_line(compose_config):
    cfg = compose_config(*FAST_RUN, "algo=rft", "algo.threshold=null", "algo.top_k=2", "algo.batch_size=2")
    train(cfg)
    first, second = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert first["rft/kept"] == 4  # the best 2 of each of the 2 groups of 4
    assert first["train/optimizer_steps"] == 2  # 4 kept in micro-batches of 2, split over 2 steps
    assert first["nfe/train"] == 4  # one conditional forward per kept sample, nothing for the others
    assert first["train/flow_matching_loss"] > 0
    assert second["train/flow_matching_loss"] != first["train/flow_matching_loss"]


def test_offline_rft_trains_from_the_command_line(compose_config, tmp_path):
    data = tmp_path / "curated"
    write_curated(data, torch.rand(3, 3, 32, 32), ["a cat", "a dog", "a bird"], [True, True, False])
    cfg = compose_config(
        *FAST_RUN, "algo=rft", "algo.source=offline", f"algo.dataset={data}", "algo.offline_batch_size=2",
        "algo.batch_size=2",
    )  # fmt: skip
    train(cfg)
    first, _ = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert first["nfe/rollout"] == 0 and first["nfe/train"] == 2
    assert first["reward/total/mean"] == pytest.approx(0.95)
    lines = (data / "samples.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kept"] for line in lines) == 2
