"""Evaluation suites on tiny models: pinned protocols, per-prompt noise, GenEval's layout read back as GenEval's
scorer reads it, the served GenEval's named scores, the preference table, OCR, token policies, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from g2rpo.data import PromptDataset
from g2rpo.evaluate import evaluate
from g2rpo.evaluation.evaluator import Evaluator, UnifiedEvaluator, items, panel_indices
from g2rpo.evaluation.layout import load_image, read_images
from g2rpo.evaluation.prompts import prompt_set
from g2rpo.evaluation.protocol import Protocol, image_seed
from g2rpo.preflight import PreflightError
from g2rpo.rewards.clip import AestheticMLP
from g2rpo.rewards.geneval import GenEval
from g2rpo.rewards.jpeg import JpegCompressibility
from g2rpo.rewards.remote import RemoteNamedReward, RemoteReward
from g2rpo.shapes.editing import EDIT_TYPES
from tests.conftest import CONF_DIR, make_policy
from tests.served_rewards import FakeGenEval, serving
from tests.test_reward_models import tiny_clip

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {
        "tag": "two_object",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
        "prompt": "a photo of a cat and a dog",
    },
]


def fake_geneval() -> GenEval:
    return FakeGenEval()


@pytest.fixture(scope="module")
def geneval_server(tmp_path_factory):
    """The fake GenEval served, for the tests of its named scores over HTTP."""
    with serving(
        "tests.served_rewards.FakeGenEval", output=tmp_path_factory.mktemp("geneval") / "server.log"
    ) as served:
        yield served


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def compose_evaluate(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_image_seeds_depend_on_the_prompt_text_the_image_and_the_suite_seed_only():
    seeds = {
        image_seed(0, "a cat", 0),
        image_seed(0, "a cat", 1),
        image_seed(0, "a dog", 0),
        image_seed(1, "a cat", 0),
    }
    assert len(seeds) == 4 and image_seed(0, "a cat", 0) == image_seed(0, "a cat", 0)
    assert all(0 <= seed < 2**63 for seed in seeds)  # torch.Generator.manual_seed takes them


def test_protocol_fails_early_naming_the_choices():
    common = dict(num_steps=4, guidance_scale=1.0, seed=0, temperature=1.0)
    with pytest.raises(ValueError, match="exactly one of images_per_prompt"):
        Protocol(images_per_prompt=4, images_per_task=4, noise="prompt", overall="tasks", **common)
    with pytest.raises(ValueError, match="choose one of prompt, set"):
        Protocol(images_per_prompt=4, images_per_task=None, noise="batch", overall="tasks", **common)
    with pytest.raises(ValueError, match="choose one of tasks, images"):
        Protocol(images_per_prompt=4, images_per_task=None, noise="prompt", overall="mean", **common)


def test_any_subset_of_a_suite_reproduces_its_images():
    """Noise from the prompt's text: an image is the same whether its prompt is evaluated alone, among others,
    in another order or in other batch sizes; ``k`` tells a prompt's images apart."""
    torch.manual_seed(0)
    policy = make_policy(lora=False).eval()
    prompts = ["a red cube", "a blue ball", "two cats"]
    reward = {"jpeg": JpegCompressibility()}
    full = Evaluator(PromptDataset(prompts), reward, num_steps=2, images_per_prompt=2, batch_size=4)(policy)
    alone = Evaluator(PromptDataset(prompts[2:]), reward, num_steps=2, images_per_prompt=2, batch_size=1)(
        policy
    )
    by_image = {(r["prompt"], r["k"]): r for r in full.images}
    for record in alone.images:
        assert record["seed"] == by_image[(record["prompt"], record["k"])]["seed"]
        assert record["jpeg"] == pytest.approx(by_image[(record["prompt"], record["k"])]["jpeg"], abs=1e-6)
    assert full.images[4]["jpeg"] != full.images[5]["jpeg"]  # two images of one prompt differ
    assert full.scores["jpeg"]["overall"] == pytest.approx(np.mean([r["jpeg"] for r in full.images]))


def test_items_and_the_panel():
    dataset = PromptDataset(["a", "b", "c", "d"], [{"tag": "x"}, {"tag": "x"}, {"tag": "y"}, {"tag": "y"}])
    protocol = Protocol(
        4,
        1.0,
        images_per_prompt=3,
        images_per_task=None,
        noise="prompt",
        seed=0,
        temperature=1.0,
        overall="tasks",
    )
    chosen = items(dataset, protocol)
    assert [(i.prompt, i.k) for i in chosen[:4]] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    # first images, round-robin over tasks: a (x), c (y), b (x), d (y)
    assert [chosen[i].prompt for i in panel_indices(chosen, 3)] == ["a", "c", "b"]
    cycled = items(dataset, Protocol(4, 1.0, None, 3, "prompt", 0, 1.0, "tasks"))
    assert [(i.prompt, i.k) for i in cycled] == [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("d", 0), ("c", 1)]


def test_a_pinned_resolution_is_sampled_whatever_the_training_resolution():
    """A transformer policy samples the protocol's resolution for the evaluation and keeps its own for
    training (G2RPO's FLUX: 720 px in training, 1024 in evaluation); a size it cannot sample fails early."""
    policy = instantiate(compose_evaluate("model=tiny_flux").model).eval()
    reward = {"jpeg": JpegCompressibility()}
    evaluator = Evaluator(PromptDataset(["a"]), reward, num_steps=2, images_per_prompt=1, resolution=32)
    evaluation = evaluator(policy)
    assert evaluation.protocol["resolution"] == 32 and policy.resolution == 16
    assert evaluation.panel[0][0].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="eval.resolution=33 must be a multiple of"):
        Evaluator(PromptDataset(["a"]), reward, images_per_prompt=1, resolution=33)(policy)
    janus = instantiate(compose_evaluate("model=tiny_janus").model).eval()
    with pytest.raises(ValueError, match="sampled 16 px images: set eval.resolution=null"):
        Evaluator(PromptDataset(["a"]), reward, images_per_prompt=1, resolution=32)(janus)


def test_geneval_suite_served_written_in_geneval_layout_and_read_back_as_its_scorer_does(
    tmp_path, geneval_server
):
    """eval=geneval end to end through the CLI: the tiny model's images scored by a served GenEval (fake
    detector) with both named scores, and written so that a walk of GenEval's ``evaluate_images.py`` finds every
    image with its metadata; re-scoring the files gives the recorded per-image verdicts."""
    metadata = write_jsonl(tmp_path / "geneval" / "evaluation_metadata.jsonl", GENEVAL_LINES)
    cfg = compose_evaluate(
        "model=tiny_sd3",
        "eval=geneval",
        f"eval.dataset.path={metadata}",
        f"eval.rewards.geneval.url={geneval_server.url}",
        "eval.num_steps=2",
        "eval.resolution=32",
        "eval.panel_size=2",
        f"output={tmp_path / 'out' / 'eval.json'}",
        "suite=geneval",
        f"run_dir={tmp_path / 'out'}",
    )
    evaluation = evaluate(cfg)
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["protocol"] == {
        "num_steps": 2, "guidance_scale": 4.5, "images_per_prompt": 4, "images_per_task": None,
        "noise": "prompt", "seed": 0, "temperature": None, "overall": "tasks", "resolution": 32,
        "sampler": "euler_ode",
    }  # fmt: skip
    assert record["num_images"] == 12 and set(record["scores"]) == {"geneval/accuracy", "geneval/partial"}
    accuracy = record["scores"]["geneval/accuracy"]
    assert set(accuracy) == {"single_object", "two_object", "overall"}
    assert accuracy["overall"] == pytest.approx((accuracy["single_object"] + accuracy["two_object"]) / 2)
    assert len(evaluation.panel) == 2
    found = read_images(tmp_path / "out" / "images")
    assert len(found) == 12 and sorted({p.parent.parent.name for _, p in found}) == [
        "00000",
        "00001",
        "00002",
    ]
    assert [m for m, _ in found[::4]] == GENEVAL_LINES
    assert [p.name for _, p in found[:4]] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    pixels = torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1) for _, p in found]).float() / 255
    rescored = fake_geneval().scores(pixels, [m["prompt"] for m, _ in found], [m for m, _ in found])[
        "accuracy"
    ]
    by_file = {(r["prompt"], r["k"]): r["geneval/accuracy"] for r in record["images"]}
    assert rescored.tolist() == [by_file[(m["prompt"], int(p.stem))] for m, p in found]


def test_named_scores_over_http(geneval_server):
    """(A reward without named scores: tests/test_remote_reward.py.)"""
    pixels = torch.rand(3, 3, 16, 16)
    prompts = [line["prompt"] for line in GENEVAL_LINES]
    named = RemoteNamedReward(geneval_server.url, batch_size=2).scores(pixels, prompts, GENEVAL_LINES)
    local = fake_geneval().scores(pixels, prompts, GENEVAL_LINES)
    assert named.keys() == local.keys()
    for key in named:
        torch.testing.assert_close(named[key], local[key])
    torch.testing.assert_close(
        RemoteNamedReward(geneval_server.url)(pixels, prompts, GENEVAL_LINES), local["partial"]
    )


def test_drawbench_suite_per_category_and_mean_over_images(tmp_path):
    """eval=drawbench: DrawBench's CSV (Prompts, Category), the preference models loaded from their configured
    local paths (tiny CLIPs here), one image per prompt, overall the mean over images."""
    csv = tmp_path / "drawbench.csv"
    csv.write_text("Prompts,Category\na red cube,Colors\ntwo cats,Counting\nthree dogs,Counting\n")
    model, processor = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    big, big_processor = tiny_clip(projection_dim=768)
    big.save_pretrained(tmp_path / "clip768")
    big_processor.save_pretrained(tmp_path / "clip768")
    torch.save(AestheticMLP().state_dict(), tmp_path / "head.pth")
    cfg = compose_evaluate(
        "model=tiny_sd3",
        "eval=drawbench",
        f"eval.dataset.path={csv}",
        f"eval.rewards.pickscore.path={tmp_path / 'clip'}",
        f"eval.rewards.pickscore.processor_path={tmp_path / 'clip'}",
        f"eval.rewards.clipscore.path={tmp_path / 'clip'}",
        f"eval.rewards.aesthetic.path={tmp_path / 'clip768'}",
        f"eval.rewards.aesthetic.head_path={tmp_path / 'head.pth'}",
        "~eval.rewards.hps",  # HPS-v2.1 and ImageReward load as their own tests show
        "~eval.rewards.imagereward",
        "eval.num_steps=2",
    )
    evaluator = instantiate(cfg.eval)
    evaluation = evaluator(make_policy(lora=False).eval())
    assert set(evaluation.scores) == {"pickscore", "clipscore", "aesthetic"}
    assert set(evaluation.scores["pickscore"]) == {"Colors", "Counting", "overall"}
    for column, scores in evaluation.scores.items():
        values = [r[column] for r in evaluation.images]
        assert scores["overall"] == pytest.approx(np.mean(values), abs=1e-6)  # images, not category means
        assert scores["Counting"] == pytest.approx(np.mean(values[1:]), abs=1e-6)


def test_every_suite_composes_with_its_protocol_pinned():
    for suite, steps, overall, resolution in [
        ("geneval", 40, "tasks", 512),
        ("drawbench", 40, "images", None),
        ("drawbench_served", 40, "images", None),
        ("ocr", 40, "images", 512),
        ("shapes", 20, "tasks", 32),
        ("pairuni", None, None, None),
    ]:
        if suite == "pairuni":  # Janus-Pro's GenEval sampling and the understanding benchmarks
            cfg = compose_evaluate(f"eval={suite}")
            generation = cfg.eval.generation
            assert (generation.guidance_scale, generation.temperature, generation.resolution) == (
                5.0,
                1.0,
                384,
            )
            assert set(cfg.eval.understanding.benchmarks) == {"mmmu", "mmstar", "pope"}
            continue
        cfg = compose_evaluate(f"eval={suite}")
        assert (cfg.eval.num_steps, cfg.eval.overall, cfg.eval.resolution) == (steps, overall, resolution), (
            suite
        )
    served = compose_evaluate("eval=drawbench_served").eval.rewards
    assert {"pickscore", "hps", "imagereward", "clipscore", "aesthetic", "unified_reward", "deqa"} == set(
        served
    )


def test_ocr_suite_scores_the_quoted_text(tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    prompts = tmp_path / "test.txt"
    prompts.write_text('A sign that says "OPEN"\nA mug with "hello" written on it\n')
    cfg = compose_evaluate(
        "model=tiny_sd3", "eval=ocr", f"eval.dataset.path={prompts}", "eval.num_steps=2", "eval.resolution=32"
    )
    evaluation = instantiate(cfg.eval)(make_policy(lora=False).eval())
    assert set(evaluation.scores) == {"ocr"} and evaluation.num_images == 2
    assert all(0.0 <= r["ocr"] <= 1.0 for r in evaluation.images)


def test_missing_prompt_file_says_where_to_get_it(tmp_path):
    absent = tmp_path / "absent.jsonl"
    cfg = compose_evaluate("eval=geneval", f"eval.dataset.path={absent}")
    with pytest.raises(Exception, match="no prompt file at") as error:  # Hydra wraps the FileNotFoundError
        instantiate(cfg.eval.dataset)
    assert f"geneval/main/prompts/evaluation_metadata.jsonl --create-dirs -o {absent}" in str(error.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,category\na,b\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: no column \['Prompts', 'Category'\]"):
        prompt_set(str(bad), source="", prompt_column="Prompts", task_column="Category")


def test_prompt_sets_read_suffixes_in_any_case_and_name_what_they_cannot_read(tmp_path):
    drawbench = tmp_path / "DrawBench.CSV"
    drawbench.write_text("\ufeffPrompts,Category\na red cube,Colors\n\ta,b\nno category\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"DrawBench.CSV:4: the row has no 'Category' cell; fix or delete that row"
    ):
        prompt_set(str(drawbench), source="", prompt_column="Prompts", task_column="Category")
    drawbench.write_text(
        "\ufeffPrompts,Category\na red cube,Colors\n", encoding="utf-8"
    )  # a spreadsheet's BOM
    dataset = prompt_set(str(drawbench), source="", prompt_column="Prompts", task_column="Category")
    assert dataset.prompts == ["a red cube"] and dataset.metadata == [{"tag": "Colors"}]
    geneval = tmp_path / "metadata.JSONL"
    geneval.write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n')
    assert prompt_set(str(geneval), source="").metadata == [{"tag": "single_object"}]
    listed = tmp_path / "prompts.yml"
    listed.write_text("- a cat\n")
    with pytest.raises(ValueError, match=r"unknown suffix '.yml'; use one of .txt, .jsonl, .json, .csv"):
        prompt_set(str(listed), source="")


def test_token_policies_sample_image_tokens_under_the_protocol():
    """Janus-Pro's images: CFG and temperature from the protocol, per-image generators from the prompt text."""
    cfg = compose_evaluate("model=tiny_janus")
    policy = instantiate(cfg.model).eval()
    evaluator = Evaluator(
        PromptDataset(["a cat", "a dog"]), {"jpeg": JpegCompressibility()},
        guidance_scale=5.0, images_per_prompt=2, resolution=16, batch_size=3,
    )  # fmt: skip
    first, second = evaluator(policy), evaluator(policy)
    assert first.protocol["sampler"] == "image_tokens(temperature=1.0)" and first.protocol["resolution"] == 16
    assert first.protocol["num_steps"] is None and first.protocol["temperature"] == 1.0
    assert [r["jpeg"] for r in first.images] == [r["jpeg"] for r in second.images]
    with pytest.raises(ValueError, match="token policies draw per image"):
        Evaluator(PromptDataset(["a"]), {"jpeg": JpegCompressibility()}, images_per_prompt=1, noise="set")(
            policy
        )


def test_the_served_reward_client_still_scores_unnamed(geneval_server):
    pixels = torch.rand(2, 3, 16, 16)
    prompts = [line["prompt"] for line in GENEVAL_LINES[:2]]
    scores = RemoteReward(geneval_server.url)(pixels, prompts, GENEVAL_LINES[:2])
    torch.testing.assert_close(scores, fake_geneval()(pixels, prompts, GENEVAL_LINES[:2]))


def test_unified_evaluation_adds_an_understanding_column_and_can_stand_alone():
    cfg = compose_evaluate("model=tiny_janus")
    policy = instantiate(cfg.model).eval()
    generation = Evaluator(
        PromptDataset(["a cat"]), {"jpeg": JpegCompressibility()}, images_per_prompt=1, resolution=16
    )
    understanding = lambda policy: {"mmmu": 0.25, "pope_f1": 0.75, "overall": 0.5}  # noqa: E731
    both = UnifiedEvaluator(generation, understanding, column="understanding")(policy)
    assert set(both.scores) == {"jpeg", "understanding"} and both.num_images == 1
    assert both.scores["understanding"] == {"mmmu": 0.25, "pope_f1": 0.75, "overall": 0.5}
    assert "mmmu" in both.table() and both.metrics()["eval/understanding/pope_f1"] == 0.75
    alone = UnifiedEvaluator(None, understanding, column="understanding")(policy)
    assert set(alone.scores) == {"understanding"} and alone.num_images == 0
    assert UnifiedEvaluator(generation, understanding).with_steps(3).generation.protocol.num_steps == 3
    assert generation.protocol.num_steps == 40  # with_steps copies, the run's evaluator is unchanged


def test_a_suites_reward_servers_are_asked_before_the_model_loads(monkeypatch):
    """eval=drawbench_served scores through a VLM server and a reward server; neither runs here."""
    monkeypatch.setattr("g2rpo.evaluate.instantiate", lambda *a, **k: pytest.fail("something was built"))
    with pytest.raises(PreflightError) as error:
        evaluate(compose_evaluate("eval=drawbench_served", "hydra.run.dir=unused"))
    assert "127.0.0.1:17140/v1/models" in str(error.value) and "127.0.0.1:18086/health" in str(error.value)


def test_the_editing_suite_reports_compliance_and_preservation_per_edit_type(tmp_path):
    """eval=edit_shapes through the CLI on the tiny Kontext: a column per judged term, a row per edit type, and
    the images written in GenEval's layout with each edit's metadata (its source scene among it)."""
    cfg = compose_evaluate(
        "model=tiny_flux_kontext",
        "eval=edit_shapes",
        "eval.dataset.per_type=2",
        "eval.images_per_task=2",
        "eval.num_steps=2",
        "eval.resolution=16",
        "eval.panel_size=2",
        f"output={tmp_path / 'eval.json'}",
        "suite=edit_shapes",
        f"run_dir={tmp_path}",
    )
    evaluate(cfg)
    record = json.loads((tmp_path / "eval.json").read_text())
    terms = {"compliance", "compliance_partial", "preservation", "unchanged", "overall"}
    assert set(record["scores"]) == {f"edit_shapes/{term}" for term in terms}
    assert set(record["scores"]["edit_shapes/preservation"]) == {*EDIT_TYPES, "overall"}
    assert record["num_images"] == 12
    images = read_images(str(tmp_path / "images"))
    assert len(images) == 12
    assert all("source" in meta and meta["tag"] == meta["edit"] in EDIT_TYPES for meta, _ in images)
