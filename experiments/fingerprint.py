"""Two-iteration runs of every algorithm on the tiny models, reduced to their logged metrics.

A refactor that should not change behaviour must reproduce these numbers: rewards, advantages, losses,
gradient norms and function-evaluation counts. Timings are left out, they differ run to run.

    python -m experiments.fingerprint --out before.json            # on the old code
    python -m experiments.fingerprint --out after.json --compare before.json

``--compare`` prints every metric that differs, with its relative difference, and exits 1 when one differs
by more than ``--rtol`` (default 0: bit for bit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# two iterations of 2 prompts x 4 samples, no evaluation, no logger
SMALL = [
    "callbacks.evaluate=null",
    "logger=none",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
]
TINY = [
    "model=tiny_sd3",
    "reward=jpeg_compressibility",
    "data=animals",
    *SMALL,
    "algo.num_steps=4",
    "algo.rollout_batch_size=2",
]
CURES = [
    "curriculum=cures",
    "curriculum.success_threshold=-1.955",
    "curriculum.sigma_mode=grad_norm",
    "curriculum.n_max=6",
    "curriculum.pre_rollouts=2",
    "curriculum.subset_size=2",
]
PAIRS = [
    "algo=pair_grpo",
    "model=tiny_unified",
    "data=shapes_pairs",
    "data.num_understanding=48",
    "data.num_generation=48",
    "data.k_clusters=12",
    "data.encoder=pixels",
    "data.threshold=0.5",
    "reward=geneval_shapes",
    *SMALL,
    "algo.generation.num_steps=4",
    "algo.generation.rollout_batch_size=4",
    "algo.understanding.rollout_batch_size=4",
    "algo.understanding.normalization.drop_zero_std=false",
]
RUNS: dict[str, list[str]] = {
    "flow_grpo": [*TINY, "algo=flow_grpo"],
    "flow_grpo_same_latent_kl": [*TINY, "algo=flow_grpo", "algo.same_latent=true", "algo.beta=0.04"],
    "flow_cps": [*TINY, "algo=flow_grpo", "algo.sde_type=cps", "algo.noise_level=0.8"],
    "dance_grpo": [*TINY, "algo=dance_grpo"],
    "mix_grpo": [*TINY, "algo=mix_grpo", "algo.window_size=2"],
    "g2rpo": [*TINY, "algo=g2rpo"],
    "g2rpo_strides_13": [*TINY, "algo=g2rpo", "algo.granularities=[1,3]"],
    "dgpo": [*TINY, "algo=dgpo", "algo.max_timestep_index=3", "algo.kl_beta=0.02"],
    "dgpo_sde": [*TINY, "algo=dgpo", "algo.max_timestep_index=3", "algo.sampler=sde"],
    "flux_flow_grpo": [*TINY, "model=tiny_flux", "algo=flow_grpo", "algo.guidance_scale=1.0"],
    "shapes_flow_grpo": [
        *TINY,
        "model=shapes",
        "reward=geneval_shapes",
        "data=shapes",
        "algo=flow_grpo",
        "algo.num_steps=6",
    ],
    **{
        f"cures_{algo}": [*TINY, f"algo={algo}", *CURES, *extra]
        for algo, extra in {
            "flow_grpo": [],
            "dance_grpo": [],
            "mix_grpo": ["algo.window_size=2"],
            "g2rpo": [],
            "dgpo": ["algo.max_timestep_index=3"],
        }.items()
    },
    "pair_grpo": PAIRS,
    "pair_grpo_janus": [
        *[o for o in PAIRS if not o.startswith(("model=", "reward=", "algo.generation.num_steps"))],
        "model=tiny_janus",
        "reward=jpeg_compressibility",
        "algo/pair_generation@algo.generation=image_tokens",
        "algo.understanding.max_new_tokens=3",
    ],
    "pair_grpo_cures": [*PAIRS, "curriculum=cures", "curriculum.subset_size=8", "curriculum.pre_rollouts=2"],
}
UNTIMED = ("time/", "seconds", "throughput", "per_second", "memory")


def fingerprint(name: str, overrides: list[str], root: Path) -> list[dict[str, float]]:
    import g2rpo.config  # noqa: F401  (schemas and resolvers)
    from g2rpo.loggers import read_metrics
    from g2rpo.run import train

    run_dir = root / name
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_dir}", f"run_name={name}", *overrides])
    train(cfg)
    return [
        {k: v for k, v in record.items() if k != "time" and not any(word in k for word in UNTIMED)}
        for record in read_metrics(run_dir / "metrics.jsonl")
    ]


def compare(after: dict, before: dict, rtol: float) -> int:
    worst, failures = 0.0, 0
    for name in sorted(before.keys() | after.keys()):
        if name not in before or name not in after:
            print(f"{name}: only in {'before' if name in before else 'after'}")
            failures += 1
            continue
        for i, (old, new) in enumerate(zip(before[name], after[name], strict=True)):
            for key in sorted(old.keys() | new.keys()):
                a, b = old.get(key), new.get(key)
                if a == b or (
                    isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
                ):
                    continue
                if a is None or b is None:
                    print(f"{name}[{i}] {key}: before {a}, after {b}")
                    failures += 1
                    continue
                rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
                worst = max(worst, rel)
                print(f"{name}[{i}] {key}: before {a!r}, after {b!r}, relative {rel:.2e}")
                failures += rel > rtol
    print(f"{len(before)} runs compared; largest relative difference {worst:.2e}; {failures} beyond {rtol:g}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the metrics (JSON)")
    parser.add_argument("--compare", type=Path, help="a JSON written by an earlier --out to compare against")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative difference allowed (default 0)")
    parser.add_argument("--only", nargs="*", help="run only these names")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; valid: {sorted(RUNS)}")
    with tempfile.TemporaryDirectory() as root:
        results = {name: fingerprint(name, RUNS[name], Path(root)) for name in names}
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {len(results)} runs to {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        return compare(results, {k: v for k, v in before.items() if k in results}, args.rtol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
