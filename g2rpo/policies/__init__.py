"""Policies: the models under training, behind the narrow interfaces the algorithms use (flow models:
:class:`FlowPolicy`; token samplers: :class:`~g2rpo.policies.tokens.TokenPolicy`; both: :class:`Policy`)."""

from g2rpo.policies.base import FlowPolicy, Policy
from g2rpo.policies.flux import FluxKontextPolicy, FluxPolicy, load_flux_kontext_pipeline, load_flux_pipeline
from g2rpo.policies.qwen_image import (
    QwenImageEditPolicy,
    QwenImagePolicy,
    load_qwen_image_edit_pipeline,
    load_qwen_image_pipeline,
)
from g2rpo.policies.sd3 import SD3EditPolicy, SD3Policy, load_sd3_pipeline
from g2rpo.policies.tiny import (
    char_tokenizer,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_pipeline,
)

__all__ = [
    "FlowPolicy",
    "FluxKontextPolicy",
    "FluxPolicy",
    "Policy",
    "QwenImageEditPolicy",
    "QwenImagePolicy",
    "SD3EditPolicy",
    "SD3Policy",
    "char_tokenizer",
    "load_flux_kontext_pipeline",
    "load_flux_pipeline",
    "load_qwen_image_edit_pipeline",
    "load_qwen_image_pipeline",
    "load_sd3_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_flux_pipeline",
    "tiny_qwen_image_edit_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_sd3_pipeline",
]
