"""Qwen2.5-VL as a judge under training: a :class:`TokenPolicy` over transformers'
``Qwen2_5_VLForConditionalGeneration``, for Skywork UniPic's recipe of a VLM reward model trained by GRPO on
human preference pairs (Skywork-ImgReward, arXiv 2508.03320 sec. 3; brief C.3).

* ``task="compare"``: a caption and two images in Qwen's chat template (``Image A: <image> Image B: <image>``
  and the instruction, ``compare_instruction`` with ``{caption}``); the model answers ``<answer>A</answer>``
  or ``<answer>B</answer>``, optionally after its reasoning.
* ``task="answer"``: one image and a question, the same code path with one image.

Decoding is a manual loop over the KV cache, as :class:`~g2rpo.policies.janus.JanusPolicy`'s: each sample
draws its tokens from its own generator (inverse-CDF, one uniform per step), so it does not depend on the
batch it is sampled in. Rows are left-padded; Qwen's multimodal RoPE positions (3 axes, images on a 2-D grid)
come from the model's own ``get_rope_index`` and each new token takes the next text position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch import Tensor
from transformers import Qwen2_5_VLForConditionalGeneration

from g2rpo.distributed import world
from g2rpo.policies.janus import language_model_only
from g2rpo.policies.qwen_image import ImageOnlyQwen2VLProcessor
from g2rpo.policies.reference import FrozenReference
from g2rpo.policies.tokens import TokenPolicy, decode
from g2rpo.rewards.judge import DEFAULT_COMPARE_INSTRUCTION
from g2rpo.types import TokenRollout

VL_TASKS = ("compare", "answer")


class QwenVL(NamedTuple):
    """A Qwen2.5-VL model and its processor (chat template, tokenizer, image patches), as loaded together."""

    model: Qwen2_5_VLForConditionalGeneration
    processor: ImageOnlyQwen2VLProcessor


def load_qwen_vl(path: str = "Qwen/Qwen2.5-VL-7B-Instruct", dtype: str = "bfloat16") -> QwenVL:
    """Qwen2.5-VL from a local directory or the Hugging Face cache, never the network, with a message that says
    how to get the weights when they are missing. The processor is built for images only
    (:class:`ImageOnlyQwen2VLProcessor`: the stock one needs torchvision for its video processor)."""
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=True
        )
        processor = ImageOnlyQwen2VLProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"model: cannot load Qwen2.5-VL weights from {path!r} without network access.\n"
            f"  Download them once with `hf download {path}`,\n"
            "  or point model.qwen_vl.path at a local directory that contains config.json.\n"
            f"  ({type(error).__name__}: {error})"
        ) from error
    return QwenVL(model, processor)


class QwenVLJudgePolicy(FrozenReference, TokenPolicy):
    """Qwen2.5-VL under training: LoRA on the language model through peft (``lora`` given) or full
    fine-tuning of the language model and its head (``lora=None``); the vision tower and its merger stay
    frozen either way (UniPic does not say; R1-style VLM GRPO recipes freeze it). Trained weights are kept
    in fp32; frozen ones stay as loaded.

    The reference for KL terms is the model with its adapters disabled (LoRA) or a frozen copy of the initial
    weights (full fine-tuning, made by ``enable_reference``).

    ``image_size``: images are resized (bicubic, in torch) to this square side, a multiple of the vision
    patch times the merge size (28 for the hub models: 448 px gives 256 tokens per image).
    """

    trained_module = "model"

    def __init__(
        self,
        qwen_vl: QwenVL,
        lora: LoraConfig | None = None,
        image_size: int = 448,
        compare_instruction: str = DEFAULT_COMPARE_INSTRUCTION,
        max_new_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.model = qwen_vl.model.eval()
        self.processor = qwen_vl.processor
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        if image_size <= 0 or image_size % factor:
            raise ValueError(
                f"model.image_size={image_size}: must be a positive multiple of {factor} (the vision patch "
                "times the merge size)"
            )
        if "{caption}" not in compare_instruction:
            raise ValueError("model.compare_instruction must contain {caption}, where the caption goes")
        self.image_size = image_size
        self.compare_instruction = compare_instruction
        self.max_new_tokens = max_new_tokens
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # the decoding loop reads each row's last column
        self.pad_id = tokenizer.pad_token_id
        ends = self.model.generation_config.eos_token_id
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        self.end_ids = torch.tensor(sorted({tokenizer.eos_token_id, *ends}))

        self.model.requires_grad_(False)
        if lora is not None:
            self.model.add_adapter(language_model_only(lora))
        else:
            self.model.model.language_model.requires_grad_(True)
            self.model.lm_head.requires_grad_(True)
        cast_training_params(self.model, dtype=torch.float32)
        self.init_reference(is_lora=lora is not None)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # -- prompts ------------------------------------------------------------------------------------------

    def conversation(self, task: str, question: str) -> list[dict]:
        """One user turn: the caption and images A and B (``compare``), or an image and a question."""
        if task == "compare":
            content = [
                {"type": "text", "text": "Image A:"},
                {"type": "image"},
                {"type": "text", "text": "Image B:"},
                {"type": "image"},
                {"type": "text", "text": self.compare_instruction.format(caption=question)},
            ]
        else:
            content = [{"type": "image"}, {"type": "text", "text": question}]
        return [{"role": "user", "content": content}]

    def prompts(self, task: str, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """The chat prompts tokenised and left-padded by the processor, with the images' patches (each row's
        images in order: A then B), their grids and the token types ``get_rope_index`` reads."""
        texts = self.processor.apply_chat_template(
            [self.conversation(task, question) for question in inputs["questions"]],
            add_generation_prompt=True,
        )
        views = [inputs["images"]] + ([inputs["other_images"]] if task == "compare" else [])
        images = torch.stack([self.resized(view) for view in views], dim=1).flatten(0, 1)
        batch = self.processor(
            text=texts,
            images=list(images.float().cpu()),
            do_resize=False,
            do_rescale=False,
            padding=True,
            return_tensors="pt",
        )
        return {key: value.to(self.device) for key, value in batch.items()}

    def resized(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] at ``image_size``, resized in torch (the processor's PIL backend would
        round float images to 8 bits); the processor then only normalises and cuts them into patches."""
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        size = (self.image_size, self.image_size)
        return F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(0, 1)

    def prompt_embeddings(self, prompt: dict[str, Tensor]) -> Tensor:
        """Token embeddings with the merged vision features in the image placeholders."""
        model = self.active
        ids = prompt["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"])
        features = torch.cat(features.pooler_output).to(embeds.dtype)
        placeholders = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(placeholders, features)

    def prompt_positions(self, prompt: dict[str, Tensor]) -> Tensor:
        """``[3, B, L]`` multimodal RoPE positions of the left-padded prompts (0 on padding)."""
        positions, _ = self.model.model.get_rope_index(
            prompt["input_ids"],
            prompt["mm_token_type_ids"],
            prompt["image_grid_thw"],
            attention_mask=prompt["attention_mask"],
        )
        return positions

    def language_model(
        self, embeds: Tensor, mask: Tensor, positions: Tensor, use_cache: bool = False, cache: Any = None
    ) -> Any:
        """The (active) language model on input embeddings; each row counts one network evaluation."""
        self.nfe += embeds.shape[0]
        return self.active.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=use_cache,
        )

    def next_log_probs(self, hidden: Tensor, temperature: float) -> Tensor:
        """Log-probs of the next token; temperature 0 (greedy) scores under temperature 1."""
        scale = temperature if temperature > 0 else 1.0
        return torch.log_softmax(self.active.lm_head(hidden).float() / scale, dim=-1)

    # -- TokenPolicy ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_tokens(
        self,
        task: str,
        inputs: dict[str, Any],
        generators: list[torch.Generator],
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        guidance_scale: float = 1.0,
    ) -> TokenRollout:
        """``inputs``: ``images`` ``[B, 3, H, W]`` in [0, 1], ``questions`` (``compare``: the captions) and,
        for ``compare``, ``other_images`` (image B). Temperature 0 decodes greedily (benchmarks), the
        log-probs those of the argmax under temperature 1. ``guidance_scale`` does not apply to text."""
        if task not in VL_TASKS:
            raise ValueError(f"task={task!r}: the Qwen2.5-VL judge answers {', '.join(VL_TASKS)}")
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: 0 (greedy) or a positive temperature")
        steps = max_new_tokens or self.max_new_tokens
        prompt = self.prompts(task, inputs)
        mask = prompt["attention_mask"]
        positions = self.prompt_positions(prompt)
        output = self.language_model(self.prompt_embeddings(prompt), mask, positions, use_cache=True)
        positions = positions[:, :, -1:]

        def feed(token: Tensor) -> None:
            nonlocal mask, positions, output
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions + 1
            embeds = self.active.get_input_embeddings()(token[:, None])
            output = self.language_model(
                embeds, mask, positions, use_cache=True, cache=output.past_key_values
            )

        tokens, valid, log_probs = decode(
            lambda: self.next_log_probs(output.last_hidden_state[:, -1], temperature),
            feed, generators, steps, temperature, self.end_ids, self.pad_id,
        )  # fmt: skip
        texts = self.processor.tokenizer.batch_decode(
            [row[keep].tolist() for row, keep in zip(tokens, valid)], skip_special_tokens=True
        )
        kept = ("images", "other_images") if task == "compare" else ("images",)
        return TokenRollout(
            task=task,
            inputs={**{key: inputs[key] for key in kept}, "questions": list(inputs["questions"])},
            tokens=tokens,
            mask=valid,
            log_probs=log_probs,
            texts=texts,
            temperature=temperature,
        )

    def token_log_probs(self, rollout: TokenRollout) -> Tensor:
        """One teacher-forced forward over prompt + sampled tokens, positions continuing the prompt's."""
        if rollout.task not in VL_TASKS:
            raise ValueError(f"task={rollout.task!r}: the Qwen2.5-VL judge answers {', '.join(VL_TASKS)}")
        tokens, length = rollout.tokens.to(self.device), rollout.tokens.shape[1]
        prompt = self.prompts(rollout.task, rollout.inputs)
        start = prompt["input_ids"].shape[1]
        prompt_positions = self.prompt_positions(prompt)
        steps = torch.arange(1, length + 1, device=self.device)
        positions = torch.cat([prompt_positions, prompt_positions[:, :, -1:] + steps], dim=2)
        embeds = torch.cat(
            [self.prompt_embeddings(prompt), self.active.get_input_embeddings()(tokens)], dim=1
        )
        mask = torch.cat([prompt["attention_mask"], prompt["attention_mask"].new_ones(tokens.shape)], dim=1)
        hidden = self.language_model(embeds, mask, positions).last_hidden_state
        log_probs = self.next_log_probs(hidden[:, start - 1 : start - 1 + length], rollout.temperature)
        picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(~rollout.mask.to(self.device), 0.0)

    def save_pretrained(self, directory: str | Path) -> None:
        """LoRA: the adapter in PEFT's format (``Qwen2_5_VLForConditionalGeneration.load_adapter`` reads it
        onto the base model; vLLM serves it with ``--enable-lora``); full fine-tuning: the whole model and its
        processor, a checkpoint ``load_qwen_vl`` (and vLLM) reads. Rank 0 writes."""
        if world()[0] != 0:
            return
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if not self.is_lora:
            self.processor.save_pretrained(directory)
