"""Framework overhead: rollout and training throughput against the bare transformer, in one run.

    python -m experiments.bench [hydra overrides, e.g. model=sd35_medium trainer=gpu]

The denoiser's forward (and every backward) is timed *inside* the real rollout and training iteration,
so "bare" throughput is the images per second of the transformer work alone and "framework" the
images per second of the whole step, both from the same execution. Comparing against a separate bare
loop would mix in the machine's drift, which on shared cores is larger than the overhead measured.
Overhead = everything but the network: text encoding, SDE math, noise, decoding, log-probs,
bookkeeping, the reference toggle, the optimiser. The goal is < 10%.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import g2rpo.config  # noqa: F401  (schemas and resolvers)
from g2rpo.randomness import iteration_generator
from g2rpo.types import PromptBatch, RewardOutput

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class Stopwatch:
    """Accumulates wall seconds spent in the wrapped callables (synchronising CUDA around them)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds = 0.0
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds += time.perf_counter() - start

        return timed

    def time_forwards(self, *modules: nn.Module | None) -> None:
        for module in modules:
            if module is not None:
                module.forward = self.wrap(module.forward)


def measure(fn, stopwatch: Stopwatch, repeats: int) -> tuple[float, float]:
    """Total seconds of ``repeats`` calls of ``fn`` (after a warm-up) and the stopwatch's share of them."""
    fn()
    stopwatch._sync()
    stopwatch.seconds = 0.0
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    stopwatch._sync()
    return time.perf_counter() - start, stopwatch.seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml")
    parser.add_argument("--images", type=int, default=32, help="images per rollout, in two groups")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=.", "run_name=bench", *args.overrides])
    torch.manual_seed(cfg.seed)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        print(
            f"g2rpo bench | skipped: trainer.accelerator=gpu and no CUDA device ({' '.join(args.overrides)})"
        )
        return {}
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    policy = instantiate(cfg.model).to(device)
    algorithm = instantiate(cfg.algo, _convert_="object")
    if algorithm.uses_reference:
        policy.enable_reference()
    optimizer = instantiate(cfg.optimizer)(policy.trainable_parameters())
    stopwatch = Stopwatch(device)
    stopwatch.time_forwards(policy.transformer, getattr(policy, "reference_copy", None))
    backward = stopwatch.wrap(torch.Tensor.backward)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.trainer.precision == "bf16-mixed"
        else nullcontext()
    )

    group = args.images // 2
    batch = PromptBatch.from_groups(
        ["a cat", "a dog"], [{}, {}], torch.arange(2), torch.tensor([group, group])
    )

    def rollout():
        with torch.no_grad(), autocast:
            return algorithm.rollout(policy, batch, iteration_generator(0, 0))

    policy.nfe = 0
    rollout_s, rollout_network_s = measure(rollout, stopwatch, args.repeats)
    rollout_images = policy.nfe / (args.repeats + 1)  # denoiser images per rollout (CFG counts twice)

    sample = rollout()
    scored = sample.scored
    rewards = RewardOutput(
        {"r": torch.randn(len(scored), generator=torch.Generator().manual_seed(0))}, {"r": 1.0}
    )
    advantages = algorithm.advantages(rewards, sample)
    minibatches = algorithm.minibatches(sample, advantages, torch.Generator().manual_seed(0))

    def train_iteration():
        for units in minibatches:
            for unit in units:
                with autocast:
                    loss = algorithm.loss(policy, sample, advantages, unit).loss
                backward(loss / len(units))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    policy.nfe = 0
    train_s, train_network_s = measure(train_iteration, stopwatch, args.repeats)
    trained_images = policy.nfe / (args.repeats + 1)  # denoiser images per training pass
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    parameters = sum(p.numel() for p in policy.transformer.parameters())
    latent = tuple(sample.images.shape[2:])
    print(
        f"g2rpo bench | {cfg.model._target_.rsplit('.', 1)[-1]}, transformer {parameters / 1e6:.2f}M params, "
        f"images {latent} | {type(algorithm).__name__}: T={algorithm.num_steps}, CFG {algorithm.guidance_scale}, "
        f"beta {getattr(algorithm, 'beta', 0)}, micro-batch {algorithm.rollout_batch_size}, {len(batch)} images "
        f"in 2 groups x {args.repeats} | torch {torch.__version__} on {device} ({torch.get_num_threads()} "
        f"threads, {platform.machine()}, {cfg.trainer.precision})"
    )
    print(
        f"{'':10}{'s/iter':>8}{'images/s':>10}{'bare images/s':>15}{'ratio':>8}{'overhead':>10}   bare = time inside"
    )
    figures = {"peak_rss_mib": peak_rss_mib}
    for name, total, network, images, what in (
        ("rollout", rollout_s, rollout_network_s, rollout_images, "transformer forwards"),
        ("train", train_s, train_network_s, trained_images, "transformer forwards + backward"),
    ):
        ratio = network / total
        figures[f"{name}_ratio"] = ratio
        figures[f"{name}_s"] = total / args.repeats
        print(
            f"{name:10}{total / args.repeats:8.2f}{images * args.repeats / total:10.2f}"
            f"{images * args.repeats / network:15.2f}{ratio:8.3f}{1 / ratio - 1:10.1%}   {what}"
        )
    print(f"peak RSS: {peak_rss_mib:.0f} MiB")
    if device.type == "cuda":
        figures["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak CUDA memory (training): {figures['peak_cuda_gib']:.1f} GiB")
    return figures


if __name__ == "__main__":
    main()
