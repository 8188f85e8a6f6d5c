"""Curricula decide which prompts an iteration draws and how many samples each gets."""

from g2rpo.curriculum.uniform import Curriculum, UniformCurriculum

__all__ = ["Curriculum", "UniformCurriculum"]
