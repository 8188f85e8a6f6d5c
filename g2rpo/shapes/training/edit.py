"""Train the shapes world's editing model from the shipped base (``make edit-model``).

In-context editing as FLUX.1-Kontext was trained (Labs et al. 2025, "FLUX.1 Kontext", section 3: the same
rectified-flow objective on (source, instruction, target) triples, the source's tokens beside the noisy
target's, the loss on the target only), on the SD3 base as a diptych (:class:`g2rpo.policies.SD3EditPolicy`,
:func:`g2rpo.shapes.model.edit_pipeline`). Triples are rendered on the fly from the training split's edits
(every type equally often, held-out compositions never), 10% of instructions dropped for CFG (the source is
kept, as the editing pipelines keep it). Everything else is the base model's pretraining
(:mod:`g2rpo.shapes.training.base`): logit-normal timesteps, text encoders trained jointly (the instructions'
new words start untrained), an EMA exported, deterministic from ``(seed, step)``, resumable.

    python -m g2rpo.shapes.training.edit --steps 3000 --out g2rpo/shapes/weights/edit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from g2rpo.shapes.editing import EDIT_TYPES, as_objects, held_out, make_edit
from g2rpo.shapes.model import edit_pipeline, load_base_model
from g2rpo.shapes.training.base import FlowMatchingPretraining
from g2rpo.shapes.training.loop import StepBatches, arguments, fit, start
from g2rpo.shapes.world import render

EVAL_CONFIG = Path(__file__).parents[3] / "conf" / "eval" / "edit_shapes.yaml"


class RenderedEdits(StepBatches):
    """Endless batches of (targets, instructions, sources), images in [-1, 1]: an edit type, then a training
    edit of it (held-out compositions are redrawn)."""

    def __init__(
        self, batch_size: int, seed: int, image_size: int = 32, instruction_dropout: float = 0.1
    ) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.image_size, self.instruction_dropout = image_size, instruction_dropout

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        targets, instructions, sources = [], [], []
        for _ in range(self.batch_size):
            edit = self.draw(rng)
            sources.append(render(as_objects(edit["source"]), self.image_size))
            targets.append(render(as_objects(edit["target"]), self.image_size))
            instructions.append("" if rng.random() < self.instruction_dropout else edit["instruction"])
        return torch.stack(targets) * 2 - 1, instructions, torch.stack(sources) * 2 - 1

    def draw(self, rng: np.random.Generator) -> dict:
        """A training edit: a uniformly drawn type, then an edit of it whose composition is not held out."""
        kind = EDIT_TYPES[rng.integers(len(EDIT_TYPES))]
        edit = make_edit(kind, rng, self.image_size)
        while held_out(edit):
            edit = make_edit(kind, rng, self.image_size)
        return edit


def main(argv: list[str] | None = None) -> None:
    parser = arguments(
        __doc__,
        steps=3000,
        lr=1e-3,
        out=Path(__file__).parents[1] / "weights" / "edit",
        checkpoints=Path("outputs/edit-model"),
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base", default=None, help="the base model directory (default: the shipped one)")
    args = start(parser, argv)
    module = FlowMatchingPretraining(
        edit_pipeline(load_base_model(args.base)),
        lr=args.lr,
        export_every=args.export_every,
        out=args.out,
    )
    fit(module, RenderedEdits(args.batch_size, args.seed), args.steps, args.checkpoints)
    module.export(args.out, args.steps)
    write_model_card(args.out, args)


def evaluate(directory: Path, **overrides):
    """The held-out editing evaluation (``eval=edit_shapes``, its protocol as configured) of the model in
    ``directory``."""
    from g2rpo.policies import SD3EditPolicy
    from g2rpo.shapes.model import load_edit_model

    policy = SD3EditPolicy(load_edit_model(str(directory)), resolution=32, max_sequence_length=0).eval()
    evaluator = instantiate(OmegaConf.merge(OmegaConf.load(EVAL_CONFIG), overrides))
    return policy, evaluator(policy)


def write_model_card(directory: Path, args: argparse.Namespace) -> None:
    """Evaluate the exported model on the held-out edits and write its card."""
    policy, evaluation = evaluate(directory)
    info = json.loads((directory / "training.json").read_text())
    info["heldout"] = evaluation.to_json()
    (directory / "training.json").write_text(json.dumps(info, indent=2))
    parameters = sum(p.numel() for p in policy.transformer.parameters())
    settings = evaluation.protocol
    card = f"""# shapes-sd3-edit

The shapes world's in-context editing model (`model=shapes_edit`): the base model (`model=shapes`,
`g2rpo/shapes/weights/base`) trained to edit. A diffusers `StableDiffusion3Pipeline` whose pixel-space
`SD3Transformer2DModel` ({parameters / 1e6:.2f}M parameters) sees the source image beside the generated one
(a 32x64 diptych; `g2rpo.policies.SD3EditPolicy`); its position table keeps the base's positions for the
generated half. The tokenizers and text encoders gain the instructions' words.

- **Data**: (source, instruction, target) triples rendered on the fly from the six edit types of
  `g2rpo.shapes.editing` (recolor, reshape, add, remove, swap, count), equally often, training split only
  (held-out compositions never seen), 10% of instructions dropped (the source kept).
- **Training**: from the shipped base, rectified flow on the target half (logit-normal timesteps), text
  encoders trained jointly, AdamW lr {args.lr}, batch {args.batch_size}, {info["steps"]} steps, EMA of the
  weights (exported), seed {args.seed}, {args.threads} CPU threads, {info["seconds"] / 60:.0f} minutes
  wall-clock.
- **Regenerate**: `make edit-model` (deterministic on a given machine and thread count).

## Held-out editing ({evaluation.num_images} images: {settings["images_per_task"]} per edit type,
ODE {settings["num_steps"]} steps, CFG {settings["guidance_scale"]} over the instruction, seed {settings["seed"]})

`compliance`: the target's objects are there (strict); `compliance_partial`: the fraction of the edit's
checks met; `preservation`: the objects the instruction does not name kept their shape, colour and
position; `unchanged`: the source returned as it was; `overall` = sqrt(compliance_partial x preservation),
the RL reward (`reward=edit_shapes`).

```
{evaluation.table()}
```
"""
    (directory / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
