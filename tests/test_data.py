"""Prompt datasets from inline lists and files (Flow-GRPO's .txt and GenEval-style .jsonl formats)."""

import json

import pytest

from g2rpo.data import PromptDataset


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
