"""Train the shapes judge (``make judge-model``): a format cold start, then token GRPO on preferences.

UniPic's Skywork-ImgReward recipe (a VLM judge trained by GRPO with a ranking and a format reward) on the
shapes world's unified model:

1. **Judge tokens.** ``with_judge_tokens`` adds ``<|judge|> <answer> </answer> A B`` to the shipped unified
   model (new embedding and LM-head rows, a zero image-index embedding).
2. **Format cold start.** The new tokens start with the mean logit, so the exact verdict format
   ``<answer> X </answer> <eos>`` is never sampled (format rate 0 in the card) and GRPO would have no signal.
   A short SFT on training pairs teaches it with ``X`` drawn at random, not the preferred image: the labels
   carry no ranking, so the accuracy measured after it is still the model's own.
3. **GRPO.** ``python -m g2rpo.run experiment=judge_grpo`` from the cold start: token GRPO over the
   verdicts (``algo=judge_grpo``) on training pairs (``data=judge_pairs``), rewarded by ranking correctness
   and format (``reward=judge_training``).

Held-out pairs (``judge_pairs("heldout")``, compositions no training caption has) are judged after each
stage; the card reports ranking accuracy (``P(A)`` vs ``P(B)``, as shown and debiased over both orders) and
the format rate of greedy and sampled verdicts. Deterministic on a given machine and thread count.

    python -m g2rpo.shapes.training.judge --out g2rpo/shapes/weights/judge
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from g2rpo.shapes.judge import judge_accuracy
from g2rpo.shapes.judge_pairs import judge_pairs
from g2rpo.shapes.unified import CHOICES, UnifiedModel, load_unified_model, with_judge_tokens

CONF_DIR = Path(__file__).parents[3] / "conf"


def cold_start(
    model: UnifiedModel, steps: int, batch_size: int, lr: float, num_pairs: int, seed: int
) -> list:
    """SFT on ``caption <|judge|> <answer> X </answer> <eos>`` with ``X`` uniformly random; returns the
    losses. Cross-entropy on the verdict's four tokens only."""
    pairs = judge_pairs("train", num_pairs, seed)
    images = torch.stack([m["image"] for m in pairs.metadata]) * 2 - 1
    others = torch.stack([m["other_image"] for m in pairs.metadata]) * 2 - 1
    rng = np.random.default_rng([seed, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        chosen = rng.choice(len(pairs), size=batch_size, replace=False)
        rows, targets = [], []
        for index in chosen.tolist():
            prefix = model.judge_prefix(pairs.prompts[index])
            verdict = model.verdict_ids(CHOICES[rng.integers(len(CHOICES))])
            rows.append(prefix + verdict)
            targets.append([-100] * (len(prefix) - 1) + verdict + [-100])  # position t predicts t + 1
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), model.eos_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (row, target) in enumerate(zip(rows, targets)):
            ids[i, : len(row)], labels[i, : len(target)] = torch.tensor(row), torch.tensor(target)
        picked = torch.from_numpy(chosen)
        logits = model.compare_logits(images[picked], others[picked], ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def grpo(start: Path, run_dir: Path, overrides: list[str]) -> Path:
    """``experiment=judge_grpo`` from the weights in ``start``; returns the exported policy's directory."""
    from g2rpo.run import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=judge_grpo",
                f"model.model.path={start}",
                f"run_dir={run_dir}",
                "run_name=judge_grpo",
                "ckpt_path=null",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                *overrides,
            ],
        )
    train(cfg)
    return run_dir / "policy"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "weights" / "judge")
    parser.add_argument("--work", type=Path, default=Path("outputs/judge-model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--sft-pairs", type=int, default=512)
    parser.add_argument("--heldout-pairs", type=int, default=384)
    parser.add_argument(
        "grpo_overrides",
        nargs="*",
        help="more overrides of experiment=judge_grpo, e.g. trainer.max_epochs=20",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    heldout = judge_pairs("heldout", args.heldout_pairs, args.seed)
    stages = {}

    model = with_judge_tokens(load_unified_model(), seed=args.seed)
    stages["new tokens"] = judge_accuracy(model, heldout)
    print("new tokens:", stages["new tokens"], flush=True)

    losses = cold_start(model, args.sft_steps, args.sft_batch, args.sft_lr, args.sft_pairs, args.seed)
    start = args.work / "cold_start"
    model.save_pretrained(start)
    stages["format cold start"] = judge_accuracy(load_unified_model(str(start)), heldout)
    print("format cold start:", stages["format cold start"], flush=True)
    sft_seconds = time.perf_counter() - clock

    exported = grpo(start, args.work / "grpo", args.grpo_overrides)
    trained = load_unified_model(str(exported))
    trained.save_pretrained(args.out)
    stages["GRPO"] = judge_accuracy(load_unified_model(str(args.out)), heldout)
    print("GRPO:", stages["GRPO"], flush=True)
    seconds = time.perf_counter() - clock

    records = [json.loads(line) for line in (args.work / "grpo" / "metrics.jsonl").read_text().splitlines()]
    info = {
        "seed": args.seed,
        "threads": args.threads,
        "cold_start": {k: getattr(args, f"sft_{k}") for k in ("steps", "batch", "lr", "pairs")},
        "cold_start_loss": [round(losses[0], 4), round(losses[-1], 4)],
        "grpo_overrides": args.grpo_overrides,
        "grpo_iterations": len(records),
        "grpo_reward": [records[0].get("reward/total/mean"), records[-1].get("reward/total/mean")],
        "heldout": stages,
        "seconds": round(seconds),
        "cold_start_seconds": round(sft_seconds),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(args, info)


def write_model_card(args: argparse.Namespace, info: dict) -> None:
    rows = "\n".join(
        f"{stage:<18} {r['accuracy']:>8.3f} {r['accuracy_debiased']:>8.3f} {r['format_greedy']:>8.3f} "
        f"{r['accuracy_greedy']:>8.3f} {r['format_sampled']:>8.3f} {r['accuracy_sampled']:>8.3f}"
        for stage, r in info["heldout"].items()
    )
    extra = " ".join(args.grpo_overrides)
    command = f"python -m g2rpo.shapes.training.judge --threads {args.threads} --out {args.out}" + (
        f" {extra}" if extra else ""
    )
    card = f"""# shapes-judge

The shapes world's preference judge (`model=shapes_judge`, `reward=judge`): the unified model
(`g2rpo/shapes/weights/unified`) given the tokens `<|judge|> <answer> </answer> A B` and trained by token GRPO
to say which of two images fits a caption better, UniPic's Skywork-ImgReward recipe (a VLM judge trained by
GRPO with a ranking and a format reward) in miniature. Code: `g2rpo/shapes/judge.py`, training
`g2rpo/shapes/training/judge.py`.

- **Layout**: `<bos> [image A] [image B] caption <|judge|> <answer> A|B </answer> <eos>`; each image sees
  itself whole, B also sees A, and a learned image-index embedding (zero at the start) tells them apart.
- **Data** (`data=judge_pairs`): two rendered images per GenEval-shapes caption (the caption's scene or one
  with objects recoloured, reshaped, dropped or added; half blurred and noised), scored by the GenEval-shapes
  detector (partial credit); pairs whose scores differ by 0.1 or more, the better one A or B by a coin flip.
  Training captions from `prompts.split("train")`, the {info["heldout"]["GRPO"]["pairs"]} held-out pairs from
  the held-out compositions.
- **Format cold start**: {args.sft_steps} SFT steps (batch {args.sft_batch}, AdamW lr {args.sft_lr}) on
  `<answer> X </answer> <eos>` with X drawn **at random**, so it teaches the format and not the ranking (loss
  {info["cold_start_loss"][0]} -> {info["cold_start_loss"][1]}; ln 2 = 0.693 per verdict token is what random labels leave).
- **GRPO** (`experiment=judge_grpo`): token GRPO (group 4, 16 pairs per iteration, clip 0.2, no KL,
  temperature 1), reward = ranking correctness + 0.2 x exact format (`reward=judge_training`),
  {info["grpo_iterations"]} iterations; mean training reward {info["grpo_reward"][0]:.3f} -> {info["grpo_reward"][1]:.3f}.
- **Cost**: {info["seconds"] / 60:.1f} minutes on {args.threads} CPU threads (2 cores shared with other jobs), the
  cold start and three evaluations included.
- **Regenerate**: `make judge-model`, i.e. `{command}` (deterministic on a given machine and thread count).

## Held-out ranking ({info["heldout"]["GRPO"]["pairs"]} pairs)

`P(A)>P(B)`: the verdict token's probabilities name the preferred image (pairs as shown); `debiased`: averaged
over both orders, the reward's rule; `greedy`/`sampled` (temperature 1): the fraction of decoded verdicts in
the exact format `<answer>A</answer>`, and of right verdicts. Chance is 0.5.

```
stage              P(A)>P(B) debiased   format  greedy  format  sampled
                                        greedy  right   sampled right
{rows}
```

`new tokens` ties P(A) and P(B) (their LM-head rows start equal), so it always answers B there: its
accuracy is the share of B-preferred pairs.
"""
    (args.out / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
