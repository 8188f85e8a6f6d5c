"""``python -m g2rpo.curate [model=...] [reward=...] [data=...]``: reward-filtered curation, UniPic's stage-4
data (arXiv 2508.03320, sec. 3.3) for ``algo=rft``.

Each prompt gets ``curate.samples_per_prompt`` deterministic ODE samples from the policy; each image is
scored by the reward ensemble and, when ``curate.check`` names one, by a second ensemble, and kept when its
total is at least ``curate.threshold`` and its check total at least ``curate.check_threshold``. Every scored
image is written, kept or not, in the format of :mod:`g2rpo.curation`, then ``report.md`` and ``scores.png``.

Images are scored as the 8-bit PNGs that are written, so a kept image is exactly the one that passed. Image
``s`` of prompt ``p`` starts from noise seeded by ``(seed, p, s)`` only, so a resumed run, a larger
``curate.max_prompts`` or another ``curate.batch_size`` makes the same images. Re-running a command resumes
its directory: the prompts complete in ``samples.jsonl`` are skipped (a line or prompt a kill tore is cut
off and sampled again), and a change of what is sampled or scored is refused, naming the field.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from tqdm import tqdm

import g2rpo.config  # noqa: F401  (schemas and resolvers)
from g2rpo.config import torch_device
from g2rpo.curation import SAMPLES_FILE, CuratedSample, read_samples, sample_line
from g2rpo.files import atomic_write, atomic_write_text
from g2rpo.policies.base import FlowPolicy
from g2rpo.preflight import check_servers
from g2rpo.randomness import seeded
from g2rpo.resume import flatten
from g2rpo.rollout import ode_rollout
from g2rpo.types import PromptBatch

CONFIG_FILE = "curate_config.yaml"
REPORT_FILE = "report.md"
HISTOGRAM_FILE = "scores.png"
#: Fields whose change would make a resumed directory mix two datasets; a resume refuses it, naming the field.
SAMPLED = (
    "seed",
    "model",
    "reward",
    "data",
    "curate.samples_per_prompt",
    "curate.num_steps",
    "curate.guidance_scale",
    "curate.threshold",
    "curate.check",
    "curate.check_threshold",
)
#: Keys the noise and prompt-subset streams apart from training's (g2rpo.randomness): seeded(seed, STREAM, ...).
STREAM = 28


class CurationConfigError(ValueError):
    """The output directory was made with another config; the message names the first differing field."""


def chosen_prompts(num_prompts: int, max_prompts: int | None, seed: int) -> list[int]:
    """The prompt ids to curate, in the order they are sampled: a permutation seeded by ``seed``, whole or its
    first ``max_prompts``. So a subset mixes the dataset's tasks, a killed run's part is a random subset too,
    and a larger ``max_prompts`` (or null) extends a smaller one into the file an uninterrupted run writes."""
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(
            f"curate.max_prompts={max_prompts}: give a positive number, or null for every prompt"
        )
    return torch.randperm(num_prompts, generator=seeded(seed, STREAM)).tolist()[:max_prompts]


def sample_noise(policy: FlowPolicy, seed: int, prompt_ids: Sequence[int], samples: Sequence[int]) -> Tensor:
    """The initial noise of each ``(prompt id, sample)``, from a stream of its own."""
    return policy.initial_noise(
        len(prompt_ids), [seeded(seed, STREAM, p, s) for p, s in zip(prompt_ids, samples, strict=True)]
    )


def sample_images(
    policy: FlowPolicy,
    prompts: list[str],
    metadata: list[dict],
    prompt_ids: list[int],
    *,
    samples_per_prompt: int,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
) -> Tensor:
    """``samples_per_prompt`` Euler ODE samples of each prompt, prompt-major, as 8-bit ``[B, 3, H, W]``."""
    ids = torch.tensor(prompt_ids).repeat_interleave(samples_per_prompt)
    samples = torch.arange(samples_per_prompt).repeat(len(prompt_ids))
    rows = torch.arange(len(prompt_ids)).repeat_interleave(samples_per_prompt).tolist()
    batch = PromptBatch(
        [prompts[r] for r in rows],
        [metadata[r] for r in rows],
        group_ids=torch.tensor(rows),
        prompt_ids=ids,
        sample_ids=torch.arange(len(rows)),
    )
    images = ode_rollout(
        policy, batch, num_steps=num_steps, guidance_scale=guidance_scale, batch_size=batch_size,
        generator=torch.Generator(), initial_noise=sample_noise(policy, seed, ids.tolist(), samples.tolist()),
    ).images  # fmt: skip
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def passes(sample: CuratedSample, threshold: float, check_threshold: float | None) -> bool:
    """Kept: the total at least ``threshold`` and, if checked, the check at least ``check_threshold``. The
    thresholds are rounded to float32, the rewards' precision, so that a reward of exactly 0.9 (stored as
    0.89999998) passes 0.9; a NaN (an unscorable image) never passes."""
    if not sample.total >= float(np.float32(threshold)):
        return False
    return sample.check is None or (
        check_threshold is not None and sample.check >= float(np.float32(check_threshold))
    )


def write_png(path: Path, pixels: Tensor) -> None:
    """An 8-bit ``[3, H, W]`` image as an RGB PNG, written whole or not at all."""

    def write(stream) -> None:
        buffer = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
        stream.write(buffer.getvalue())

    atomic_write(path, write)


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines and put them on disk before the next prompt starts."""
    with path.open("a", encoding="utf-8") as stream:
        stream.write("".join(lines))
        stream.flush()
        os.fsync(stream.fileno())


def complete_prompts(directory: Path, samples_per_prompt: int) -> set[int]:
    """The prompt ids with all their samples in ``samples.jsonl``. What a kill left after the last complete
    prompt (a torn line, or a prompt with only some of its lines) is cut off, to be sampled again; a bad line
    before that is damage a kill cannot cause, and fails naming it."""
    path = directory / SAMPLES_FILE
    if not path.is_file():
        return set()
    data = path.read_bytes()
    records, offset = [], 0  # (prompt id, end offset) per whole line
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        end = offset + len(line)
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no end of line")
            record = json.loads(line)
            records.append((int(record["prompt_id"]), end))
        except (ValueError, KeyError, TypeError) as error:
            if number < len(lines):
                raise ValueError(
                    f"{path}:{number}: not a curated sample ({error}) before the last line, which a kill cannot "
                    "cause; delete the directory, or that line and the rest of its prompt's lines"
                ) from None
            break
        offset = end
    complete, keep, run_id, run_length = set(), 0, None, 0
    for prompt_id, end in records:
        run_length = run_length + 1 if prompt_id == run_id else 1
        run_id = prompt_id
        if run_length == samples_per_prompt:
            complete.add(prompt_id)
            keep = end
    if keep < len(data):
        with path.open("r+b") as stream:
            stream.truncate(keep)
            stream.flush()
            os.fsync(stream.fileno())
    return complete


def check_directory(directory: Path, config: dict) -> None:
    """Refuse a directory made with another config, naming the first field of :data:`SAMPLED` that differs;
    then record ``config`` in it. Where the rewards run (``device``) may change."""
    stored = directory / CONFIG_FILE
    if stored.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(stored), resolve=False)
        before, after = flatten(previous), flatten(config)
        for field in SAMPLED:
            keys = [k for k in before.keys() | after.keys() if k == field or k.startswith(f"{field}.")]
            for key in sorted(keys):
                if key.rsplit(".", 1)[-1] == "device":
                    continue
                old, new = before.get(key, "<unset>"), after.get(key, "<unset>")
                if old != new:
                    raise CurationConfigError(
                        f"{directory} was curated with {key}={old!r}, this command has {key}={new!r}: resuming "
                        "would mix two datasets. Put it back, or write to another directory (curate.output=...)"
                    )
    elif (directory / SAMPLES_FILE).is_file():
        raise CurationConfigError(
            f"{directory} holds {SAMPLES_FILE} but no {CONFIG_FILE}: not resumable; curate.output=<another directory>"
        )
    atomic_write_text(stored, OmegaConf.to_yaml(config))


def curate(cfg: DictConfig) -> Path:
    """Sample, score and write the prompts not yet complete in ``curate.output``, then the report."""
    settings = cfg.curate
    directory = Path(settings.output)
    if settings.report_only:
        return write_report(directory, settings.threshold)
    n = settings.samples_per_prompt
    if n < 1:
        raise ValueError(f"curate.samples_per_prompt={n}: give at least 1")
    check_servers(cfg, roots=("reward", "curate"))  # served rewards answer before anything loads
    check_directory(directory, OmegaConf.to_container(cfg, resolve=True))
    dataset = instantiate(cfg.data)
    prompt_ids = chosen_prompts(len(dataset), settings.max_prompts, cfg.seed)
    done = complete_prompts(directory, n)
    todo = [p for p in prompt_ids if p not in done]
    if todo:
        reward = instantiate(cfg.reward)
        check = instantiate(settings.check) if settings.check is not None else None
        L.seed_everything(0, verbose=False)
        policy = instantiate(cfg.model)
        if not isinstance(policy, FlowPolicy):
            raise TypeError(f"curation samples flow policies with the ODE, not {type(policy).__name__}")
        policy = policy.to(torch.device(torch_device(cfg.trainer.accelerator))).eval()
        (directory / "images").mkdir(parents=True, exist_ok=True)
        per_chunk = max(1, settings.batch_size // n)
        kept = scored_images = 0
        start = time.perf_counter()
        bar = tqdm(total=len(prompt_ids), initial=len(prompt_ids) - len(todo), unit="prompt", desc="curate")
        for first in range(0, len(todo), per_chunk):
            chunk = todo[first : first + per_chunk]
            prompts = [dataset.prompts[p] for p in chunk]
            metadata = [dataset.metadata[p] for p in chunk]
            pixels = sample_images(
                policy, prompts, metadata, chunk, samples_per_prompt=n, seed=cfg.seed,
                num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
                batch_size=settings.batch_size,
            )  # fmt: skip
            images = pixels.float().to(policy.device) / 255
            repeated_prompts = [p for p in prompts for _ in range(n)]
            repeated_metadata = [m for m in metadata for _ in range(n)]
            scored = reward(images, repeated_prompts, repeated_metadata)
            checked = check(images, repeated_prompts, repeated_metadata) if check is not None else None
            for row, prompt_id in enumerate(chunk):
                lines = []
                for sample in range(n):
                    index = row * n + sample
                    record = CuratedSample(
                        prompt=prompts[row],
                        metadata=metadata[row],
                        prompt_id=prompt_id,
                        sample=sample,
                        image=CuratedSample.image_name(prompt_id, sample),
                        scores={k: float(v[index]) for k, v in scored.scores.items()},
                        total=float(scored.total[index]),
                        check=float(checked.total[index]) if checked is not None else None,
                        extra=(
                            {"check_scores": {k: float(v[index]) for k, v in checked.scores.items()}}
                            if checked is not None
                            else {}
                        ),
                    )
                    record.kept = passes(record, settings.threshold, settings.check_threshold)
                    kept += record.kept
                    scored_images += 1
                    write_png(directory / record.image, pixels[index])
                    lines.append(sample_line(record))
                append_lines(directory / SAMPLES_FILE, lines)  # after its images: a line names a whole file
                bar.update(1)
            bar.set_postfix(kept=f"{kept / scored_images:.3f}")
        bar.close()
        print(f"sampled and scored {len(todo)} prompts x {n} images in {time.perf_counter() - start:.1f} s")
    report = write_report(directory)
    print(f"wrote {directory / SAMPLES_FILE}, {report} and {directory / HISTOGRAM_FILE}")
    return report


@dataclass
class TaskSummary:
    images: int
    prompts: int
    mean: float  # mean finite total
    kept: int
    prompts_kept: int  # prompts with at least one kept image
    totals: list[float]

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.images if self.images else float("nan")


def summarize(
    samples: list[CuratedSample], threshold: float | None = None, check_threshold: float | None = None
) -> dict[str, TaskSummary]:
    """Per task (``metadata["tag"]``, else ``all``), in order of the first prompt id, then ``overall``: the
    counts, the mean total and how many passed (at ``threshold``, or the stored ``kept`` when None)."""
    by_task: dict[str, list[CuratedSample]] = {}
    for sample in sorted(samples, key=lambda s: (s.prompt_id, s.sample)):
        by_task.setdefault(sample.metadata.get("tag", "all"), []).append(sample)
    if len(by_task) > 1:
        by_task["overall"] = samples
    out = {}
    for task, group in by_task.items():
        kept = [s.kept if threshold is None else passes(s, threshold, check_threshold) for s in group]
        totals = [s.total for s in group]
        finite = [t for t in totals if math.isfinite(t)]
        out[task] = TaskSummary(
            images=len(group),
            prompts=len({s.prompt_id for s in group}),
            mean=float(np.mean(finite)) if finite else float("nan"),
            kept=sum(kept),
            prompts_kept=len({s.prompt_id for s, k in zip(group, kept) if k}),
            totals=totals,
        )
    return out


def write_report(directory: str | Path, threshold: float | None = None) -> Path:
    """``report.md`` (per task: images, prompts, mean score, kept fraction) and ``scores.png`` (a histogram
    of the totals per task, the threshold drawn) from ``samples.jsonl``, without sampling. ``threshold``
    None reads the stored ``kept``; a number re-decides it (with the stored ``curate.check_threshold``)."""
    directory = Path(directory)
    samples = read_samples(directory)
    stored = directory / CONFIG_FILE
    settings = OmegaConf.load(stored).curate if stored.is_file() else None
    check_threshold = settings.check_threshold if settings is not None else None
    if threshold is not None and check_threshold is None and any(s.check is not None for s in samples):
        raise ValueError(f"{stored}: missing, so the check threshold of these checked samples is unknown")
    summary = summarize(samples, threshold, check_threshold)
    shown = threshold if threshold is not None else (settings.threshold if settings is not None else None)
    checked = any(s.check is not None for s in samples)
    lines = [
        f"# Curated dataset: {directory}",
        "",
        f"{len(samples)} scored images; kept: total >= {shown}"
        + (f" and check >= {check_threshold}" if checked else "")
        + (
            f" (re-decided here; the directory was curated at {settings.threshold})"
            if settings is not None and shown != settings.threshold
            else ""
        )
        + ".",
        "",
        "| task | images | prompts | mean score | kept | kept fraction | prompts with a kept image |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, row in summary.items():
        lines.append(
            f"| {task} | {row.images} | {row.prompts} | {row.mean:.3f} | {row.kept} | {row.kept_fraction:.3f} "
            f"| {row.prompts_kept} |"
        )
    report = directory / REPORT_FILE
    atomic_write_text(report, "\n".join(lines) + "\n")
    write_histograms(directory / HISTOGRAM_FILE, summary, shown)
    return report


def write_histograms(path: Path, summary: dict[str, TaskSummary], threshold: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(summary))
    rows = -(-len(summary) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.4 * rows), squeeze=False)
    every = [t for row in summary.values() for t in row.totals if math.isfinite(t)]
    edges = [*every, *([threshold] if threshold is not None else [])]
    span = (min(edges), max(edges)) if edges and min(edges) < max(edges) else None  # one x axis for all
    for axis in axes.flat[len(summary) :]:
        axis.set_visible(False)
    for axis, (task, row) in zip(axes.flat, summary.items()):
        axis.hist([t for t in row.totals if math.isfinite(t)], bins=20, range=span, color="tab:blue")
        if threshold is not None:
            axis.axvline(threshold, color="tab:red", linestyle="--")
        axis.set_title(f"{task}: {row.kept}/{row.images} kept", fontsize=9)
        axis.set_xlabel("total score", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes[:, 0]:
        axis.set_ylabel("images", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write(path, lambda stream: stream.write(buffer.getvalue()))


@hydra.main(version_base="1.3", config_path="../conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    curate(cfg)


if __name__ == "__main__":
    main()
