"""Checkpoint converters: official reward checkpoints renamed into the transformers modules that run them.

``openclip`` (open_clip ViT checkpoints to a ``CLIPModel``: HPSv2, DFN5B), ``imagereward`` (ImageReward's
BLIP checkpoint to ``ImageRewardModel``), ``checks`` (the key and shape checks both share).
"""
