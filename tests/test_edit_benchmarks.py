"""GEdit-Bench and ImgEdit-Bench: their local files in the official layouts (tiny fakes built here), the judges'
prompts and answer parsing against a fake chat client, and one evaluation through the CLI on the tiny Kontext."""

import io
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from PIL import Image

from g2rpo.data import source_images
from g2rpo.evaluate import evaluate
from g2rpo.evaluation.edit_benchmarks import GEDIT_TASKS, gedit_bench, imgedit_bench
from g2rpo.evaluation.layout import read_images
from g2rpo.rewards.benchmark_judges import (
    IMGEDIT_PROMPTS_URL,
    VIESCORE_PROMPTS_URL,
    GEditJudge,
    ImgEditJudge,
    viescore_list,
)
from g2rpo.rewards.chat import ChatClient
from g2rpo.rewards.wire import encode_image, pixels_of

# our own stand-ins for VIEScore's strings: the names and slots of vie_prompts.py, not its wording; a file
# that is run instead of parsed stops the test
VIESCORE_FAKE = '''
"""Generated prompts."""
_context_no_delimit = """Grade AI images. Answer {"score" : [...], "reasoning" : "..."}"""
_prompts_0shot_two_image_edit_rule = """RULES: the first image is the original, the second its edit."""
_prompts_0shot_tie_rule_SC = """Score success and over-editing, 0 to 10.
Editing instruction: <instruction>
"""
_prompts_0shot_rule_PQ = """RULES: one image. Score naturalness and artifacts, 0 to 10."""
_prompts_0shot_t2i_rule_SC = """Text Prompt: <prompt>"""
import os
raise SystemExit("vie_prompts.py must be parsed, never run")
'''
RUBRICS_FAKE = {
    kind: f"Grade the {kind} edit: Compliance, Naturalness, Fidelity, 1 to 5 each.\n"
    "editing instruction is : <edit_prompt>.\n"
    for kind in ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")
}
CLIENT = ChatClient(base_url="http://127.0.0.1:9/v1", model="judge")


def _encoded(color: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_gedit(root, rows: list[dict]) -> None:
    """A GEdit-Bench download: the ``train`` split saved as Arrow files (dataset_dict.json, train/*.arrow)."""
    import datasets

    image = datasets.Image()
    features = datasets.Features(
        {
            "task_type": datasets.Value("string"),
            "key": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "instruction_language": datasets.Value("string"),
            "input_image": image,
            "input_image_raw": image,
            "Intersection_exist": datasets.Value("bool"),
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    split = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"train": split}).save_to_disk(str(root))


def gedit_row(task: str, key: str, instruction: str, language: str = "en", intersection: bool = True) -> dict:
    return {
        "task_type": task,
        "key": key,
        "instruction": instruction,
        "instruction_language": language,
        "input_image": {"bytes": _encoded("gray", (6, 4), "PNG"), "path": None},  # the judge's copy: not used
        "input_image_raw": {
            "bytes": _encoded("red" if task == "color_alter" else "blue", (12, 8), "JPEG"),
            "path": None,
        },
        "Intersection_exist": intersection,
    }


GEDIT_ROWS = [
    gedit_row("subject-add", "a1", "Add a hat to the dog", intersection=False),
    gedit_row("color_alter", "c1", "Make the car red"),
    gedit_row("color_alter", "c1", "把车变成红色", language="cn"),
    gedit_row("subject-add", "a2", "Add a bird in the sky"),
    gedit_row("color_alter", "c2", "Turn the wall blue"),
]


def write_imgedit(root) -> dict:
    """Benchmark.tar's basic suite: Benchmark/singleturn/singleturn.json and its images at their ids."""
    folder = root / "Benchmark" / "singleturn"
    cases = {
        "1082": {
            "id": "animal/000342021.jpg",
            "prompt": "Change the shell to a smooth surface.",
            "edit_type": "adjust",
        },
        "673": {"id": "style/000278574.jpg", "prompt": "Make it a ukiyo-e print.", "edit_type": "style"},
        "12": {"id": "for_add/000000012.jpg", "prompt": "Add a red kite in the sky.", "edit_type": "add"},
        "13": {"id": "for_add/000000013.jpg", "prompt": "Add a boat on the lake.", "edit_type": "add"},
    }
    for case in cases.values():
        (folder / case["id"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / case["id"]).write_bytes(_encoded("green", (10, 10), "JPEG"))
    (folder / "singleturn.json").write_text(json.dumps(cases))
    return cases


def test_gedit_reader_takes_the_english_cases_and_writes_each_raw_source_once(tmp_path, monkeypatch):
    root = tmp_path / "GEdit-Bench"
    write_gedit(root, GEDIT_ROWS)
    assert (root / "dataset_dict.json").is_file() and list((root / "train").glob("data-*.arrow"))
    dataset = gedit_bench(str(root), str(tmp_path / "sources"), download="hf download ...")
    # ordered by the paper's type order, file order within a type; the Chinese twin left out
    assert dataset.prompts == [
        "Make the car red",
        "Turn the wall blue",
        "Add a hat to the dog",
        "Add a bird in the sky",
    ]
    assert [m["tag"] for m in dataset.metadata] == [
        "color_alter",
        "color_alter",
        "subject-add",
        "subject-add",
    ]
    assert [m["intersection"] for m in dataset.metadata] == [True, True, False, True]
    first = dataset.metadata[0]["source_image"]
    assert first == str(tmp_path / "sources" / "color_alter" / "en" / "c1.jpeg")
    with open(first, "rb") as stream:  # input_image_raw's bytes, unchanged (not input_image's)
        assert stream.read() == GEDIT_ROWS[1]["input_image_raw"]["bytes"]
    assert source_images(dataset.metadata[:1], 8)[0, :, 4, 4].tolist() == pytest.approx(
        [254 / 255, 0, 0], abs=0.02
    )
    with monkeypatch.context() as patched:  # a second pass reads the files the first one wrote
        patched.setattr("g2rpo.evaluation.edit_benchmarks.atomic_write", lambda *a: pytest.fail("rewritten"))
        assert gedit_bench(str(root), str(tmp_path / "sources"), download="").metadata == dataset.metadata
    chinese = gedit_bench(str(root), str(tmp_path / "sources"), download="", language="cn")
    assert chinese.prompts == ["把车变成红色"] and chinese.metadata[0]["source_image"].endswith("cn/c1.jpeg")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.ipc.open_stream(pa.memory_map(str(next((root / "train").glob("*.arrow"))))).read_all()

    def arrow_file(path):  # the Arrow IPC file format, not the stream format save_to_disk writes
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)

    for name, write in [
        ("file.arrow", arrow_file),
        ("train-00000-of-00001.parquet", partial(pq.write_table, table)),
    ]:
        other = tmp_path / name / "data"
        other.mkdir(parents=True)
        write(other / name)
        assert (
            gedit_bench(str(other.parent), str(tmp_path / name / "s"), download="").prompts == dataset.prompts
        )
    subset = gedit_bench(str(root), str(tmp_path / "sources"), download="", intersection_only=True, limit=1)
    assert subset.prompts == ["Make the car red", "Add a bird in the sky"]
    assert set(GEDIT_TASKS) >= {m["tag"] for m in dataset.metadata} and len(GEDIT_TASKS) == 11


def test_gedit_reader_names_what_is_missing_or_malformed(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no prompt file at .*absent.* Get it with:\n  hf download stepfun"
    ):
        gedit_bench(
            str(tmp_path / "absent"), str(tmp_path / "s"), download="hf download stepfun-ai/GEdit-Bench"
        )
    bad = tmp_path / "bad"
    write_gedit(bad, [GEDIT_ROWS[0], gedit_row("colour_alter", "x9", "Make it red")])
    with pytest.raises(
        ValueError, match=r"data-00000-of-00001.arrow: row 1 \(key 'x9'\): task_type 'colour_alter'"
    ):
        gedit_bench(str(bad), str(tmp_path / "s"), download="")
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other" / "data"
    other.mkdir(parents=True)
    pq.write_table(pa.table({"key": ["k"], "instruction": ["x"]}), other / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="no column.*task_type.*input_image_raw.*not GEdit-Bench's files"):
        gedit_bench(str(tmp_path / "other"), str(tmp_path / "s"), download="")
    good = tmp_path / "GEdit-Bench"
    write_gedit(good, GEDIT_ROWS)
    with pytest.raises(ValueError, match=r"no GEdit-Bench case in language 'de' .*\['cn', 'en'\]"):
        gedit_bench(str(good), str(tmp_path / "s"), download="", language="de")


def test_imgedit_reader_reads_singleturn_json_and_checks_every_image(tmp_path):
    cases = write_imgedit(tmp_path)
    path = tmp_path / "Benchmark" / "singleturn" / "singleturn.json"
    dataset = imgedit_bench(str(path), download="")
    assert [m["tag"] for m in dataset.metadata] == [
        "add",
        "add",
        "adjust",
        "style",
    ]  # the paper's column order
    assert dataset.prompts[2] == cases["1082"]["prompt"]
    assert dataset.metadata[2] == {
        "tag": "adjust",
        "edit_type": "adjust",
        "key": "1082",
        "source_image": str(path.parent / "animal" / "000342021.jpg"),
    }
    assert [m["key"] for m in imgedit_bench(str(path), download="", limit=1).metadata] == [
        "12",
        "1082",
        "673",
    ]
    with pytest.raises(
        FileNotFoundError, match="no prompt file at .*basic.json.* Get it with:\n  hf download sysuyy"
    ):
        imgedit_bench(str(tmp_path / "basic.json"), download="hf download sysuyy/ImgEdit Benchmark.tar")
    (path.parent / "style" / "000278574.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"singleturn.json: key '673': no source image at .*000278574.jpg"
    ):
        imgedit_bench(str(path), download="")
    for case, message in [
        (
            {"id": "animal/000342021.jpg", "prompt": "x", "edit_type": "hybrid"},
            "edit_type 'hybrid' is not one of",
        ),
        ({"id": "animal/000342021.jpg", "edit_type": "add"}, r"it has no \['prompt'\]"),
    ]:
        path.write_text(json.dumps({"1082": cases["1082"], "99": case}))
        with pytest.raises(ValueError, match=rf"singleturn.json: key '99': .*{message}"):
            imgedit_bench(str(path), download="")


@pytest.mark.parametrize(
    ("answer", "scores"),
    [
        ('||V^=^V||\n{\n"score" : [8, 6],\n"reasoning" : "fine"\n}\n||V^=^V||', [8, 6]),
        ('Sure. {"score": [7, 9], "reasoning": "a hat, {nicely} placed"} Done.', [7, 9]),
        ("{score: [3, 4], reasoning: unquoted keys}", [3, 4]),  # not JSON: the score list is still read
        ('```json\n{"score": 5, "reasoning": "one number"}\n```', [5]),
        ("[6, 0]", [6, 0]),
        ("7", [7]),
        ("The edit is good. Final Score: 4", None),
        ('{"reasoning": "no score"}', None),
        ('{"score": ["high", 2]}', None),
        (None, None),
    ],
)
def test_viescore_answers_read_as_the_official_scorer_reads_them(answer, scores):
    assert viescore_list(answer) == scores


def _fake_judge(monkeypatch, answer):
    """``ChatClient.complete_all`` answering each message with ``answer(content)``; returns what was sent."""
    sent = []

    def complete_all(self, contents):
        sent.extend(contents)
        return [answer(content) for content in contents]

    monkeypatch.setattr(ChatClient, "complete_all", complete_all)
    return sent


def _image_url(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + encode_image(pixels)


def test_gedit_judge_asks_sc_with_both_images_and_pq_with_the_edit_then_takes_sqrt(monkeypatch, tmp_path):
    prompts_path = tmp_path / "vie_prompts.py"
    prompts_path.write_text(VIESCORE_FAKE)
    judge = GEditJudge(CLIENT, str(prompts_path))
    images, sources = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    instructions = ["Make the car red", "Add a hat", "Remove the tree"]
    answers = {  # SC and PQ answers per instruction (PQ keyed by the edit's pixels)
        "Make the car red": '{"score": [8, 6], "reasoning": "ok"}',
        "Add a hat": '{"score": [10, 2]}',
        "Remove the tree": "I cannot tell.",
    }
    quality = dict(
        zip(map(_image_url, pixels_of(images)), ['{"score": [9, 4]}', "[5, 5]", '{"score": [11, 3]}'])
    )

    def answer(content):
        text = content[-1]["text"]
        if "Editing instruction:" in text:
            return answers[text.rsplit("Editing instruction: ", 1)[1].strip()]
        return quality[content[0]["image_url"]["url"]]

    sent = _fake_judge(monkeypatch, answer)
    scores = judge.scores(images, instructions, [{}] * 3, sources=sources)
    assert scores["sc"][:2].tolist() == [6.0, 2.0] and math.isnan(scores["sc"][2])  # the list's minimum, 0-10
    assert scores["pq"][:2].tolist() == [4.0, 5.0] and math.isnan(scores["pq"][2])  # 11 is off the scale
    assert scores["overall"][:2].tolist() == pytest.approx([math.sqrt(24), math.sqrt(10)])
    assert math.isnan(scores["overall"][2])
    semantic, quality_ask = sent[0], sent[3]
    assert [part["type"] for part in semantic] == [
        "image_url",
        "image_url",
        "text",
    ]  # source, edit, then text
    assert semantic[0]["image_url"]["url"] == _image_url(pixels_of(sources)[0])
    assert semantic[1]["image_url"]["url"] == _image_url(pixels_of(images)[0])
    assert semantic[2]["text"] == (
        'Grade AI images. Answer {"score" : [...], "reasoning" : "..."}\n'
        "RULES: the first image is the original, the second its edit.\n"
        "Score success and over-editing, 0 to 10.\nEditing instruction: Make the car red\n"
    )
    assert [part["type"] for part in quality_ask] == ["image_url", "text"]
    assert quality_ask[0]["image_url"]["url"] == _image_url(pixels_of(images)[0])
    assert quality_ask[1]["text"].endswith("\nRULES: one image. Score naturalness and artifacts, 0 to 10.")
    assert judge(images, instructions, [{}] * 3, sources=sources)[:2].tolist() == pytest.approx(
        [math.sqrt(24) / 10, math.sqrt(10) / 10]
    )
    assert all(math.isnan(v) for v in judge.scores(images, instructions, [{}] * 3)["overall"])  # no sources


def test_imgedit_judge_sends_its_types_rubric_then_the_source_then_the_edit(monkeypatch, tmp_path):
    prompts_path = tmp_path / "prompts.json"
    prompts_path.write_text(json.dumps(RUBRICS_FAKE))
    judge = ImgEditJudge(CLIENT, str(prompts_path))
    images, sources = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    replies = [
        "Brief reasoning: the kite: red, as asked.\nPrompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Coherence: 3",
        "Brief reasoning: nothing changed.\nStyle Fidelity: 1\nContent Preservation: 5\nRendering Quality: 5",
        "I am unable to grade this.",
        "Prompt Compliance: 7\nVisual Naturalness: 3\nPhysical & Detail Coherence: 3",
    ]
    sent = _fake_judge(
        monkeypatch, lambda content: replies[int(content[0]["text"].split("#")[1].split(".")[0])]
    )
    metadata = [{"edit_type": kind} for kind in ("add", "style", "remove", "add")]
    instructions = [f"Edit #{i}." for i in range(4)]
    scores = judge.scores(images, instructions, metadata, sources=sources)["score"]
    assert scores[:2].tolist() == pytest.approx([3.33, 3.67])  # mean of three, rounded to two decimals
    assert math.isnan(scores[2]) and math.isnan(scores[3])  # no criteria; 7 is off the 1-5 scale
    text, source, edited = sent[1]
    assert text["text"] == RUBRICS_FAKE["style"].replace("<edit_prompt>", "Edit #1.")
    assert source["image_url"]["url"] == _image_url(pixels_of(sources)[1])
    assert edited["image_url"]["url"] == _image_url(pixels_of(images)[1])
    assert judge(images, instructions, metadata, sources=sources)[0] == pytest.approx(3.33 / 5)
    with pytest.raises(
        ValueError, match=r"prompt 0 \('Edit #0.'\) has edit_type 'hybrid', but the rubrics in"
    ):
        judge.scores(images[:1], instructions[:1], [{"edit_type": "hybrid"}], sources=sources[:1])


def test_the_judges_rubric_files_say_where_to_get_them(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"no prompt file at .* Get it with:\n  curl -L {VIESCORE_PROMPTS_URL}"
    ):
        GEditJudge(CLIENT, str(tmp_path / "vie_prompts.py"))
    with pytest.raises(FileNotFoundError, match=f"Get it with:\n  curl -L {IMGEDIT_PROMPTS_URL}"):
        ImgEditJudge(CLIENT, str(tmp_path / "prompts.json"))
    (tmp_path / "vie_prompts.py").write_text('_context_no_delimit = "x"\n')
    with pytest.raises(ValueError, match="no string _prompts_0shot_two_image_edit_rule, .*_rule_PQ"):
        GEditJudge(CLIENT, str(tmp_path / "vie_prompts.py"))
    (tmp_path / "prompts.json").write_text(json.dumps({"add": "Grade the edit."}))
    with pytest.raises(ValueError, match="the rubric of 'add' is not a text with an <edit_prompt> slot"):
        ImgEditJudge(CLIENT, str(tmp_path / "prompts.json"))


def gedit_command(tmp_path, *overrides: str):
    """``python -m g2rpo.evaluate eval=gedit_bench <overrides>``'s config, writing into ``tmp_path``."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=["eval=gedit_bench", f"output={tmp_path / 'eval.json'}", "suite=gedit_bench",
                       f"run_dir={tmp_path}", *overrides],
        )  # fmt: skip


def test_the_gedit_suite_scores_the_tiny_kontexts_edits_per_type(monkeypatch, tmp_path):
    """eval=gedit_bench through the CLI: the tiny Kontext edits each English case's raw source, the judge (faked)
    gets that source beside the edit, and the table has SC, PQ and O per type with O's mean of type means."""
    root = tmp_path / "GEdit-Bench"
    write_gedit(root, GEDIT_ROWS)
    prompts_path = tmp_path / "vie_prompts.py"
    prompts_path.write_text(VIESCORE_FAKE)
    semantic = {"Make the car red": [8, 6], "Turn the wall blue": [4, 9], "Add a hat to the dog": [9, 9]}
    asked = []

    def answer(content):
        text = content[-1]["text"]
        if "Editing instruction:" not in text:
            return '{"score": [9, 4]}'
        asked.append(content)
        instruction = text.rsplit("Editing instruction: ", 1)[1].strip()
        return json.dumps({"score": semantic.get(instruction, [0, 5])})

    _fake_judge(monkeypatch, answer)
    monkeypatch.setattr(ChatClient, "check", lambda self, timeout_s=5.0: None)
    cfg = gedit_command(tmp_path, "model=tiny_flux_kontext", f"eval.dataset.path={root}",
                        f"eval.rewards.gedit.prompts_path={prompts_path}", "eval.num_steps=2", "eval.resolution=16",
                        "eval.panel_size=2")  # fmt: skip
    evaluate(cfg)
    record = json.loads((tmp_path / "eval.json").read_text())
    scores = record["scores"]
    assert set(scores) == {"gedit/sc", "gedit/pq", "gedit/overall"} and record["num_images"] == 4
    assert scores["gedit/sc"] == pytest.approx({"color_alter": 5.0, "subject-add": 4.5, "overall": 4.75})
    assert scores["gedit/pq"] == pytest.approx({"color_alter": 4.0, "subject-add": 4.0, "overall": 4.0})
    color, add = (math.sqrt(24) + math.sqrt(16)) / 2, (math.sqrt(36) + 0.0) / 2
    assert scores["gedit/overall"] == pytest.approx(
        {"color_alter": color, "subject-add": add, "overall": (color + add) / 2}
    )
    assert record["protocol"]["resolution"] == 16 and record["protocol"]["overall"] == "tasks"
    written = read_images(str(tmp_path / "images"))
    assert len(written) == 4 and all(meta["source_image"].endswith(".jpeg") for meta, _ in written)
    first = written[0][0]
    expected_source = pixels_of(source_images([first], 16))[0]  # the raw source, at the edit's size
    assert asked[0][0]["image_url"]["url"] == _image_url(expected_source)


def test_a_missing_benchmark_stops_the_evaluation_before_the_model_loads(monkeypatch, tmp_path):
    """model=flux_kontext has no weights here either: the benchmark's files are what the command names first."""
    monkeypatch.setattr(ChatClient, "check", lambda self, timeout_s=5.0: None)
    cfg = gedit_command(tmp_path, "model=flux_kontext", f"eval.dataset.path={tmp_path / 'GEdit-Bench'}")
    with pytest.raises(Exception, match=r"no prompt file at .*GEdit-Bench's \*.arrow") as error:
        evaluate(cfg)
    assert f"hf download stepfun-ai/GEdit-Bench --repo-type dataset --local-dir {tmp_path}" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("suite", "resolution", "reward", "port"),
    [("gedit_bench", 512, "gedit", 17142), ("imgedit_bench", 1024, "imgedit", 17143)],
)
def test_the_editing_suites_pin_their_protocol(suite, resolution, reward, port):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"eval={suite}"]).eval
    protocol = (
        cfg.images_per_prompt,
        cfg.resolution,
        cfg.num_steps,
        cfg.guidance_scale,
        cfg.seed,
        cfg.overall,
    )
    assert protocol == (1, resolution, 28, 1.0, 0, "tasks") and cfg.noise == "prompt"
    assert set(cfg.rewards) == {reward} and cfg.rewards[reward].image_size is None
    assert cfg.rewards[reward].chat.base_url == f"http://127.0.0.1:{port}/v1"
    assert cfg.rewards[reward].chat.temperature == 0.0
