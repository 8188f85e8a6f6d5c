"""Checks shared by the checkpoint converters (:mod:`~g2rpo.rewards.weights.openclip`,
:mod:`~g2rpo.rewards.weights.imagereward`): a converted state dict must name exactly the target module's
tensors, with their shapes, or the error lists what differs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

SHOWN = 12  # keys listed per kind in an error message


def listed(keys: Iterable[str]) -> str:
    """Up to ``SHOWN`` keys, sorted, and how many more."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_fits(converted: Mapping[str, Tensor], own: Mapping[str, Tensor], module: str, source: str) -> None:
    """``ValueError`` unless ``converted`` has ``own``'s keys and shapes (``module``: what ``own`` belongs
    to; ``source``: what defined its shapes, e.g. "config" or "model")."""
    if set(own) != set(converted):  # a transformers layout the converter does not know
        raise ValueError(
            f"{module} expects other keys: missing {listed(set(own) - set(converted))}; "
            f"unexpected {listed(set(converted) - set(own))}"
        )
    wrong = [
        f"{name}: {source} {tuple(own[name].shape)}, checkpoint {tuple(tensor.shape)}"
        for name, tensor in converted.items()
        if own[name].shape != tensor.shape
    ]
    if wrong:
        raise ValueError(
            f"the checkpoint does not fit the {source} ({len(wrong)} shape mismatch(es)): "
            + "; ".join(wrong[:SHOWN])
        )


def check_keys(given: set[str], expected: set[str], what: str, hint: str = "") -> None:
    """``ValueError`` unless a checkpoint's keys are exactly ``expected``: "``what`` (missing ...;
    unexpected ...)``hint``"."""
    missing, unexpected = expected - given, given - expected
    problems = [f"{kind} {len(keys)} key(s): {listed(keys)}" for kind, keys in
                (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
    if problems:
        raise ValueError(f"{what} (" + "; ".join(problems) + ")" + hint)
