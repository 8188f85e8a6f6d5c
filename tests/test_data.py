"""Prompt datasets from inline lists and files (Flow-GRPO's .txt and GenEval-style .jsonl formats)."""

import json

import pytest
from PIL import Image

from g2rpo.data import PromptDataset, pair_dataset


def test_txt_file_gives_one_prompt_per_non_empty_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n")
    dataset = PromptDataset(path=str(path))
    assert dataset.prompts == ["a cat", "a dog"] and dataset.metadata == [{}, {}]


def test_jsonl_file_keeps_every_other_key_as_metadata(tmp_path):
    records = [
        {"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]}
    ]
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    dataset = PromptDataset(path=str(path))
    assert dataset.prompts == ["a photo of two cats"]
    assert dataset.metadata == [{"tag": "counting", "include": [{"class": "cat", "count": 2}]}]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        PromptDataset()
    with pytest.raises(FileNotFoundError, match="no file at"):
        PromptDataset(path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="2 prompts but 1 metadata"):
        PromptDataset(prompts=["a", "b"], metadata=[{}])


def _written(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("prompt", ["null", '""', '"   "', "42", '["a", "cat"]'])
def test_a_prompt_that_is_not_a_non_empty_string_names_its_file_and_line(tmp_path, prompt):
    path = _written(
        tmp_path / "prompts.jsonl", '{"prompt": "a cat"}', "", f'{{"prompt": {prompt}, "tag": "x"}}'
    )
    with pytest.raises(ValueError, match=r'prompts.jsonl:3: "prompt" must be a non-empty string') as error:
        PromptDataset(path=path)
    assert "fix or delete it" in str(error.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a dog",', r"prompts.jsonl:4: not a JSON object \(.*\); fix or delete that line"),
        ("a dog", r"prompts.jsonl:4: not a JSON object \(Expecting value.*\); fix or delete that line"),
        ('["a dog"]', r"prompts.jsonl:4: not a JSON object but a JSON list"),
        (
            '{"text": "a dog", "tag": "x"}',
            r"""prompts.jsonl:4: no "prompt" key \(the keys are \['tag', 'text'\]\); the prompt must be under "prompt\"""",
        ),
    ],
)
def test_a_bad_jsonl_line_is_named_by_its_real_line_number(tmp_path, line, message):
    """Blank lines are skipped but counted: the number is the one an editor shows."""
    path = _written(tmp_path / "prompts.jsonl", '{"prompt": "a cat"}', "", "   ", line)
    with pytest.raises(ValueError, match=message):
        PromptDataset(path=path)


def test_suffixes_are_case_insensitive_and_json_holds_an_array(tmp_path):
    upper = _written(tmp_path / "PROMPTS.JSONL", '{"prompt": "a cat", "tag": "x"}')
    assert PromptDataset(path=upper).prompts == ["a cat"] and PromptDataset(path=upper).metadata == [
        {"tag": "x"}
    ]
    assert PromptDataset(path=_written(tmp_path / "p.TXT", "a cat")).prompts == ["a cat"]
    array = tmp_path / "prompts.json"
    array.write_text(json.dumps(["a cat", {"prompt": "a dog", "tag": "counting"}], indent=2))
    dataset = PromptDataset(path=str(array))
    assert dataset.prompts == ["a cat", "a dog"] and dataset.metadata == [{}, {"tag": "counting"}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"prompts": ["a cat"]}',
            r"prompts.json: a .json prompt file must hold a JSON array .* not a JSON dict",
        ),
        (
            '["a cat", null]',
            r"prompts.json: array item 1 \(counting from 0\): None is neither a prompt string",
        ),
        (
            '["a cat", {"prompt": ""}]',
            r'prompts.json: array item 1 \(counting from 0\): "prompt" must be a non-empty',
        ),
        ('["a cat",\n "a dog"', r"prompts.json:2: not valid JSON"),
    ],
)
def test_a_bad_json_file_is_named(tmp_path, text, message):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        PromptDataset(path=str(path))


def test_an_unknown_suffix_lists_the_supported_ones(tmp_path):
    path = _written(tmp_path / "prompts.yaml", "- a cat")
    with pytest.raises(
        ValueError, match=r"prompts.yaml: unknown prompt file type '.yaml'; use one of .txt, .jsonl, .json"
    ):
        PromptDataset(path=path)


def test_inline_prompts_must_not_be_null_or_empty():
    with pytest.raises(
        ValueError, match=r"data.prompts: the prompts at \[1, 2\] \(counting from 0\) are null or empty"
    ):
        PromptDataset(prompts=["a cat", None, " "])


def test_a_broken_pair_line_is_named_by_its_real_line_number(tmp_path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (4, 4)).save(image)
    pair = {"prompt": "a cat", "question": "what?", "answer": "a cat", "image": "cat.png", "kind": "aligned"}
    path = _written(tmp_path / "pairs.jsonl", json.dumps(pair), "", '{"prompt": "a dog",')
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: not a JSON object \(.*\); fix or delete that line"):
        pair_dataset(path)
    path = _written(tmp_path / "pairs.jsonl", json.dumps(pair), "", json.dumps({**pair, "prompt": None}))
    with pytest.raises(ValueError, match=r'pairs.jsonl:3: "prompt" must be a non-empty string, got None'):
        pair_dataset(path)
    path = _written(tmp_path / "pairs.jsonl", "", json.dumps(pair), "", json.dumps({"prompt": "a dog"}))
    with pytest.raises(
        ValueError, match=r"pairs.jsonl:4: a pair needs \['answer', 'image', 'kind', 'question'\]"
    ):
        pair_dataset(path)
    assert pair_dataset(_written(tmp_path / "pairs.jsonl", "", json.dumps(pair))).prompts == ["a cat"]
