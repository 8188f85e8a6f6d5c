"""Policies: flow-matching text-to-image models behind the narrow interface the algorithms use."""

from g2rpo.policies.base import FlowPolicy
from g2rpo.policies.flux import FluxPolicy, load_flux_pipeline
from g2rpo.policies.sd3 import SD3Policy, load_sd3_pipeline
from g2rpo.policies.tiny import char_tokenizer, tiny_flux_pipeline, tiny_sd3_pipeline

__all__ = [
    "FlowPolicy",
    "FluxPolicy",
    "SD3Policy",
    "char_tokenizer",
    "load_flux_pipeline",
    "load_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
]
