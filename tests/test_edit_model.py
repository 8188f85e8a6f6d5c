"""The shapes world's editing model: the diptych keeps the base's positions and weights, the edit policy
reads the source (CFG keeps it), and its training batches never show a held-out composition."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from g2rpo.data import source_images
from g2rpo.policies import SD3EditPolicy
from g2rpo.shapes.editing import EDIT_TYPES, edits, held_out, make_edit
from g2rpo.shapes.model import edit_pipeline, shapes_pipeline, vocabulary
from g2rpo.shapes.training.edit import RenderedEdits
from g2rpo.types import Conditioning

TINY = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "text_hidden_size": 16}


@pytest.fixture(scope="module")
def models():
    base = shapes_pipeline(seed=0, **TINY)
    return base, edit_pipeline(copy.deepcopy(base))


def test_the_generated_half_keeps_the_base_positions_and_every_base_weight(models):
    base, editor = models
    dim = base.transformer.pos_embed.pos_embed.shape[-1]
    diptych = editor.transformer.pos_embed.cropped_pos_embed(32, 64).reshape(8, 16, dim)
    generated, source = diptych[:, :8].reshape(1, 64, dim), diptych[:, 8:].reshape(1, 64, dim)
    torch.testing.assert_close(generated, base.transformer.pos_embed.pos_embed)
    assert (source - generated).abs().amax(-1).min() > 0.1  # every source token's position is another
    wide = editor.transformer.state_dict()
    for name, weight in base.transformer.state_dict().items():
        if name != "pos_embed.pos_embed":
            assert torch.equal(wide[name], weight), name
    for old, new in ((base.text_encoder, editor.text_encoder), (base.text_encoder_2, editor.text_encoder_2)):
        rows = old.get_input_embeddings().weight
        assert torch.equal(new.get_input_embeddings().weight[: len(rows)], rows)


def test_every_instruction_is_in_the_vocabulary_and_captions_keep_their_ids(models):
    base, editor = models
    unknown = editor.tokenizer.unk_token_id
    for edit in edits("train", 30, seed=1) + edits("heldout", 30, seed=1):
        assert unknown not in editor.tokenizer(edit["instruction"]).input_ids, edit["instruction"]
    caption = "a photo of two red circles and a blue square"
    assert editor.tokenizer(caption).input_ids == base.tokenizer(caption).input_ids
    assert len(editor.tokenizer) > len(vocabulary())


def test_the_edit_policy_reads_the_source_and_guidance_keeps_it(models):
    base, editor = models
    policy = SD3EditPolicy(editor, resolution=32, max_sequence_length=0)
    rng = np.random.default_rng(0)
    pair = [make_edit("recolor", rng), make_edit("add", rng)]
    cond = policy.encode([e["instruction"] for e in pair], sources=policy.sources(pair))
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = policy.velocity(x, 0.7, cond)
        swapped = policy.velocity(
            x, 0.7, Conditioning(**{**vars(cond), "context_latents": cond.context_latents.flip(0)})
        )
        guided = policy.velocity(x, 0.7, cond, guidance_scale=3.0)
        sigma = torch.full((2,), 0.7)
        uncond = policy.transformer_velocity(x, sigma, cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds,
                                             context=cond.context_latents)  # fmt: skip
    assert v.shape == x.shape  # the generated half only
    assert (v - swapped).abs().flatten(1).amax(1).min() > 1e-4  # each row depends on its source
    torch.testing.assert_close(guided, uncond + 3.0 * (v - uncond))  # the unconditional row sees the source
    torch.testing.assert_close(cond.context_latents, source_images(pair, 32) * 2 - 1)
    with pytest.raises(ValueError, match="edits a source image"):
        policy.velocity(x, 0.7, policy.encode(["make the red circle blue"] * 2))
    with pytest.raises(ValueError, match="pos_embed_max_size >= 16; this transformer's is 8"):
        SD3EditPolicy(base, resolution=32, max_sequence_length=0)


def test_training_edits_cover_every_type_and_no_held_out_composition():
    batches = RenderedEdits(batch_size=4, seed=0)
    rng = np.random.default_rng(0)
    drawn = [batches.draw(rng) for _ in range(300)]
    assert not any(map(held_out, drawn))
    assert {e["edit"] for e in drawn} == set(EDIT_TYPES)
    targets, instructions, sources = batches.batch(3)
    again = RenderedEdits(batch_size=4, seed=0).batch(3)
    assert torch.equal(targets, again[0]) and instructions == again[1] and torch.equal(sources, again[2])
    assert targets.shape == sources.shape == (4, 3, 32, 32) and targets.min() >= -1 and targets.max() <= 1
    assert not torch.equal(targets, sources)


def test_the_saved_editor_loads_with_its_position_table(models, tmp_path):
    from g2rpo.shapes.model import load_edit_model

    _, editor = models
    editor.save_pretrained(tmp_path)
    loaded = load_edit_model(str(tmp_path))
    assert torch.equal(loaded.transformer.pos_embed.pos_embed, editor.transformer.pos_embed.pos_embed)
    assert (
        loaded.tokenizer("swap the red circle and the blue square").input_ids
        == editor.tokenizer("swap the red circle and the blue square").input_ids
    )
    with pytest.raises(FileNotFoundError, match="make edit-model"):
        load_edit_model(str(tmp_path / "absent"))


def test_evaluation_conditions_on_the_source_and_gives_it_to_the_rewards_that_read_it(models):
    from g2rpo.evaluation.evaluator import Evaluator
    from g2rpo.shapes.editing import edit_dataset

    class SourceReader:
        reads_sources = True
        seen: list = []

        def __call__(self, images, prompts, metadata, sources=None):
            self.seen.append(sources)
            return (images - sources).abs().flatten(1).mean(1)

    _, editor = models
    policy = SD3EditPolicy(editor, resolution=32, max_sequence_length=0)
    dataset = edit_dataset("heldout", per_type=1, seed=0)
    reader = SourceReader()
    evaluation = Evaluator(dataset, {"distance": reader}, num_steps=2, images_per_task=1, guidance_scale=1.0)(
        policy
    )
    torch.testing.assert_close(reader.seen[0], source_images(dataset.metadata, 32))
    assert set(evaluation.scores["distance"]) == {*EDIT_TYPES, "overall"}
