"""A tiny arithmetic world: multi-step word problems with worked answers, a character-level tokenizer, and a
small Llama pretrained on them (``weights/arithmetic``), so that RL on text reasoning (GRPO, REINFORCE++ with
a binary verifier reward, CurES's curriculum) runs on a few CPU cores.

A problem's level is its number of operations; higher levels also use larger numbers. Every intermediate
result is a non-negative integer no larger than the level's cap (at most 99), so a character-level model can
learn the steps. The worked answer writes one step per line and ends in ``\\boxed{answer}``::

    Ann has 3 apples. She buys 4 more and gives 2 away. How many apples now?
    3+4=7
    7-2=5
    \\boxed{5}

Problems are split by a hash of their text (one in eight is held out), so no held-out question is ever a
training question, however many of either are drawn.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from g2rpo.data import PromptDataset
from g2rpo.reasoning.verifier import boxed_answer

#: the levels (numbers of operations) of the shipped model's data
LEVELS = (1, 2, 3, 4, 5)
#: the largest number (start, operand or intermediate result) at each level
CAPS = {1: 10, 2: 20, 3: 40, 4: 70, 5: 99, 6: 99, 7: 99, 8: 99}
#: the longest sequence (prompt and answer, special tokens included) the models are built for
MAX_LENGTH = 256
#: one problem in this many (by a hash of its text) is held out
HELDOUT_EVERY = 8
SPLITS = ("train", "heldout")
WEIGHTS = Path(__file__).parent / "weights" / "arithmetic"

PAD, BOS, EOS, UNK, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)
#: every printable ASCII character and the newline: whatever the generator writes, and then some
CHARACTERS = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the arithmetic chat template knows the roles user and assistant only') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

NAMES = (
    ("Ann", "she", "her"),
    ("Ben", "he", "him"),
    ("Cara", "she", "her"),
    ("Dan", "he", "him"),
    ("Eva", "she", "her"),
    ("Finn", "he", "him"),
    ("Gia", "she", "her"),
    ("Hugo", "he", "him"),
    ("Ivy", "she", "her"),
    ("Jon", "he", "him"),
    ("Kim", "she", "her"),
    ("Leo", "he", "him"),
    ("Mia", "she", "her"),
    ("Ned", "he", "him"),
    ("Ola", "she", "her"),
    ("Raj", "he", "him"),
    ("Sue", "she", "her"),
    ("Tom", "he", "him"),
    ("Uma", "she", "her"),
    ("Wes", "he", "him"),
)
ITEMS = (
    "apples",
    "pears",
    "plums",
    "coins",
    "cards",
    "marbles",
    "books",
    "shells",
    "stamps",
    "eggs",
    "pens",
    "rocks",
    "cookies",
    "stickers",
)
#: how a step is told, by operation; ``{n}`` is the operand
PHRASES = {
    "+": ("buys {n} more", "finds {n} more", "gets {n} more"),
    "-": ("gives {n} away", "loses {n}", "sells {n}", "uses {n}"),
    "*": ("multiplies them by {n}", "makes it {n} times as many"),
    "/": ("keeps 1 in {n}", "keeps one of every {n}"),
}
#: a step told by someone else (a sentence of its own); ``{obj}`` is the object pronoun
GIFTS = {"+": "{other} gives {obj} {n}.", "-": "{other} takes {n}."}
OPENERS = ("{Subject} ", "Then {subject} ")
QUESTIONS = (
    "How many {items} now?",
    "How many {items} does {name} have?",
    "How many {items} are left?",
)
#: weights of the operations (an infeasible one is skipped)
OPERATIONS = {"+": 0.35, "-": 0.35, "*": 0.15, "/": 0.15}
_STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def split_of(prompt: str) -> str:
    """``"heldout"`` for one prompt text in :data:`HELDOUT_EVERY` (a stable hash, not Python's salted one)."""
    digest = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return "heldout" if digest % HELDOUT_EVERY == 0 else "train"


def _operand(rng: random.Random, op: str, value: int, cap: int) -> int | None:
    """A random operand keeping the result in ``[0, cap]``, or None when ``op`` cannot follow ``value``."""
    if op == "+":
        return rng.randint(1, cap - value) if value < cap else None
    if op == "-":
        return rng.randint(1, value) if value > 0 else None
    if op == "*":
        factors = [f for f in range(2, 5) if value * f <= cap]
        return rng.choice(factors) if value > 0 and factors else None
    divisors = [d for d in range(2, 5) if value % d == 0 and value >= d]
    return rng.choice(divisors) if divisors else None


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _problem(rng: random.Random, level: int) -> dict:
    """One problem of ``level`` operations drawn from ``rng`` (the feasibility checks draw from it too: the
    draws are part of the data's definition, and the shipped model was trained on exactly this stream)."""
    cap = CAPS[level]
    name, subject, obj = rng.choice(NAMES)
    other = rng.choice([n for n, _, _ in NAMES if n != name])
    items = rng.choice(ITEMS)
    value = rng.randint(2, cap)
    sentences = [f"{name} has {value} {items}."]
    steps = []
    clauses: list[str] = []
    for _ in range(level):
        feasible = {op: w for op, w in OPERATIONS.items() if _operand(rng, op, value, cap) is not None}
        op = rng.choices(list(feasible), weights=list(feasible.values()))[0]
        operand = _operand(rng, op, value, cap)
        assert operand is not None
        result = _apply(op, value, operand)
        steps.append(f"{value}{op}{operand}={result}")
        value = result
        if op in GIFTS and rng.random() < 0.15:
            if clauses:
                sentences.append(_sentence(rng, clauses, subject))
                clauses = []
            sentences.append(GIFTS[op].format(other=other, obj=obj, n=operand))
            continue
        clauses.append(rng.choice(PHRASES[op]).format(n=operand))
        if len(clauses) == 2 or rng.random() < 0.5:
            sentences.append(_sentence(rng, clauses, subject))
            clauses = []
    if clauses:
        sentences.append(_sentence(rng, clauses, subject))
    sentences.append(rng.choice(QUESTIONS).format(items=items, subject=subject, name=name))
    return {
        "prompt": " ".join(sentences),
        "answer": str(value),
        "level": level,
        "solution": "\n".join([*steps, f"\\boxed{{{value}}}"]),
    }


def _sentence(rng: random.Random, clauses: list[str], subject: str) -> str:
    opener = rng.choice(OPENERS).format(Subject=subject.capitalize(), subject=subject)
    return opener + " and ".join(clauses) + "."


def make_problems(
    count: int, seed: int = 0, levels: Sequence[int] = LEVELS, split: str | None = None
) -> list[dict]:
    """``count`` problems ``{"prompt", "answer", "level", "solution"}``, levels in turn (so each is equally
    represented); the list depends on ``(seed, levels, split)`` only, and a longer list extends a shorter one.
    ``split`` keeps only that side of the hash partition (:func:`split_of`); None keeps both."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    unknown = sorted(set(levels) - set(CAPS))
    if unknown or not levels:
        raise ValueError(f"levels must be a non-empty subset of {sorted(CAPS)}, got {list(levels)}")
    problems: list[dict] = []
    attempt = 0
    while len(problems) < count:
        level = levels[len(problems) % len(levels)]
        rng = random.Random(f"{split}/{seed}/{attempt}")
        attempt += 1
        problem = _problem(rng, level)
        fits = len(problem["prompt"]) + len(problem["solution"]) + len(SPECIAL_TOKENS) - 2 <= MAX_LENGTH
        if fits and (split is None or split_of(problem["prompt"]) == split):
            problems.append(problem)
    return problems


def arithmetic_dataset(
    split: str = "train", count: int = 512, seed: int = 0, levels: Sequence[int] = LEVELS
) -> PromptDataset:
    """RL prompts with ``{"answer", "level"}`` metadata (the worked solution is not given to RL)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = make_problems(count, seed, levels, split)
    return PromptDataset(
        [p["prompt"] for p in problems],
        [{"answer": p["answer"], "level": p["level"]} for p in problems],
    )


def solution_steps(solution: str) -> list[tuple[int, str, int, int]]:
    """The ``(a, op, b, result)`` steps of a worked answer (lines before the boxed one); ValueError if not."""
    steps = []
    for line in solution.split("\n")[:-1]:
        match = _STEP.match(line)
        if match is None:
            raise ValueError(f"not a step 'a<op>b=c': {line!r}")
        a, op, b, result = match.groups()
        steps.append((int(a), op, int(b), int(result)))
    return steps


def is_correct(text: str, answer: str) -> bool:
    """Whether the boxed answer is the integer ``answer`` (``007`` counts as 7; no box is wrong)."""
    boxed = boxed_answer(text)
    return boxed is not None and boxed.isdigit() and int(boxed) == int(answer)


def arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus the special tokens; a chat template ``<bos><|user|>q<|assistant|>``.

    Encoding plain text adds no special tokens (the chat template writes them), so ``decode(encode(x)) == x``
    for any text of :data:`CHARACTERS`. Left padding, for batched generation."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def lm_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 96,
    num_layers: int = 3,
    num_heads: int = 4,
) -> LlamaConfig:
    """A small Llama over ``tokenizer``'s vocabulary: 4x MLPs, tied embeddings, :data:`MAX_LENGTH` positions."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _fit_generation_config(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Pure temperature sampling by default (``top_k`` 50 would cut the vocabulary in half), stopping at eos."""
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.top_k = None
    generation.top_p = None


def tiny_lm(
    seed: int = 0, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised model (fp32) and the tokenizer, for fast tests; the global RNG is untouched."""
    tokenizer = arithmetic_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lm_config(tokenizer, hidden_size, num_layers, num_heads))
    _fit_generation_config(model, tokenizer)
    return model.float(), tokenizer


def load_arithmetic_lm(path: str | Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The pretrained model and its tokenizer (default: the shipped ``weights/arithmetic``), from disk only."""
    directory = Path(path) if path is not None else WEIGHTS
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no arithmetic model at {directory}; regenerate it with `make arith-model` "
            "(python -m g2rpo.reasoning.training)"
        )
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer
