"""The frozen reference model for KL terms, kept the same way by every policy (diffusers transformers, the
unified shapes model, Janus-Pro)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class FrozenReference:
    """With LoRA the reference is the trained module with its adapters disabled (no copy); with full
    fine-tuning it is a frozen copy of the initial weights, made once by :meth:`enable_reference`. Forwards
    go through :attr:`active`, which is the copy inside :meth:`reference`.

    A policy names its trained module (``trained_module``) and calls :meth:`init_reference` once the LoRA
    adapters are in place.
    """

    trained_module: str  # the attribute holding the module whose weights train

    def init_reference(self, is_lora: bool) -> None:
        self.is_lora = is_lora
        # peft's own disable_adapters() walks every module (and diffusers' queries the peft version on each
        # call); the reference runs once per trained unit, so the LoRA layers are found once
        self._lora_layers = [m for m in self.trained.modules() if isinstance(m, BaseTunerLayer)]
        self.reference_copy: nn.Module | None = None
        self._use_reference = False

    @property
    def trained(self) -> nn.Module:
        return getattr(self, self.trained_module)

    @property
    def active(self) -> nn.Module:
        """The module a forward runs: the trained one, or the reference copy inside :meth:`reference`."""
        return self.reference_copy if self._use_reference else self.trained

    def enable_reference(self) -> None:
        if not self.is_lora and self.reference_copy is None:
            self.reference_copy = copy.deepcopy(self.trained).requires_grad_(False).eval()

    @contextmanager
    def reference(self) -> Iterator[None]:
        if self.is_lora:
            for layer in self._lora_layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in self._lora_layers:
                    layer.enable_adapters(True)
                if self.paused:  # peft's enable_adapters turns requires_grad back on for every adapter
                    names = {n for n, _ in self.named_trainable_parameters()}
                    self.train_only(names - self.paused)
            return
        if self.reference_copy is None:
            raise RuntimeError("full fine-tuning keeps a frozen reference only after enable_reference()")
        self._use_reference = True
        try:
            yield
        finally:
            self._use_reference = False

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (n, p)
            for n, p in self.trained.named_parameters(prefix=self.trained_module)
            if p.requires_grad or n in self.paused
        ]
