"""The open_clip -> CLIPModel converter against an independent open_clip-layout model, and HPSv2 / ClipCosine.

The reference below is built from torch primitives with open_clip's module names (so its ``state_dict`` has
open_clip's keys, and its ``torch.nn.MultiheadAttention`` the real fused ``in_proj`` layout) and open_clip's
forward (``model.py`` ``encode_image`` / ``encode_text``, ``transformer.py`` ``VisionTransformer``,
``ResidualAttentionBlock``): pre-LN residual blocks, sequence-first attention, a causal mask in the text
tower, the EOT token (largest id) pooled, projections applied as ``x @ proj``.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from g2rpo.policies.tiny import char_tokenizer
from g2rpo.rewards.openclip_rewards import ClipCosine, HPSv2
from g2rpo.rewards.weights.openclip import convert_open_clip_state_dict, load_open_clip_checkpoint, main

WIDTH, LAYERS, HEADS, MLP = 32, 2, 4, 64
IMAGE, PATCH, VOCAB, CONTEXT, EMBED = 32, 8, 100, 16, 24
EOT, SOT = VOCAB - 1, VOCAB - 2  # open_clip pools at argmax: EOT has the largest id


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(WIDTH, MLP), gelu=act(), c_proj=nn.Linear(MLP, WIDTH))
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # x: [L, N, W]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(act) for _ in range(LAYERS))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # [N, L, W] in and out
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return x.permute(1, 0, 2)


class VisionTransformer(nn.Module):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(WIDTH))
        self.positional_embedding = nn.Parameter(torch.empty((IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(act)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.empty(WIDTH, EMBED))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)  # [N, grid², W]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj


class OpenClipReference(nn.Module):
    """open_clip's ``CLIP`` (ViT vision tower, default text tower) at toy size."""

    def __init__(self, act: type[nn.Module] = nn.GELU, vocab: int = VOCAB) -> None:
        super().__init__()
        self.visual = VisionTransformer(act)
        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.empty(CONTEXT, WIDTH))
        self.transformer = Transformer(act)
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.empty(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)  # as open_clip
        with torch.no_grad():  # everything random, LayerNorms and biases included
            for name, parameter in self.named_parameters():
                if name.endswith(
                    ("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")
                ):
                    parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
                elif name != "logit_scale":
                    parameter.normal_(0, 0.15)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)

    def encode_text(self, text: Tensor) -> Tensor:
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, self.attn_mask[:length, :length]))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def reference(act: type[nn.Module] = nn.GELU, seed: int = 0, vocab: int = VOCAB) -> OpenClipReference:
    torch.manual_seed(seed)
    return OpenClipReference(act, vocab).eval()


def tiny_config(hidden_act: str = "gelu", projection_dim: int = EMBED, vocab: int = VOCAB) -> CLIPConfig:
    tower = {
        "hidden_size": WIDTH,
        "intermediate_size": MLP,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "hidden_act": hidden_act,
    }
    return CLIPConfig(
        text_config={
            **tower,
            "vocab_size": vocab,
            "max_position_embeddings": CONTEXT,
            "bos_token_id": vocab - 2,
            "eos_token_id": 2,  # transformers then pools at the argmax, as open_clip
            "pad_token_id": 0,
        },
        vision_config={**tower, "image_size": IMAGE, "patch_size": PATCH},
        projection_dim=projection_dim,
    )


def inputs(batch: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Pixels, and token ids ``SOT w... EOT 0 0 ...`` of different lengths (padding after the EOT)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    ids = torch.zeros(batch, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate((5, 12, 8, 3)[:batch]):
        ids[row, 0], ids[row, length - 1] = SOT, EOT
        ids[row, 1 : length - 1] = torch.randint(3, SOT, (length - 2,), generator=generator)
        mask[row, :length] = 1
    return pixels, ids, mask


def features(model: CLIPModel, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
    return tuple(out if isinstance(out, Tensor) else out.pooler_output for out in (image, text))


def assert_same_model(converted: CLIPModel, original: OpenClipReference) -> None:
    pixels, ids, mask = inputs()
    image, text = features(converted, pixels, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(image, original.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text, original.encode_text(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(converted.logit_scale.detach(), original.logit_scale.detach())


@pytest.mark.parametrize(("act", "hidden_act"), [(nn.GELU, "gelu"), (QuickGELU, "quick_gelu")])
def test_converted_model_computes_open_clip_features(act, hidden_act):
    original = reference(act)
    state = original.state_dict()
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in state and "text_projection" in state
    assert state["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * WIDTH, WIDTH)
    converted = convert_open_clip_state_dict(state, tiny_config(hidden_act)).eval()
    assert_same_model(converted, original)
    wrong_act = convert_open_clip_state_dict(state, tiny_config("quick_gelu" if act is nn.GELU else "gelu"))
    pixels, ids, mask = inputs()
    assert not torch.allclose(
        features(wrong_act.eval(), pixels, ids, mask)[0], original.encode_image(pixels).detach()
    )


def test_padding_after_eot_and_the_attn_mask_buffer_change_nothing():
    original = reference()
    state = {**original.state_dict(), "attn_mask": original.attn_mask}  # old checkpoints carried it
    converted = convert_open_clip_state_dict(state, tiny_config()).eval()
    pixels, ids, mask = inputs()
    _, text = features(converted, pixels, ids, mask)
    longer = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # more padding after the EOT
    _, padded = features(
        converted, pixels, longer, torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    )
    torch.testing.assert_close(padded, text, atol=1e-5, rtol=1e-5)


def test_cli_round_trip(tmp_path, capsys):
    original = reference(QuickGELU, seed=1)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, checkpoint)
    tiny_config("gelu").save_pretrained(tmp_path / "config")  # the flag supplies quick_gelu
    main([str(checkpoint), str(tmp_path / "config"), str(tmp_path / "out"), "--hidden-act", "quick_gelu"])
    assert "holds no processor" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    loaded = CLIPModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert loaded.config.text_config.hidden_act == loaded.config.vision_config.hidden_act == "quick_gelu"
    assert_same_model(loaded, original)


def test_checkpoint_formats(tmp_path):
    state = reference().state_dict()
    torch.save({f"module.{name}": tensor for name, tensor in state.items()}, tmp_path / "ddp.bin")
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, tmp_path / "plain.safetensors")
    for name in ("ddp.bin", "plain.safetensors"):
        loaded = load_open_clip_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_bad_checkpoints_name_the_keys():
    state = reference().state_dict()
    missing = {name: tensor for name, tensor in state.items() if name != "visual.proj"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): visual\.proj"):
        convert_open_clip_state_dict(missing, tiny_config())
    text_tower = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")
    custom = {f"text.{name}" if name.startswith(text_tower) else name: t for name, t in state.items()}
    with pytest.raises(ValueError, match="unexpected") as error:  # open_clip's CustomTextCLIP layout
        convert_open_clip_state_dict(custom, tiny_config())
    assert "text.token_embedding.weight" in str(error.value) and "ln_final.weight" in str(error.value)
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): logit_bias"):
        convert_open_clip_state_dict({**state, "logit_bias": torch.zeros(())}, tiny_config())
    with pytest.raises(ValueError, match="shape mismatch") as error:
        convert_open_clip_state_dict(state, tiny_config(projection_dim=16))
    assert "visual_projection.weight: config (16, 32), checkpoint (24, 32)" in str(error.value)


# --- the rewards, on tiny CLIPs built as in tests/test_reward_models.py ---------------------------------

PROMPTS = ["a red cube", "a photo of a cat", "two dogs on a beach", "a blue sky"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def tiny_processor() -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=char_tokenizer(24))


def tiny_clip(seed: int = 0) -> CLIPModel:
    tokenizer = char_tokenizer(24)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 24,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def images(batch: int = 4, seed: int = 0) -> Tensor:
    """Random images on the uint8 grid, so a hand-normalised copy sees the very same pixels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, 32, 32), generator=generator).float() / 255


def cosine_by_hand(model: CLIPModel, processor: CLIPProcessor, pixels: Tensor, prompts) -> Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=(pixels - mean) / std).pooler_output)
        tokens = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return torch.diagonal(image @ text.T)  # HPSv2's score


@pytest.fixture(scope="module")
def parts() -> tuple[CLIPModel, CLIPProcessor]:
    return tiny_clip(), tiny_processor()


@pytest.mark.parametrize("reward_class", [HPSv2, ClipCosine])
def test_reward_is_the_plain_cosine(parts, reward_class):
    model, processor = parts
    reward = reward_class(model=model, processor=processor)
    pixels = images()
    scores = reward(pixels, PROMPTS, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert scores.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(
        scores, cosine_by_hand(model, processor, pixels, PROMPTS), atol=1e-5, rtol=1e-5
    )
    one_by_one = torch.cat([reward(pixels[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)
    assert reward(pixels[:1].expand(4, -1, -1, -1), PROMPTS).unique().numel() == 4  # the prompt matters
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward(pixels, PROMPTS[:3])


def test_hpsv2_loads_the_converter_output(tmp_path, parts):
    """Converter output + processor files in CONFIG_DIR: one directory serves as path and processor_path."""
    _, processor = parts
    vocab = len(processor.tokenizer)
    torch.save({"state_dict": reference(vocab=vocab).state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    tiny_config(vocab=vocab).save_pretrained(tmp_path / "config")
    processor.save_pretrained(tmp_path / "config")
    main([str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path / "config"), str(tmp_path / "hps")])
    reward = HPSv2(path=str(tmp_path / "hps"))
    direct = HPSv2(model=reward.model, processor=processor)
    pixels = images(batch=2)
    torch.testing.assert_close(reward(pixels, PROMPTS[:2]), direct(pixels, PROMPTS[:2]))


@pytest.mark.parametrize(
    ("reward_class", "download", "flags"),
    [
        (HPSv2, "hf download xswu/HPSv2 HPS_v2.1_compressed.pt", ""),
        (
            ClipCosine,
            "hf download apple/DFN5B-CLIP-ViT-H-14 open_clip_pytorch_model.bin",
            " --hidden-act quick_gelu",
        ),
    ],
)
def test_missing_weights_say_how_to_convert(tmp_path, reward_class, download, flags):
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no converted model directory") as error:
        reward_class(path=absent)
    message = str(error.value)
    assert download in message and absent in message
    assert f"python -m g2rpo.rewards.weights.openclip <download>/{reward_class.checkpoint_file} " in message
    assert message.splitlines()[3].endswith(f" {absent}{flags}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no loadable weights") as error:
        reward_class(path=str(empty))
    assert "g2rpo.rewards.weights.openclip" in str(error.value)
