"""Reward-filtered curation (``python -m g2rpo.curate``): what is kept, what is written, resuming, the report."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import g2rpo.curate as curate_module
from g2rpo.curate import (
    CONFIG_FILE,
    HISTOGRAM_FILE,
    CurationConfigError,
    chosen_prompts,
    complete_prompts,
    curate,
    sample_images,
    write_report,
)
from g2rpo.curation import SAMPLES_FILE, CuratedSample, read_kept, read_samples, sample_line

SCORES = [0.95, 0.2, 0.9, 0.5]  # per prompt; 0.9 sits on the threshold, which keeps it
TAGS = ["a", "b", "a", "b"]
SAMPLES_PER_PROMPT = 2


class PromptScore:
    """The score in the prompt's metadata: known before anything is sampled."""

    def __call__(self, images, prompts, metadata):
        return torch.tensor([m["score"] for m in metadata])


class Brightness:
    """The mean pixel value: a function of the image itself."""

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


def ensemble(**weights: float) -> dict:
    targets = {"prompt": f"{__name__}.PromptScore", "brightness": f"{__name__}.Brightness"}
    return {
        "_target_": "g2rpo.rewards.RewardEnsemble",
        "rewards": {name: {"_target_": targets[name]} for name in weights},
        "weights": weights,
    }


def compose_curate(tmp_path: Path, output: Path, *overrides: str, check_threshold: float = 0.5):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"shape number {i}", "score": s, "tag": t}) + "\n"
            for i, (s, t) in enumerate(zip(SCORES, TAGS))
        )
    )
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "curate",
            overrides=[
                "model=tiny_sd3",
                "data=prompt_file",
                f"data.path={prompts}",
                "reward=jpeg_compressibility",
                f"curate.output={output}",
                f"curate.samples_per_prompt={SAMPLES_PER_PROMPT}",
                "curate.num_steps=2",
                "curate.batch_size=4",
                f"curate.check_threshold={check_threshold}",
                *overrides,
            ],
        )
    # the total is the prompt's score; brightness is a term with weight 0, and the whole check
    cfg.reward = ensemble(prompt=1.0, brightness=0.0)
    cfg.curate.check = ensemble(brightness=1.0)
    return cfg


def read_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_keeps_exactly_the_samples_over_the_threshold_whose_check_passes(tmp_path):
    """Each image's noise depends on (seed, prompt, sample) only: the test samples the same images itself,
    puts the check threshold at their median brightness, and predicts every verdict and every pixel. The
    prompt scored 0.9 (0.89999998 in float32) is on the threshold and passes it."""
    cfg = compose_curate(tmp_path, tmp_path / "out")
    dataset = instantiate(cfg.data)
    L.seed_everything(0, verbose=False)
    policy = instantiate(cfg.model).eval()
    order = chosen_prompts(len(dataset), None, cfg.seed)
    assert sorted(order) == [0, 1, 2, 3]
    expected = sample_images(
        policy, [dataset.prompts[p] for p in order], [dataset.metadata[p] for p in order], order,
        samples_per_prompt=SAMPLES_PER_PROMPT, seed=0, num_steps=2, guidance_scale=4.5, batch_size=5,
    )  # fmt: skip
    brightness = Brightness()(expected.float() / 255, None, None)
    half = len(brightness) // 2  # half the images pass the check; none is within 1e-6 of the line
    middle = brightness.sort().values[half - 1 : half + 1]
    cfg.curate.check_threshold = float(middle.mean())
    assert middle[1] - middle[0] > 1e-4
    curate(cfg)

    samples = read_samples(tmp_path / "out")
    assert [(s.prompt_id, s.sample) for s in samples] == [
        (p, k) for p in order for k in range(SAMPLES_PER_PROMPT)
    ]
    verdicts = []
    for index, sample in enumerate(samples):
        score = SCORES[sample.prompt_id]
        bright = pytest.approx(float(brightness[index]), abs=1e-5)  # a reduction over another batch size
        assert sample.scores == {"prompt": pytest.approx(score), "brightness": bright}
        assert sample.total == pytest.approx(score) and sample.check == bright
        assert sample.extra == {"check_scores": {"brightness": sample.check}}
        assert sample.metadata == {"score": score, "tag": TAGS[sample.prompt_id]}
        assert sample.image == f"images/{sample.prompt_id:06d}_{sample.sample:03d}.png"
        # the same image; another batch size may round a pixel level differently, no more
        difference = (read_pixels(tmp_path / "out" / sample.image).int() - expected[index].int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01
        verdicts.append(score >= 0.9 and float(brightness[index]) >= cfg.curate.check_threshold)
    assert [s.kept for s in samples] == verdicts
    # both filters bite: an over-threshold prompt's image fails the check, another passes
    assert any(verdicts) and any(SCORES[s.prompt_id] >= 0.9 and not s.kept for s in samples)
    assert {s.prompt_id for s in read_kept(tmp_path / "out")} <= {0, 2}


def test_a_killed_run_resumes_into_the_uninterrupted_runs_file_without_resampling(tmp_path, monkeypatch):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    curate(compose_curate(tmp_path, whole))
    sampled = []

    def recording(policy, prompts, metadata, prompt_ids, **kwargs):
        sampled.extend(prompt_ids)
        return sample_images(policy, prompts, metadata, prompt_ids, **kwargs)

    monkeypatch.setattr(curate_module, "sample_images", recording)
    curate(compose_curate(tmp_path, killed, "curate.max_prompts=2"))
    order = chosen_prompts(4, None, 0)
    assert sampled == order[:2]
    # the kill: the first prompt whole, one line of the second, and half of its next line
    lines = (killed / SAMPLES_FILE).read_text().splitlines(keepends=True)
    torn = SAMPLES_PER_PROMPT + 1
    (killed / SAMPLES_FILE).write_text("".join(lines[:torn]) + lines[torn][:40])
    sampled.clear()
    curate(compose_curate(tmp_path, killed))  # the uninterrupted run's command (max_prompts: null)
    assert sampled == order[1:]
    assert (killed / SAMPLES_FILE).read_bytes() == (whole / SAMPLES_FILE).read_bytes()
    for sample in read_samples(whole):
        assert (killed / sample.image).read_bytes() == (whole / sample.image).read_bytes()
    sampled.clear()
    curate(compose_curate(tmp_path, killed))  # complete: nothing to sample, the report is rewritten
    assert sampled == [] and (killed / "report.md").is_file()


def test_a_torn_last_line_and_a_torn_prompt_are_cut_off(tmp_path):
    def line(prompt_id, sample):
        return sample_line(
            CuratedSample(
                "p", {}, prompt_id, sample, CuratedSample.image_name(prompt_id, sample), {"r": 1.0}, 1.0
            )
        )

    whole = line(5, 0) + line(5, 1) + line(2, 0) + line(2, 1)
    path = tmp_path / SAMPLES_FILE
    path.write_text(whole + line(7, 0) + line(7, 1)[:25])
    assert complete_prompts(tmp_path, 2) == {5, 2}
    assert path.read_text() == whole
    assert complete_prompts(tmp_path, 2) == {5, 2} and path.read_text() == whole  # idempotent
    path.write_text(line(5, 0) + "{not json\n" + line(5, 1))  # damage a kill cannot cause: named
    with pytest.raises(ValueError, match=f"{SAMPLES_FILE}:2: not a curated sample"):
        complete_prompts(tmp_path, 2)


def test_a_changed_config_is_refused_naming_the_field(tmp_path):
    output = tmp_path / "out"
    curate(compose_curate(tmp_path, output, "curate.max_prompts=1"))
    assert OmegaConf.load(output / CONFIG_FILE).curate.num_steps == 2
    with pytest.raises(CurationConfigError, match=r"curate.num_steps=2, this command has curate.num_steps=3"):
        curate(compose_curate(tmp_path, output, "curate.max_prompts=1", "curate.num_steps=3"))
    changed = compose_curate(tmp_path, output, "curate.max_prompts=1")
    changed.reward.weights.brightness = 0.5
    with pytest.raises(CurationConfigError, match="reward.weights.brightness=0.0"):
        curate(changed)
    with pytest.raises(CurationConfigError, match="curate.check_threshold"):
        curate(compose_curate(tmp_path, output, "curate.max_prompts=1", check_threshold=0.25))
    # what does not change the images or verdicts is taken: more prompts, another batch size
    curate(compose_curate(tmp_path, output, "curate.max_prompts=2", "curate.batch_size=7"))
    assert len(read_samples(output)) == 2 * SAMPLES_PER_PROMPT


def test_the_report_counts_per_task_and_redecides_at_another_threshold(tmp_path):
    rows = [  # (prompt id, tag, total, check)
        (0, "colors", 1.0, 0.9), (0, "colors", 1.0, 0.1), (0, "colors", 0.5, 0.9),
        (1, "colors", 0.0, 0.9), (1, "colors", 0.0, 0.9), (1, "colors", float("nan"), 0.9),
        (2, "counting", 1.0, 0.9), (2, "counting", 0.95, 0.9), (2, "counting", 0.6, 0.9),
    ]  # fmt: skip
    lines = []
    for index, (prompt_id, tag, total, check) in enumerate(rows):
        sample = CuratedSample(
            "p", {"tag": tag}, prompt_id, index % 3, CuratedSample.image_name(prompt_id, index % 3),
            {"r": total}, total, check,
        )  # fmt: skip
        sample.kept = total >= 0.9 and check >= 0.5
        lines.append(sample_line(sample))
    (tmp_path / SAMPLES_FILE).write_text("".join(lines))
    (tmp_path / CONFIG_FILE).write_text("curate: {threshold: 0.9, check_threshold: 0.5}\n")
    report = write_report(tmp_path).read_text()
    assert "| colors | 6 | 2 | 0.500 | 1 | 0.167 | 1 |" in report
    assert "| counting | 3 | 1 | 0.850 | 2 | 0.667 | 1 |" in report
    assert "| overall | 9 | 3 | 0.631 | 3 | 0.333 | 2 |" in report
    assert "total >= 0.9 and check >= 0.5." in report
    assert (tmp_path / HISTOGRAM_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = write_report(tmp_path, threshold=0.5).read_text()
    assert "| colors | 6 | 2 | 0.500 | 2 | 0.333 | 1 |" in report
    assert "| counting | 3 | 1 | 0.850 | 3 | 1.000 | 1 |" in report
    assert "re-decided here; the directory was curated at 0.9" in report


def test_the_default_directory_is_named_by_the_overrides_that_change_the_data():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        composed = [
            compose("curate", overrides=overrides, return_hydra_config=True)
            for overrides in (
                ["curate.threshold=0.8", "curate.batch_size=8", "curate.max_prompts=4", "trainer=cpu"],
                ["curate.threshold=0.8"],
                [],
            )
        ]
    hydra, previous, outputs = HydraConfig.instance(), HydraConfig.instance().cfg, []
    try:
        for cfg in composed:
            hydra.set_config(cfg)  # what ${hydra:job.override_dirname} reads, as in a real run
            outputs.append(cfg.curate.output)
            assert cfg.hydra.run.dir == cfg.curate.output
    finally:
        hydra.cfg = previous
    assert outputs == ["outputs/curated/curate.threshold=0.8"] * 2 + ["outputs/curated/default"]
    assert composed[2].curate.check is None and composed[2].curate.threshold == 0.9
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        checked = compose("curate", overrides=["+reward@curate.check=shapes_score", "curate.output=unused"])
    assert set(instantiate(checked.curate.check).rewards) == {"shapes_score"}  # a reward option as the check
