"""Speed levers, each measured on and off in one process, then `make run`'s iteration with all of them.

    python -m experiments.levers [hydra overrides] [--repeats 3] [--iterations 8] [--processes 2]
    make bench            (runs this after experiments.bench)

Part 1, per lever: two variants of the same policy and algorithm (the lever off, then on) alternate
``--repeats`` times on the same batch of real prompts, scored by the run's reward. Printed per variant: the
rollout's generated images/s, and training's learning samples/s (samples with a non-zero advantage, per
second of forward + backward over one pass). ``--equal-groups`` groups get equal rewards, as a run's
all-correct or all-wrong groups do, so that padding has something to refill. Each variant's first rollout
and training pass is a warm-up, reported separately (a compiled variant compiles there). Levers: ``algo.micro_batches`` (padded -> exact),
``model.compile``, CFG-free (``algo.guidance_scale=1``: a different algorithm setting, listed for its
cost), ``model.text_cache_size``; on a CUDA device also bf16 autocast.

Part 2: ``--processes`` processes each of ``python -m g2rpo.run experiment=quickstart`` with the CPU levers
off (``algo.micro_batches=padded model.compile=false``) and on (``exact``, ``true``), alternating, for
``--iterations`` iterations without evaluation or logger. Printed: the median ``time/iteration_s`` after
the first iteration (the warm-up, printed beside it), and each process's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import g2rpo.config  # noqa: F401  (schemas and resolvers)
from g2rpo.randomness import iteration_generator
from g2rpo.types import PromptBatch

ROOT = Path(__file__).resolve().parents[1]
CPU_LEVERS_OFF = ["algo.micro_batches=padded", "model.compile=false"]
CPU_LEVERS_ON = ["algo.micro_batches=exact", "model.compile=true"]


@dataclass
class Variant:
    label: str
    overrides: list[str]  # on top of the command line's


@dataclass
class Lever:
    name: str
    off: Variant
    on: Variant
    cuda_only: bool = False


LEVERS = [
    Lever("exact micro-batches", Variant("padded", ["algo.micro_batches=padded"]),
          Variant("exact", ["algo.micro_batches=exact"])),
    Lever("regional compile", Variant("eager", ["model.compile=false"]), Variant("compiled", ["model.compile=true"])),
    Lever("CFG-free", Variant("CFG 4.5", []), Variant("CFG 1", ["algo.guidance_scale=1.0", "algo.train_cfg=false"])),
    Lever("text cache", Variant("no cache", ["model.text_cache_size=0"]),
          Variant("cache", ["model.text_cache_size=1024"])),
    Lever("bf16 autocast", Variant("fp32", ["trainer.precision=32-true"]),
          Variant("bf16", ["trainer.precision=bf16-mixed"]), cuda_only=True),
]  # fmt: skip


class Setup:
    """A variant's policy, algorithm and autocast, with a batch of real prompts from the run's data."""

    def __init__(self, overrides: list[str], device: torch.device, equal_groups: int) -> None:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            self.cfg = cfg = compose("config", overrides=["run_dir=.", "run_name=levers", *overrides])
        torch.manual_seed(cfg.seed)  # the same LoRA initialisation for every variant
        self.policy = instantiate(cfg.model).to(device)
        self.algorithm = instantiate(cfg.algo, _convert_="object")
        if self.algorithm.uses_reference:
            self.policy.enable_reference()
        self.reward = instantiate(cfg.reward)
        dataset = instantiate(cfg.data)
        prompts, size = cfg.curriculum.prompts_per_iteration, cfg.curriculum.group_size
        indices = torch.randperm(len(dataset.prompts), generator=torch.Generator().manual_seed(0))[:prompts]
        self.batch = PromptBatch.from_groups(
            [dataset.prompts[i] for i in indices.tolist()],
            [dataset.metadata[i] for i in indices.tolist()],
            torch.arange(prompts),
            torch.full((prompts,), size),
        )
        bf16 = device.type == "cuda" and cfg.trainer.precision == "bf16-mixed"
        self.autocast: Callable[[], AbstractContextManager] = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
        )
        self.equal_groups = equal_groups
        self.sample = None

    def rollout(self):
        with torch.no_grad(), self.autocast():
            return self.algorithm.rollout(self.policy, self.batch, iteration_generator(0, 0))

    def train_pass(self) -> tuple[int, int]:
        """One pass of forward + backward over the iteration's minibatches (no optimiser step, so every
        repetition trains the same weights); returns the samples with a learning signal and the samples
        trained (padding included)."""
        if self.sample is None:
            self.sample = self.rollout()
            rewards = self.algorithm.score(self.reward, self.sample)
            groups = self.sample.scored.groups.ids
            for values in rewards.scores.values():  # the last groups' rewards made all equal
                values[groups >= groups.max() + 1 - self.equal_groups] = 0.5
            self.advantages = self.algorithm.advantages(rewards, self.sample)
        minibatches = self.algorithm.minibatches(
            self.sample, self.advantages, torch.Generator().manual_seed(0)
        )
        trained = sum(len(unit.samples) for units in minibatches for unit in units if unit.index == 0)
        for units in minibatches:
            for unit in units:
                with self.autocast():
                    loss = self.algorithm.loss(self.policy, self.sample, self.advantages, unit).loss
                (loss / len(units)).backward()
            for parameter in self.policy.trainable_parameters():
                parameter.grad = None
        return int((self.advantages.train_mask & (self.advantages.values != 0)).sum()), trained


def _timed(fn: Callable, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def measure_lever(
    lever: Lever, overrides: list[str], device: torch.device, repeats: int, equal_groups: int
) -> dict[str, list]:
    setups = [Setup([*overrides, *v.overrides], device, equal_groups) for v in (lever.off, lever.on)]
    images = len(setups[0].batch)
    warmup = [_timed(s.train_pass, device)[0] for s in setups]  # the first rollout, scoring and training pass
    rollout_s: list[list[float]] = [[], []]
    train_s: list[list[float]] = [[], []]
    counts = [(0, 0), (0, 0)]
    for _ in range(repeats):  # alternating, so the machine's drift falls on both variants alike
        for k, setup in enumerate(setups):
            rollout_s[k].append(_timed(setup.rollout, device)[0])
            seconds, counts[k] = _timed(setup.train_pass, device)
            train_s[k].append(seconds)
    learning, trained = [c[0] for c in counts], [c[1] for c in counts]
    rollout = [images / statistics.median(s) for s in rollout_s]
    train = [n / statistics.median(s) for n, s in zip(learning, train_s)]
    for k, variant in enumerate((lever.off, lever.on)):
        print(
            f"  {variant.label:10} rollout {rollout[k]:8.2f} images/s   training {train[k]:8.2f} learning "
            f"samples/s ({learning[k]} of {images}, {trained[k]} trained)   warm-up {warmup[k]:6.1f} s"
        )
    print(
        f"  on/off     rollout x{rollout[1] / rollout[0]:.2f}   training x{train[1] / train[0]:.2f}   "
        f"(throughput ratios, medians of {repeats} alternating repetitions)"
    )
    return {
        "rollout_images_s": rollout,
        "learning_samples_s": train,
        "learning": learning,
        "trained": trained,
    }


def quickstart_iterations(overrides: list[str], iterations: int) -> tuple[list[float], float]:
    """``time/iteration_s`` of one ``experiment=quickstart`` process, and its wall seconds."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable, "-m", "g2rpo.run", "experiment=quickstart", f"trainer.max_epochs={iterations}",
            "callbacks.evaluate=null", "logger=none", "trainer.enable_progress_bar=false",
            f"run_dir={run_dir}", "ckpt_path=null", *overrides,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["time/iteration_s"] for r in records if "time/iteration_s" in r], wall


def measure_quickstart(iterations: int, processes: int) -> None:
    results: dict[str, list[tuple[list[float], float]]] = {"off": [], "on": []}
    for _ in range(processes):
        for name, levers in (("off", CPU_LEVERS_OFF), ("on", CPU_LEVERS_ON)):
            results[name].append(quickstart_iterations(levers, iterations))
    medians = {}
    for name, levers in (("off", CPU_LEVERS_OFF), ("on", CPU_LEVERS_ON)):
        steady = [statistics.median(times[1:]) for times, _ in results[name]]
        medians[name] = statistics.median(steady)
        first = statistics.median(times[0] for times, _ in results[name])
        walls = ", ".join(f"{wall:.0f}" for _, wall in results[name])
        print(
            f"  levers {name:3} ({' '.join(levers)}): {medians[name]:.2f} s/iteration (median over processes "
            f"of each one's median after the first), first iteration {first:.1f} s, processes {walls} s"
        )
    print(f"  on/off: x{medians['on'] / medians['off']:.2f} time per iteration")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=quickstart)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8, help="per quickstart process (0: skip part 2)")
    parser.add_argument("--processes", type=int, default=2, help="per side, alternating")
    parser.add_argument("--levers", nargs="*", help="only these levers (names as printed)")
    parser.add_argument(
        "--equal-groups", type=int, default=2,
        help="groups whose rewards are set equal (no learning signal): 2 of quickstart's 8 is the median "
        "share of its runs (advantage/zero_std_frac 0.25)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    overrides = args.overrides or ["experiment=quickstart"]
    if "trainer=gpu" in overrides and not torch.cuda.is_available():
        print(f"g2rpo levers | skipped: trainer=gpu and no CUDA device ({' '.join(overrides)})")
        return {}
    device = torch.device("cuda" if "trainer=gpu" in overrides else "cpu")
    print(
        f"g2rpo levers | {' '.join(overrides)} | torch {torch.__version__} on {device} "
        f"({torch.get_num_threads()} threads)"
    )
    figures = {}
    for lever in LEVERS:
        if args.levers and lever.name not in args.levers:
            continue
        print(f"{lever.name}: {lever.off.label} -> {lever.on.label}")
        if lever.cuda_only and device.type != "cuda":
            print("  skipped: needs a CUDA device (make bench-gpu)")
            continue
        figures[lever.name] = measure_lever(lever, overrides, device, args.repeats, args.equal_groups)
    if args.iterations and device.type == "cpu":
        print(
            f"make run (experiment=quickstart), {args.iterations} iterations per process, CPU levers off vs on:"
        )
        measure_quickstart(args.iterations, args.processes)
    return figures


if __name__ == "__main__":
    main()
