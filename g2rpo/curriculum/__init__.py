"""Curricula decide which prompts an iteration draws and how many samples each gets."""

from g2rpo.curriculum.base import Curriculum, Probe, Probed
from g2rpo.curriculum.cures import CurESCurriculum
from g2rpo.curriculum.probe import PolicyProbe, TokenProbe, probe_for
from g2rpo.curriculum.uniform import UniformCurriculum

__all__ = [
    "CurESCurriculum",
    "Curriculum",
    "PolicyProbe",
    "Probe",
    "Probed",
    "TokenProbe",
    "UniformCurriculum",
    "probe_for",
]
