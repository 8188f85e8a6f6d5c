"""PairUG in the shapes world: understanding and generation items paired by image similarity (PairUni).

PairUni (arXiv 2510.25682v3, sec. 3.1) builds its RL data from an understanding set U of (image, question,
answer) items (Orsta) and a generation set G of (image, caption) items (BLIP3o); :mod:`g2rpo.pairing` holds
the algorithm. Here:

* **U**: random scenes (:func:`g2rpo.shapes.vqa.random_scene`), one question each, answered from the
  scene's ground truth.
* **G**: training prompts balanced over GenEval's six tasks, each with a reference image rendered from a
  scene that satisfies it (:func:`g2rpo.shapes.prompts.scene_for`), in BLIP3o's (I, C) role.
* **Features**: a frozen image encoder, the shapes CLIP's image tower (``shapes_clip``, in ResNet-50's role)
  or a fixed random projection of the pixels (``pixels``, for fast tests).
* **Completion** (:mod:`g2rpo.shapes.completion`): a k-means medoid from U needs a caption, one from G a
  question; the paper asks GPT, here the world's templates or any OpenAI-compatible server write them, and a
  verifier drops any completion that is not true of the scene (the paper's generate-then-verify loop).
  Captions of held-out compositions are dropped too: they would leak the held-out evaluation into RL
  training.

Variants (``pairing``, the rows of the paper's Table 5): ``pairug`` (aligned + retrieved), ``aligned``,
``retrieved``, ``random`` (pairug's items re-paired at random) and ``unpaired`` (all of U and G, each U item
with a random G item). :class:`PairDataset` is a :class:`~g2rpo.data.PromptDataset` whose prompts are the
generation captions and whose metadata carries each caption's GenEval metadata plus the pair.

    python -m g2rpo.shapes.pairug --out pairs.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from g2rpo.data import PromptDataset
from g2rpo.pairing import match_retrieved, medoids, normalize
from g2rpo.shapes import prompts, vqa
from g2rpo.shapes.completion import Completer, TemplateCompleter, Verifier
from g2rpo.shapes.world import BACKGROUND, WorldObject, render

PAIRINGS = ("pairug", "aligned", "retrieved", "random", "unpaired")
ENCODERS = ("shapes_clip", "pixels")
PIXEL_DIMS = 128
PIXEL_SEED = 0  # the projection is part of the encoder: fixed, whatever the build's seed
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
STREAMS = {"understanding": 0, "generation": 1, "completion": 2, "pairing": 3}


@dataclass
class Item:
    """One item of U (``qa`` set, ``caption`` None) or G (``caption`` set, ``qa`` None), with its image."""

    scene: list[WorldObject]
    image: Tensor
    qa: dict | None = None
    caption: dict | None = None


@dataclass
class Pair:
    """A generation caption and an understanding (image, question, answer); indices point into the item pool."""

    caption: dict
    qa: dict
    und: int
    gen: int
    kind: str
    similarity: float | None


def understanding_items(count: int, rng: np.random.Generator) -> list[Item]:
    items = []
    for _ in range(count):
        scene = vqa.random_scene(rng)
        items.append(Item(scene, render(scene), qa=vqa.sample_question(scene, rng)))
    return items


def generation_items(count: int, rng: np.random.Generator) -> list[Item]:
    """``count`` training prompts, as even over the six tasks as the count allows, each with its own scene."""
    tasks = prompts.split("train")
    items = []
    for index, metadata in enumerate(tasks.values()):
        share = count // len(tasks) + (index < count % len(tasks))
        order = np.concatenate([rng.permutation(len(metadata)) for _ in range(-(-share // len(metadata)))])
        for i in order[:share]:
            scene = prompts.scene_for(metadata[i], rng)
            items.append(Item(scene, render(scene), caption=dict(metadata[i])))
    return items


def encode(images: Tensor, encoder: str) -> np.ndarray:
    """L2-normalised features ``[N, D]`` of ``[N, 3, 32, 32]`` images from a frozen encoder."""
    if encoder == "shapes_clip":
        from g2rpo.shapes.score import ShapesScore, embed_images

        return normalize(embed_images(ShapesScore().model, images).numpy())
    if encoder == "pixels":  # minus the background, which every image shares and would dominate the cosine
        background = torch.tensor(BACKGROUND, dtype=torch.float64)[:, None, None] / 255
        pixels = (images.double() - background).flatten(1).numpy()
        projection = np.random.default_rng(PIXEL_SEED).standard_normal((pixels.shape[1], PIXEL_DIMS))
        return normalize(pixels @ projection)
    raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    return {
        f"q{round(q * 100):02d}": round(float(v), 4)
        for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))
    }


def build_pairs(
    pairing: str,
    num_understanding: int,
    num_generation: int,
    k_clusters: int,
    top_n: int,
    threshold: float,
    encoder: str,
    completer: Completer | None,
    seed: int,
) -> tuple[list[Item], list[Pair], dict]:
    """The item pool (U then G), the pairs of the ``pairing`` variant, and the build's statistics."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    if num_understanding < 1 or num_generation < 1:
        raise ValueError(f"need at least one item per set, got {num_understanding=} and {num_generation=}")

    def stream(name: str) -> np.random.Generator:
        return np.random.default_rng([seed, STREAMS[name]])

    items = understanding_items(num_understanding, stream("understanding"))
    items += generation_items(num_generation, stream("generation"))
    features = encode(torch.stack([item.image for item in items]), encoder)
    und_pool, gen_pool = np.arange(num_understanding), np.arange(num_understanding, len(items))
    stats: dict = {"understanding_items": num_understanding, "generation_items": num_generation}
    rng = stream("pairing")

    def cosine(und: int, gen: int) -> float:
        return float(features[und] @ features[gen])

    if pairing == "unpaired":  # every item once at least: the larger set in full, the smaller cycled
        count = max(num_understanding, num_generation)
        unds = np.resize(und_pool, count)
        gens = np.resize(rng.permutation(gen_pool), count)
        pairs = [
            Pair(items[g].caption, items[u].qa, int(u), int(g), "unpaired", cosine(u, g))
            for u, g in zip(unds, gens)
        ]
        return items, pairs, stats

    chosen, _ = medoids(features, k_clusters, seed)
    stats["medoids"] = len(chosen)
    aligned: list[Pair] = []
    if pairing != "retrieved":
        aligned, stats["rejected"] = complete_medoids(
            items, chosen, num_understanding, completer or TemplateCompleter(), stream("completion")
        )
    rest = np.setdiff1d(np.arange(len(items)), chosen)
    rest_und, rest_gen = rest[rest < num_understanding], rest[rest >= num_understanding]
    retrieved: list[Pair] = []
    if pairing != "aligned":
        candidates = features[rest_gen] @ features[rest_und].T
        nearest = -np.sort(-candidates, axis=1)[:, :top_n]
        stats["candidate_similarity"] = _quantiles(nearest.reshape(-1))
        stats["candidates_above_threshold"] = (
            round(float(np.mean(nearest >= threshold)), 4) if nearest.size else None
        )
        for g, u, s in match_retrieved(features[rest_gen], features[rest_und], top_n, threshold):
            gen, und = int(rest_gen[g]), int(rest_und[u])
            retrieved.append(Pair(items[gen].caption, items[und].qa, und, gen, "retrieved", s))
    pairs = aligned + retrieved
    if pairing == "random":
        order = rng.permutation(len(pairs))
        pairs = [
            Pair(pairs[j].caption, p.qa, p.und, pairs[j].gen, "random", cosine(p.und, pairs[j].gen))
            for p, j in zip(pairs, order)
        ]
    return items, pairs, stats


def complete_medoids(
    items: list[Item],
    chosen: np.ndarray,
    num_understanding: int,
    completer: Completer,
    rng: np.random.Generator,
) -> tuple[list[Pair], dict[str, int]]:
    """Aligned pairs: each medoid completed into (I, C, Q, A) and verified; rejected ones dropped and counted."""
    verifier = Verifier()
    und = [int(i) for i in chosen if i < num_understanding]
    gen = [int(i) for i in chosen if i >= num_understanding]
    captions = completer.captions([(items[i].scene, items[i].qa) for i in und], rng)
    questions = completer.questions([(items[i].scene, items[i].caption) for i in gen], rng)
    accepted: dict[int, Pair] = {}
    rejected: Counter = Counter()
    for i, text in zip(und, captions):
        caption = verifier.caption(text, items[i].scene)
        if isinstance(caption, str):
            rejected[caption] += 1
        else:
            accepted[i] = Pair(caption, items[i].qa, i, i, "aligned", None)
    for i, completion in zip(gen, questions):
        qa = verifier.question(completion, items[i].scene)
        if isinstance(qa, str):
            rejected[qa] += 1
        else:
            accepted[i] = Pair(items[i].caption, qa, i, i, "aligned", None)
    return [accepted[i] for i in sorted(accepted)], dict(sorted(rejected.items()))


class PairDataset(PromptDataset):
    """PairUG pairs as a prompt dataset: ``prompts`` are the generation captions, ``metadata[i]`` the caption's
    GenEval metadata (what ``geneval_shapes`` reads) plus ``"pair"``: the understanding question, answer,
    ``qtype``, ``image_index`` into :attr:`images` (and the ``image`` itself, which the understanding rollout
    reads), ``kind`` and ``similarity``. The pair's weight is the algorithm's choice (``algo.weight_fn``).

    :attr:`images` ``[M, 3, 32, 32]`` in [0, 1] holds each understanding image once; :attr:`scenes` its ground
    truth; :attr:`stats` what the build counted (rejections, candidate similarities).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        metadata: Sequence[dict],
        images: Tensor,
        scenes: Sequence[list[WorldObject]],
        stats: dict | None = None,
    ) -> None:
        super().__init__(prompts=prompts, metadata=metadata)
        if images.ndim != 4 or len(images) != len(scenes):
            raise ValueError(
                f"images [M, 3, H, W] and one scene each; got {tuple(images.shape)}, {len(scenes)}"
            )
        self.images = images
        self.scenes = list(scenes)
        self.stats = dict(stats or {})

    @classmethod
    def build(
        cls,
        pairing: str = "pairug",
        num_understanding: int = 384,
        num_generation: int = 384,
        k_clusters: int = 96,
        top_n: int = 5,
        threshold: float = 0.6,
        encoder: str = "shapes_clip",
        completer: Completer | None = None,
        seed: int = 0,
    ) -> PairDataset:
        """Builds the ``pairing`` variant from scratch; the same arguments give the same dataset."""
        items, pairs, stats = build_pairs(
            pairing,
            num_understanding,
            num_generation,
            k_clusters,
            top_n,
            threshold,
            encoder,
            completer,
            seed,
        )
        if not pairs:
            raise ValueError(f"the {pairing} build made no pair; lower the threshold or add items")
        slots: dict[int, int] = {}
        for pair in pairs:
            slots.setdefault(pair.und, len(slots))
        metadata = []
        for pair in pairs:
            entry = {k: v for k, v in pair.caption.items() if k != "prompt"}
            entry["pair"] = {
                **{k: pair.qa[k] for k in ("question", "answer", "qtype")},
                "image_index": slots[pair.und],
                "kind": pair.kind,
                "similarity": pair.similarity,
                "image": items[pair.und].image,
            }
            metadata.append(entry)
        return cls(
            prompts=[pair.caption["prompt"] for pair in pairs],
            metadata=metadata,
            images=torch.stack([items[i].image for i in slots]),
            scenes=[items[i].scene for i in slots],
            stats=stats,
        )

    def summary(self) -> dict:
        """Counts by pair kind, rejections and similarity quantiles per kind."""
        pairs = [m["pair"] for m in self.metadata]
        similarity: dict[str, list[float]] = {}
        for pair in pairs:
            if pair["similarity"] is not None:
                similarity.setdefault(pair["kind"], []).append(pair["similarity"])
        return {
            "pairs": len(pairs),
            "kinds": dict(Counter(pair["kind"] for pair in pairs)),
            "images": len(self.images),
            **self.stats,
            "similarity": {kind: _quantiles(values) for kind, values in similarity.items()},
            "tags": dict(Counter(m["tag"] for m in self.metadata)),
            "qtypes": dict(Counter(pair["qtype"] for pair in pairs)),
        }

    def records(self) -> list[dict]:
        """One JSON-serialisable record per pair: the caption, its metadata and the image's ground truth."""
        return [
            {
                "prompt": prompt,
                **metadata,
                "pair": {k: v for k, v in metadata["pair"].items() if k != "image"},
                "objects": [dataclasses.asdict(o) for o in self.scenes[metadata["pair"]["image_index"]]],
            }
            for prompt, metadata in zip(self.prompts, self.metadata)
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSONL file of the pairs")
    defaults = {name: p.default for name, p in inspect.signature(PairDataset.build).parameters.items()}
    parser.add_argument("--pairing", default=defaults["pairing"], choices=PAIRINGS)
    parser.add_argument("--encoder", default=defaults["encoder"], choices=ENCODERS)
    for name in ("num_understanding", "num_generation", "k_clusters", "top_n", "threshold", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=type(defaults[name]), default=defaults[name])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dataset = PairDataset.build(**{k: v for k, v in vars(args).items() if k != "out"})
    seconds = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(record) + "\n" for record in dataset.records()))
    print(
        json.dumps({**dataset.summary(), "build_seconds": round(seconds, 2), "out": str(args.out)}, indent=2)
    )


if __name__ == "__main__":
    main()
