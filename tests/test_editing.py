"""Editing in the shapes world: edits whose target is known, the edit_shapes judge on rendered truth, and the
rewards that read an edit's source image (in process, over the reward server's wire, a VLM edit judge)."""

import json
import math

import numpy as np
import pytest
import torch

from g2rpo.data import source_images
from g2rpo.rewards import RewardEnsemble
from g2rpo.rewards.chat import ChatClient
from g2rpo.rewards.judge import VLMEditJudge
from g2rpo.rewards.wire import encode_image, pixels_of
from g2rpo.shapes.edit_reward import EditShapes, judge_edit
from g2rpo.shapes.editing import EDIT_TYPES, as_objects, edit_dataset, edits, held_out, make_edit
from g2rpo.shapes.geneval import ShapesDetector, holds
from g2rpo.shapes.world import WorldObject, boxes_apart, render

JUDGE = EditShapes()


def _judge(objects: list[WorldObject], edit: dict):
    return judge_edit(ShapesDetector()(render(objects)), edit, 32)


@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_edits_name_unique_objects_and_their_targets_fit_the_image(kind):
    rng = np.random.default_rng(1)
    for _ in range(50):
        edit = make_edit(kind, rng)
        source, target = as_objects(edit["source"]), as_objects(edit["target"])
        for scene in (source, target):
            assert all(0 <= x <= 32 for o in scene for x in o.box)
            assert all(boxes_apart(a, b, 2.0) for i, a in enumerate(scene) for b in scene[i + 1 :])
            assert (
                (scene is not target or kind != "remove") <= len(scene) <= 4
            )  # removing the only object empties it
        if kind != "count":  # an object is named by its colour and shape
            assert len({(o.colour, o.shape) for o in source}) == len(source)
        assert source != target
        json.dumps(edit)  # travels as prompt metadata, and over the remote wire format


def test_instructions_say_what_the_target_holds():
    rng = np.random.default_rng(2)
    examples = {kind: make_edit(kind, rng) for kind in EDIT_TYPES}
    recolor = examples["recolor"]
    named = as_objects(recolor["source"])[recolor["named"][0]]
    assert recolor["instruction"] == f"make the {named.colour} {named.shape} {recolor['colour']}"
    count = examples["count"]
    meta = {"tag": "counting", "include": [{"class": count["shape"], "count": count["count"]}]}
    meta["exclude"] = [{"class": count["shape"], "count": count["count"] + 1}]
    assert holds(as_objects(count["target"]), meta) and not holds(as_objects(count["source"]), meta)
    add = examples["add"]
    assert add["instruction"].startswith("add a") and add["instruction"].endswith(
        f"{add['colour']} {add['shape']}"
    )


def test_the_splits_are_disjoint_deterministic_and_cover_every_type():
    train, heldout = edits("train", 20, seed=3), edits("heldout", 20, seed=3)
    assert not any(held_out(e) for e in train) and all(held_out(e) for e in heldout)
    assert [e["edit"] for e in heldout] == [k for k in EDIT_TYPES for _ in range(20)]
    assert edits("heldout", 20, seed=3) == heldout
    with pytest.raises(ValueError, match="choose train or heldout"):
        edits("test", 1)


@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_the_judge_agrees_with_rendered_truth(kind):
    """The target rendered is a full, faithful edit; the source rendered is "returned unchanged"."""
    rng = np.random.default_rng(4)
    agree = 0
    for _ in range(100):
        edit = make_edit(kind, rng)
        images = torch.stack([render(as_objects(edit["target"])), render(as_objects(edit["source"]))])
        done, untouched = JUDGE.judge(images, [edit, edit])
        agree += (done.compliance, done.preservation, done.unchanged) == (1.0, 1.0, 0.0)
        agree += (untouched.compliance, untouched.preservation, untouched.unchanged) == (0.0, 1.0, 1.0)
    assert agree >= 0.99 * 200


def test_wrong_edits_fail_compliance_or_preservation():
    rng = np.random.default_rng(5)
    edit = make_edit("recolor", rng)
    while len(edit["source"]) < 3:
        edit = make_edit("recolor", rng)
    target = as_objects(edit["target"])
    index = edit["named"][0]
    before = as_objects(edit["source"])[index].colour
    other_colour = next(c for c in ("red", "orange", "blue", "green") if c not in (edit["colour"], before))
    wrong = list(target)
    wrong[index] = WorldObject(
        target[index].shape, other_colour, target[index].cx, target[index].cy, target[index].size
    )
    verdict = _judge(wrong, edit)  # recoloured, but not as asked: the old colour is gone, the new one absent
    assert verdict.compliance == 0.0 and verdict.compliance_partial == 0.5 and verdict.preservation == 1.0

    unnamed = next(i for i in range(len(target)) if i != index)
    moved = list(target)
    o = target[unnamed]
    moved[unnamed] = WorldObject(o.shape, o.colour, 32 - o.cx, 32 - o.cy, o.size)
    if all(boxes_apart(a, b, 2.0) for i, a in enumerate(moved) for b in moved[i + 1 :]):
        verdict = _judge(moved, edit)  # the edit, and an object it did not name moved away
        assert verdict.compliance == 1.0 and verdict.preservation < 1.0 and verdict.overall < 1.0


def test_an_unasked_object_costs_preservation_and_a_wrong_count_partial_credit():
    rng = np.random.default_rng(6)
    edit = make_edit("remove", rng)
    target = as_objects(edit["target"])
    extra = next(
        WorldObject("square", "green", x, y, 8.0)
        for x in (6.0, 16.0, 26.0)
        for y in (6.0, 16.0, 26.0)
        if all(boxes_apart(WorldObject("square", "green", x, y, 8.0), t, 2.0) for t in target)
    )
    verdict = _judge([*target, extra], edit)
    assert verdict.compliance == 1.0 and verdict.preservation == len(target) / (len(target) + 1)

    edit = make_edit("count", rng)
    while edit["count"] < 3:
        edit = make_edit("count", rng)
    kept = [o for o in as_objects(edit["target"])]
    shape_indices = [i for i, o in enumerate(kept) if o.shape == edit["shape"]]
    one_short = [o for i, o in enumerate(kept) if i != shape_indices[0]]
    verdict = _judge(one_short, edit)
    assert verdict.compliance == 0.0
    assert verdict.compliance_partial == pytest.approx(1 - 1 / edit["count"])


def test_the_reward_gives_every_term_and_nan_without_an_edit():
    dataset = edit_dataset("heldout", per_type=2, seed=7)
    assert len(dataset) == 12 and {m["tag"] for m in dataset.metadata} == set(EDIT_TYPES)
    assert dataset.prompts == [
        e["instruction"] for e in edits("heldout", 2, seed=7)
    ]  # prompts are instructions
    images = torch.stack(
        [render(as_objects(m["target"])) for m in dataset.metadata[:2]] + [torch.ones(3, 32, 32)]
    )
    metadata = [*dataset.metadata[:2], {"tag": "single_object"}]
    scores = JUDGE.scores(images, ["", "", ""], metadata)
    assert set(scores) == {"compliance", "compliance_partial", "preservation", "unchanged", "overall"}
    assert scores["overall"][:2].tolist() == [1.0, 1.0] and math.isnan(scores["overall"][2])
    assert torch.equal(JUDGE(images[:2], ["", ""], metadata[:2]), scores["overall"][:2])
    with pytest.raises(ValueError, match="term='quality' is not one of"):
        EditShapes(term="quality")


class SourceReader:
    """A reward that reads edits' sources, recording what it was given."""

    reads_sources = True

    def __init__(self) -> None:
        self.seen: list[torch.Tensor | None] = []

    def __call__(self, images, prompts, metadata, sources=None):
        self.seen.append(sources)
        return torch.zeros(len(images))


def _edit_batch(count: int = 3):
    dataset = edit_dataset("train", per_type=1, seed=8)
    metadata = dataset.metadata[:count]
    images = torch.stack([render(as_objects(m["target"])) for m in metadata])
    return images, dataset.prompts[:count], metadata


def test_the_ensemble_gives_sources_only_to_rewards_that_read_them():
    images, prompts, metadata = _edit_batch()
    reader = SourceReader()
    ensemble = RewardEnsemble({"reader": reader, "edit": EditShapes()})
    ensemble(images, prompts, metadata)
    torch.testing.assert_close(reader.seen[0], source_images(metadata, 32))
    ensemble(images, prompts, [{"tag": "single_object"}] * 3)  # text-to-image prompts: no source
    assert reader.seen[1] is None


def test_the_vlm_edit_judge_sends_the_source_then_the_edit(monkeypatch):
    images, prompts, metadata = _edit_batch(2)
    sent = []

    def complete_all(self, contents):
        sent.extend(contents)
        return ["Both asked changes are there. Final Score: 4", "no score"]

    monkeypatch.setattr(ChatClient, "complete_all", complete_all)
    judge = VLMEditJudge(ChatClient(base_url="http://127.0.0.1:9/v1", model="judge"), image_size=None)
    scores = RewardEnsemble({"judge": judge})(images, prompts, metadata).scores["judge"]
    assert scores[0] == 0.8 and math.isnan(scores[1])
    source, edited, text = sent[0]
    sources = source_images(metadata, 32)
    assert source["image_url"]["url"].endswith(encode_image(pixels_of(sources[:1])[0]))
    assert edited["image_url"]["url"].endswith(encode_image(pixels_of(images[:1])[0]))
    assert f"Instruction: [{prompts[0]}]" in text["text"]
    assert math.isnan(judge(images, prompts, [{}, {}])[0])  # not edits: no source, NaN
