"""The understanding benchmarks (MMMU, MMStar, POPE): their readers on tiny parquet files in the official
layouts, the answer parsing and scoring on hand-made replies, and greedy, deterministic evaluations of the
shapes world's unified policy and of a tiny Janus."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from g2rpo.evaluation.understanding import (
    Benchmark,
    Question,
    UnderstandingBenchmarks,
    letterbox,
    mmmu,
    mmmu_correct,
    mmstar,
    mmstar_options,
    open_correct,
    parse_choice,
    pope,
    pope_answer,
    score_mmmu,
    score_mmstar,
    score_pope,
)
from g2rpo.policies.janus import JanusPolicy
from g2rpo.policies.tiny import tiny_janus
from g2rpo.shapes.policy import UnifiedPolicy
from g2rpo.shapes.unified import unified_model


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' matrices are too small to split over threads (see test_janus.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Streaming parquet leaves a lock file in the datasets cache: keep it in the test's folder."""
    try:
        import datasets
    except ModuleNotFoundError:
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_parquet(path: Path, rows: dict, images: list[str]) -> None:
    """A parquet file as the Hub's repositories hold them (written by ``datasets``, image columns typed)."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            column: datasets.Image() if column in images else datasets.Value("string")
            for column in rows
            if column != "index"
        }
        | ({"index": datasets.Value("int64")} if "index" in rows else {})
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


MMMU_IMAGES = [f"image_{i}" for i in range(1, 8)]


def mmmu_rows(subject: str, split: str, questions: list[dict]) -> dict:
    rows = {
        "id": [f"{split}_{subject}_{i + 1}" for i in range(len(questions))],
        "question": [q["question"] for q in questions],
        "options": [q["options"] for q in questions],
        "answer": [q["answer"] for q in questions],
        "question_type": [q["type"] for q in questions],
        "subfield": ["x"] * len(questions),
        "explanation": [""] * len(questions),
    }
    for k, column in enumerate(MMMU_IMAGES):
        rows[column] = [q["images"][k] if k < len(q["images"]) else None for q in questions]
    return rows


def write_benchmarks(root: Path) -> dict[str, Path]:
    """Tiny MMMU (two subjects, a dev split beside validation), MMStar and POPE (two shards) copies."""
    mmmu_root, mmstar_root, pope_root = root / "MMMU", root / "MMStar", root / "POPE"
    accounting = [
        {
            "question": "how many circles <image 1>",
            "options": "['1', '2', '3']",
            "answer": "B",
            "type": "multiple-choice",
            "images": [picture(12, 20, 0)],
        },
        {
            "question": "what colour is the square",
            "options": "[]",
            "answer": "red",
            "type": "open",
            "images": [picture(8, 8, 1), picture(6, 9, 2)],
        },
    ]
    art = [
        {
            "question": "which shape",
            "options": "['circle', 'square']",
            "answer": "A",
            "type": "multiple-choice",
            "images": [picture(10, 10, 3)],
        }
    ]
    write_parquet(
        mmmu_root / "Accounting/validation-00000-of-00001.parquet",
        mmmu_rows("Accounting", "validation", accounting),
        MMMU_IMAGES,
    )
    write_parquet(
        mmmu_root / "Accounting/dev-00000-of-00001.parquet", mmmu_rows("Accounting", "dev", art), MMMU_IMAGES
    )
    write_parquet(
        mmmu_root / "Art/validation-00000-of-00001.parquet", mmmu_rows("Art", "validation", art), MMMU_IMAGES
    )
    write_parquet(
        mmstar_root / "mmstar.parquet",
        {
            "index": [0, 1, 2],
            "question": [
                "Which shape is red?\nOptions: A: circle, B: square, C: triangle, D: none",
                "Is there a circle? Please answer yes or no.\nOptions: A: yes, B: no",
                "How many?\nOptions: A: 1, B: 2, C: 3, D: 4",
            ],
            "image": [picture(16, 16, 4), picture(9, 5, 5), picture(7, 7, 6)],
            "answer": ["A", "B", "C"],
            "category": ["coarse perception", "coarse perception", "math"],
            "l2_category": ["a", "a", "b"],
        },
        ["image"],
    )
    for shard, categories in enumerate([["adversarial", "adversarial"], ["random", "popular"]]):
        write_parquet(
            pope_root / f"data/test-0000{shard}-of-00002.parquet",
            {
                "id": [f"{shard}{i}" for i in range(2)],
                "question_id": [f"q{shard}{i}" for i in range(2)],
                "question": ["Is there a circle in the image?", "Is there a square in the image? "],
                "answer": ["yes", "No"],
                "image_source": ["coco", "coco"],
                "image": [picture(10, 14, 7 + shard), picture(14, 10, 9 + shard)],
                "category": categories,
            },
            ["image"],
        )
    return {"mmmu": mmmu_root, "mmstar": mmstar_root, "pope": pope_root}


# ---- readers -------------------------------------------------------------------------------------------------


def test_mmmu_reads_the_official_layout_with_lettered_options(tmp_path):
    roots = write_benchmarks(tmp_path)
    questions = list(mmmu(roots["mmmu"]))
    assert [q.id for q in questions] == [
        "validation_Accounting_1",
        "validation_Accounting_2",
        "validation_Art_1",
    ]
    choice, open_, art = questions
    assert choice.prompt == (
        "how many circles <image 1>\nA. 1\nB. 2\nC. 3\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert choice.options == ("1", "2", "3") and choice.answer == "B" and choice.kind == "multiple-choice"
    assert open_.prompt == "what colour is the square\n\nAnswer the question using a single word or phrase."
    assert open_.kind == "open" and open_.options == () and open_.answer == "red"
    expected = torch.from_numpy(np.asarray(picture(12, 20, 0), dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(choice.image, expected)  # [3, H, W] in [0, 1], the stored pixels
    assert (choice.num_images, open_.num_images) == (1, 2)  # asked with its first image, and marked
    assert open_.image.shape == (3, 8, 8)
    assert (choice.category, art.category, art.benchmark) == ("Accounting", "Art", "mmmu")
    assert [q.id for q in mmmu(roots["mmmu"], split="dev")] == ["dev_Accounting_1"]
    assert [q.id for q in mmmu(roots["mmmu"], subjects=["Art"])] == ["validation_Art_1"]
    assert [q.id for q in mmmu(roots["mmmu"], limit=1)] == ["validation_Accounting_1", "validation_Art_1"]
    benchmark = mmmu(roots["mmmu"])
    assert len(list(benchmark)) == len(list(benchmark)) == 3  # read anew on every pass


def test_mmstar_and_pope_read_the_official_layouts(tmp_path):
    roots = write_benchmarks(tmp_path)
    stars = list(mmstar(roots["mmstar"]))
    assert stars[0].prompt == (
        "Which shape is red?\nOptions: A: circle, B: square, C: triangle, D: none\n"
        "Answer with the option's letter from the given choices directly"
    )
    assert stars[0].options == ("circle", "square", "triangle", "none")
    assert "Please answer yes or no." not in stars[1].prompt  # as lmms-eval drops it
    assert [q.category for q in stars] == ["coarse perception", "coarse perception", "math"]
    assert stars[1].image.shape == (3, 9, 5) and stars[2].answer == "C"
    assert [q.id for q in mmstar(roots["mmstar"], limit=1)] == ["0", "2"]  # per category

    questions = list(pope(roots["pope"]))
    assert [q.id for q in questions] == ["q00", "q01", "q10", "q11"]  # shards in order
    assert questions[1].prompt == (
        "Is there a square in the image?\nAnswer the question using a single word or phrase."
    )
    assert [q.answer for q in questions] == ["yes", "no", "yes", "no"] and questions[0].kind == "yes/no"
    assert [q.category for q in questions] == ["adversarial", "adversarial", "random", "popular"]
    assert [q.id for q in pope(roots["pope"], limit=1)] == ["q00", "q10", "q11"]


def test_missing_files_name_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hf download MMMU/MMMU --repo-type dataset --local-dir"):
        mmmu(tmp_path / "MMMU")
    with pytest.raises(FileNotFoundError, match=r"--include '\*/validation-\*'"):
        mmmu(tmp_path / "MMMU")
    (tmp_path / "MMMU/Art").mkdir(parents=True)
    (tmp_path / "MMMU/Art/validation-00000-of-00001.parquet").touch()
    with pytest.raises(FileNotFoundError, match="subject folder\\(s\\) Math"):
        mmmu(tmp_path / "MMMU", subjects=["Art", "Math"])
    with pytest.raises(FileNotFoundError, match="hf download Lin-Chen/MMStar --repo-type dataset"):
        mmstar(tmp_path / "MMStar")
    with pytest.raises(FileNotFoundError, match="hf download lmms-lab/POPE --repo-type dataset"):
        pope(tmp_path / "POPE")


def test_the_config_node_reads_g2rpo_data(tmp_path, monkeypatch):
    node = OmegaConf.load(CONF_DIR / "eval_understanding/pairuni.yaml")
    monkeypatch.setenv("G2RPO_DATA", str(tmp_path))
    with pytest.raises(
        Exception, match=f"hf download MMMU/MMMU --repo-type dataset --local-dir {tmp_path}/MMMU"
    ):
        instantiate(node)


def test_the_config_node_instantiates_on_local_copies(tmp_path, monkeypatch):
    write_benchmarks(tmp_path)
    monkeypatch.setenv("G2RPO_DATA", str(tmp_path))
    evaluation = instantiate(OmegaConf.load(CONF_DIR / "eval_understanding/pairuni.yaml"), image_size=32)
    assert isinstance(evaluation, UnderstandingBenchmarks) and list(evaluation.benchmarks) == [
        "mmmu",
        "mmstar",
        "pope",
    ]
    results = evaluation(shapes_policy())
    assert {"mmmu", "mmstar", "pope_f1", "overall", "mmmu/Business", "pope/popular/f1"} <= set(results)


# ---- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("The answer is (B).", "B"),
        ("B", "B"),
        ("C. blue", "C"),
        ("(A) first, but on reflection (D)", "D"),  # the last named wins
        ("I would say that the colour here is blue", "B"),  # a long reply quoting an option's text
        ("blue", None),  # a short one does not
        ("<think>A or C?</think><answer>C</answer>", "C"),
        ("", None),
        ("E", None),  # not an option
    ],
)
def test_the_option_letter_is_read_from_free_text(reply, letter):
    assert parse_choice(reply, ["red", "blue", "green", "yellow"]) == letter


@pytest.mark.parametrize(
    ("reply", "gold", "correct"),
    [
        ("The answer is 3,000.", "3000", True),  # numbers: commas dropped
        ("x = 2.50", "2.5", True),  # rounded to 2 decimals, "=" on the last line
        ("It is Blue.", "blue", True),  # lower-cased, the tail after "is "
        ("so the result is 12", "13", False),
        ("the answer is a", "A", True),  # one character: matched as a word only
        ("banana", "a", False),
        ("approximately 3.43", "['24/7', '3.429']", True),  # a list of accepted answers
    ],
)
def test_mmmu_open_answers_are_normalised_as_mmmu_does(reply, gold, correct):
    assert open_correct(reply, gold) is correct


def test_mmstar_options_are_split_from_the_question():
    assert mmstar_options("Which?\nOptions: A: a cat, B: two dogs, C: 3, D: none") == (
        "a cat",
        "two dogs",
        "3",
        "none",
    )
    assert mmstar_options("Which one has no options listed?") == ()


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("Not at all", "no"),
        ("There is no dog.", "no"),
        ("", "yes"),
        ("yes. no", "yes"),
    ],
)
def test_pope_replies_are_no_when_their_first_sentence_says_so(reply, answer):
    assert pope_answer(reply) == answer


# ---- scoring -------------------------------------------------------------------------------------------------


def question(
    benchmark="pope", answer="yes", category="adversarial", kind="yes/no", options=(), id_="0", image=None
):
    return Question(benchmark, id_, "q", answer, tuple(options), category, kind, image)


def test_pope_metrics_on_hand_made_predictions():
    golds = ["yes", "yes", "no", "no", "yes", "yes", "no", "no"]
    categories = ["adversarial"] * 4 + ["random"] * 4
    replies = ["Yes", "yes, there is", "Yes", "no", "No.", "There is not a dog", "No, there isn't", "No"]
    questions = [question(answer=a, category=c) for a, c in zip(golds, categories)]
    scores = score_pope(replies, questions)
    # predicted yes, yes, yes, no | no, no, no, no: TP 2, FP 1, FN 2, TN 3
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(4 / 7) and scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["yes_ratio"] == pytest.approx(3 / 8)
    adversarial = {k.split("/")[1]: v for k, v in scores.items() if k.startswith("adversarial/")}
    assert adversarial == pytest.approx(
        {"f1": 0.8, "accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "yes_ratio": 0.75}
    )
    assert scores["random/f1"] == 0 and scores["random/precision"] == 0 and scores["random/accuracy"] == 0.5


def test_mmmu_and_mmstar_scores_per_category():
    options = ("1", "2", "3", "4")
    mmmu_questions = [
        question("mmmu", "B", "Accounting", "multiple-choice", options, "validation_Accounting_1"),
        question("mmmu", "red", "Art", "open", (), "validation_Art_1"),
        question("mmmu", "C", "Art", "multiple-choice", options, "validation_Art_2"),
    ]
    scores = score_mmmu(["(B)", "it is red", "no idea"], mmmu_questions)
    # a reply naming no option gets MMMU's guess, drawn from a stream seeded by the question's id
    guess = random.Random("validation_Art_2").choice("ABCD") == "C"
    assert scores == pytest.approx(
        {"accuracy": (2 + guess) / 3, "Business": 1.0, "Art and Design": (1 + guess) / 2}
    )
    assert mmmu_correct("no idea", mmmu_questions[2]) is guess  # the same guess every time
    stars = [
        question("mmstar", "A", "math", "multiple-choice", options),
        question("mmstar", "B", "math", "multiple-choice", options),
        question("mmstar", "C", "coarse perception", "multiple-choice", options),
    ]
    assert score_mmstar(["A", "no idea", "The answer is C."], stars) == pytest.approx(
        {"accuracy": 2 / 3, "coarse perception": 1.0, "math": 0.5}
    )


def test_letterbox_keeps_the_aspect_ratio_on_grey():
    image = torch.rand(3, 4, 8)
    boxed = letterbox(image, 16)
    assert boxed.shape == (3, 16, 16)
    assert (boxed[:, :4] == 0.5).all() and (boxed[:, 12:] == 0.5).all()  # 8 rows of content, centred
    assert not (boxed[:, 4:12] == 0.5).all()
    assert torch.equal(letterbox(boxed, 16), boxed)


# ---- evaluation ----------------------------------------------------------------------------------------------


def shapes_policy() -> UnifiedPolicy:
    return UnifiedPolicy(
        unified_model(seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    )


def in_memory(size: int) -> dict[str, Benchmark]:
    """A few questions of each kind, with images of several shapes, as the readers make them."""
    generator = torch.Generator().manual_seed(0)
    image = lambda h, w: torch.rand(3, h, w, generator=generator)  # noqa: E731
    mmmu_questions = [
        Question("mmmu", "validation_Art_1", "what shape\nA. circle\nB. square\n\nAnswer with the option's letter "
                 "from the given choices directly.", "A", ("circle", "square"), "Art", "multiple-choice", image(size, 2 * size)),
        Question("mmmu", "validation_Math_1", "how many\n\nAnswer the question using a single word or phrase.",
                 "3", (), "Math", "open", image(size, size), 2),
    ]  # fmt: skip
    stars = [
        Question("mmstar", "0", "which colour\nOptions: A: red, B: blue", "B", ("red", "blue"), "math",
                 "multiple-choice", image(2 * size, size)),
    ]  # fmt: skip
    popes = [
        Question("pope", str(i), "is there a circle", answer, (), category, "yes/no", image(size + i, size))
        for i, (answer, category) in enumerate(
            [("yes", "adversarial"), ("no", "adversarial"), ("no", "random")]
        )
    ]
    return {
        "mmmu": Benchmark(lambda: iter(mmmu_questions), score_mmmu),
        "mmstar": Benchmark(lambda: iter(stars), score_mmstar),
        "pope": Benchmark(lambda: iter(popes), score_pope, headline="f1"),
    }


def check_evaluation(policy, image_size: int, max_new_tokens: int) -> None:
    evaluation = UnderstandingBenchmarks(in_memory(image_size), batch_size=2, max_new_tokens=max_new_tokens,
                                         image_size=image_size)  # fmt: skip
    policy.nfe = 7
    first, second = evaluation(policy), evaluation(policy)
    assert first == second  # greedy: the same replies, so the same scores
    assert policy.nfe == 7  # evaluation cost is not training cost
    assert {"mmmu", "mmstar", "pope_f1", "overall"} <= set(first)
    assert {
        "mmmu/Art and Design",
        "mmmu/Science",
        "mmstar/math",
        "pope/adversarial/f1",
        "pope/yes_ratio",
    } <= set(first)
    assert first["overall"] == pytest.approx((first["mmmu"] + first["mmstar"] + first["pope_f1"]) / 3)
    assert all(isinstance(v, float) for v in first.values())


def test_the_shapes_unified_policy_answers_deterministically():
    check_evaluation(shapes_policy(), image_size=32, max_new_tokens=4)


def test_a_tiny_janus_answers_deterministically():
    check_evaluation(JanusPolicy(tiny_janus(seed=0), lora=None), image_size=16, max_new_tokens=4)
