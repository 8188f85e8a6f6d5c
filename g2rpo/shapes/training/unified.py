"""Pretrain the unified shapes model on generation and understanding at once (``make unified-model``).

Transfusion's recipe (Zhou et al. 2024, arXiv 2408.11039): every batch holds captioned images for the
flow-matching loss and image-question-answer sequences for the language-modelling loss, and the two
losses are summed (``loss = gen_weight * gen + und_weight * und``, Transfusion's lambda = 5 on the flow
loss by default) into one update of the shared weights.

- Generation: SD3's rectified flow as :mod:`g2rpo.shapes.training.base` (velocity ``noise - x0``, logit-normal
  timesteps), captions of every GenEval-shapes prompt (``prompts.split("all")``) on scenes drawn by
  ``prompts.scene_for``, 10% of captions dropped to the empty caption for classifier-free guidance.
- Understanding: next-token cross-entropy on the answer and its end token only (the question is context),
  images from ``vqa.random_scene`` and from scenes of prompts (half each), questions from
  ``vqa.sample_question``.

Batches are rendered from ``(seed, step)`` and an EMA of the weights is exported, so, as for the base model
(:mod:`g2rpo.shapes.training.loop`), the run is deterministic on a given machine and thread count and resumes
from its last Lightning checkpoint. The learning rate is constant after warm-up until a linear cool-down over
the last 20% of the steps, so snapshots before the cool-down do not depend on the total.
At the end the export is evaluated: understanding accuracy per question type (greedy answers on held-out
scenes) and held-out GenEval-shapes (ODE samples, the world's default evaluation).

    python -m g2rpo.shapes.training.unified --steps 3000 --out g2rpo/shapes/weights/unified
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from g2rpo.shapes import vqa
from g2rpo.shapes.policy import HELDOUT_PER_TYPE, UnifiedPolicy, understanding_accuracy
from g2rpo.shapes.prompts import TASKS, scene_for, split
from g2rpo.shapes.training.loop import (
    EMAPretraining,
    StepBatches,
    arguments,
    fit,
    rectified_flow_inputs,
    start,
)
from g2rpo.shapes.unified import UnifiedModel, load_unified_model, unified_model
from g2rpo.shapes.world import render


class UnifiedBatches(StepBatches):
    """Endless batches, each a function of ``(seed, step)``: ``gen_batch`` captioned images and
    ``und_batch`` (image, question, answer) triples, images in [-1, 1]."""

    def __init__(
        self,
        gen_batch: int,
        und_batch: int,
        seed: int,
        image_size: int = 32,
        caption_dropout: float = 0.1,
        prompt_scenes: float = 0.5,
    ) -> None:
        self.gen_batch, self.und_batch, self.seed = gen_batch, und_batch, seed
        self.image_size, self.caption_dropout, self.prompt_scenes = image_size, caption_dropout, prompt_scenes
        self.prompts = split("all")

    def prompt(self, rng: np.random.Generator) -> dict:
        task = TASKS[rng.integers(len(TASKS))]
        return self.prompts[task][rng.integers(len(self.prompts[task]))]

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        images, captions = [], []
        for _ in range(self.gen_batch):
            metadata = self.prompt(rng)
            images.append(render(scene_for(metadata, rng, self.image_size), self.image_size))
            captions.append("" if rng.random() < self.caption_dropout else metadata["prompt"])
        und_images, questions, answers = [], [], []
        for _ in range(self.und_batch):
            if rng.random() < self.prompt_scenes:
                scene = scene_for(self.prompt(rng), rng, self.image_size)
            else:
                scene = vqa.random_scene(rng, self.image_size)
            entry = vqa.sample_question(scene, rng)
            und_images.append(render(scene, self.image_size))
            questions.append(entry["question"])
            answers.append(entry["answer"])
        return {
            "images": torch.stack(images) * 2 - 1,
            "captions": captions,
            "und_images": torch.stack(und_images) * 2 - 1,
            "questions": questions,
            "answers": answers,
        }


def answer_sequences(
    model: UnifiedModel, questions: list[str], answers: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text after the image, ``question <|answer|> answer <eos>`` right-padded with end tokens, and the
    next-token targets: the answer and its end token, -100 (ignored) elsewhere."""
    rows, targets = [], []
    for question, answer in zip(questions, answers):
        prefix = model.question_prefix(question)
        reply = [*model.words(answer), model.eos_id]
        rows.append(prefix + reply)
        targets.append([-100] * (len(prefix) - 1) + reply + [-100])  # position t predicts token t + 1
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), model.eos_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(target)] = torch.tensor(target)
    return ids, labels


class UnifiedPretraining(EMAPretraining):
    def __init__(
        self,
        model: UnifiedModel,
        lr: float = 4e-3,
        warmup_steps: int = 200,
        cooldown_fraction: float = 0.2,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        gen_weight: float = 5.0,
        und_weight: float = 1.0,
        export_every: int = 0,
        out: Path | None = None,
    ) -> None:
        super().__init__(lr, warmup_steps, weight_decay, export_every, out)
        self.model = model
        self.cooldown_fraction = cooldown_fraction
        self.gen_weight, self.und_weight = gen_weight, und_weight
        self.start_ema(ema_decay)

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["images"]
        captions = self.model.caption_ids(batch["captions"])
        noisy, sigma, velocity = rectified_flow_inputs(images)
        gen = torch.nn.functional.mse_loss(self.model.velocity(captions, noisy, sigma), velocity)

        ids, labels = answer_sequences(self.model, batch["questions"], batch["answers"])
        logits = self.model.answer_logits(batch["und_images"], ids.to(self.device))
        und = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(self.device).flatten())
        loss = self.gen_weight * gen + self.und_weight * und
        self.log_dict({"gen": gen, "und": und}, prog_bar=True)
        self.losses = {"gen": gen.item(), "und": und.item()}
        return loss

    def configure_optimizers(self):
        # beta2 0.95 and clipping at norm 1 (in the Trainer) keep a qk-norm-free Llama stable at this rate
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=self.weight_decay
        )
        # Warmup-stable-decay (MiniCPM, arXiv 2404.06395): a constant rate, then a linear cool-down to 0 over
        # the last ``cooldown_fraction`` of the steps, which is where the flow loss drops below its plateau.
        # One LambdaLR rather than transformers' get_wsd_schedule: its warm-up starts at lr 0, one step
        # behind the (step + 1) / warmup of the checkpoints the shipped weights resumed from.
        total = self.trainer.max_steps
        cooldown_start = total * (1 - self.cooldown_fraction)

        def rate(step: int) -> float:
            if step >= cooldown_start:
                return max(0.0, (total - step) / (total - cooldown_start))
            return self.warmup(step)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export(self, directory: Path, step: int) -> None:
        """Save the EMA weights in the model's own format, in fp16 (half the size; loaded as fp32)."""
        model = copy.deepcopy(self.model)
        self.ema.copy_to(model.parameters())
        model.save_pretrained(directory, dtype=torch.float16)
        self.record_export(directory, step)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(
        __doc__,
        steps=3000,
        lr=4e-3,
        out=Path(__file__).parents[1] / "weights" / "unified",
        checkpoints=Path("outputs/unified-model"),
    )
    parser.add_argument("--gen-batch", type=int, default=24)
    parser.add_argument("--und-batch", type=int, default=16)
    parser.add_argument(
        "--gen-weight",
        type=float,
        default=5.0,
        help="Transfusion's lambda: the flow loss is far smaller than the cross-entropy, and without the "
        "weight the answers' gradients dominate Adam's normalisation of the shared weights",
    )
    parser.add_argument("--und-weight", type=float, default=1.0)
    parser.add_argument(
        "--cooldown", type=float, default=0.2, help="fraction of the steps spent decaying lr to 0"
    )
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=512)
    args = start(parser, argv)
    sizes = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "intermediate_size": args.intermediate_size,
    }
    module = UnifiedPretraining(
        unified_model(seed=args.seed, **sizes),
        lr=args.lr,
        cooldown_fraction=args.cooldown,
        gen_weight=args.gen_weight,
        und_weight=args.und_weight,
        export_every=args.export_every,
        out=args.out,
    )
    batches = UnifiedBatches(args.gen_batch, args.und_batch, args.seed)
    fit(module, batches, args.steps, args.checkpoints, gradient_clip_val=1.0)
    module.export(args.out, args.steps)
    write_model_card(args.out, args)


def write_model_card(directory: Path, args: argparse.Namespace) -> None:
    """Evaluate the export (understanding per question type; held-out GenEval-shapes as the world's
    default evaluation, ``conf/eval/shapes.yaml``), record it in ``training.json`` and write the card."""
    from g2rpo.evaluation.evaluator import Evaluator
    from g2rpo.shapes.geneval import GenEvalShapes
    from g2rpo.shapes.prompts import shapes_dataset
    from g2rpo.shapes.score import ShapesScore

    policy = UnifiedPolicy(load_unified_model(str(directory))).eval()
    understanding = understanding_accuracy(policy)
    rewards = {"geneval_shapes": GenEvalShapes(), "shapes_score": ShapesScore()}
    evaluation = Evaluator(
        shapes_dataset("heldout"), rewards, num_steps=20, images_per_task=64, noise="set", batch_size=128
    )(policy)
    info = json.loads((directory / "training.json").read_text())
    info.update(
        seconds_per_step=round(info["seconds"] / info["steps"], 3),
        understanding=understanding,
        heldout=evaluation.to_json(),
    )
    (directory / "training.json").write_text(json.dumps(info, indent=2))
    parameters = sum(p.numel() for p in policy.model.parameters())
    s = policy.model.sizes
    command = (
        f"python -m g2rpo.shapes.training.unified --steps {args.steps} --threads {args.threads} "
        f"--out {args.out}"
    )
    understanding_rows = "\n".join(f"{k:<9} {v:.3f}" for k, v in understanding.items())
    settings = evaluation.protocol
    card = f"""# shapes-unified

The shapes world's unified understanding and generation model (`model=shapes_unified`): one
`transformers` `LlamaModel` ({s["num_layers"]} layers, hidden {s["hidden_size"]}, {s["num_heads"]} heads, MLP
{s["intermediate_size"]}; {parameters / 1e6:.2f}M parameters in all) that answers questions about 32x32 images
token by token and draws them by flow matching from a caption, with shared weights (Transfusion, arXiv
2408.11039; JanusFlow, arXiv 2411.07975). Code: `g2rpo/shapes/unified.py`, policy `g2rpo/shapes/policy.py`.

- **Architecture**: a word-level vocabulary ({len(policy.model.tokenizer)} tokens: captions, questions, answers,
  `<|answer|>`); 4x4 pixel patches (64 image tokens) in and velocities out through linear layers, a
  learned image position embedding and a noise-level embedding (sinusoidal + MLP) on every image token;
  causal attention over text, bidirectional within the image; an untied LM head.
- **Layouts**: understanding `<bos> [clean image] question <|answer|> answer <eos>`; generation
  `<bos> caption <eos>... [noisy image]` (captions padded to {s["caption_length"]} tokens with `<eos>`).
- **Data**: per batch {args.gen_batch} captioned images (every GenEval-shapes prompt,
  `prompts.split("all")`, on scenes from `prompts.scene_for`, 10% captions dropped) and {args.und_batch}
  image-question-answer triples (`vqa.random_scene` and prompt scenes, `vqa.sample_question`).
- **Objective**: {args.gen_weight} x rectified-flow velocity MSE (logit-normal timesteps) + {args.und_weight} x
  next-token cross-entropy on the answer tokens.
- **Training**: AdamW lr {args.lr}, betas (0.9, 0.95), gradients clipped at norm 1 (200 warm-up steps,
  constant, then a linear cool-down to 0 over the last {args.cooldown:.0%} of the steps), {info["steps"]} steps,
  EMA of the
  weights (exported in fp16), seed {args.seed}, {args.threads} CPU threads: {info["seconds"] / 60:.1f} minutes
  wall-clock, {info["seconds_per_step"]} s/step (on 2 cores shared with other jobs).
- **Regenerate**: `make unified-model`, i.e. `{command}` (deterministic on a given machine and thread
  count; resumes from `{args.checkpoints}/last.ckpt`).

Both abilities are imperfect, so RL post-training has something to improve. Generation is the weaker one:
a 1.1M-parameter model drawing 4x4 patches makes blobby shapes, and at CFG 4.5 a prompt with one object often
comes out empty, because guidance extrapolates away from the unconditional scene with several objects.

## Understanding (greedy answers to {len(vqa.QUESTION_TYPES) * HELDOUT_PER_TYPE} held-out questions, {HELDOUT_PER_TYPE} per type)

```
{understanding_rows}
```

## Held-out GenEval-shapes ({evaluation.num_images} images: {settings["images_per_task"]} per task,
ODE {settings["num_steps"]} steps, CFG {settings["guidance_scale"]}, seed {settings["seed"]})

```
{evaluation.table()}
```
"""
    (directory / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
