"""A text-only policy: a transformers causal language model answering questions (``task="text"``), for RL on
reasoning with a verifier reward, the setting CurES (arXiv 2510.01037) was built for: Qwen2.5-Math-1.5B / 7B
trained by GRPO or REINFORCE++ on math problems.

Each question is rendered by the tokenizer's chat template (``chat_template: true``; with the system prompt
``system_prompt`` when given) or as plain text (``false``: a base model without a template), after
``prompt_template`` puts it in the instruction (CurES: "Let's think step by step and output the final answer
within \\boxed{}"). Rows are left-padded; decoding is a manual loop over the KV cache, as
:class:`~g2rpo.policies.qwen_vl.QwenVLJudgePolicy`'s: every sample draws each token from its own generator
(inverse CDF, one uniform per step), so a sample does not depend on the batch it is drawn in, and the
log-probs kept are those of the tempered distribution it was drawn from (the PPO ratio is exactly 1 before
the first update).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from g2rpo.distributed import world
from g2rpo.policies.janus import positions_of
from g2rpo.policies.reference import FrozenReference
from g2rpo.policies.tokens import TokenPolicy, decode
from g2rpo.types import TokenRollout

TEXT_TASKS = ("text",)


class CausalLM(NamedTuple):
    """A causal language model and its tokenizer (chat template, end tokens), as loaded together."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_causal_lm(path: str, dtype: str = "bfloat16") -> CausalLM:
    """A causal LM from a local directory or the Hugging Face cache, never the network, with a message that
    says how to get the weights when they are missing."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"model: cannot load a causal LM from {path!r} without network access.\n"
            f"  Download it once with `hf download {path}`,\n"
            "  or point model.lm.path at a local directory that contains config.json.\n"
            f"  ({type(error).__name__}: {error})"
        ) from error
    return CausalLM(model, tokenizer)


class CausalLMPolicy(FrozenReference, TokenPolicy):
    """A causal LM under training: LoRA through peft (``lora`` given) or full fine-tuning (``lora=None``).
    Trained weights are kept in fp32 (a bf16 weight cannot take CurES's 1e-6 steps); frozen ones stay as
    loaded. The reference for KL terms is the model with its adapters disabled (LoRA) or a frozen copy of the
    initial weights (full fine-tuning, made by ``enable_reference``).

    ``nfe`` counts sequences pushed through the network: one per sequence and decoding step, one per
    sequence for a teacher-forced forward.
    """

    trained_module = "model"

    def __init__(
        self,
        lm: CausalLM | tuple[PreTrainedModel, PreTrainedTokenizerBase],
        lora: LoraConfig | None = None,
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
        chat_template: bool = True,
        max_new_tokens: int = 1024,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if "{question}" not in prompt_template:
            raise ValueError("model.prompt_template must contain {question}, where the question goes")
        model, self.tokenizer = lm
        self.model = model.eval()
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "model.chat_template=true but the tokenizer has no chat template: set model.chat_template=false "
                "to feed prompt_template as plain text (a base model)"
            )
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.chat_template = chat_template
        self.max_new_tokens = max_new_tokens
        self.tokenizer.padding_side = "left"  # the decoding loop reads each row's last column
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id
        ends = self.model.generation_config.eos_token_id if self.model.generation_config else None
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        self.end_ids = torch.tensor(sorted({self.tokenizer.eos_token_id, *ends}))

        self.model.requires_grad_(False)
        if lora is not None:
            self.model.add_adapter(lora)
        else:
            self.model.requires_grad_(True)
        cast_training_params(self.model, dtype=torch.float32)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.init_reference(is_lora=lora is not None)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def render(self, question: str) -> str:
        """The prompt text of one question, up to where the answer starts."""
        content = self.prompt_template.format(question=question)
        if not self.chat_template:
            return content
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompts(self, questions: list[str]) -> dict[str, Tensor]:
        """The rendered prompts tokenised and left-padded (the template already holds its special tokens)."""
        batch = self.tokenizer(
            [self.render(q) for q in questions],
            padding=True,
            add_special_tokens=not self.chat_template,
            return_tensors="pt",
        )
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def forward_tokens(
        self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any = None, use_cache: bool = False
    ) -> Any:
        """The active model (trained or reference) on token ids; each row counts one network evaluation."""
        self.nfe += ids.shape[0]
        if torch.is_grad_enabled():
            self.nfe_backward += ids.shape[0]
        return self.active(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=use_cache,
        )

    @staticmethod
    def tempered(logits: Tensor, temperature: float) -> Tensor:
        """Log-probs of ``softmax(logits / T)``; temperature 0 (greedy) scores under temperature 1."""
        return torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)

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
        """``inputs["questions"]``: one answer per question. Temperature 0 decodes greedily (evaluation), the
        log-probs then those of the argmax under temperature 1. ``guidance_scale`` does not apply to text."""
        if task not in TEXT_TASKS:
            raise ValueError(f"task={task!r}: a text-only language model answers task=text")
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: 0 (greedy) or a positive temperature")
        steps = max_new_tokens or self.max_new_tokens
        prompt = self.prompts(list(inputs["questions"]))
        mask = prompt["attention_mask"]
        positions = positions_of(mask)
        output = self.forward_tokens(prompt["input_ids"], mask, positions, use_cache=True)
        positions = positions[:, -1:]

        def feed(token: Tensor) -> None:
            nonlocal mask, positions, output
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions + 1
            output = self.forward_tokens(
                token[:, None], mask, positions, cache=output.past_key_values, use_cache=True
            )

        tokens, valid, log_probs = decode(
            lambda: self.tempered(output.logits[:, -1], temperature),
            feed, generators, steps, temperature, self.end_ids, self.pad_id,
        )  # fmt: skip
        texts = self.tokenizer.batch_decode(
            [row[keep].tolist() for row, keep in zip(tokens, valid)], skip_special_tokens=True
        )
        return TokenRollout(
            task=task,
            inputs={"questions": list(inputs["questions"])},
            tokens=tokens,
            mask=valid,
            log_probs=log_probs,
            texts=texts,
            temperature=temperature,
        )

    def token_log_probs(self, rollout: TokenRollout) -> Tensor:
        """One teacher-forced forward over prompt + sampled tokens, positions continuing each prompt's."""
        if rollout.task not in TEXT_TASKS:
            raise ValueError(f"task={rollout.task!r}: a text-only language model answers task=text")
        tokens, length = rollout.tokens.to(self.device), rollout.tokens.shape[1]
        prompt = self.prompts(rollout.inputs["questions"])
        start = prompt["input_ids"].shape[1]
        ids = torch.cat([prompt["input_ids"], tokens], dim=1)
        mask = torch.cat([prompt["attention_mask"], prompt["attention_mask"].new_ones(tokens.shape)], dim=1)
        logits = self.forward_tokens(ids, mask, positions_of(mask)).logits
        log_probs = self.tempered(logits[:, start - 1 : start - 1 + length], rollout.temperature)
        picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(~rollout.mask.to(self.device), 0.0)

    def save_pretrained(self, directory: str | Path) -> None:
        """LoRA: the adapter in PEFT's format (vLLM serves it with ``--enable-lora``); full fine-tuning: the
        whole model and its tokenizer, a checkpoint ``load_causal_lm`` and vLLM read. Rank 0 writes."""
        if world()[0] != 0:
            return
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if not self.is_lora:
            self.tokenizer.save_pretrained(directory)
