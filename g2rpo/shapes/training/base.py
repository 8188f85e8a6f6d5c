"""Pretrain the shapes world's base model by flow matching, as SD3 was pretrained (``make base-model``).

Rectified-flow objective of SD3 (Esser et al. 2024, eq. 1 with the velocity target ``noise - x0``),
timesteps from its logit-normal density (diffusers' ``compute_density_for_timestep_sampling``), 10% of
captions dropped for classifier-free guidance, text encoders trained jointly (they start from scratch
here, unlike SD3's frozen pretrained ones), an EMA of the weights (diffusers' ``EMAModel``) exported as
the base. Every batch is rendered from ``(seed, step)``, so the run is deterministic on a given machine and
thread count, and a constant learning rate after warm-up makes the export at step N of a longer run
identical to a run of N steps. An interrupted run resumes from its last Lightning checkpoint (EMA included;
the mechanics are shared with the unified model's, :mod:`g2rpo.shapes.training.loop`).

    python -m g2rpo.shapes.training.base --steps 4000 --out g2rpo/shapes/weights/base
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from g2rpo.shapes.model import shapes_pipeline
from g2rpo.shapes.prompts import TASKS, scene_for, split
from g2rpo.shapes.training.loop import (
    EMAPretraining,
    StepBatches,
    arguments,
    fit,
    rectified_flow_inputs,
    start,
)
from g2rpo.shapes.world import render


class RenderedPairs(StepBatches):
    """Endless batches of (image in [-1, 1], caption): a task, then a prompt of it, then a scene satisfying it."""

    def __init__(
        self, batch_size: int, seed: int, image_size: int = 32, caption_dropout: float = 0.1
    ) -> None:
        self.batch_size, self.seed, self.image_size, self.caption_dropout = (
            batch_size,
            seed,
            image_size,
            caption_dropout,
        )
        self.prompts = split("all")

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        rng = np.random.default_rng([self.seed, step])
        images, captions = [], []
        for _ in range(self.batch_size):
            task = TASKS[rng.integers(len(TASKS))]
            metadata = self.prompts[task][rng.integers(len(self.prompts[task]))]
            images.append(render(scene_for(metadata, rng, self.image_size), self.image_size))
            captions.append("" if rng.random() < self.caption_dropout else metadata["prompt"])
        return torch.stack(images) * 2 - 1, captions


class FlowMatchingPretraining(EMAPretraining):
    def __init__(
        self,
        pipeline: StableDiffusion3Pipeline,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        export_every: int = 0,
        out: Path | None = None,
    ) -> None:
        super().__init__(lr, warmup_steps, weight_decay, export_every, out)
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.text_encoders = torch.nn.ModuleList([pipeline.text_encoder, pipeline.text_encoder_2])
        self.start_ema(ema_decay)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [*self.transformer.parameters(), *self.text_encoders.parameters()]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Flow matching on ``(images, captions)``; with a third element, the edits' source images, the
        editing model's diptych (source beside the noisy target, loss on the target half only)."""
        images, captions, *sources = batch
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(captions), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=0,
        )  # fmt: skip
        noisy, sigma, velocity = rectified_flow_inputs(images)
        if sources:
            noisy = torch.cat([noisy, sources[0]], dim=-1)
        prediction = self.transformer(
            hidden_states=noisy,
            timestep=sigma * self.pipeline.scheduler.config.num_train_timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0][..., : images.shape[-1]]
        loss = torch.nn.functional.mse_loss(prediction, velocity)
        self.log("loss", loss, prog_bar=True)
        self.losses = {"loss": loss.item()}
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable(), lr=self.lr, weight_decay=self.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, self.warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def export(self, directory: Path, step: int) -> None:
        """Save the EMA weights as a diffusers pipeline directory, in fp16 (half the size; loaded as fp32)."""
        pipeline = copy.deepcopy(self.pipeline)
        ema = copy.deepcopy(self.ema)
        ema.copy_to(
            [
                *pipeline.transformer.parameters(),
                *pipeline.text_encoder.parameters(),
                *pipeline.text_encoder_2.parameters(),
            ]
        )  # the order of trainable()
        pipeline.to(torch.float16).save_pretrained(directory)
        self.record_export(directory, step)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(
        __doc__,
        steps=4000,
        lr=1e-3,
        out=Path(__file__).parents[1] / "weights" / "base",
        checkpoints=Path("outputs/base-model"),
    )
    parser.add_argument("--batch-size", type=int, default=64)
    args = start(parser, argv)
    module = FlowMatchingPretraining(
        shapes_pipeline(seed=args.seed), lr=args.lr, export_every=args.export_every, out=args.out
    )
    fit(module, RenderedPairs(args.batch_size, args.seed), args.steps, args.checkpoints)
    module.export(args.out, args.steps)
    write_model_card(args.out, args)


def write_model_card(directory: Path, args: argparse.Namespace) -> None:
    """Evaluate the exported base on the held-out split (the world's default evaluation) and write its card."""
    from g2rpo.evaluation.evaluator import Evaluator
    from g2rpo.policies import SD3Policy
    from g2rpo.shapes.geneval import GenEvalShapes
    from g2rpo.shapes.model import load_base_model
    from g2rpo.shapes.prompts import shapes_dataset

    policy = SD3Policy(load_base_model(str(directory)), resolution=32, max_sequence_length=0).eval()
    from g2rpo.shapes.score import ShapesScore

    rewards = {"geneval_shapes": GenEvalShapes(), "shapes_score": ShapesScore()}
    evaluation = Evaluator(
        shapes_dataset("heldout"), rewards, num_steps=20, images_per_task=64, noise="set", batch_size=128
    )(policy)
    info = json.loads((directory / "training.json").read_text())
    info["heldout"] = evaluation.to_json()
    (directory / "training.json").write_text(json.dumps(info, indent=2))
    parameters = sum(p.numel() for p in policy.transformer.parameters())
    settings = evaluation.protocol
    card = f"""# shapes-sd3-base

The shapes world's base text-to-image model (`model=shapes`): a diffusers `StableDiffusion3Pipeline` with
a pixel-space `SD3Transformer2DModel` ({parameters / 1e6:.2f}M parameters, 32x32 RGB, patch 4, qk RMSNorm)
and two small CLIP text encoders over a word-level tokenizer; no VAE, no T5.

- **Data**: (image, caption) pairs rendered on the fly by `g2rpo.shapes.world` for prompts of all six
  GenEval tasks and every composition (`g2rpo.shapes.prompts.split("all")`), 10% captions dropped.
- **Training**: rectified flow (SD3's objective, logit-normal timesteps), AdamW lr {args.lr}, batch
  {args.batch_size}, {info["steps"]} steps, EMA of the weights (exported), seed {args.seed},
  {args.threads} CPU threads, {info["seconds"] / 60:.0f} minutes wall-clock.
- **Regenerate**: `make base-model` (deterministic on a given machine and thread count).

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
