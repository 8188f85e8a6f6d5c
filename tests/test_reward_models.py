"""The CLIP-family rewards on tiny random CLIPs built in code: shapes, scaling, batching, loading, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from g2rpo.policies.tiny import char_tokenizer
from g2rpo.rewards.clip import AestheticMLP, ClipScore, LaionAesthetic, PickScore

MAX_LENGTH = 24
PROMPTS = ["a red cube", "a photo of a cat", "two dogs on a beach", "a blue sky"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def tiny_clip(projection_dim: int = 32, seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    tokenizer = char_tokenizer(MAX_LENGTH)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images already on the uint8 grid, so a hand-normalised copy sees the very same pixels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator).float() / 255


@pytest.fixture(scope="module")
def parts() -> tuple[CLIPModel, CLIPProcessor]:
    return tiny_clip()


@pytest.fixture(scope="module")
def aesthetic() -> LaionAesthetic:
    model, processor = tiny_clip(projection_dim=768)
    torch.manual_seed(1)
    return LaionAesthetic(model=model, processor=processor, head=AestheticMLP())


def by_hand(model: CLIPModel, processor: CLIPProcessor, pixels: torch.Tensor, prompts) -> torch.Tensor:
    """logit_scale.exp() * cos(image, text) with CLIP's normalisation applied by hand (no resize at 32 px)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.vision_model(pixel_values=(pixels - mean) / std).pooler_output
        image = model.visual_projection(image)
        tokens = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return model.logit_scale.exp() * cosine


@pytest.mark.parametrize(("reward_class", "divisor"), [(PickScore, 26.0), (ClipScore, 30.0)])
def test_similarity_rewards_match_the_formula(parts, reward_class, divisor):
    model, processor = parts
    reward = reward_class(model=model, processor=processor)
    pixels = images()
    scores = reward(pixels, PROMPTS, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(
        scores, by_hand(model, processor, pixels, PROMPTS) / divisor, atol=1e-5, rtol=1e-5
    )
    assert scores.abs().max() <= model.logit_scale.exp() / divisor + 1e-6  # |cos| <= 1


@pytest.mark.parametrize("reward_class", [PickScore, ClipScore])
def test_similarity_rewards_batch_prompt_and_quantisation(parts, reward_class):
    model, processor = parts
    reward = reward_class(model=model, processor=processor)
    pixels = images()
    scores = reward(pixels, PROMPTS, [{}] * 4)
    halves = torch.cat([reward(pixels[:2], PROMPTS[:2]), reward(pixels[2:], PROMPTS[2:])])
    torch.testing.assert_close(scores, halves, atol=1e-5, rtol=1e-5)
    same_image = pixels[:1].expand(4, -1, -1, -1)
    assert reward(same_image, PROMPTS).unique().numel() == 4  # the prompt matters
    off_grid = (pixels + 0.3 / 255).clamp(0, 1)  # rounds back to the same uint8 image
    torch.testing.assert_close(reward(off_grid, PROMPTS), scores)


def test_aesthetic_is_the_head_on_the_normalised_embedding(aesthetic):
    pixels = images()
    scores = aesthetic(pixels, PROMPTS, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        embedding = aesthetic.model.visual_projection(
            aesthetic.model.vision_model(pixel_values=(pixels - mean) / std).pooler_output
        )
        expected = aesthetic.head(embedding / embedding.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([aesthetic(pixels[:1]), aesthetic(pixels[1:])]), scores)
    torch.testing.assert_close(aesthetic(pixels, ["x"] * 4), scores)  # prompts are not used
    torch.testing.assert_close(aesthetic((pixels - 0.3 / 255).clamp(0, 1)), scores)
    assert aesthetic(images(seed=1)).sub(scores).abs().max() > 0  # the image matters


def test_aesthetic_head_has_the_original_layout_and_loads_pth_and_safetensors(tmp_path):
    head = AestheticMLP()
    shapes = {name: tuple(p.shape) for name, p in head.state_dict().items() if name.endswith("weight")}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.2.weight": (128, 1024),
        "layers.4.weight": (64, 128),
        "layers.6.weight": (16, 64),
        "layers.7.weight": (1, 16),
    }
    assert [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    model, processor = tiny_clip(projection_dim=768)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    pixels = images(batch=2)
    expected = LaionAesthetic(model=model, processor=processor, head=head)(pixels)
    for name in ("head.pth", "head.safetensors"):
        loaded = LaionAesthetic(model=model, processor=processor, head_path=str(tmp_path / name))
        torch.testing.assert_close(loaded(pixels), expected)


def test_loads_from_local_directories_and_resizes(parts, tmp_path):
    model, processor = parts
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    loaded = PickScore(path=str(tmp_path / "model"), processor_path=str(tmp_path / "processor"))
    reference = PickScore(model=model, processor=processor)
    pixels = images()
    torch.testing.assert_close(loaded(pixels, PROMPTS), reference(pixels, PROMPTS))
    big = torch.nn.functional.interpolate(pixels, scale_factor=2, mode="nearest")  # the processor resizes
    assert loaded(big, PROMPTS).shape == (4,) and torch.isfinite(loaded(big, PROMPTS)).all()


def test_dtype_and_prompt_count(parts):
    model, processor = parts
    half = ClipScore(model=CLIPModel(model.config), processor=processor, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half(images(), PROMPTS).dtype == torch.float32
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        half(images(), PROMPTS[:3])


@pytest.mark.parametrize(
    ("build", "missing", "hint"),
    [
        (
            lambda p: PickScore(path=p, processor_path=p),
            "CLIP model",
            "hf download yuvalkirstain/PickScore_v1",
        ),
        (lambda p: ClipScore(path=p), "CLIP model", "hf download openai/clip-vit-large-patch14"),
        (
            lambda p: LaionAesthetic(path=p, head_path=p),
            "CLIP model",
            "hf download openai/clip-vit-large-patch14",
        ),
    ],
)
def test_missing_weights_say_what_is_missing_and_how_to_get_it(tmp_path, build, missing, hint):
    path = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=missing) as error:
        build(path)
    assert hint in str(error.value) and path in str(error.value)


def test_missing_processor_aesthetic_head_and_weight_files(parts, tmp_path):
    model, _ = parts
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        PickScore(model=model, processor_path=absent)
    big, processor = tiny_clip(projection_dim=768)
    with pytest.raises(FileNotFoundError, match="aesthetic head") as error:
        LaionAesthetic(model=big, processor=processor, head_path=absent)
    assert f"wget -O {absent} " in str(error.value) and "sac+logos+ava1-l14-linearMSE.pth" in str(error.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no loadable weights"):
        ClipScore(path=str(empty))
