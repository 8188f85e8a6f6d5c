"""Janus-Pro (DeepSeek's unified understanding + generation model) as a :class:`TokenPolicy`, over
transformers' ``JanusForConditionalGeneration``: PairUni's policy (arXiv 2510.25682), trained with GRPO on
both sides at once.

* ``task="answer"``: an image and a question in Janus's chat format; the language model samples the answer's
  text tokens (``lm_head``) until the end-of-sentence token.
* ``task="image"``: a prompt in the same chat format ending in ``<begin_of_image>``; the language model
  samples the VQ codes of the image grid (``generation_head``) with classifier-free guidance as Janus does,
  and the VQ-VAE decodes them.

Both sides share the language model, so one optimiser step on the summed loss trains understanding and
generation together (PairGRPO).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch import Tensor
from transformers import (
    JanusForConditionalGeneration,
    JanusProcessor,
)

from g2rpo.distributed import world
from g2rpo.policies.reference import FrozenReference
from g2rpo.policies.tokens import TOKEN_TASKS, TokenPolicy, decode, sample_from
from g2rpo.randomness import rand_per_key
from g2rpo.types import TokenRollout

LOGPROB_SOURCES = ("guided", "conditional")


class Janus(NamedTuple):
    """A Janus model and its processor (chat template, tokenizer, image normalisation), as loaded together."""

    model: JanusForConditionalGeneration
    processor: JanusProcessor


def load_janus(path: str = "deepseek-community/Janus-Pro-1B", dtype: str = "bfloat16") -> Janus:
    """Janus-Pro in transformers' layout from a local directory or the Hugging Face cache, never the network,
    with a message that says how to get the weights when they are missing."""
    try:
        model = JanusForConditionalGeneration.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=True
        )
        processor = JanusProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"model: cannot load Janus-Pro weights from {path!r} without network access.\n"
            f"  Download them once with `hf download {path}` (transformers' layout: the deepseek-community "
            "repositories, not deepseek-ai's original ones),\n"
            "  or point model.janus.path at a local directory that contains config.json.\n"
            f"  ({type(error).__name__}: {error})"
        ) from error
    return Janus(model, processor)


def positions_of(attention_mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: every sequence starts at 0 whatever its padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class JanusPolicy(FrozenReference, TokenPolicy):
    """Janus-Pro under training: LoRA on the language model through peft (``lora`` given) or full fine-tuning
    (``lora=None``: everything but the frozen VQ-VAE, as Janus-Pro's own fine-tuning stage). Trained weights
    are kept in fp32 (a bf16 weight cannot take PairUni's 1e-6 steps); frozen ones stay as loaded.

    The reference model for KL terms is the model with its adapters disabled (LoRA, no copy) or a frozen copy
    of the initial weights (full fine-tuning, made by ``enable_reference``).

    ``logprob_from`` says which distribution an image token's log-prob is taken from. PairUni does not say.
    ``"guided"`` (default) is the one sampled, ``softmax((u + w (c - u)) / T)``, so the PPO ratio is exactly 1
    on-policy and the policy gradient is that of the images actually drawn; ``"conditional"`` is
    ``softmax(c / T)``, the model's own distribution without guidance (half the forward in the update, but
    its samples then come from another distribution than the one trained).
    """

    trained_module = "model"

    def __init__(
        self,
        janus: Janus,
        lora: LoraConfig | None = None,
        logprob_from: str = "guided",
        max_new_tokens: int = 512,
    ) -> None:
        super().__init__()
        if logprob_from not in LOGPROB_SOURCES:
            raise ValueError(
                f"model.logprob_from={logprob_from!r}: expected one of {', '.join(LOGPROB_SOURCES)}"
            )
        self.model = janus.model.eval()
        self.processor = janus.processor
        self.logprob_from = logprob_from
        self.max_new_tokens = max_new_tokens
        tokenizer = self.processor.tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.boi_id = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
        self.image_token_id = self.model.config.image_token_id
        self.num_image_codes = self.model.config.vq_config.num_patches**2

        self.model.requires_grad_(False)
        if lora is not None:
            self.model.add_adapter(language_model_only(lora))
        else:
            self.model.requires_grad_(True)
            self.model.model.vqmodel.requires_grad_(False)
        cast_training_params(self.model, dtype=torch.float32)
        self.init_reference(is_lora=lora is not None)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # -- prompts ------------------------------------------------------------------------------------------

    def answer_prompts(self, images: Tensor, questions: list[str]) -> dict[str, Tensor]:
        """Janus's understanding prompt (system prompt, ``<|User|>: <image>\\n{question}\\n\\n<|Assistant|>:``)
        tokenised and left-padded by the processor, with the image's pixel values."""
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            for question in questions
        ]
        texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True)
        batch = self.processor(
            text=texts,
            images=list(self.square_images(images).float().cpu()),
            do_resize=False,
            do_rescale=False,
            padding=True,
            return_tensors="pt",
        )
        return {key: value.to(self.device) for key, value in batch.items()}

    def square_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images in [0, 1] at the vision encoder's size: padded to a square with the
        processor's background colour (its mean) and resized bicubically, ``JanusImageProcessor``'s steps, in
        torch, because its PIL backend (used without torchvision) rounds float images to 8 bits when it
        resizes. The processor then only normalises them."""
        image_processor = self.processor.image_processor
        size = image_processor.size["height"]
        height, width = images.shape[-2:]
        if (height, width) == (size, size):
            return images
        side = max(height, width)
        mean = torch.tensor(image_processor.image_mean, dtype=images.dtype, device=images.device)
        square = mean.view(1, 3, 1, 1).expand(images.shape[0], 3, side, side).clone()
        top, left = (side - height) // 2, (side - width) // 2
        square[:, :, top : top + height, left : left + width] = images
        return F.interpolate(square, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)

    def image_prompts(self, prompts: list[str], guided: bool) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask of Janus's generation prompt (``...<|Assistant|>:<begin_of_image>``);
        with ``guided``, the unconditional rows follow (every token but BOS and BOI replaced by padding, as
        Janus and transformers' ``generate`` build them)."""
        conversations = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts]
        texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True)
        batch = self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if not guided:
            return ids, mask
        uncond = ids.masked_fill((ids != self.bos_id) & (ids != self.boi_id), self.pad_id)
        return torch.cat([ids, uncond]), torch.cat([mask, mask])

    def prompt_embeddings(self, ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings with the aligned image features in the image placeholders of the prompt."""
        model = self.active
        embeds = model.get_input_embeddings()(ids)
        if pixel_values is None:
            return embeds
        features = model.model.get_image_features(pixel_values).pooler_output
        placeholders = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(placeholders, features.to(embeds.dtype))

    def code_embeddings(self, codes: Tensor) -> Tensor:
        """Input embeddings of VQ codes (generation embeddings through the generation aligner)."""
        return self.active.prepare_embeddings_for_image_generation(codes)

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

    # -- logits --------------------------------------------------------------------------------------------

    def answer_log_probs(self, hidden: Tensor, temperature: float) -> Tensor:
        """Log-probs of the next text token; temperature 0 (greedy) scores under temperature 1."""
        scale = temperature if temperature > 0 else 1.0
        return torch.log_softmax(self.active.lm_head(hidden).float() / scale, dim=-1)

    def code_log_probs(
        self, hidden: Tensor, temperature: float, guidance_scale: float, guided: bool
    ) -> tuple[Tensor, Tensor]:
        """Log-probs of the next VQ code, ``(sampled, recorded)``: sampled from ``u + w (c - u)`` with
        ``guided`` (rows ``[cond; uncond]``), else from the conditional logits ``c``; recorded from the
        sampled distribution or, with ``logprob_from="conditional"``, from ``c``."""
        logits = self.active.model.generation_head(hidden).float()
        if not guided:
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            return log_probs, log_probs
        cond, uncond = logits.chunk(2)
        sampled = torch.log_softmax((uncond + guidance_scale * (cond - uncond)) / temperature, dim=-1)
        if self.logprob_from == "guided":
            return sampled, sampled
        return sampled, torch.log_softmax(cond / temperature, dim=-1)

    def uses_guidance(self, guidance_scale: float, for_log_probs: bool) -> bool:
        """Whether a forward needs the unconditional rows: ``w != 1``, except for log-probs taken from the
        conditional distribution."""
        return guidance_scale != 1.0 and not (for_log_probs and self.logprob_from == "conditional")

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
        """``max_new_tokens`` (default the policy's) bounds answers; an image is always its VQ grid's codes.
        ``guidance_scale`` applies to images (PairUni: 5, as Janus-Pro). Answers at temperature 0 are greedy
        (benchmarks), their log-probs those of the argmax under temperature 1."""
        if task not in ("answer", "image"):
            raise ValueError(
                f"task={task!r}: Janus-Pro samples 'answer' or 'image' tokens (a pairwise 'compare' judge is "
                "model=shapes_judge or a Qwen2.5-VL judge); the token tasks are " + ", ".join(TOKEN_TASKS)
            )
        if temperature < 0 or (temperature == 0 and task == "image"):
            raise ValueError(
                f"temperature={temperature}: answers take 0 (greedy) or a positive temperature, image codes a "
                "positive one"
            )
        if task == "answer":
            return self.sample_answers(inputs, generators, temperature, max_new_tokens or self.max_new_tokens)
        return self.sample_images(inputs, generators, temperature, guidance_scale)

    def sample_answers(
        self,
        inputs: dict[str, Any],
        generators: list[torch.Generator],
        temperature: float,
        max_new_tokens: int,
    ) -> TokenRollout:
        prompt = self.answer_prompts(inputs["images"], inputs["questions"])
        mask = prompt["attention_mask"]
        embeds = self.prompt_embeddings(prompt["input_ids"], prompt["pixel_values"])
        positions = positions_of(mask)
        output = self.language_model(embeds, mask, positions, use_cache=True)

        def feed(token: Tensor) -> None:
            nonlocal mask, positions, output
            mask, positions, output = self._extend(
                self.prompt_embeddings(token[:, None]), mask, positions, output
            )

        tokens, valid, log_probs = decode(
            lambda: self.answer_log_probs(output.last_hidden_state[:, -1], temperature),
            feed, generators, max_new_tokens, temperature, torch.tensor([self.eos_id]), self.pad_id,
        )  # fmt: skip
        texts = self.processor.tokenizer.batch_decode(
            [row[keep].tolist() for row, keep in zip(tokens, valid)], skip_special_tokens=True
        )
        return TokenRollout(
            task="answer",
            inputs={"images": inputs["images"], "questions": list(inputs["questions"])},
            tokens=tokens,
            mask=valid,
            log_probs=log_probs,
            texts=texts,
            temperature=temperature,
        )

    def sample_images(
        self,
        inputs: dict[str, Any],
        generators: list[torch.Generator],
        temperature: float,
        guidance_scale: float,
    ) -> TokenRollout:
        guided = self.uses_guidance(guidance_scale, for_log_probs=False)
        ids, mask = self.image_prompts(inputs["prompts"], guided)
        output, positions, uniforms = self._prefill(
            self.prompt_embeddings(ids), mask, generators, self.num_image_codes
        )
        rows = mask.shape[0]
        codes, log_probs = [], []
        for step in range(self.num_image_codes):
            sampled, recorded = self.code_log_probs(
                output.last_hidden_state[:, -1], temperature, guidance_scale, guided
            )
            code = sample_from(sampled, uniforms[:, step])
            codes.append(code)
            log_probs.append(recorded.gather(-1, code[:, None]).squeeze(-1))
            if step == self.num_image_codes - 1:
                break
            embeds = self.code_embeddings(code.repeat(rows // len(code))[:, None])
            mask, positions, output = self._extend(embeds, mask, positions, output)
        codes = torch.stack(codes, dim=1)
        return TokenRollout(
            task="image",
            inputs={"prompts": list(inputs["prompts"])},
            tokens=codes,
            mask=torch.ones_like(codes, dtype=torch.bool),
            log_probs=torch.stack(log_probs, dim=1),
            images=self.decode_codes(codes),
            temperature=temperature,
            guidance_scale=guidance_scale,
        )

    def _prefill(
        self, embeds: Tensor, mask: Tensor, generators: list[torch.Generator], steps: int
    ) -> tuple[Any, Tensor, Tensor]:
        """The prompt's forward (which fills the KV cache), its positions, and ``steps`` uniforms per sample."""
        positions = positions_of(mask)
        output = self.language_model(embeds, mask, positions, use_cache=True)
        return output, positions, rand_per_key(generators, steps).to(self.device)

    def _extend(
        self, embeds: Tensor, mask: Tensor, positions: Tensor, output: Any
    ) -> tuple[Tensor, Tensor, Any]:
        """One more token per row (``embeds`` ``[B, 1, D]``) through the cached forward."""
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        output = self.language_model(embeds, mask, positions, use_cache=True, cache=output.past_key_values)
        return mask, positions, output

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images in [0, 1] from the VQ codes (the decoder's output is in [-1, 1])."""
        pixels = self.model.model.vqmodel.decode(codes).float()
        return ((pixels + 1) / 2).clamp(0, 1)

    def token_log_probs(self, rollout: TokenRollout) -> Tensor:
        """One teacher-forced forward over prompt + sampled tokens (``2B`` rows with CFG): nfe counts each
        row once."""
        tokens, length = rollout.tokens.to(self.device), rollout.tokens.shape[1]
        if rollout.task == "answer":
            prompt = self.answer_prompts(rollout.inputs["images"], rollout.inputs["questions"])
            ids, prompt_mask = prompt["input_ids"], prompt["attention_mask"]
            start = ids.shape[1]
            embeds = torch.cat(
                [self.prompt_embeddings(ids, prompt["pixel_values"]), self.prompt_embeddings(tokens)], dim=1
            )
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(tokens.shape)], dim=1)
            hidden = self.language_model(embeds, mask, positions_of(mask)).last_hidden_state
            log_probs = self.answer_log_probs(hidden[:, start - 1 : start - 1 + length], rollout.temperature)
        elif rollout.task == "image":
            guided = self.uses_guidance(rollout.guidance_scale, for_log_probs=True)
            ids, prompt_mask = self.image_prompts(rollout.inputs["prompts"], guided)
            start, rows = ids.shape[1], ids.shape[0]
            codes = tokens.repeat(rows // len(tokens), 1)
            embeds = torch.cat([self.prompt_embeddings(ids), self.code_embeddings(codes)], dim=1)
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(codes.shape)], dim=1)
            hidden = self.language_model(embeds, mask, positions_of(mask)).last_hidden_state
            _, log_probs = self.code_log_probs(
                hidden[:, start - 1 : start - 1 + length], rollout.temperature, rollout.guidance_scale, guided
            )
        else:
            raise ValueError(f"task={rollout.task!r}: expected one of {', '.join(TOKEN_TASKS)}")
        picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(~rollout.mask.to(self.device), 0.0)

    def save_pretrained(self, directory: str | Path) -> None:
        """LoRA: the adapter in PEFT's format (``JanusForConditionalGeneration.load_adapter`` reads it onto the
        base model); full fine-tuning: the whole model and its processor, a checkpoint ``load_janus`` reads.
        Rank 0 writes (the weights are replicated under DDP)."""
        if world()[0] != 0:
            return
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if not self.is_lora:
            self.processor.save_pretrained(directory)


def language_model_only(lora: LoraConfig) -> LoraConfig:
    """``lora`` restricted to the language model: module names (``q_proj``, ...) also name layers of Janus's
    vision encoder, so a list of names becomes a regex anchored in ``model.language_model``; a string (a regex,
    or peft's ``"all-linear"``) is the caller's and kept as is."""
    if lora.target_modules is None or isinstance(lora.target_modules, str):
        return lora
    names = "|".join(sorted(lora.target_modules))
    restricted = copy.deepcopy(lora)
    restricted.target_modules = rf"model\.language_model\..*\.({names})"
    return restricted
