"""The unified shapes model as a policy of both kinds: a flow policy that draws images, a token policy that
answers questions about them, over one set of weights (:mod:`g2rpo.shapes.unified`); and its held-out
understanding evaluation (:func:`understanding_accuracy`, ``eval=shapes_unified``).

The flow side follows :class:`~g2rpo.policies.transformer.TransformerPolicy` (explicit CFG, fp32
velocities, the scheduler's own sigma grid); the token side samples one-word answers as
:mod:`g2rpo.algos.token_grpo` expects. A flow update therefore moves the answers too, and a token update
the images: that coupling is what a unified model is for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from g2rpo.distributed import full_tensors, world
from g2rpo.policies.base import FlowPolicy
from g2rpo.policies.reference import FrozenReference
from g2rpo.policies.tokens import TokenPolicy
from g2rpo.randomness import TOKEN, keyed
from g2rpo.sampling import sigma_schedule
from g2rpo.shapes import vqa
from g2rpo.shapes.unified import UnifiedModel
from g2rpo.shapes.world import render
from g2rpo.types import Conditioning, TokenRollout

ADAPTER_WEIGHTS = "adapter_model.safetensors"
HELDOUT_SEED = 20_240_811  # understanding evaluation scenes: a stream no training step draws from
HELDOUT_PER_TYPE = 200
TASKS = ("answer", "compare")  # compare: the judge's (a model with_judge_tokens)


class UnifiedPolicy(FrozenReference, FlowPolicy, TokenPolicy):
    """Full fine-tuning (``lora=None``, the default: the model has about a million parameters, so a
    full copy for the reference costs nothing and LoRA would only restrict it) or LoRA through peft on
    any of its linear layers (e.g. the Llama attention projections ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``).

    The reference model for KL terms is a frozen copy made by :meth:`enable_reference` (full
    fine-tuning) or the same model with its adapters disabled (LoRA).

    ``encode`` returns caption *token ids* in :class:`~g2rpo.types.Conditioning`'s ``prompt_embeds``
    (long ``[N, caption_length]``): they are embedded inside the shared transformer, so a generation
    loss trains the word embeddings that understanding reads too. The model has no pooled text vector
    (``pooled_prompt_embeds`` is None).
    """

    trained_module = "model"

    def __init__(
        self, model: UnifiedModel, resolution: int = 32, lora: LoraConfig | None = None, shift: float = 1.0
    ) -> None:
        super().__init__()
        if resolution != model.sizes["image_size"]:
            raise ValueError(
                f"model.resolution={resolution}: the unified model draws {model.sizes['image_size']}px images"
            )
        self.model = model
        self.resolution = resolution
        self._scheduler_config = FlowMatchEulerDiscreteScheduler(shift=shift).config
        self.lora = lora
        if lora is not None:
            inject_adapter_in_model(lora, self.model)
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_("lora_" in name)
        else:
            self.model.requires_grad_(True)
        self.init_reference(is_lora=lora is not None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- flow side ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self, prompts: list[str], negative: bool = True, sources: Tensor | None = None
    ) -> Conditioning:
        if sources is not None:
            self.encode_source(sources)  # the unified model does not edit: says so
        ids = self.model.caption_ids(list(prompts))
        if not negative:
            return Conditioning(ids)
        empty = self.model.caption_ids([""]).expand(len(prompts), -1)
        return Conditioning(ids, negative_prompt_embeds=empty)

    def transformer_velocity(self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: None) -> Tensor:
        """``embeds`` are caption token ids; the model has no pooled vector."""
        return self.active.velocity(embeds, latents, sigma)

    def encode_images(self, images: Tensor) -> Tensor:
        return images.to(self.device, torch.float32) * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        """Pixel space: latents are images in [-1, 1]."""
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        return self._scheduler_config

    def sigmas(self, num_steps: int) -> Tensor:
        return sigma_schedule(self.scheduler_config, num_steps)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> Tensor:
        shape = (batch_size, 3, self.resolution, self.resolution)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    # ---- token side ---------------------------------------------------------------------------------

    def _check_task(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(
                f"UnifiedPolicy samples task='answer' or 'compare' tokens only, not {task!r}: it draws images by "
                "flow matching, so train its generation with a flow algorithm (e.g. algo=flow_grpo)"
            )
        if task == "compare":
            self.model.check_judges()

    def _context(self, task: str, inputs: Mapping[str, Any]) -> tuple[tuple[Tensor, ...], list[list[int]]]:
        """The images in [-1, 1] on the model's device (``answer``: the image; ``compare``: A then B) and each
        sample's text up to its reply (``question <|answer|>``, or ``caption <|judge|>``)."""
        questions = list(inputs["questions"])
        images = (inputs["images"],) if task == "answer" else (inputs["images"], inputs["other_images"])
        if any(len(i) != len(questions) for i in images):
            raise ValueError(f"{[len(i) for i in images]} images for {len(questions)} questions")
        prefix = self.model.question_prefix if task == "answer" else self.model.judge_prefix
        return tuple(i.to(self.device).float() * 2 - 1 for i in images), [prefix(q) for q in questions]

    def _logits_at(self, images: tuple[Tensor, ...], rows: list[list[int]], offsets: Tensor) -> Tensor:
        """Logits ``[B, K, V]`` at text positions ``offsets`` ``[B, K]`` of ``<bos> [images] rows`` (rows
        right-padded with end tokens, which causal attention hides from the positions read)."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.model.eos_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        forward = self.active.answer_logits if len(images) == 1 else self.active.compare_logits
        logits = forward(*images, ids.to(self.device))
        index = offsets.to(self.device)[..., None].expand(-1, -1, logits.shape[-1])
        return logits.gather(1, index).float()

    @staticmethod
    def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
        """The tempered distribution; temperature 0 (greedy) scores under temperature 1."""
        return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)

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
        """Answers to ``inputs["questions"]`` about ``inputs["images"]`` ([B, 3, H, W] in [0, 1]); for
        ``task="compare"``, verdicts on which of ``inputs["images"]`` (A) and ``inputs["other_images"]`` (B)
        matches the caption ``inputs["questions"]`` better (texts ``<answer>A</answer>`` when the format is
        kept, the tokens joined without spaces).

        Sample ``i`` draws from ``generators[i]`` only; temperature 0 is greedy, and its log-probs are
        those of the argmax under temperature 1. Every rollout has ``max_new_tokens`` (default 4) columns:
        after a sequence's end token its tokens are end tokens outside the mask. ``guidance_scale`` is not
        used: answers are not guided.
        """
        self._check_task(task)
        questions = list(inputs["questions"])
        if len(generators) != len(questions):
            raise ValueError(f"{len(generators)} generators for {len(questions)} questions")
        images, prefixes = self._context(task, inputs)
        steps = 4 if max_new_tokens is None else max_new_tokens
        batch, eos = len(questions), self.model.eos_id
        tokens = torch.full((batch, steps), eos, dtype=torch.long)
        log_probs = torch.zeros(batch, steps)
        mask = torch.zeros(batch, steps, dtype=torch.bool)
        done = torch.zeros(batch, dtype=torch.bool)
        lengths = torch.tensor([len(p) for p in prefixes])
        for t in range(steps):
            rows = [prefix + tokens[i, :t].tolist() for i, prefix in enumerate(prefixes)]
            logits = self._logits_at(images, rows, (lengths - 1 + t)[:, None])[:, 0].cpu()
            self.nfe += batch
            scores = self._log_softmax(logits, temperature)
            if temperature > 0:
                picked = torch.cat(
                    [torch.multinomial(scores[i].exp(), 1, generator=g) for i, g in enumerate(generators)]
                )
            else:
                picked = scores.argmax(-1)
            live = ~done
            tokens[live, t] = picked[live]
            log_probs[live, t] = scores.gather(1, picked[:, None])[live, 0]
            mask[live, t] = True
            done |= picked == eos
            if bool(done.all()):
                break
        decode = self.model.decode_answer if task == "answer" else self.model.decode_verdict
        texts = [decode(row[m].tolist()) for row, m in zip(tokens, mask)]
        kept = ("images", "questions") if task == "answer" else ("images", "other_images", "questions")
        return TokenRollout(
            task=task,
            inputs={key: questions if key == "questions" else inputs[key] for key in kept},
            tokens=tokens.to(self.device),
            mask=mask.to(self.device),
            log_probs=log_probs.to(self.device),
            texts=texts,
            temperature=temperature,
        )

    def token_log_probs(self, rollout: TokenRollout) -> Tensor:
        """One differentiable forward over ``<bos> [image] question <|answer|> tokens`` (or the comparison
        layout): the same logits as the step-by-step sampling (causal text), so the ratio is 1 before an
        update."""
        self._check_task(rollout.task)
        images, prefixes = self._context(rollout.task, rollout.inputs)
        mask, tokens = rollout.mask.to(self.device), rollout.tokens.to(self.device)
        tokens = torch.where(mask, tokens, torch.full_like(tokens, self.model.eos_id))  # padding: any id
        steps = tokens.shape[1]
        rows = [prefix + tokens[i].tolist() for i, prefix in enumerate(prefixes)]
        offsets = torch.tensor([len(p) - 1 for p in prefixes])[:, None] + torch.arange(steps)
        logits = self._logits_at(images, rows, offsets)
        self.nfe += len(rows)
        picked = self._log_softmax(logits, rollout.temperature).gather(-1, tokens[..., None])[..., 0]
        return torch.where(mask, picked, torch.zeros_like(picked))

    # ---- training ------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Full fine-tuning: the model's own directory (``load_unified_model(directory)`` reads it); LoRA:
        peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (:meth:`load_adapter` reads them).
        Called on every rank; rank 0 writes."""
        directory = Path(directory)
        if self.is_lora:
            layers = full_tensors(get_peft_model_state_dict(self.model))
            if world()[0] == 0:
                directory.mkdir(parents=True, exist_ok=True)
                self.lora.save_pretrained(directory)
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in layers.items()}, directory / ADAPTER_WEIGHTS
                )
            return
        if world()[0] == 0:
            self.model.save_pretrained(directory)

    def load_adapter(self, directory: str | Path) -> None:
        """Load LoRA weights written by :meth:`save_pretrained` into this policy (built with the same
        ``LoraConfig``)."""
        if not self.is_lora:
            raise ValueError(
                "load_adapter needs a LoRA policy; a full fine-tune loads with load_unified_model"
            )
        result = set_peft_model_state_dict(self.model, load_file(Path(directory) / ADAPTER_WEIGHTS))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(
                f"{directory}: adapter weights do not fit this model: {result.unexpected_keys[:5]}"
            )


def heldout_questions(num_per_type: int, seed: int, image_size: int = 32) -> list[dict]:
    """``num_per_type`` questions of each type on fresh ``vqa.random_scene`` scenes drawn from ``seed``:
    ``{"image" [3, H, W] in [0, 1], "question", "answer", "qtype"}``."""
    rng = np.random.default_rng(seed)
    out = []
    for qtype in vqa.QUESTION_TYPES:
        count = 0
        while count < num_per_type:
            scene = vqa.random_scene(rng, image_size)
            if not vqa.questions(scene)[qtype]:
                continue
            entry = vqa.sample_question(scene, rng, qtype)
            out.append({**entry, "image": render(scene, image_size)})
            count += 1
    return out


@torch.no_grad()
def understanding_accuracy(
    policy_or_model: UnifiedPolicy | UnifiedModel,
    num_per_type: int = HELDOUT_PER_TYPE,
    seed: int = HELDOUT_SEED,
    temperature: float = 0.0,
    batch_size: int = 250,
) -> dict[str, float]:
    """Exact-match accuracy of the policy's answers on held-out scenes, per question type and ``overall``
    (the mean over types). Greedy at temperature 0; otherwise sample ``i`` draws from a stream keyed by
    ``seed`` and ``i``, so two policies are compared on the same randomness."""
    policy = policy_or_model if isinstance(policy_or_model, UnifiedPolicy) else UnifiedPolicy(policy_or_model)
    items = heldout_questions(num_per_type, seed, policy.resolution)
    generators = keyed(torch.Generator().manual_seed(seed), list(range(len(items))), TOKEN)
    nfe, texts = policy.nfe, []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rollout = policy.sample_tokens(
            "answer",
            {"images": torch.stack([i["image"] for i in chunk]), "questions": [i["question"] for i in chunk]},
            generators[start : start + batch_size],
            temperature=temperature,
        )
        texts.extend(rollout.texts)
    policy.nfe = nfe  # evaluation cost is not training cost
    correct: dict[str, list[bool]] = {qtype: [] for qtype in vqa.QUESTION_TYPES}
    for item, text in zip(items, texts):
        correct[item["qtype"]].append(vqa.answer_matches(text, item["answer"]))
    accuracy = {qtype: float(np.mean(hits)) for qtype, hits in correct.items()}
    accuracy["overall"] = float(np.mean(list(accuracy.values())))
    return accuracy
