"""ImageReward's converter and reward against an independent BLIP/med-layout reference.

The reference is built from torch primitives with the original module names, so its ``state_dict`` has the
checkpoint's keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``), and restates the
original forward: BLIP's ``vit.py`` (pre-LN blocks, fused ``qkv`` laid out as ``[3, heads, head_dim]``, GELU,
LayerNorm eps 1e-6, all tokens after the final norm), med's ``BertModel`` in ``multimodal`` mode (post-LN
layers of self-attention with -10000 on padding, cross-attention to every image token, GELU feed-forward;
word + absolute position embeddings, no token types; a persistent ``position_ids`` buffer), then
``ImageReward.score``: the first token's state -> MLP -> ``(r - mean) / std``, one image at a time.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn
from transformers import BertTokenizer

from g2rpo.rewards.imagereward import (
    MAX_LENGTH,
    ImageReward,
    ImageRewardModel,
    add_blip_tokens,
    load_image_reward_model,
    text_config,
    vision_config,
)
from g2rpo.rewards.weights.imagereward import convert_image_reward_state_dict

VIT_WIDTH, VIT_DEPTH, VIT_HEADS, VIT_MLP, IMAGE, PATCH = 32, 2, 4, 64, 32, 8
TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, TEXT_MLP, POSITIONS = 24, 2, 4, 48, 40
WORDS = ["a", "red", "cube", "photo", "of", "the", "cat", "dog", "##s", "on", "beach", "two", "blue", "sky"]
WORDS += ["green", "tree", "under", "big", "small", "house"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PROMPTS = [
    "a red cube",
    "two dogs on the beach under a blue sky",
    "a photo of a cat",
    " ".join(["a big green tree"] * 12),  # 48 words: truncated to 35 tokens
]


# --- the reference: BLIP's ViT and med's BERT with the original names ------------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(VIT_WIDTH, 3 * VIT_WIDTH)
        self.proj = nn.Linear(VIT_WIDTH, VIT_WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, VIT_HEADS, c // VIT_HEADS).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (c // VIT_HEADS) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(VIT_WIDTH, VIT_MLP), nn.GELU(), nn.Linear(VIT_MLP, VIT_WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(VIT_WIDTH, eps=1e-6), Attention()
        self.norm2, self.mlp = nn.LayerNorm(VIT_WIDTH, eps=1e-6), Mlp()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, VIT_WIDTH, kernel_size=PATCH, stride=PATCH)


class VisionTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, VIT_WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, VIT_WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(VIT_DEPTH))
        self.norm = nn.LayerNorm(VIT_WIDTH, eps=1e-6)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SelfAttention(nn.Module):
    def __init__(self, key_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(TEXT_WIDTH, TEXT_WIDTH)
        self.key, self.value = nn.Linear(key_width, TEXT_WIDTH), nn.Linear(key_width, TEXT_WIDTH)

    def heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], TEXT_HEADS, -1).permute(0, 2, 1, 3)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q, k, v = self.heads(self.query(x)), self.heads(self.key(source)), self.heads(self.value(source))
        scores = q @ k.transpose(-1, -2) / math.sqrt(TEXT_WIDTH // TEXT_HEADS) + mask
        out = scores.softmax(dim=-1) @ v
        return out.permute(0, 2, 1, 3).reshape(*x.shape)


class Output(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(width, TEXT_WIDTH), nn.LayerNorm(TEXT_WIDTH, eps=1e-12)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # dropout inactive


class BertAttention(nn.Module):
    def __init__(self, key_width: int) -> None:
        super().__init__()
        self.self = SelfAttention(key_width)
        self.output = Output(TEXT_WIDTH)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        return self.output(self.self(x, mask, context), x)


class Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(TEXT_WIDTH, TEXT_MLP)


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = BertAttention(TEXT_WIDTH)
        self.crossattention = BertAttention(VIT_WIDTH)  # med: encoder_width
        self.intermediate = Intermediate()
        self.output = Output(TEXT_MLP)

    def forward(self, x: Tensor, mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        x = self.crossattention(self.attention(x, mask), image_mask, image)
        return self.output(nn.functional.gelu(self.intermediate.dense(x)), x)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer() for _ in range(TEXT_DEPTH))


class Embeddings(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, TEXT_WIDTH)
        self.position_embeddings = nn.Embedding(POSITIONS, TEXT_WIDTH)
        self.LayerNorm = nn.LayerNorm(TEXT_WIDTH, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(POSITIONS).expand(1, -1))  # persistent, as med

    def forward(self, ids: Tensor) -> Tensor:
        positions = self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.LayerNorm(self.word_embeddings(ids) + positions)


class BertModel(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embeddings, self.encoder = Embeddings(vocab), Encoder()

    def forward(self, ids: Tensor, mask: Tensor, image: Tensor) -> Tensor:
        additive = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med get_extended_attention_mask
        image_additive = torch.zeros(image.shape[0], 1, 1, image.shape[1])  # all-ones image mask
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, additive, image, image_additive)
        return x


class Blip(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.visual_encoder, self.text_encoder = VisionTransformer(), BertModel(vocab)
        self.vision_proj, self.text_proj = nn.Linear(VIT_WIDTH, 16), nn.Linear(TEXT_WIDTH, 16)  # unused


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(TEXT_WIDTH, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip


class Reference(nn.Module):
    """``ImageReward`` at toy size: ``blip`` and ``mlp``."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.blip, self.mlp = Blip(vocab), Head()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # everything random, LayerNorms and biases included
            for name, parameter in self.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                if "norm" in name.lower() and name.endswith("weight"):
                    parameter.copy_(1 + 0.2 * noise)
                elif name.startswith("mlp.") and name.endswith("weight"):
                    parameter.copy_(noise / math.sqrt(parameter.shape[1]))
                else:
                    parameter.copy_(0.2 * noise)
        self.eval()

    @torch.no_grad()
    def score(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """``ImageReward.score`` for one image ``[1, 3, H, W]`` (normalised) and its tokens ``[1, 35]``."""
        features = self.blip.text_encoder(ids, mask, self.blip.visual_encoder(pixels))[:, 0, :]
        return ((self.mlp.layers(features) - MEAN) / STD).squeeze(-1)


# --- fixtures -----------------------------------------------------------------------------------------------


def tiny_tokenizer() -> BertTokenizer:
    return add_blip_tokens(BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}))


def tiny_model() -> ImageRewardModel:
    vision = vision_config(
        hidden_size=VIT_WIDTH,
        intermediate_size=VIT_MLP,
        num_hidden_layers=VIT_DEPTH,
        num_attention_heads=VIT_HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    return ImageRewardModel(vision, text_config(tiny_med_config(), encoder_width=VIT_WIDTH))


def tiny_med_config() -> dict:
    return {
        "vocab_size": len(VOCAB) + 2,  # + [DEC] + [ENC]
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": TEXT_MLP,
        "num_hidden_layers": TEXT_DEPTH,
        "num_attention_heads": TEXT_HEADS,
        "max_position_embeddings": POSITIONS,
        "encoder_width": 768,  # BLIP_Pretrain overrides it with the ViT width
        "add_cross_attention": True,
        "type_vocab_size": 2,
        "model_type": "bert",
    }


def checkpoint(reference: Reference) -> dict[str, Tensor]:
    """The reference's state dict plus entries ImageReward never reads."""
    return {
        **reference.state_dict(),
        "blip.itm_head.weight": torch.randn(2, TEXT_WIDTH),
        "blip.temp": torch.ones(()),
    }


def images(batch: int = 4, seed: int = 0) -> Tensor:
    """Images on the uint8 grid, at the model's size (the processor's resize and crop are then identities)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, IMAGE, IMAGE), generator=generator).float() / 255


def reference_scores(reference: Reference, tokenizer, pixels: Tensor, prompts) -> Tensor:
    """One image at a time, as ``ImageReward.score``; normalised with OpenAI's mean/std by hand."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    scores = []
    for image, prompt in zip(pixels, prompts, strict=True):
        tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        normalised = (image[None] - mean) / std
        scores.append(reference.score(normalised, tokens["input_ids"], tokens["attention_mask"]))
    return torch.cat(scores)


@pytest.fixture(scope="module")
def parts() -> tuple[Reference, ImageReward]:
    tokenizer = tiny_tokenizer()
    reference = Reference(len(tokenizer))
    model = tiny_model()
    model.load_state_dict(convert_image_reward_state_dict(checkpoint(reference), model), strict=True)
    return reference, ImageReward(model=model, tokenizer=tokenizer)


# --- tests --------------------------------------------------------------------------------------------------


def test_reward_equals_the_reference_model(parts):
    reference, reward = parts
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    lengths = [sum(mask) for mask in tokens["attention_mask"]]
    assert lengths == [5, 12, 7, 35]  # different lengths, the last one truncated
    pixels = images()
    scores = reward(pixels, PROMPTS, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    expected = reference_scores(reference, reward.tokenizer, pixels, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.1  # non-trivial numbers


def test_batch_equals_one_by_one(parts):
    _, reward = parts
    pixels = images(seed=1)
    batched = reward(pixels, PROMPTS)
    one_by_one = torch.cat([reward(pixels[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=1e-6)


def test_images_are_quantised_to_uint8(parts):
    _, reward = parts
    pixels = images(seed=2)
    jitter = (torch.rand(pixels.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.9 / 255
    off_grid = (pixels + jitter).clamp(0, 1)
    assert not torch.equal(off_grid, pixels)
    torch.testing.assert_close(reward(off_grid, PROMPTS), reward(pixels, PROMPTS), atol=0, rtol=0)


def test_tokenizer_is_blips_and_keeps_cls(parts):
    _, reward = parts
    tokenizer = reward.tokenizer
    assert len(tokenizer) == len(VOCAB) + 2
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids("[DEC]") == len(VOCAB)
    assert tokenizer.convert_tokens_to_ids("[ENC]") == len(VOCAB) + 1
    encoded = tokenizer(["a red cube"], padding="max_length", truncation=True, max_length=MAX_LENGTH)
    ids = encoded["input_ids"][0]
    assert len(ids) == 35 and ids[:5] == [2, 5, 6, 7, 3] and set(ids[5:]) == {0}  # [CLS] ... [SEP] [PAD]
    assert len(add_blip_tokens(tokenizer)) == len(VOCAB) + 2  # idempotent


def test_prompt_count_must_match(parts):
    _, reward = parts
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward(images(), PROMPTS[:3])


def test_loads_a_checkpoint_directory(tmp_path, parts):
    reference, reward = parts
    torch.save(checkpoint(reference), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(tiny_med_config()))
    vision = tiny_model().vision_model.config
    loaded = ImageReward(model=load_image_reward_model(tmp_path, vision=vision), tokenizer=tiny_tokenizer())
    pixels = images(batch=2)
    torch.testing.assert_close(loaded(pixels, PROMPTS[:2]), reward(pixels, PROMPTS[:2]), atol=0, rtol=0)


def test_missing_files_say_how_to_download(tmp_path, parts):
    download = "hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir"
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no ImageReward.pt") as error:
        ImageReward(path=absent, tokenizer=tiny_tokenizer())
    assert f"{download} {absent}" in str(error.value)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no med_config.json") as error:
        ImageReward(path=str(tmp_path / "partial"), tokenizer=tiny_tokenizer())
    assert download in str(error.value)
    bert = 'hf download google-bert/bert-base-uncased --include "*.json" --include "*.txt" --local-dir'
    _, reward = parts
    for tokenizer_path in (None, str(tmp_path / "partial")):  # no path; a folder without vocab.txt
        with pytest.raises(FileNotFoundError, match="no bert-base-uncased tokenizer") as error:
            ImageReward(tokenizer_path=tokenizer_path, model=reward.model)
        assert bert in str(error.value)


def test_tokenizer_must_fit_the_vocabulary(parts):
    _, reward = parts
    small = BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB[:-1])})
    with pytest.raises(ValueError, match=f"the tokenizer has {len(VOCAB) + 1} ids"):
        ImageReward(model=reward.model, tokenizer=small)


def test_converter_names_bad_keys():
    state = checkpoint(Reference(len(VOCAB) + 2))
    model = tiny_model()
    dropped = "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"
    missing = {k: v for k, v in state.items() if k != dropped}
    for given in (None, model):  # with the model, or on the checkpoint's own layer count
        with pytest.raises(ValueError, match=r"missing 1 key\(s\): blip\.text_encoder\.encoder\.layer\.1\."):
            convert_image_reward_state_dict(missing, given)
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): blip\.visual_encoder\.head\.weight"):
        convert_image_reward_state_dict({**state, "blip.visual_encoder.head.weight": torch.zeros(2)}, model)
    no_head = {k: v for k, v in state.items() if not k.startswith("mlp.")}
    with pytest.raises(ValueError, match=r"missing 10 key\(s\): mlp\.layers\.0\.bias"):
        convert_image_reward_state_dict(no_head)
    deeper = text_config({**tiny_med_config(), "num_hidden_layers": 3}, encoder_width=VIT_WIDTH)
    # a third text layer: its 26 tensors are missing
    with pytest.raises(ValueError, match=r"missing 26 key\(s\): blip\.text_encoder\.encoder\.layer\.2\."):
        convert_image_reward_state_dict(state, ImageRewardModel(model.vision_model.config, deeper))
    wider = text_config({**tiny_med_config(), "max_position_embeddings": 64}, encoder_width=VIT_WIDTH)
    with pytest.raises(ValueError, match="1 shape mismatch") as error:
        convert_image_reward_state_dict(state, ImageRewardModel(model.vision_model.config, wider))
    assert "text_encoder.embeddings.position_embeddings.weight: model (64, 24), checkpoint (40, 24)" in str(
        error.value
    )
    converted = convert_image_reward_state_dict(state)
    assert "vision_model.encoder.layers.1.self_attn.projection.weight" in converted
    assert not any("position_ids" in k or "itm_head" in k or "_proj." in k for k in converted)


def test_default_configs_are_image_rewards():
    """ViT-L/16 at 224 px with BLIP's LayerNorm eps (the tiny test above cannot tell 1e-6 from 1e-5) and med."""
    vision = vision_config()
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1024, 4096, 24)
    assert (vision.num_attention_heads, vision.image_size, vision.patch_size) == (16, 224, 16)
    assert vision.hidden_act == "gelu" and vision.layer_norm_eps == 1e-6
    text = text_config()
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (30524, 768, 3072)
    assert (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) == (12, 12, 512)
    assert text.layer_norm_eps == 1e-12 and text.encoder_hidden_size == 1024 and text.is_decoder
    with pytest.raises(ValueError, match="cross-attention"):
        text_config({"add_cross_attention": False})
