"""PairUG pairing (g2rpo.pairing) and the shapes-world builder (g2rpo.shapes.pairug): pair weights, greedy
one-to-one matching above the threshold, medoids, completions that are true of their scenes, the ablation
variants, determinism, and the OpenAI-compatible completer against a fake server on loopback."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.optimize import linear_sum_assignment

from g2rpo.pairing import match_retrieved, medoids, normalize, pair_weight
from g2rpo.rewards.chat import ChatClient
from g2rpo.shapes import pairug, vqa
from g2rpo.shapes.completion import OpenAICompleter, Verifier
from g2rpo.shapes.geneval import holds
from g2rpo.shapes.pairug import PairDataset, build_pairs
from g2rpo.shapes.world import SHAPES, WorldObject

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "data" / "shapes_pairs.yaml"
# Small and on the pixel encoder, so that a build takes well under a second; the threshold suits its cosines.
SMALL = dict(num_understanding=96, num_generation=96, k_clusters=24, top_n=5, threshold=0.5, encoder="pixels")


def _build(**kwargs: Any) -> PairDataset:
    return PairDataset.build(**{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def pairs() -> PairDataset:
    return _build()


# --- the generic algorithm -------------------------------------------------------------------------------


def test_pair_weights_follow_the_weight_fn():
    for fn in ("none", "linear", "sqrt"):
        assert pair_weight("aligned", None, fn) == 1.0
    assert pair_weight("retrieved", 0.64, "none") == 1.0
    assert pair_weight("retrieved", 0.64, "linear") == pytest.approx(0.64)
    assert pair_weight("retrieved", 0.64, "sqrt") == pytest.approx(0.8)
    with pytest.raises(ValueError, match="none, linear, sqrt"):
        pair_weight("retrieved", 0.64, "square")
    with pytest.raises(ValueError, match="aligned, retrieved"):
        pair_weight("shuffled", 0.64, "sqrt")
    with pytest.raises(ValueError, match="similarity"):
        pair_weight("retrieved", None, "sqrt")


def test_matching_is_one_to_one_above_the_threshold_among_the_top_n():
    rng = np.random.default_rng(0)
    gen, und = rng.standard_normal((60, 8)), rng.standard_normal((40, 8))
    top_n, threshold = 3, 0.3
    matches = match_retrieved(gen, und, top_n, threshold)
    assert matches
    gens, unds, sims = zip(*matches)
    assert len(set(gens)) == len(gens) and len(set(unds)) == len(unds)
    assert min(sims) >= threshold
    similarity = normalize(gen) @ normalize(und).T
    for g, u, s in matches:
        assert s == pytest.approx(similarity[g, u])
        assert u in np.argsort(-similarity[g])[:top_n]
    assert list(sims) == sorted(sims, reverse=True)  # greedy: taken in decreasing similarity


def test_greedy_takes_the_best_edge_first_where_an_optimal_assignment_would_not():
    # cos(gen i, und j) = target[i, j]: und items are basis vectors, gen items have a third, unmatched axis
    target = np.array([[0.7, 0.6], [0.65, 0.1]])
    und = np.eye(3)[:2]
    gen = np.column_stack([target, np.sqrt(1 - (target**2).sum(axis=1))])
    assert match_retrieved(gen, und, top_n=2, threshold=0.5) == [(0, 0, pytest.approx(0.7))]
    rows, cols = linear_sum_assignment(np.where(target >= 0.5, target, -10.0), maximize=True)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]  # two pairs, the greedy one lost
    assert match_retrieved(gen, und, top_n=2, threshold=0.0) == [
        (0, 0, pytest.approx(0.7)),
        (1, 1, pytest.approx(0.1)),
    ]


def test_medoids_are_the_members_nearest_their_cluster_centroid():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((5, 16)) * 3
    features = np.concatenate([c + rng.standard_normal((30, 16)) for c in centres])
    chosen, labels = medoids(features, k=5, seed=0)
    unit = normalize(features)
    assert len(chosen) == len(np.unique(labels)) == 5
    assert list(chosen) == sorted(set(chosen.tolist()))
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        (medoid,) = set(chosen.tolist()) & set(members.tolist())
        distance = np.linalg.norm(unit[members] - unit[members].mean(axis=0), axis=1)
        assert medoid == members[np.argmin(distance)]


# --- the shapes-world builder ----------------------------------------------------------------------------


def test_every_answer_is_true_of_its_image(pairs):
    assert pairs.images.shape == (len(pairs.scenes), 3, 32, 32)
    assert pairs.images.min() >= 0.0 and pairs.images.max() <= 1.0
    for meta in pairs.metadata:
        pair = meta["pair"]
        truth = {
            q["question"]: q for qs in vqa.questions(pairs.scenes[pair["image_index"]]).values() for q in qs
        }
        assert truth[pair["question"]]["answer"] == pair["answer"]
        assert truth[pair["question"]]["qtype"] == pair["qtype"]


def test_aligned_captions_hold_on_the_scene_they_were_completed_from(pairs):
    aligned = [(p, m) for p, m in zip(pairs.prompts, pairs.metadata) if m["pair"]["kind"] == "aligned"]
    assert aligned
    for prompt, meta in aligned:
        assert holds(pairs.scenes[meta["pair"]["image_index"]], {**meta, "prompt": prompt})


def test_pairug_kinds_and_metadata(pairs):
    kinds = Counter(m["pair"]["kind"] for m in pairs.metadata)
    assert set(kinds) == {"aligned", "retrieved"} and kinds["retrieved"] > kinds["aligned"]
    for meta in pairs.metadata:
        pair = meta["pair"]
        assert meta["tag"] in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
        assert meta["include"]
        assert torch.equal(pair["image"], pairs.images[pair["image_index"]])
        if pair["kind"] == "aligned":
            assert pair["similarity"] is None
        else:
            assert pair["similarity"] >= SMALL["threshold"]
    summary = pairs.summary()
    assert summary["kinds"] == dict(kinds) and summary["pairs"] == len(pairs)
    assert summary["medoids"] == kinds["aligned"] + sum(summary["rejected"].values())


def test_aligned_only_is_pairugs_aligned_part(pairs):
    aligned = _build(pairing="aligned")
    assert {m["pair"]["kind"] for m in aligned.metadata} == {"aligned"}
    expected = [p for p, m in zip(pairs.prompts, pairs.metadata) if m["pair"]["kind"] == "aligned"]
    assert aligned.prompts == expected


def test_retrieved_only_is_pairugs_retrieved_part(pairs):
    retrieved = _build(pairing="retrieved")
    assert {m["pair"]["kind"] for m in retrieved.metadata} == {"retrieved"}
    expected = [p for p, m in zip(pairs.prompts, pairs.metadata) if m["pair"]["kind"] == "retrieved"]
    assert retrieved.prompts == expected


def test_random_pairing_keeps_pairugs_items_and_reshuffles_them():
    args = (96, 96, 24, 5, 0.5, "pixels", None, 0)
    _, paired, _ = build_pairs("pairug", *args)
    _, shuffled, _ = build_pairs("random", *args)
    assert sorted(p.und for p in shuffled) == sorted(p.und for p in paired)
    assert sorted(p.gen for p in shuffled) == sorted(p.gen for p in paired)
    assert [(p.und, p.gen) for p in shuffled] != [(p.und, p.gen) for p in paired]
    assert {p.kind for p in shuffled} == {"random"}
    assert sorted(_build(pairing="random").prompts) == sorted(_build().prompts)


def test_unpaired_covers_every_item_once_at_least():
    items, pairs, _ = build_pairs("unpaired", 50, 70, 10, 5, 0.5, "pixels", None, 0)
    assert len(pairs) == 70
    assert {p.und for p in pairs} == set(range(50)) and {p.gen for p in pairs} == set(range(50, 120))
    assert all(items[p.und].qa is p.qa and items[p.gen].caption is p.caption for p in pairs)
    assert {p.kind for p in pairs} == {"unpaired"}


def test_a_build_is_determined_by_its_seed(pairs):
    again = _build()
    assert again.prompts == pairs.prompts and again.records() == pairs.records()
    assert torch.equal(again.images, pairs.images)
    assert _build(seed=1).prompts != pairs.prompts


def test_invalid_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="pairug, aligned, retrieved, random, unpaired"):
        _build(pairing="mixed")
    with pytest.raises(ValueError, match="shapes_clip, pixels"):
        _build(encoder="resnet")


def test_the_hydra_config_builds_on_the_shapes_clip_encoder():
    cfg = OmegaConf.load(CONFIG)
    cfg.num_understanding, cfg.num_generation, cfg.k_clusters = 48, 48, 12
    dataset = instantiate(cfg)
    assert isinstance(dataset, PairDataset) and len(dataset) > 12
    retrieved = [m["pair"]["similarity"] for m in dataset.metadata if m["pair"]["kind"] == "retrieved"]
    assert retrieved and min(retrieved) >= cfg.threshold and max(retrieved) <= 1 + 1e-6


def test_the_cli_writes_one_record_per_pair(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    pairug.main(
        [
            "--out",
            str(out),
            "--encoder",
            "pixels",
            "--num-understanding",
            "48",
            "--num-generation",
            "48",
            "--k-clusters",
            "12",
            "--threshold",
            "0.5",
        ]
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(capsys.readouterr().out)
    assert len(records) == summary["pairs"] > 0
    assert {"prompt", "tag", "include", "pair", "objects"} <= set(records[0])


# --- verification and the OpenAI-compatible completer ----------------------------------------------------

SCENE = [WorldObject("square", "red", 8.0, 16.0, 8.0), WorldObject("circle", "green", 24.0, 16.0, 8.0)]


def test_the_verifier_accepts_only_what_is_true_of_the_scene():
    verifier = Verifier()
    assert verifier.caption("A photo of a red square.", SCENE)["tag"] == "colors"
    assert verifier.caption("a photo of a square left of a circle", SCENE)["tag"] == "position"
    assert verifier.caption("a photo of a blue circle", SCENE) == "caption_false"
    assert verifier.caption("a photo of a dragon", SCENE) == "caption_unknown"
    assert verifier.caption("a photo of a green circle", SCENE) == "caption_heldout"  # true, but held out
    assert verifier.caption(None, SCENE) == "unparsable"
    assert verifier.question(("How many circles are there?", "One"), SCENE)["answer"] == "one"
    assert verifier.question(("how many circles are there", "two"), SCENE) == "answer_wrong"
    assert verifier.question(("what colour is the triangle", "red"), SCENE) == "question_unknown"


OBJECT_LINE = re.compile(r"^- (\w+) (\w+), centre", re.MULTILINE)
KEY, MODEL = "test-key", "completer-model"


class FakeCompletionServer(ThreadingHTTPServer):
    """Answers chat completions from the object list in the prompt: ``truthful`` (a caption naming the first
    object's shape; the count of the first object's shape), ``lying`` (an absent shape, or a count off by
    one), or ``garbled`` (no JSON at all)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "truthful"
        self.lock = threading.Lock()
        self.payloads: list[dict[str, Any]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeCompletionServer

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {KEY}" or self.path != "/v1/chat/completions":
            self._send(401, {"error": {"message": "bad key or route"}})
            return
        with self.server.lock:
            self.server.payloads.append(payload)
        (message,) = payload["messages"]
        text = message["content"]
        objects = OBJECT_LINE.findall(text)  # [(colour, shape), ...]
        shapes = [shape for _, shape in objects]
        lying = self.server.mode == "lying"
        if 'Reply with JSON only: {"caption"' in text:
            absent = [s for s in SHAPES if s not in shapes]
            shape = (absent[0] if absent else "dragon") if lying else shapes[0]
            answer: dict[str, str] = {
                "caption": f"A photo of {'an' if shape[0] in 'aeiou' else 'a'} {shape}."
            }
        else:
            count = (shapes.count(shapes[0]) + (1 if lying else 0)) % len(vqa.COUNT_WORDS)
            answer = {
                "question": f"How many {shapes[0]}s are there?",
                "answer": vqa.COUNT_WORDS[count].title(),
            }
        content = (
            "Sure.\n```json\n" + json.dumps(answer) + "\n```" if self.server.mode != "garbled" else "Sorry."
        )
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeCompletionServer]:
    httpd = FakeCompletionServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    thread.join()
    httpd.server_close()


# the completer's client as in conf/data/shapes_pairs.yaml; 16 requests in flight overflow the fake server's
# listen queue (connection resets)
COMPLETER_CHAT = {"max_tokens": 256, "max_concurrency": 8, "what": "completion server"}


def _completer_config(server: FakeCompletionServer) -> dict[str, Any]:
    return {
        "_target_": "g2rpo.shapes.completion.OpenAICompleter",
        "chat": {
            "_target_": "g2rpo.rewards.chat.ChatClient",
            "base_url": server.base_url,
            "model": MODEL,
            "api_key": KEY,
            "max_retries": 0,
            **COMPLETER_CHAT,
        },
    }


def test_truthful_completions_pass_the_verifier(server):
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), SMALL, {"completer": _completer_config(server)})
    dataset = instantiate(cfg)
    summary = dataset.summary()
    assert summary["rejected"] == {}
    assert summary["kinds"]["aligned"] == summary["medoids"] == len(server.payloads)
    assert {p["model"] for p in server.payloads} == {MODEL}
    assert all("Objects in a 32x32 image" in p["messages"][0]["content"] for p in server.payloads)
    for prompt, meta in zip(dataset.prompts, dataset.metadata):
        if meta["pair"]["kind"] == "aligned":
            assert holds(dataset.scenes[meta["pair"]["image_index"]], {**meta, "prompt": prompt})


def test_false_completions_are_rejected_and_counted(server):
    server.mode = "lying"
    completer = OpenAICompleter(
        ChatClient(server.base_url, MODEL, api_key=KEY, max_retries=0, **COMPLETER_CHAT)
    )
    dataset = _build(completer=completer)
    summary = dataset.summary()
    assert "aligned" not in summary["kinds"]
    assert summary["rejected"]["answer_wrong"] > 0
    assert summary["rejected"].get("caption_false", 0) + summary["rejected"].get("caption_unknown", 0) > 0
    assert sum(summary["rejected"].values()) == summary["medoids"]


def test_answers_without_json_are_rejected_as_unparsable(server):
    server.mode = "garbled"
    dataset = _build(
        completer=OpenAICompleter(
            ChatClient(server.base_url, MODEL, api_key=KEY, max_retries=0, **COMPLETER_CHAT)
        )
    )
    assert dataset.summary()["rejected"] == {"unparsable": dataset.summary()["medoids"]}
