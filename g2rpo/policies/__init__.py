"""Policies: flow-matching text-to-image models behind the narrow interface the algorithms use."""

from g2rpo.policies.base import FlowPolicy
from g2rpo.policies.sd3 import SD3Policy, load_sd3_pipeline
from g2rpo.policies.tiny import char_tokenizer, tiny_sd3_pipeline

__all__ = ["FlowPolicy", "SD3Policy", "char_tokenizer", "load_sd3_pipeline", "tiny_sd3_pipeline"]
