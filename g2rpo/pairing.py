"""PairUG's pairing algorithm (PairUni, arXiv 2510.25682v3, Algorithm 1) over plain feature arrays.

PairUni pairs an understanding item (image, question, answer) with a generation item (image, caption) so that
one GRPO step sees two semantically aligned tasks. Its builder has two parts, both over L2-normalised image
features of a frozen encoder:

1. **Aligned pairs.** MiniBatchKMeans with K clusters over the union of both sets; each cluster's member
   nearest its centroid (the medoid) is completed into a full quadruple (I, C, Q, A) and paired with itself.
2. **Retrieved pairs.** For each remaining generation item, its top-n understanding items by cosine
   similarity with similarity >= threshold (0.6 in the paper); candidate edges are then taken greedily,
   highest similarity first, each item at most once.

A pair's weight scales every advantage it produces (PairGRPO, Eq. 3-4): 1 for aligned pairs, a function of
the similarity for retrieved ones (``sqrt`` in the paper). Nothing here knows about images or text, so the
same code serves the shapes world and a real (ResNet/DINO features) build.
"""

from __future__ import annotations

import math

import numpy as np
from threadpoolctl import threadpool_limits

WEIGHT_FNS = ("none", "linear", "sqrt")
# aligned and retrieved pairs are PairUG's; random and unpaired ones are the ablation's unweighted baselines
PAIR_KINDS = ("aligned", "retrieved", "random", "unpaired")


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64), so that dot products are cosine similarities."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array [items, dims], got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a feature vector is all zeros: its cosine similarity is undefined")
    return features / norms


def medoids(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One representative per k-means cluster: ``(medoid indices, cluster label of every item)``.

    The centroid is the mean of a cluster's final members (the exact k-means centroid of the partition, not
    MiniBatchKMeans' running estimate), and the medoid is the member nearest it; empty clusters yield none.
    Indices are sorted, so the result does not depend on the arbitrary numbering of the clusters. Runs on one
    thread: on a few thousand points the BLAS and OpenMP pools fight over the cores (measured on a shared
    2-core machine: 0.2 s on one thread, 2.4 to 8 s on two), with the same labels either way.
    """
    features = normalize(features)
    if not 1 <= k <= len(features):
        raise ValueError(f"k_clusters must be in [1, {len(features)}] (the number of items), got {k}")
    # imported here: scikit-learn (and the pandas it loads) would cost every process's start-up 0.3 s
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=1024)
    with threadpool_limits(1):
        labels = kmeans.fit_predict(features)
    chosen = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        centroid = features[members].mean(axis=0)
        chosen.append(members[np.argmin(np.linalg.norm(features[members] - centroid, axis=1))])
    return np.sort(np.asarray(chosen, dtype=np.int64)), labels


def match_retrieved(
    gen_features: np.ndarray, und_features: np.ndarray, top_n: int, threshold: float
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of generation to understanding items: ``(gen, und, similarity)`` triples.

    Candidates are each generation item's ``top_n`` nearest understanding items with cosine similarity >=
    ``threshold``; edges are taken in decreasing similarity (ties by index, for determinism), skipping any
    whose items are already used. Greedy rather than an optimal assignment: it is what the paper does, and it
    gives every pair the best partner still available when its turn comes.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    gen, und = normalize(gen_features), normalize(und_features)
    if len(gen) == 0 or len(und) == 0:
        return []
    similarity = gen @ und.T
    n = min(top_n, und.shape[0])
    nearest = np.argpartition(-similarity, n - 1, axis=1)[:, :n]
    rows = np.repeat(np.arange(len(gen)), n)
    cols = nearest.reshape(-1)
    sims = similarity[rows, cols]
    keep = sims >= threshold
    rows, cols, sims = rows[keep], cols[keep], sims[keep]
    order = np.lexsort((cols, rows, -sims))
    used_gen, used_und, pairs = set(), set(), []
    for g, u, s in zip(rows[order].tolist(), cols[order].tolist(), sims[order].tolist()):
        if g not in used_gen and u not in used_und:
            used_gen.add(g)
            used_und.add(u)
            pairs.append((g, u, s))
    return pairs


def pair_weight(kind: str, similarity: float | None, weight_fn: str) -> float:
    """PairGRPO's weight of a pair (eq. 3): 1, s or sqrt(s) for a retrieved pair of similarity s; 1 for any
    other (aligned pairs are one image's own quadruple; random and unpaired ones are unweighted baselines)."""
    if weight_fn not in WEIGHT_FNS:
        raise ValueError(f"unknown weight_fn {weight_fn!r}; choose one of {', '.join(WEIGHT_FNS)}")
    if kind not in PAIR_KINDS:
        raise ValueError(f"unknown pair kind {kind!r}; choose one of {', '.join(PAIR_KINDS)}")
    if kind != "retrieved":
        return 1.0
    if similarity is None or not similarity >= 0:
        raise ValueError(f"a retrieved pair needs a similarity >= 0, got {similarity!r}")
    if weight_fn == "linear":
        return float(similarity)
    if weight_fn == "sqrt":
        return math.sqrt(similarity)
    return 1.0
