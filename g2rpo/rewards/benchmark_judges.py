"""The judges of two editing benchmarks on the VLM edit judge's client: GEdit-Bench's VIEScore and
ImgEdit-Bench's rubric per edit type. Each reads its prompts from the benchmark's own file (the text is not
copied here; the configs give the download command), so a judge served here is asked word for word what the
official scorers ask.

GEdit-Bench (Step1X-Edit, arXiv 2504.17761; ``GEdit-Bench/`` of github.com/stepfun-ai/Step1X-Edit) scores an
edit with VIEScore's "tie" task: two asks per edit. Semantic consistency (SC) gets the source, the edit and
the instruction, and asks for two scores from 0 to 10, the edit's success and how little it over-edits;
perceptual quality (PQ) gets the edit alone and asks for its naturalness and its freedom from artifacts. The
judge answers a JSON object whose ``score`` is that list. SC and PQ are each list's minimum, and the overall
O = sqrt(SC * PQ) per image (``viescore/__init__.py``). The prompts are VIEScore's strings in
``viescore/vie_prompts.py``: ``_context_no_delimit``, then ``_prompts_0shot_two_image_edit_rule`` and
``_prompts_0shot_tie_rule_SC`` for SC (``<instruction>`` replaced) or ``_prompts_0shot_rule_PQ`` for PQ, joined
by newlines. The file is parsed, never run.

ImgEdit-Bench (arXiv 2505.20275; ``Benchmark/Basic/`` of github.com/PKU-YuanGroup/ImgEdit) asks once per
edit, with the rubric of its edit type from ``prompts.json`` (``<edit_prompt>`` replaced by the instruction),
the text first, then the source, then the edit (``basic_bench.py``). The judge ends with three lines
``<criterion>: <1-5>``; the case's score is their mean rounded to two decimals (``step1_get_avgscore.py``
counts every line that splits on ``": "`` into a name and digits).

Deliberate differences from the official scorers:
- An answer with no valid score is NaN: left out of the means, as ImgEdit's scorer drops it. GEdit's asks
  again once, then guesses a random score from 0 to 10.
- A score outside the scale (0-10; 1-5) is NaN; the official scorers take any number.
- GEdit-Bench's images come before the text, as its Qwen2.5-VL backbone sends them; its GPT-4.1 backbone
  sends the text first.
- The judge sees the source resized to the edit's square size, as PNG (the official scorers send the files:
  GEdit's resizes the edit to the source's size, and its GPT-4.1 backbone re-encodes both as JPEG).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from g2rpo.rewards.chat import ChatClient
from g2rpo.rewards.judge import VLMEditJudge

log = logging.getLogger(__name__)

#: the official prompt files, at the commits these judges were written against
VIESCORE_PROMPTS_URL = (
    "https://raw.githubusercontent.com/stepfun-ai/Step1X-Edit/570eba6ebda0c45c013983a483afbf2fd12bfcbc/"
    "GEdit-Bench/viescore/vie_prompts.py"
)
IMGEDIT_PROMPTS_URL = (
    "https://raw.githubusercontent.com/PKU-YuanGroup/ImgEdit/547185d12c08267a862b94248576e1746e479937/"
    "Benchmark/Basic/prompts.json"
)
VIESCORE_CONTEXT = "_context_no_delimit"
VIESCORE_SEMANTIC = ("_prompts_0shot_two_image_edit_rule", "_prompts_0shot_tie_rule_SC")
VIESCORE_QUALITY = ("_prompts_0shot_rule_PQ",)
VIESCORE_DELIMITER = "||V^=^V||"  # VIEScore's few-shot prompts fence the answer's JSON with it

_SCORE_KEY = re.compile(r'"?score"?\s*:\s*(\[[^\]]*\]|-?\d+(?:\.\d+)?)')
_BARE_LIST = re.compile(r"^\s*\[\s*\d+(?:\s*,\s*\d+)*\s*\]\s*$")


def _no_file(file: Path, what: str, url: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no prompt file at {file} ({what}). Get it with:\n  curl -L {url} --create-dirs -o {file}"
    )


def viescore_prompts(path: str | Path) -> tuple[str, str]:
    """VIEScore's SC prompt (with ``<instruction>``) and PQ prompt for an edit, from ``vie_prompts.py``."""
    file = Path(path)
    if not file.is_file():
        raise _no_file(file, "VIEScore's prompts, which GEdit-Bench's judge is asked", VIESCORE_PROMPTS_URL)
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except (SyntaxError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not VIEScore's vie_prompts.py ({error})") from None
    strings = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    wanted = (VIESCORE_CONTEXT, *VIESCORE_SEMANTIC, *VIESCORE_QUALITY)
    missing = [name for name in wanted if name not in strings]
    if missing:
        raise ValueError(f"{file}: no string {', '.join(missing)}; this is not VIEScore's vie_prompts.py")
    semantic = "\n".join(strings[name] for name in (VIESCORE_CONTEXT, *VIESCORE_SEMANTIC))
    if "<instruction>" not in semantic:
        raise ValueError(f"{file}: the SC prompt has no <instruction> slot for the editing instruction")
    return semantic, "\n".join(strings[name] for name in (VIESCORE_CONTEXT, *VIESCORE_QUALITY))


def viescore_list(answer: str | None) -> list[float] | None:
    """The ``score`` list of a VIEScore answer: from its JSON object (between the delimiters, or from the first
    ``{`` to the last ``}``), else from a ``score: [...]`` it holds; an answer that is only ``[a, b]`` or only a
    number is that list. None when it has none."""
    if answer is None:
        return None
    text = answer.strip()
    if text.count(VIESCORE_DELIMITER) == 2:
        text = text.split(VIESCORE_DELIMITER)[1].strip()
    start, end = text.find("{"), text.rfind("}")
    score = None
    if start != -1 and end > start:
        try:
            record = json.loads(text[start : end + 1])
            score = record.get("score") if isinstance(record, dict) else None
        except ValueError:
            score = None
    if score is None and (match := _SCORE_KEY.search(text)):
        try:
            score = json.loads(match.group(1))
        except ValueError:
            return None
    if score is None and _BARE_LIST.match(text):
        score = json.loads(text)
    if score is None and re.fullmatch(r"\d+", text):
        score = int(text)
    scores = score if isinstance(score, list) else [score]
    if not scores or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        return None
    return [float(s) for s in scores]


def imgedit_rubrics(path: str | Path) -> dict[str, str]:
    """ImgEdit-Bench's rubric of each edit type (``prompts.json``), each with its ``<edit_prompt>`` slot."""
    file = Path(path)
    if not file.is_file():
        raise _no_file(file, "ImgEdit-Bench's judge rubrics", IMGEDIT_PROMPTS_URL)
    try:
        rubrics = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not a JSON file ({error})") from None
    if not isinstance(rubrics, dict) or not rubrics:
        raise ValueError(f"{file}: must be a JSON object of edit type -> rubric, as ImgEdit's prompts.json")
    for kind, rubric in rubrics.items():
        if not isinstance(rubric, str) or "<edit_prompt>" not in rubric:
            raise ValueError(f"{file}: the rubric of {kind!r} is not a text with an <edit_prompt> slot")
    return rubrics


def imgedit_criteria(answer: str | None) -> list[int]:
    """The scores of an ImgEdit answer: every line that is ``<name>: <digits>``."""
    found = []
    for line in (answer or "").splitlines():
        parts = line.strip().split(": ")
        if len(parts) == 2 and parts[1].isascii() and parts[1].isdigit():
            found.append(int(parts[1]))
    return found


class BenchmarkJudge(VLMEditJudge):
    """A benchmark's judge: :meth:`scores` gives its named scores on the benchmark's own scale (the evaluation
    table's columns); called as a reward, its ``reward_term`` / ``max_score``."""

    reward_term: str  # the named score that is the reward

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> Tensor:
        return self.scores(images, prompts, metadata, sources)[self.reward_term] / self.max_score


class GEditJudge(BenchmarkJudge):
    """GEdit-Bench's VIEScore: named scores ``sc``, ``pq`` and ``overall`` = sqrt(SC * PQ), each 0 to 10 as
    the paper reports them; called as a reward, the overall / 10. ``image_size`` None sends the images as
    sampled (the server's processor resizes them)."""

    reward_term = "overall"

    def __init__(self, chat: ChatClient, prompts_path: str, image_size: int | None = None) -> None:
        semantic, self.quality_prompt = viescore_prompts(prompts_path)
        super().__init__(
            chat, semantic.replace("<instruction>", "{prompt}"), max_score=10.0, image_size=image_size
        )

    def scores(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> dict[str, Tensor]:
        count = images.shape[0]
        pairs = self._edit_pixels(images, prompts, sources)
        if pairs is None:
            return {name: torch.full((count,), math.nan) for name in ("sc", "pq", "overall")}
        semantic = [
            [*self._image_parts(source, edited), self._text_part(prompt)]
            for source, edited, prompt in zip(*pairs, prompts)
        ]
        quality = [
            [*self._image_parts(edited), {"type": "text", "text": self.quality_prompt}] for edited in pairs[1]
        ]
        answers = self._ask(semantic + quality)  # one batch: the server runs both asks concurrently
        sc, pq = answers[:count], answers[count:]
        return {"sc": sc, "pq": pq, "overall": torch.sqrt(sc * pq)}

    def _parse_score(self, answer: str | None) -> float:
        """The minimum of the answer's score list (VIEScore's SC or PQ), on its 0-10 scale."""
        scores = viescore_list(answer)
        if scores is None or not all(0.0 <= s <= self.max_score for s in scores):
            log.warning(
                "GEdit judge: no score list within [0, 10] in the answer, scored NaN: %r",
                (answer or "")[:200],
            )
            return math.nan
        return min(scores)


class ImgEditJudge(BenchmarkJudge):
    """ImgEdit-Bench's judge: the named score ``score`` (1 to 5, the mean of the three criteria of the edit's
    type, ``metadata["edit_type"]``); called as a reward, score / 5."""

    reward_term = "score"

    def __init__(self, chat: ChatClient, prompts_path: str, image_size: int | None = None) -> None:
        self.rubrics = imgedit_rubrics(prompts_path)
        self.prompts_path = str(prompts_path)
        # the text is the edit type's rubric, filled in scores(): the template passes it through
        super().__init__(chat, "{prompt}", max_score=5.0, image_size=image_size)

    def scores(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] = (),
        sources: Tensor | None = None,
    ) -> dict[str, Tensor]:
        pairs = self._edit_pixels(images, prompts, sources)
        if pairs is None:
            return {"score": torch.full((images.shape[0],), math.nan)}
        if len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")
        texts = []
        for index, (prompt, meta) in enumerate(zip(prompts, metadata)):
            kind = meta.get("edit_type")
            if kind not in self.rubrics:
                raise ValueError(
                    f"ImgEdit judge: prompt {index} ({prompt!r}) has edit_type {kind!r}, but the rubrics in "
                    f"{self.prompts_path} cover {sorted(self.rubrics)}"
                )
            texts.append(self._text_part(self.rubrics[kind].replace("<edit_prompt>", prompt)))
        return {
            "score": self._ask(
                [[text, *self._image_parts(source, edited)] for text, source, edited in zip(texts, *pairs)]
            )
        }

    def _parse_score(self, answer: str | None) -> float:
        """The mean of the answer's criteria, rounded to two decimals as ``step1_get_avgscore.py`` does."""
        criteria = imgedit_criteria(answer)
        if not criteria or not all(1 <= c <= self.max_score for c in criteria):
            log.warning(
                "ImgEdit judge: no criteria scored 1-5 in the answer, scored NaN: %r", (answer or "")[:200]
            )
            return math.nan
        return round(sum(criteria) / len(criteria), 2)
