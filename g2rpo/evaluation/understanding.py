"""Understanding benchmarks of PairUni's table (arXiv 2510.25682v3, Table 1): MMMU, MMStar and POPE, answered
greedily by a token policy and scored as the benchmarks' own scripts score them.

Each benchmark is read from a local copy of its Hugging Face dataset repository (parquet files, never
downloaded at run time) through ``datasets``' streaming parquet reader: nothing is copied into the Arrow
cache, and an evaluation holds one batch of decoded images at a time, however often it runs during training.

* MMMU (``MMMU/MMMU``, ``<Subject>/<split>-*.parquet``): the ``validation`` split, as papers report it.
  Prompts as lmms-eval's ``mmmu_val`` builds them (options lettered ``A.``, ``B.``, ...); answers parsed and
  judged as the MMMU repository's ``eval_utils`` does (an option letter for multiple choice, normalised
  strings and numbers for open questions); accuracy over questions, and per discipline.
  A policy sees one image: a question with several (``image_2``...) is asked with its first, as MMMU's own
  single-image evaluation does; ``Question.num_images`` marks them.
* MMStar (``Lin-Chen/MMStar``, ``mmstar.parquet``, split ``val``): options are part of the question text;
  the answer is the option letter read from the reply; accuracy over questions, and per category.
* POPE (``lmms-lab/POPE``, ``data/test-*.parquet``): yes/no questions in three categories (adversarial,
  popular, random); a reply is "no" when its first sentence says no or not, else "yes" (POPE's own rule);
  accuracy, precision, recall, F1 and the share of "yes" answers, over all questions and per category. Papers
  report F1.
"""

from __future__ import annotations

import ast
import io
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from g2rpo.randomness import TOKEN, keyed
from g2rpo.rewards.answer import ANSWER_TAG

MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
OPEN = "Answer the question using a single word or phrase."
MMSTAR_INSTRUCTION = MULTIPLE_CHOICE.rstrip(".")  # lmms-eval's MMStar prompt: the same, without its full stop

# MMMU's 30 subjects (the dataset's folders) in its six disciplines, as its evaluation groups them.
MMMU_DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
DISCIPLINE_OF = {subject: d for d, subjects in MMMU_DISCIPLINES.items() for subject in subjects}
MMMU_IMAGES = [f"image_{i}" for i in range(1, 8)]


@dataclass(frozen=True, eq=False)
class Question:
    """One benchmark question as the policy is asked it.

    ``prompt`` is the question with its options in the benchmark's prompt format; ``answer`` is the dataset's
    (an option letter, an open answer, or yes/no); ``options`` are the option texts in letter order (empty for
    open and yes/no questions); ``image`` is ``[3, H, W]`` in [0, 1] at the dataset's size, ``None`` once the
    question has been answered (an evaluation keeps the questions to score them, not their pixels).
    """

    benchmark: str
    id: str
    prompt: str
    answer: str
    options: tuple[str, ...]
    category: str
    kind: str  # "multiple-choice" | "open" | "yes/no"
    image: Tensor | None
    num_images: int = 1


Scorer = Callable[[Sequence[str], Sequence[Question]], dict[str, float]]


class Benchmark:
    """A benchmark's questions, read anew on every pass, and the scorer of its answers. ``headline`` names the
    scorer's metric that the benchmark is reported by (``accuracy``; POPE: ``f1``)."""

    def __init__(self, read: Callable[[], Iterator[Question]], score: Scorer, headline: str = "accuracy"):
        self.read, self.score, self.headline = read, score, headline

    def __iter__(self) -> Iterator[Question]:
        return self.read()


# ---- reading ------------------------------------------------------------------------------------------------


def _download_hint(repo: str, root: Path, include: str) -> str:
    return (
        f"Download it once (nothing is fetched at run time):\n"
        f"  hf download {repo} --repo-type dataset --local-dir {root} --include '{include}'"
    )


def _parquet_rows(files: Sequence[Path], columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The files' rows in order, images left encoded (``{"bytes", "path"}``): they are decoded only for the
    questions kept."""
    try:
        import datasets
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"reading {files[0]} needs Hugging Face datasets, which is not installed: pip install datasets"
        ) from error
    rows = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", streaming=True
    ).decode(False)
    missing = sorted(set(columns) - set(rows.column_names or columns))
    if missing:
        raise ValueError(
            f"{files[0]}: no column(s) {', '.join(missing)} (found {', '.join(rows.column_names)}); these "
            "files are not in the layout of the benchmark's Hugging Face repository"
        )
    return iter(rows)


def _pixels(cell: dict[str, Any]) -> Tensor:
    """An encoded image cell (``{"bytes", "path"}``) as ``[3, H, W]`` floats in [0, 1]."""
    with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _capped(rows: Iterable[dict], limit: int | None, category: Callable[[dict], str]) -> Iterator[dict]:
    """At most ``limit`` rows per category, in file order (all with ``None``)."""
    seen: dict[str, int] = {}
    for row in rows:
        key = category(row)
        if limit is None or seen.get(key, 0) < limit:
            seen[key] = seen.get(key, 0) + 1
            yield row


def lettered(options: Sequence[str]) -> str:
    """``A. first\\nB. second...``, lmms-eval's rendering of MMMU's options."""
    return "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


def mmmu(
    path: str | Path,
    split: str = "validation",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
) -> Benchmark:
    """MMMU from a local copy of ``MMMU/MMMU`` (one folder per subject, ``<split>-*.parquet`` in each):
    ``subjects`` (folder names; default all) and at most ``limit`` questions per subject, in file order."""
    root = Path(path)
    present = sorted(p.name for p in root.glob("*") if p.is_dir() and any(p.glob(f"{split}-*.parquet")))
    wanted = present if subjects is None else list(subjects)
    missing = [s for s in wanted if s not in present]
    if not present or missing:
        what = f"subject folder(s) {', '.join(missing)} with" if missing else "subject folders with"
        raise FileNotFoundError(
            f"MMMU: no {what} {split}-*.parquet under {root} (the MMMU/MMMU dataset's layout: "
            f"<Subject>/{split}-00000-of-00001.parquet). " + _download_hint("MMMU/MMMU", root, f"*/{split}-*")
        )
    files = {s: sorted((root / s).glob(f"{split}-*.parquet")) for s in wanted}
    columns = ["id", "question", "options", "answer", "question_type", *MMMU_IMAGES]

    def read() -> Iterator[Question]:
        for subject, paths in files.items():
            for row in islice(_parquet_rows(paths, columns), limit):
                options = tuple(str(o) for o in ast.literal_eval(row["options"] or "[]"))
                images = [row[c] for c in MMMU_IMAGES if row[c] is not None]
                if not images:
                    raise ValueError(f"{paths[0]}: question {row['id']} has no image")
                choice = row["question_type"] == "multiple-choice"
                if choice:
                    prompt = f"{row['question']}\n{lettered(options)}\n\n{MULTIPLE_CHOICE}"
                else:
                    prompt = f"{row['question']}\n\n{OPEN}"
                yield Question(
                    benchmark="mmmu",
                    id=str(row["id"]),
                    prompt=prompt,
                    answer=str(row["answer"]),
                    options=options if choice else (),
                    category=subject,
                    kind="multiple-choice" if choice else "open",
                    image=_pixels(images[0]),
                    num_images=len(images),
                )

    return Benchmark(read, score_mmmu)


MMSTAR_OPTION = re.compile(r"(?:^|,\s+|\n)([A-F])[:.]\s+")


def mmstar_options(question: str) -> tuple[str, ...]:
    """The option texts of an MMStar question (``...\\nOptions: A: x, B: y, C: z, D: w``), or ``()`` when they
    cannot be split (the letter is then read without its option's text)."""
    head, found, listed = question.rpartition("Options:")
    parts = MMSTAR_OPTION.split(listed.strip()) if found else []
    letters, texts = parts[1::2], parts[2::2]
    if not letters or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return ()
    return tuple(t.strip() for t in texts)


def mmstar(path: str | Path, limit: int | None = None) -> Benchmark:
    """MMStar's 1,500 questions (split ``val``) from a local copy of ``Lin-Chen/MMStar`` (``mmstar.parquet``):
    at most ``limit`` per category, in file order."""
    file = Path(path) / "mmstar.parquet"
    if not file.is_file():
        raise FileNotFoundError(
            f"MMStar: no {file}. " + _download_hint("Lin-Chen/MMStar", file.parent, file.name)
        )
    columns = ["index", "question", "image", "answer", "category"]

    def read() -> Iterator[Question]:
        for row in _capped(_parquet_rows([file], columns), limit, lambda r: r["category"]):
            question = row["question"].strip().replace(" Please answer yes or no.", "")
            yield Question(
                benchmark="mmstar",
                id=str(row["index"]),
                prompt=f"{question}\n{MMSTAR_INSTRUCTION}",
                answer=str(row["answer"]).strip(),
                options=mmstar_options(question),
                category=row["category"],
                kind="multiple-choice",
                image=_pixels(row["image"]),
            )

    return Benchmark(read, score_mmstar)


def pope(path: str | Path, limit: int | None = None) -> Benchmark:
    """POPE's 9,000 questions (split ``test``: 3,000 per category) from a local copy of ``lmms-lab/POPE``
    (``data/test-*.parquet``): at most ``limit`` per category, in file order."""
    root = Path(path)
    files = sorted((root / "data").glob("test-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"POPE: no {root / 'data'}/test-*.parquet. " + _download_hint("lmms-lab/POPE", root, "data/*")
        )
    columns = ["question_id", "question", "answer", "image", "category"]

    def read() -> Iterator[Question]:
        for row in _capped(_parquet_rows(files, columns), limit, lambda r: r["category"]):
            yield Question(
                benchmark="pope",
                id=str(row["question_id"]),
                prompt=f"{row['question'].strip()}\n{OPEN}",
                answer=str(row["answer"]).strip().lower(),
                options=(),
                category=row["category"],
                kind="yes/no",
                image=_pixels(row["image"]),
            )

    return Benchmark(read, score_pope, headline="f1")


# ---- parsing ------------------------------------------------------------------------------------------------


def _answer_part(response: str) -> str:
    """The reply inside ``<answer>...</answer>`` when it has one (a policy trained on PairUni's format)."""
    match = ANSWER_TAG.search(response)
    return match.group(1) if match else response


def option_letters(options: Sequence[str]) -> list[str]:
    """``A``, ``B``, ... one per option; A to D when the options are unknown (an MMStar question whose list
    could not be split: all of MMStar's have four)."""
    return [chr(ord("A") + i) for i in range(len(options) or 4)]


def parse_choice(response: str, options: Sequence[str]) -> str | None:
    """The option letter a reply names, by MMMU's rules (``parse_multi_choice_response``): a bracketed letter
    ``(B)``, else a letter followed by a space or a full stop, else (in replies of more than five words) the
    option text it quotes; the last named wins when several are. ``None`` when it names none."""
    letters = option_letters(options)
    text = " " + _answer_part(response).strip(",.!?;:'") + " "
    patterns = [("({})", "({})"), ("{} ", " {} "), ("{}.", " {} ")]
    for found, last in patterns:
        named = [letter for letter in letters if found.format(letter) in text]
        if named:
            return max(named, key=lambda letter: text.rfind(last.format(letter)))
    if len(text.split()) > 5:
        quoted = [
            (letter, o.lower()) for letter, o in zip(letters, options) if o and o.lower() in text.lower()
        ]
        if quoted:
            return max(quoted, key=lambda pair: text.lower().rfind(pair[1]))[0]
    return None


NUMBER_PATTERNS = [
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 12, 0.5, .5
]
KEY_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def normalize_open(text: str) -> list[str | float]:
    """MMMU's ``normalize_str``: a number (commas dropped) rounded to 2 decimals, else the lower-cased string;
    a single character is padded with a space on either side, so that it matches only a whole word."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def parse_open(response: str) -> list[str | float]:
    """MMMU's ``parse_open_response``: the tail of each line after its last answer indicator ("is ", "so ",
    "therefore ", ...; also "=" on the last line), the numbers in those tails, all normalised. (MMMU's script
    also splits sentences at ``". "`` before a capital, but after lower-casing, so only its line split acts.)"""
    text = _answer_part(response).strip().strip(".").lower()
    lines = text.split("\n")
    tails = []
    for index, line in enumerate(lines):
        indicators = KEY_INDICATORS + (["="] if index == len(lines) - 1 else [])
        candidates = [line.split(indicator)[-1].strip() for indicator in indicators if indicator in line]
        shortest = min([c for c in candidates if c], key=len, default="")
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            tails.append(shortest)
    tails = tails or [text]
    numbers = [n for tail in tails for pattern in NUMBER_PATTERNS for n in pattern.findall(tail)]
    return list(dict.fromkeys(value for item in tails + numbers for value in normalize_open(item)))


def gold_answers(answer: str) -> list[str]:
    """An MMMU answer, or each of the answers of a list literal (``"['24/7', '3.429']"``: open questions with
    several accepted answers)."""
    if answer.startswith("["):
        try:
            listed = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return [answer]
        if isinstance(listed, list):
            return [str(a) for a in listed]
    return [answer]


def open_correct(response: str, answer: str) -> bool:
    """MMMU's ``eval_open``: a normalised gold string inside a parsed string, or a gold number equal to one."""
    golds = [g for answer_ in gold_answers(answer) for g in normalize_open(answer_)]
    for predicted in parse_open(response):
        if isinstance(predicted, str):
            if any(isinstance(g, str) and g in predicted for g in golds):
                return True
        elif predicted in golds:
            return True
    return False


def pope_answer(response: str) -> str:
    """POPE's rule: "no" when the reply's first sentence has the word no or not, else "yes" (case-folded and
    split on any whitespace, where POPE's script matches "No", "no", "not" between spaces)."""
    first = _answer_part(response).split(".")[0].replace(",", "").lower()
    return "no" if {"no", "not"} & set(first.split()) else "yes"


# ---- scoring ------------------------------------------------------------------------------------------------


def _mean(values: Sequence[bool | float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _grouped(correct: Sequence[bool], keys: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for key, hit in zip(keys, correct, strict=True):
        groups.setdefault(key, []).append(hit)
    return {key: _mean(groups[key]) for key in sorted(groups)}


def mmmu_correct(response: str, question: Question) -> bool:
    """One MMMU answer judged as MMMU's script judges it. A multiple-choice reply that names no option gets a
    guess, as in MMMU's script, but one drawn from a stream seeded by the question's id, so a score is
    reproducible."""
    if question.kind != "multiple-choice":
        return open_correct(response, question.answer)
    letter = parse_choice(response, question.options)
    if letter is None:
        letter = random.Random(question.id).choice(option_letters(question.options))
    return letter == question.answer


def score_mmmu(predictions: Sequence[str], questions: Sequence[Question]) -> dict[str, float]:
    """``accuracy`` over questions (MMMU's "Overall"), then per discipline."""
    correct = [mmmu_correct(p, q) for p, q in zip(predictions, questions, strict=True)]
    disciplines = [DISCIPLINE_OF.get(q.category, q.category) for q in questions]
    return {"accuracy": _mean(correct), **_grouped(correct, disciplines)}


def score_mmstar(predictions: Sequence[str], questions: Sequence[Question]) -> dict[str, float]:
    """``accuracy`` over questions, then per category; a reply that names no option is wrong."""
    correct = [parse_choice(p, q.options) == q.answer for p, q in zip(predictions, questions, strict=True)]
    return {"accuracy": _mean(correct), **_grouped(correct, [q.category for q in questions])}


def yes_no_metrics(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes" as the positive class, and the share of "yes" answers."""
    pred = np.array([p == "yes" for p in predicted])
    gold = np.array([t == "yes" for t in truth])
    tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": f1,
        "accuracy": float((pred == gold).mean()),
        "precision": precision,
        "recall": recall,
        "yes_ratio": float(pred.mean()),
    }


def score_pope(predictions: Sequence[str], questions: Sequence[Question]) -> dict[str, float]:
    """The yes/no metrics over all questions (``f1`` is VLMEvalKit's "Overall"), then per category
    (``adversarial/f1``...)."""
    predicted = [pope_answer(p) for p in predictions]
    truth = [q.answer for q in questions]
    metrics = yes_no_metrics(predicted, truth)
    for category in sorted({q.category for q in questions}):
        rows = [i for i, q in enumerate(questions) if q.category == category]
        for name, value in yes_no_metrics([predicted[i] for i in rows], [truth[i] for i in rows]).items():
            metrics[f"{category}/{name}"] = value
    return metrics


# ---- answering ----------------------------------------------------------------------------------------------


def letterbox(image: Tensor, size: int) -> Tensor:
    """``[3, H, W]`` to ``[3, size, size]``: the longer side resized to ``size`` (bicubic, antialiased), centred
    on mid-grey, as Janus's image processor does (its background is its image mean, 0.5), so that benchmark
    images of any shape batch together and keep their aspect ratio."""
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image.float()
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(
        image[None].float(), size=(new_height, new_width), mode="bicubic", antialias=True
    )[0].clamp(0, 1)
    square = torch.full((3, size, size), 0.5)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    square[:, top : top + new_height, left : left + new_width] = resized
    return square


def _batches(questions: Iterable[Question], size: int) -> Iterator[list[Question]]:
    iterator = iter(questions)
    while batch := list(islice(iterator, size)):
        yield batch


class UnderstandingBenchmarks:
    """Answers every question of ``benchmarks`` greedily (deterministic) and scores them: a policy evaluation
    ``policy -> {metric: value}`` for ``UnifiedEvaluator``'s ``understanding``.

    The result is flat: each benchmark's headline under its name (``mmmu``, ``mmstar``; a headline other than
    accuracy with its metric appended: ``pope_f1``), its other metrics as ``<name>/<metric>``
    (``mmmu/Science``, ``pope/adversarial/f1``), and ``overall``, the mean of the headlines. Images are
    letterboxed to ``image_size`` (Janus-Pro: 384, its vision encoder's input, so its processor only
    normalises them; the shapes world's unified model: 32); ``max_new_tokens`` bounds every reply.
    """

    def __init__(
        self,
        benchmarks: Mapping[str, Benchmark],
        batch_size: int = 16,
        max_new_tokens: int = 32,
        image_size: int = 384,
    ) -> None:
        if not benchmarks:
            raise ValueError("understanding benchmarks: none given")
        self.benchmarks = dict(benchmarks)
        self.batch_size, self.max_new_tokens, self.image_size = batch_size, max_new_tokens, image_size

    def answer(self, policy: Any, questions: Iterable[Question]) -> tuple[list[str], list[Question]]:
        """The policy's greedy replies, and the questions without their images."""
        replies, answered = [], []
        for batch in _batches(questions, self.batch_size):
            inputs = {
                "images": torch.stack([letterbox(q.image, self.image_size) for q in batch]),
                "questions": [q.prompt for q in batch],
            }
            # greedy decoding draws nothing; the interface takes one generator per sample
            generators = keyed(torch.Generator().manual_seed(0), list(range(len(batch))), TOKEN)
            rollout = policy.sample_tokens(
                "answer", inputs, generators, temperature=0.0, max_new_tokens=self.max_new_tokens
            )
            replies.extend(rollout.texts)
            answered.extend(replace(q, image=None) for q in batch)
        return replies, answered

    @torch.no_grad()
    def __call__(self, policy: Any) -> dict[str, float]:
        nfe = policy.nfe  # evaluation cost is not training cost
        results: dict[str, float] = {}
        headlines = []
        for name, benchmark in self.benchmarks.items():
            replies, questions = self.answer(policy, benchmark)
            if not questions:
                raise ValueError(f"understanding benchmark {name!r}: no questions were read")
            metrics = benchmark.score(replies, questions)
            headline = metrics.pop(benchmark.headline)
            key = name if benchmark.headline == "accuracy" else f"{name}_{benchmark.headline}"
            results[key] = headline
            headlines.append(headline)
            results.update({f"{name}/{metric}": value for metric, value in metrics.items()})
        policy.nfe = nfe
        results["overall"] = _mean(headlines)
        return results
