"""Train the ``shapes_score`` CLIP (:mod:`g2rpo.shapes.score`) from scratch on rendered (image, caption) pairs
(``make reward-model``): CLIP's symmetric InfoNCE with truth-aware targets, hard negatives (:func:`corrupt`)
and minimal pairs (:func:`counterfactual`), compositional tasks oversampled, images augmented. Why each: the
shapes world's page in the docs. Batches are rendered from ``np.random.default_rng([seed, step])``, so a run
is deterministic on a given machine and thread count.

    python -m g2rpo.shapes.training.score --steps 400 --out g2rpo/shapes/weights/shapes_score
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from transformers import CLIPModel, PreTrainedTokenizerFast

from g2rpo.shapes.geneval import holds
from g2rpo.shapes.prompts import (
    NUMBERS,
    color_attr,
    colors,
    counting,
    position,
    scene_for,
    single_object,
    split,
    two_object,
)
from g2rpo.shapes.score import SCORE_MODEL_DIR, ShapesScore, embed_images, embed_text, shapes_clip, to_pixels
from g2rpo.shapes.training.loop import arguments, start
from g2rpo.shapes.world import COLOURS, SHAPES, WorldObject, render

log = logging.getLogger(__name__)

CORRUPTIONS = ("shape", "colour", "binding", "count", "position")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
EVAL_STREAM = 10**9  # evaluation batches use rng([seed, EVAL_STREAM + i]): no training step reaches it
TASK_WEIGHTS = {  # relative odds of drawing each task for a training image
    "single_object": 0.5,
    "two_object": 0.5,
    "counting": 1.0,
    "colors": 0.5,
    "position": 2.0,
    "color_attr": 2.5,
}


def applicable(metadata: dict) -> list[str]:
    """The corruption kinds that can falsify this prompt (colours are only corrupted where specified)."""
    tag = metadata["tag"]
    kinds = ["shape"]
    if tag in ("colors", "color_attr"):
        kinds.append("colour")
    if tag == "color_attr":
        kinds.append("binding")
    if tag in ("single_object", "counting"):
        kinds.append("count")
    if tag == "position":
        kinds.append("position")
    return kinds


def corrupt(metadata: dict, kind: str, rng: np.random.Generator) -> dict:
    """Metadata of a caption that is false of every scene satisfying ``metadata`` (the scenes hold exactly
    the prompt's objects): one shape replaced by one the prompt lacks, one colour by an absent colour, the
    two colours swapped, the count changed, or the relation reversed (flipped, or the objects swapped) or
    turned by a right angle (``scene_for``'s position scenes hold their relation alone)."""
    tag, include = metadata["tag"], metadata["include"]
    if kind not in applicable(metadata):
        raise ValueError(f"corruption {kind!r} does not apply to a {tag} prompt")
    shapes = [req["class"] for req in include]
    absent_shapes = [s for s in SHAPES if s not in shapes]

    def other_shape() -> str:
        return absent_shapes[rng.integers(len(absent_shapes))]

    if tag == "single_object":
        shape = shapes[0]
        if kind == "shape":
            return single_object(other_shape())
        return counting(shape, list(NUMBERS)[rng.integers(len(NUMBERS))])
    if tag == "two_object":
        first, second = shapes
        return two_object(other_shape(), second) if rng.random() < 0.5 else two_object(first, other_shape())
    if tag == "counting":
        shape, count = shapes[0], include[0]["count"]
        if kind == "shape":
            return counting(other_shape(), count)
        counts = [n for n in NUMBERS if n != count]
        return counting(shape, counts[rng.integers(len(counts))])
    if tag == "colors":
        shape, colour = shapes[0], include[0]["color"]
        if kind == "shape":
            return colors(other_shape(), colour)
        others = [c for c in COLOURS if c != colour]
        return colors(shape, others[rng.integers(len(others))])
    if tag == "position":
        second, first, relation = shapes[0], shapes[1], include[1]["position"][0]  # the anchor comes first
        if kind == "shape":
            if rng.random() < 0.5:
                return position(other_shape(), relation, second)
            return position(first, relation, other_shape())
        draw = rng.integers(3)
        if draw == 0:
            return position(first, OPPOSITE[relation], second)
        if draw == 1:
            return position(second, relation, first)
        crossing = [
            r for r in OPPOSITE if r not in (relation, OPPOSITE[relation])
        ]  # scenes hold one relation
        return position(first, crossing[rng.integers(2)], second)
    if tag == "color_attr":
        (first, second), (first_colour, second_colour) = shapes, [req["color"] for req in include]
        if kind == "shape":
            if rng.random() < 0.5:
                return color_attr(other_shape(), first_colour, second, second_colour)
            return color_attr(first, first_colour, other_shape(), second_colour)
        if kind == "binding":
            return color_attr(first, second_colour, second, first_colour)
        others = [c for c in COLOURS if c not in (first_colour, second_colour)]
        colour = others[rng.integers(len(others))]
        if rng.random() < 0.5:
            return color_attr(first, colour, second, second_colour)
        return color_attr(first, first_colour, second, colour)
    raise ValueError(f"unknown task {tag!r}")


def augment(images: Tensor, rng: np.random.Generator, blur_p: float = 0.5, max_noise: float = 0.08) -> Tensor:
    """Mild corruption of ``[B, 3, H, W]`` images in [0, 1]: with probability ``blur_p`` a Gaussian blur of
    sigma in [0.3, 1] px, then Gaussian noise of a std drawn in [0, ``max_noise``], clipped to [0, 1]."""
    batch, channels, height, width = images.shape
    sigma = np.where(rng.random(batch) < blur_p, rng.uniform(0.3, 1.0, batch), 0.0)
    taps = np.arange(-2, 3, dtype=np.float64)
    kernel = np.exp(-(taps[None, :] ** 2) / (2 * np.maximum(sigma, 1e-6)[:, None] ** 2))
    kernel = torch.from_numpy(kernel / kernel.sum(axis=1, keepdims=True)).float()  # sigma 0: identity
    kernel = kernel.repeat_interleave(channels, dim=0).to(images)  # [B * 3, 5]
    x = images.reshape(1, batch * channels, height, width)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=batch * channels)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=batch * channels)
    std = rng.uniform(0.0, max_noise, batch)
    noise = rng.standard_normal(images.shape) * std[:, None, None, None]
    return (x.reshape(images.shape) + torch.from_numpy(noise).to(images)).clamp(0, 1)


def render_batch(
    rng: np.random.Generator,
    batch_size: int,
    prompts: dict[str, list[dict]],
    image_size: int = 32,
    task_weights: dict[str, float] | None = None,
) -> tuple[Tensor, list[dict], list[list[WorldObject]]]:
    """A task (uniformly, or by ``task_weights``), a prompt of it, a scene satisfying it; ``batch_size`` times."""
    tasks = list(prompts)
    p = None
    if task_weights:
        p = np.array([task_weights.get(t, 1.0) for t in tasks], dtype=np.float64)
        p /= p.sum()
    images, metadata, scenes = [], [], []
    for _ in range(batch_size):
        task = tasks[rng.choice(len(tasks), p=p)] if p is not None else tasks[rng.integers(len(tasks))]
        meta = prompts[task][rng.integers(len(prompts[task]))]
        scene = scene_for(meta, rng, image_size)
        images.append(render(scene, image_size))
        metadata.append(meta)
        scenes.append(scene)
    return torch.stack(images), metadata, scenes


def counterfactual(
    metadata: dict, scene: list[WorldObject], kind: str, rng: np.random.Generator, image_size: int = 32
) -> tuple[dict, list[WorldObject]] | None:
    """A minimal pair for ``scene``: a corrupted caption and a scene that it describes and the original
    caption does not. The scene is edited where an edit makes it (recoloured or reshaped objects, swapped
    colours, swapped positions), so that only the corruption tells the two images apart; otherwise (a new
    count, a relation turned by a right angle) it is a fresh scene. ``None`` when no such pair exists
    (one circle against "two circles": a fresh scene of two circles still shows "a circle")."""
    caption = corrupt(metadata, kind, rng)
    slots = [
        (req, c) for req, c in zip(metadata["include"], caption["include"]) if req["count"] == c["count"]
    ]
    candidates = []
    if len(slots) == len(metadata["include"]) == len(caption["include"]):
        edited, index = [], 0
        for _, req in slots:  # scene_for lays objects out in the order of the include list
            for obj in scene[index : index + req["count"]]:
                edited.append(replace(obj, shape=req["class"], colour=req.get("color", obj.colour)))
            index += req["count"]
        candidates.append(edited)
    if metadata["tag"] == "position":
        anchor, mover = scene
        candidates.append(
            [replace(anchor, cx=mover.cx, cy=mover.cy), replace(mover, cx=anchor.cx, cy=anchor.cy)]
        )
    candidates.append(scene_for(caption, rng, image_size))
    for candidate in candidates:
        if holds(candidate, caption) and not holds(candidate, metadata):
            return caption, candidate
    return None


class ContrastiveBatches(IterableDataset):
    """Endless training batches from ``(seed, step)``: augmented images, the distinct captions with which
    of them is true of each image, each image's hard-negative captions (``draws`` per corruption kind,
    deduplicated) with their owner, and, with probability ``pairs`` per image, a :func:`counterfactual`
    image (appended after the batch's images) whose caption is the last of its owner's negatives."""

    def __init__(
        self,
        batch_size: int,
        seed: int,
        image_size: int = 32,
        draws: int = 2,
        pairs: float = 1.0,
        task_weights: dict[str, float] | None = TASK_WEIGHTS,
    ) -> None:
        self.batch_size, self.seed, self.image_size, self.draws = batch_size, seed, image_size, draws
        self.pair_rate, self.task_weights = pairs, task_weights
        self.prompts = split("all")

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        images, metadata, scenes = render_batch(
            rng, self.batch_size, self.prompts, self.image_size, self.task_weights
        )
        captions = {m["prompt"]: m for m in metadata}  # distinct, in order of appearance
        truth = torch.tensor([[holds(scene, m) for m in captions.values()] for scene in scenes])
        negatives, owners, pairs, paired_images = [], [], [], []
        for index, (meta, scene) in enumerate(zip(metadata, scenes)):
            drawn = [
                corrupt(meta, kind, rng)["prompt"] for kind in applicable(meta) for _ in range(self.draws)
            ]
            pair = None
            for kind in rng.permutation(applicable(meta)) if rng.random() < self.pair_rate else []:
                pair = counterfactual(meta, scene, str(kind), rng, self.image_size)
                if pair is not None:
                    break
            if pair is not None:
                drawn = [c for c in drawn if c != pair[0]["prompt"]] + [pair[0]["prompt"]]
            for caption in dict.fromkeys(drawn):
                negatives.append(caption)
                owners.append(index)
            if pair is not None:
                pairs.append((index, len(negatives) - 1))
                paired_images.append(render(pair[1], self.image_size))
        names = list(captions)
        return {
            "images": augment(torch.cat([images, *(image[None] for image in paired_images)]), rng),
            "captions": names,
            "labels": torch.tensor([names.index(m["prompt"]) for m in metadata]),
            "truth": truth,
            "negatives": negatives,
            "owners": torch.tensor(owners),
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        }

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against a target distribution spread uniformly over each row's positives."""
    targets = targets.float() / targets.float().sum(dim=-1, keepdim=True)
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def contrastive_loss(
    model: CLIPModel, tokenizer: PreTrainedTokenizerFast, batch: dict, ranking_weight: float = 1.0
) -> Tensor:
    """Symmetric multi-positive InfoNCE; hard negatives join the image->text direction of their owner only.

    ``ranking_weight`` weighs two direct terms: a pairwise logistic ``-log sigmoid(logit(true) -
    logit(negative))`` per hard negative (in the softmax a negative competes with every caption of the row,
    and bindings, the slowest things a CLIP learns, need the direct push) and the minimal pairs' 2x2 blocks.
    """
    captions, negatives = batch["captions"], batch["negatives"]
    device = batch["images"].device
    truth, owners = batch["truth"].to(device), batch["owners"].to(device)
    text = tokenizer(
        list(captions) + list(negatives),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).to(device)
    logits = model(
        input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=to_pixels(batch["images"])
    ).logits_per_image  # [B + P, U + N]: the batch's images, then the counterfactual ones
    n_captions, batch_size = len(captions), len(batch["labels"])
    logits, paired = logits[:batch_size], logits[batch_size:]
    own = owners[None, :] == torch.arange(batch_size, device=device)[:, None]  # [B, N]
    visible = torch.cat([torch.ones_like(truth, dtype=torch.bool), own], dim=1)
    image_to_text = logits.masked_fill(~visible, -1e9)
    targets = torch.cat([truth, torch.zeros_like(own)], dim=1)
    text_to_image = logits[:, :n_captions].t()  # every distinct caption is true of at least one image
    infonce = (
        _soft_cross_entropy(image_to_text, targets) + _soft_cross_entropy(text_to_image, truth.t())
    ) / 2
    labels = batch["labels"].to(device)
    true_logit = logits.gather(1, labels[:, None])[owners, 0]
    negative_logit = logits[owners, n_captions + torch.arange(len(owners), device=device)]
    ranking = F.softplus(negative_logit - true_logit).mean()
    return infonce + ranking_weight * (
        ranking + _minimal_pairs_loss(logits, paired, labels, n_captions, batch["pairs"])
    )


def _minimal_pairs_loss(
    logits: Tensor, paired: Tensor, labels: Tensor, n_captions: int, pairs: Tensor
) -> Tensor:
    """Cross-entropy of each 2x2 block (image, counterfactual image) x (caption, corrupted caption), both
    ways: the images must tell the captions apart and the captions the images."""
    if len(pairs) == 0:
        return logits.new_zeros(())
    device = logits.device
    owner, negative = pairs.to(device).unbind(dim=1)
    true_column, negative_column = labels[owner], n_captions + negative
    rows = torch.arange(len(owner), device=device)
    square = torch.stack(  # [P, image (original, counterfactual), caption (original, corrupted)]
        [
            torch.stack([logits[owner, true_column], logits[owner, negative_column]], dim=-1),
            torch.stack([paired[rows, true_column], paired[rows, negative_column]], dim=-1),
        ],
        dim=1,
    )
    diagonal = torch.arange(2, device=device).repeat(len(owner))
    return (
        F.cross_entropy(square.reshape(-1, 2), diagonal)  # each image picks its own caption
        + F.cross_entropy(square.transpose(1, 2).reshape(-1, 2), diagonal)  # each caption its own image
    ) / 2


@torch.no_grad()
def evaluate_heldout(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    batches: int = 8,
    batch_size: int = 128,
    noisy: bool = False,
) -> dict[str, float]:
    """Metrics on freshly rendered images of held-out prompts (``noisy``: augmented as in training).

    ``retrieval_i2t``: the best-scoring distinct caption of the batch is true of the image (GenEval's rule);
    ``retrieval_i2t_exact``: it is the image's own caption; ``retrieval_t2i``: the best-scoring image for a
    caption is one it is true of. ``beats_<kind>``: how often the true caption outscores a corrupted one
    (``position`` split into ``position_reversed`` and ``position_turned`` as well); the mean cosines of true
    and corrupted captions give the reward's scale.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = split("heldout")
    hits: dict[str, list[float]] = {"retrieval_i2t": [], "retrieval_i2t_exact": [], "retrieval_t2i": []}
    wins: dict[str, list[float]] = {
        kind: [] for kind in (*CORRUPTIONS, "position_reversed", "position_turned")
    }
    true_scores, corrupted_scores = [], []
    for index in range(batches):
        rng = np.random.default_rng([seed, EVAL_STREAM + index])
        images, metadata, scenes = render_batch(rng, batch_size, prompts)
        if noisy:
            images = augment(images, rng)
        captions = {m["prompt"]: m for m in metadata}
        names = list(captions)
        truth = torch.tensor([[holds(scene, m) for m in captions.values()] for scene in scenes])
        image_embeds = embed_images(model, images.to(device))
        similarity = (image_embeds @ embed_text(model, tokenizer, names, device).t()).cpu()  # [B, U]
        best = similarity.argmax(dim=1)
        hits["retrieval_i2t"] += truth[torch.arange(len(best)), best].float().tolist()
        hits["retrieval_i2t_exact"] += [
            float(names[b] == m["prompt"]) for b, m in zip(best.tolist(), metadata)
        ]
        hits["retrieval_t2i"] += truth[similarity.argmax(dim=0), torch.arange(len(names))].float().tolist()
        own = similarity[torch.arange(len(metadata)), [names.index(m["prompt"]) for m in metadata]]
        true_scores += own.tolist()
        tests = [
            (i, kind, corrupt(meta, kind, rng))
            for i, meta in enumerate(metadata)
            for kind in applicable(meta)
        ]
        corrupted = embed_text(model, tokenizer, [c["prompt"] for _, _, c in tests], device).cpu()
        for (i, kind, caption), text in zip(tests, corrupted):
            score = float(image_embeds[i].cpu() @ text)
            wins[kind].append(float(own[i] > score))
            corrupted_scores.append(score)
            if kind == "position":  # reversed (the opposite relation, or the objects swapped) or turned
                relation = metadata[i]["include"][1]["position"][0]
                turned = caption["include"][1]["position"][0] not in (relation, OPPOSITE[relation])
                wins["position_turned" if turned else "position_reversed"].append(float(own[i] > score))
    model.train(was_training)
    metrics = {name: float(np.mean(values)) for name, values in hits.items()}
    metrics.update({f"beats_{kind}": float(np.mean(values)) for kind, values in wins.items() if values})
    metrics["true_cosine_mean"] = float(np.mean(true_scores))
    metrics["corrupted_cosine_mean"] = float(np.mean(corrupted_scores))
    return metrics


class ContrastiveTraining(L.LightningModule):
    """AdamW with linear warm-up then cosine decay to zero over ``steps`` (the run ends converged); the logit
    scale is clipped at 100 after every step, as CLIP does."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerFast,
        steps: int,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.05,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.steps, self.lr, self.warmup_steps, self.weight_decay = steps, lr, warmup_steps, weight_decay

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = contrastive_loss(self.model, self.tokenizer, batch)
        self.log("loss", loss, prog_bar=True)
        self.log("logit_scale", self.model.logit_scale.exp(), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.lr,
        )

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, steps=400, lr=1e-3, out=SCORE_MODEL_DIR)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 128 images to score")
    args = start(parser, argv)
    started = time.time()
    model, tokenizer = shapes_clip(seed=args.seed)
    module = ContrastiveTraining(model, tokenizer, steps=args.steps, lr=args.lr)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        deterministic=True,
        log_every_n_steps=50,
        enable_model_summary=True,
    )
    trainer.fit(module, DataLoader(ContrastiveBatches(args.batch_size, args.seed), batch_size=None))
    seconds = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    shipped = ShapesScore(args.out)  # the metrics are those of the fp16 weights as they load
    metrics = evaluate_heldout(shipped.model, shipped.tokenizer, seed=args.seed, batches=args.eval_batches)
    noisy = evaluate_heldout(shipped.model, shipped.tokenizer, args.seed, args.eval_batches, noisy=True)
    report = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "logit_scale": round(float(shipped.model.logit_scale.exp()), 3),
        "task_weights": TASK_WEIGHTS,
        "heldout": {k: round(v, 4) for k, v in metrics.items()},
        "heldout_noisy": {k: round(v, 4) for k, v in noisy.items()},
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved the shapes_score model to %s", args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
