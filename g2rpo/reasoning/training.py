"""Pretrain the arithmetic world's model (``make arith-model``): supervised worked answers, stopped early.

Teacher forcing on ``<bos><|user|>question<|assistant|>solution<eos>`` with the loss on the answer tokens
only (solution and eos), AdamW with warm-up and cosine decay, problems drawn from the training side of the
hash split (:func:`g2rpo.reasoning.arithmetic.make_problems`). Batches are cut from length-sorted chunks, so
little of a step is padding. The run is short on purpose: RL needs problems the model sometimes solves and
sometimes not, so the card's per-level pass rates (held-out problems, 8 samples each at temperature 1)
should fall from most at level 1 to few at the top level.

Writes the model and tokenizer (``save_pretrained``), ``training.json`` and a ``README.md`` card to
``--out``. Deterministic on a given machine and thread count.

    python -m g2rpo.reasoning.training --out g2rpo/reasoning/weights/arithmetic --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from g2rpo.reasoning.arithmetic import (
    CAPS,
    HELDOUT_EVERY,
    LEVELS,
    WEIGHTS,
    is_correct,
    make_problems,
    tiny_lm,
)


def chat_prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    """The text the model is prompted with: the chat template with the generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def encode(tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict]) -> list[tuple[list[int], int]]:
    """``(ids of prompt + solution + eos, prompt length)`` per problem."""
    prompts = [chat_prompt(tokenizer, p["prompt"]) for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answers = tokenizer([p["solution"] for p in problems], add_special_tokens=False)["input_ids"]
    return [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompt_ids, answers)]


def batches(
    examples: list[tuple[list[int], int]], batch_size: int, chunk: int, seed: int
) -> list[list[tuple[list[int], int]]]:
    """Batches of ``batch_size``: each chunk of ``chunk`` batches is sorted by length and cut, and the
    batches are shuffled, so a batch is made of similar lengths (little padding) and levels still mix."""
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(examples))
    out = []
    size = batch_size * chunk
    for start in range(0, len(order) - batch_size + 1, size):
        group = sorted(order[start : start + size].tolist(), key=lambda i: len(examples[i][0]))
        out += [
            [examples[i] for i in group[b : b + batch_size]]
            for b in range(0, len(group) - batch_size + 1, batch_size)
        ]
    return [out[i] for i in rng.permutation(len(out))]


def tensors(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and next-token labels (-100 on the prompt and padding). Causal attention never
    looks right, so the padding needs no mask."""
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (sequence, prompt_length) in enumerate(batch):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, prompt_length - 1 : len(sequence) - 1] = torch.tensor(sequence[prompt_length:])
    return ids, labels


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    levels: Sequence[int],
    seed: int,
) -> list[float]:
    """Supervised training on ``steps * batch_size`` fresh training problems; returns the losses."""
    examples = encode(tokenizer, make_problems(steps * batch_size, seed, levels, split="train"))
    schedule = batches(examples, batch_size, chunk=16, seed=seed)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for step, batch in enumerate(schedule[:steps]):
        ids, labels = tensors(batch, tokenizer.pad_token_id)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    questions: Sequence[str],
    samples: int,
    sample: bool,
    max_new_tokens: int,
) -> list[str]:
    """``samples`` decoded answers per question (question-major), at temperature 1 or greedy; KV cache."""
    inputs = tokenizer(
        [chat_prompt(tokenizer, q) for q in questions],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    out = model.generate(
        **inputs,
        do_sample=sample,
        temperature=1.0 if sample else None,
        top_k=None,
        top_p=None,
        num_return_sequences=samples,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[dict],
    samples: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Per level: the mean pass rate of ``samples`` answers at temperature 1, the share of problems solved
    by none and by all of them, greedy accuracy, and the longest reference answer in tokens (eos included)."""
    torch.manual_seed(seed)
    results = {}
    for level in sorted({p["level"] for p in problems}):
        chosen = [p for p in problems if p["level"] == level]
        longest = max(len(p["solution"]) for p in chosen) + 1
        questions = [p["prompt"] for p in chosen]
        sampled = generate(model, tokenizer, questions, samples, True, longest + 16)
        greedy = generate(model, tokenizer, questions, 1, False, longest + 16)
        rates = np.array(
            [
                np.mean([is_correct(text, p["answer"]) for text in sampled[i * samples : (i + 1) * samples]])
                for i, p in enumerate(chosen)
            ]
        )
        results[str(level)] = {
            "problems": len(chosen),
            "pass_rate": round(float(rates.mean()), 4),
            "none_solved": round(float((rates == 0).mean()), 4),
            "all_solved": round(float((rates == 1).mean()), 4),
            "greedy": round(float(np.mean([is_correct(t, p["answer"]) for t, p in zip(greedy, chosen)])), 4),
            "answer_tokens": longest,
        }
        print(f"level {level}: {results[str(level)]}", flush=True)
    return results


def sampling_speed(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict], seed: int
) -> dict[str, float]:
    """Seconds to decode 128 answers (16 problems x 8, all levels) to completion at temperature 1."""
    torch.manual_seed(seed)
    questions = [p["prompt"] for p in problems[:16]]
    clock = time.perf_counter()
    texts = generate(model, tokenizer, questions, 8, True, 80)
    seconds = time.perf_counter() - clock
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    return {"sequences": len(texts), "seconds": round(seconds, 2), "answer_tokens": tokens}


def card(info: dict) -> str:
    """The model card (README.md) from ``training.json``'s contents."""
    s, m, speed = info["settings"], info["model"], info["sampling_speed"]
    rows = "\n".join(
        f"{level:>5}  {r['problems']:>8}  {r['pass_rate']:>9.3f}  {r['none_solved']:>11.3f}  "
        f"{r['all_solved']:>10.3f}  {r['greedy']:>6.3f}  {r['answer_tokens']:>13}"
        for level, r in info["heldout"].items()
    )
    caps = ", ".join(f"{cap} (level {level})" for level, cap in info["caps"].items())
    per_level = info["heldout_problems"] // len(info["heldout"])
    load = info.get("load_average")
    load = (
        f" (load average {load[0]} / {load[1]} / {load[2]} over 1 / 5 / 15 minutes as training ended)"
        if load
        else ""
    )
    notes = "".join(f" {note}" for note in info.get("notes", []))
    return f"""# arithmetic

The arithmetic world's language model (`g2rpo.reasoning.arithmetic.load_arithmetic_lm()`): a small Llama
pretrained here on generated multi-step arithmetic word problems with short worked answers, and stopped early
on purpose, so that RL on text reasoning (GRPO, REINFORCE++ with a binary verifier reward, CurES's
curriculum) finds problems it solves almost always, sometimes, and almost never. Code:
`g2rpo/reasoning/arithmetic.py`, training `g2rpo/reasoning/training.py`.

- **Format**: prompt `<bos><|user|>question<|assistant|>` (the tokenizer's chat template with the generation
  prompt); answer one step `a+b=c` per line (`+ - * /`), then `\\boxed{{answer}}` and `<eos>` (id
  {info["eos_id"]}). One token per character (printable ASCII and the newline) plus `<pad> <bos> <eos> <unk>
  <|user|> <|assistant|>`: {m["vocab_size"]} tokens; left padding.
- **Architecture**: `LlamaForCausalLM`, hidden {m["hidden_size"]}, {m["num_layers"]} layers,
  {m["num_heads"]} heads, MLP {m["intermediate_size"]}, tied embeddings, {m["max_length"]} positions;
  {m["parameters"]:,} parameters (fp32).
- **Data**: word problems of levels {", ".join(map(str, s["levels"]))}, level = number of operations; every
  number (start, operand, intermediate result) a non-negative integer up to {caps}. One question text in
  {info["heldout_every"]} is held out (by a hash of the text). Training reads
  {s["steps"] * s["batch_size"]:,} training-side problems (`make_problems(..., seed={s["seed"]},
  split="train")`), each once, levels in equal shares.
- **Training**: teacher forcing, cross-entropy on the answer tokens only; {s["steps"]} steps of batch
  {s["batch_size"]} (cut from length-sorted chunks), AdamW lr {s["lr"]} (betas 0.9, 0.95, weight decay 0.01),
  {s["warmup"]} warm-up steps, cosine decay to 10 %, gradient clip 1; seed {s["seed"]}. Loss
  {info["loss"][0]:.4f} -> {info["loss"][1]:.4f} (mean of the last 50 steps {info["loss_last50"]:.4f}).
- **Cost**: {info["train_minutes"]:.1f} minutes of training, {info["total_minutes"]:.1f} with the held-out
  evaluation, on {info["threads"]} CPU threads of 2 cores shared with other jobs{load}.{notes}
- **Sampling speed**: {speed["sequences"]} answers (16 held-out problems x 8, all levels) decoded to
  completion with the KV cache (`model.generate`, temperature 1) in {speed["seconds"]} s
  ({speed["answer_tokens"]} answer tokens) on {info["threads"]} threads.
- **Regenerate**: `make arith-model`, i.e. `{info["command"]}` (deterministic on a given machine and thread
  count).

## Held-out pass rates

The first {info["heldout_problems"]} held-out problems ({per_level} per level, `arithmetic_dataset("heldout",
seed={s["seed"]})`), {s["samples"]} answers each sampled at temperature 1 (no top-k or top-p); an answer
passes when its last `\\boxed{{}}` holds the right integer. `pass rate`: mean over problems; `none solved` /
`all solved`: the share of problems that none / all of the samples solve; `greedy`: greedy decoding's
accuracy; `answer tokens`: the longest reference answer, eos included.

```
level  problems  pass rate  none solved  all solved  greedy  answer tokens
{rows}
```

Mean pass rate {info["mean_pass_rate"]:.3f}, greedy {info["mean_greedy"]:.3f}.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--heldout-per-level", type=int, default=48)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = time.perf_counter()

    model, tokenizer = tiny_lm(args.seed, args.hidden_size, args.num_layers, args.num_heads)
    losses = pretrain(
        model, tokenizer, args.steps, args.batch_size, args.lr, args.warmup, args.levels, args.seed
    )
    train_seconds = time.perf_counter() - clock
    load = os.getloadavg()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)

    heldout = make_problems(args.heldout_per_level * len(args.levels), args.seed, args.levels, "heldout")
    results = evaluate(model, tokenizer, heldout, args.samples, args.seed)
    speed = sampling_speed(model, tokenizer, heldout, args.seed)
    seconds = time.perf_counter() - clock
    config = model.config
    info = {
        "command": (
            f"python -m g2rpo.reasoning.training --out {args.out} --threads {args.threads} --steps {args.steps}"
        ),
        "settings": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "levels": args.levels,
            "samples": args.samples,
        },
        "model": {
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_length": config.max_position_embeddings,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "eos_id": tokenizer.eos_token_id,
        "heldout_every": HELDOUT_EVERY,
        "caps": {str(level): CAPS[level] for level in args.levels},
        "threads": args.threads,
        "loss": [round(losses[0], 4), round(losses[-1], 4)],
        "loss_last50": round(float(np.mean(losses[-50:])), 4),
        "heldout_problems": len(heldout),
        "heldout": results,
        "mean_pass_rate": round(float(np.mean([r["pass_rate"] for r in results.values()])), 4),
        "mean_greedy": round(float(np.mean([r["greedy"] for r in results.values()])), 4),
        "sampling_speed": speed,
        "train_minutes": round(train_seconds / 60, 2),
        "load_average": [round(value, 2) for value in load],
        "total_minutes": round(seconds / 60, 2),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "README.md").write_text(card(info))
    print(json.dumps({k: info[k] for k in ("mean_pass_rate", "mean_greedy", "total_minutes")}), flush=True)


if __name__ == "__main__":
    main()
