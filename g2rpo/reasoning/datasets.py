"""Math word problems with gold answers, for RL with a verifier reward and for the CurES evaluation table.

:func:`math_dataset` reads the common layouts: MATH (``problem``, ``solution`` ending in ``\\boxed{}``, often
an ``answer`` too), GSM8K (``question``, ``answer`` ending in ``#### 72``), and the evaluation repositories'
(``question`` / ``problem`` with ``answer``; OlympiadBench's ``final_answer`` list). A prompt is the question
alone: the policy adds the instruction (CurES: "Let's think step by step and output the final answer within
\\boxed{}") and its chat template. The gold answer goes to ``metadata["answer"]``, which
:class:`~g2rpo.reasoning.verifier.MathVerifyReward` reads.

:data:`EVAL_SETS` are the paper's evaluation sets (arXiv 2510.01037, Table 1), read by :func:`eval_set` from
local copies of their Hugging Face repositories under ``$G2RPO_DATA``: nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from g2rpo.data import PromptDataset, _json_lines, _read_text
from g2rpo.reasoning.verifier import extract_answer

#: where a question is looked for, in this order (``question_key`` overrides)
QUESTION_KEYS = ("problem", "question", "prompt")
#: where a gold answer is looked for, in this order (``answer_key`` overrides); a solution is reduced to its
#: last ``\boxed{}``, GSM8K's answer to the text after ``####``
ANSWER_KEYS = ("answer", "final_answer", "solution")
#: file types math_dataset reads, by suffix (any case)
MATH_SUFFIXES = (".jsonl", ".json", ".parquet")


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of each question of a ``.jsonl``, ``.json`` (array of objects) or ``.parquet``
    file; ``where`` names the file and line (or item, or row) for error messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, record in _json_lines(path):
            yield f"{path}:{number}", record
    elif suffix == ".json":
        try:
            items = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error}); fix the file") from None
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: a .json file of questions must hold a JSON array of objects, not a JSON "
                f"{type(items).__name__}; or write one object per line to a .jsonl"
            )
        for index, item in enumerate(items):
            where = f"{path}: array item {index} (counting from 0)"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: {item!r} is not an object with a question and an answer")
            yield where, item
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {index} (counting from 0)", row
    else:
        raise ValueError(
            f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; use one of {', '.join(MATH_SUFFIXES)}"
        )


def _answer_text(value: object, where: str, key: str) -> str:
    """A gold answer as text: numbers as written (``27.0`` as ``27``), a solution reduced to its final answer,
    an answer list (OlympiadBench's several answers) joined by commas, surrounding ``$`` removed."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_answer_text(item, where, key) for item in value)
    if isinstance(value, Real) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, a number or a list, got {value!r}")
    text = value
    if "\\boxed" in text or "\\fbox" in text or "####" in text or key == "solution":
        text = extract_answer(text) or ""
    text = text.strip().strip("$").strip()
    if not text:
        hint = " (a solution must end in \\boxed{answer})" if key == "solution" else ""
        raise ValueError(
            f"{where}: {key!r} holds no answer{hint}: {value!r:.120}; fix or delete that question"
        )
    return text


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def math_dataset(
    path: str,
    question_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
) -> PromptDataset:
    """Questions and gold answers from a ``.jsonl``, ``.json`` or ``.parquet`` file (see the module docstring).

    The question is the first of ``problem``, ``question``, ``prompt`` present (or ``question_key``); the gold
    answer the first of ``answer``, ``final_answer``, ``solution`` (or ``answer_key``). Metadata:
    ``{"answer": gold}`` and the record's other scalar fields (``level``, ``type``, ``unique_id``, ...), the
    worked solution left out. ``limit``: the first that many questions. Errors name the file and line.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"data.path: no file at {file}. Set data.path, or G2RPO_DATA to the folder that holds it "
            "(conf/data/math_jsonl.yaml says how to get the math sets)"
        )
    prompts, metadata = [], []
    for where, record in _records(file):
        if limit is not None and len(prompts) >= limit:
            break
        keys = (question_key,) if question_key else QUESTION_KEYS
        key = next((k for k in keys if k in record), None)
        if key is None:
            raise ValueError(
                f"{where}: no question under {' or '.join(repr(k) for k in keys)} (the keys are {sorted(record)}); "
                "set question_key to the key that holds it"
            )
        question = record[key]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                f"{where}: {key!r} must be a non-empty string, got {question!r}; fix or delete it"
            )
        answers = (answer_key,) if answer_key else ANSWER_KEYS
        found = next((k for k in answers if record.get(k) is not None), None)
        if found is None:
            raise ValueError(
                f"{where}: no gold answer under {' or '.join(repr(k) for k in answers)} (the keys are "
                f"{sorted(record)}); set answer_key to the key that holds it, or delete the question"
            )
        gold = _answer_text(record[found], where, found)
        extra = {
            k: v for k, v in record.items() if k not in {key, found, "answer", "solution"} and _scalar(v)
        }
        prompts.append(question)
        metadata.append({"answer": gold, **extra})
    if not prompts:
        raise ValueError(f"{file}: no questions in the file; is it the right file?")
    return PromptDataset(prompts=prompts, metadata=metadata)


@dataclass(frozen=True)
class EvalSet:
    """One of the paper's evaluation sets: ``files``, a glob under ``$G2RPO_DATA/folder``, as ``hf download``
    of ``repo`` (``include``) lays them out; ``protocol`` ``"pass@1"`` (one sample per question) or
    ``"avg@16"`` (the mean accuracy of 16 samples per question), at temperature 1.0."""

    folder: str
    files: str
    repo: str
    include: str
    protocol: str

    @property
    def samples(self) -> int:
        """Samples per question under the protocol."""
        return int(self.protocol.split("@")[1])

    def download(self, root: str | Path) -> str:
        """The command that puts the set where :func:`eval_set` reads it."""
        return (
            f"hf download {self.repo} --repo-type dataset --local-dir {Path(root) / self.folder} "
            f"--include '{self.include}'"
        )


#: CurES's evaluation sets (Table 1): Pass@1 for MATH500, GSM8K, Minerva and OlympiadBench; Average@16 for
#: AIME24 and AMC23; temperature 1.0, at most 3072 new tokens (conf/eval/math_reasoning.yaml)
EVAL_SETS = {
    "math500": EvalSet("MATH-500", "test.jsonl", "HuggingFaceH4/MATH-500", "test.jsonl", "pass@1"),
    "gsm8k": EvalSet("gsm8k", "main/test-*.parquet", "openai/gsm8k", "main/test-*", "pass@1"),
    "minerva": EvalSet("minervamath", "test.jsonl", "math-ai/minervamath", "test.jsonl", "pass@1"),
    "olympiadbench": EvalSet("olympiadbench", "test.jsonl", "math-ai/olympiadbench", "test.jsonl", "pass@1"),
    "aime24": EvalSet("aime_2024", "**/train-*.parquet", "HuggingFaceH4/aime_2024", "*.parquet", "avg@16"),
    "amc23": EvalSet("amc23", "**/test-*.parquet", "math-ai/amc23", "*.parquet", "avg@16"),
}


def eval_set(name: str, root: str | None = None, limit: int | None = None) -> PromptDataset:
    """The evaluation set ``name`` (a key of :data:`EVAL_SETS`) from ``root`` (default ``$G2RPO_DATA``, else
    ``data``); ``limit``: its first that many questions. A missing set fails with the command that gets it."""
    if name not in EVAL_SETS:
        raise ValueError(f"eval set {name!r} is not known; choose one of {', '.join(EVAL_SETS)}")
    spec = EVAL_SETS[name]
    base = Path(root if root is not None else os.environ.get("G2RPO_DATA", "data"))
    files = sorted((base / spec.folder).glob(spec.files))
    if not files:
        raise FileNotFoundError(
            f"eval set {name}: no prompt file at {base / spec.folder / spec.files}. Get it with (nothing is "
            f"downloaded at run time):\n  {spec.download(base)}"
        )
    parts = [math_dataset(str(file), limit=limit) for file in files]
    prompts = [p for part in parts for p in part.prompts][:limit]
    metadata = [m for part in parts for m in part.metadata][:limit]
    return PromptDataset(prompts=prompts, metadata=metadata)
