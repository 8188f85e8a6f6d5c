"""What an execution on fake tensors costs: FLOPs, and device memory (every storage created, when it is
freed, and the peak), per phase.

FLOPs: the formulas of ``torch.utils.flop_counter`` (matmuls, convolutions, attention; with the CPU
attention kernels of :mod:`g2rpo.plan.flops`), applied to each operator this mode sees. ``FlopCounterMode``
itself is not used: its module tracker keeps the recomputed activations of gradient checkpointing alive
(6 GB more per FLUX backward, measured), which would corrupt the memory count.

A ``TorchDispatchMode`` sees each tensor an operator returns; a storage is counted once (views share it)
from its first appearance until a weakref finalizer sees it collected. This is what a caching allocator
hands out, without its rounding and fragmentation (PyTorch's ``max_memory_allocated``, not ``reserved``).
``torch.distributed._tools.mem_tracker.MemTracker`` does the same but hooks every parameter's gradient and
fails on frozen ones ("cannot register a hook on a tensor that doesn't require gradient"), i.e. on every
LoRA run; hence this small one.

At each new peak (by more than ``resolution``) the serial numbers of the live storages are kept, so the
peak can be split afterwards into what each storage turned out to be (weights, gradients, optimiser
state, ...): labels are given to tensors when their role is known, e.g. after a backward.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

import g2rpo.plan.flops  # noqa: F401  (registers the CPU attention kernels' formulas)


@dataclass
class Peak:
    """The largest live total seen, the phase it happened in, and the storages live then (serials)."""

    bytes: int = 0
    phase: str = ""
    serials: dict[int, int] = field(default_factory=dict)  # serial -> bytes


class Meter(TorchDispatchMode):
    """FLOPs, and live and peak bytes of the storages that operators create (and of those :meth:`add` is
    given), per phase (``phase`` is set by whoever drives the execution)."""

    def __init__(self, resolution: float = 0.002) -> None:
        super().__init__()
        self.resolution = resolution
        self.live: dict[int, tuple[int, int]] = {}  # id(storage) -> (serial, bytes)
        self.current = 0
        self.serial = 0
        self.labels: dict[int, str] = {}
        self.phase = ""
        self.peaks: dict[str, Peak] = {}
        self._snapshot_at: dict[str, int] = defaultdict(int)
        self.window_peak = 0  # reset by whoever times a window (g2rpo.plan.replay)
        self.paused = 0
        self.flops: dict[str, int] = defaultdict(int)

    @property
    def peak(self) -> Peak:
        return max(self.peaks.values(), key=lambda peak: peak.bytes, default=Peak())

    def add(self, tensors: Iterable[torch.Tensor], label: str | None = None) -> None:
        """Count tensors that exist already (the weights before a run starts), optionally labelled."""
        for tensor in tensors:
            self._track(tensor)
            if label is not None:
                self.label([tensor], label)

    def label(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Say what the (live) storages of ``tensors`` are, for :meth:`breakdown`."""
        for tensor in tensors:
            if tensor is not None and (entry := self.live.get(id(tensor.untyped_storage()))):
                self.labels[entry[0]] = label

    def breakdown(self, phase: str | None = None, unlabelled: str = "activations") -> dict[str, int]:
        """A phase's peak (the overall peak by default) split by label; storages never labelled count as
        ``unlabelled``. Parts sum to the peak within ``resolution``."""
        peak = self.peak if phase is None else self.peaks[phase]
        parts: dict[str, int] = defaultdict(int)
        for serial, size in peak.serials.items():
            parts[self.labels.get(serial, unlabelled)] += size
        return dict(parts)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Storages created inside are not counted (work on another device, e.g. a reward on the CPU)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def transient(self, extra: int) -> None:
        """A moment at which ``extra`` bytes of temporaries exist on top of what is live (a replayed
        forward's own peak, :mod:`g2rpo.plan.replay`)."""
        self._observe(self.current + extra, extra)

    def _track(self, tensor: torch.Tensor) -> None:
        if self.paused:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less
            return
        key = id(storage)
        if key in self.live:
            return
        size = storage.nbytes()
        self.serial += 1
        self.live[key] = (self.serial, size)
        self.current += size
        weakref.finalize(storage, self._free, key, self.serial)
        self._observe(self.current)

    def _observe(self, total: int, extra: int = 0) -> None:
        self.window_peak = max(self.window_peak, total)
        peak = self.peaks.setdefault(self.phase, Peak(phase=self.phase))
        if total <= peak.bytes:
            return
        peak.bytes = total
        if total > self._snapshot_at[self.phase] * (1 + self.resolution):
            self._snapshot_at[self.phase] = total
            peak.serials = dict(self.live.values())
            if extra:
                peak.serials[0] = extra  # serial 0 is never labelled: temporaries count as activations

    def _free(self, key: int, serial: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] == serial:
            del self.live[key]
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None and not self.paused:
            self.flops[self.phase] += formula(*args, **kwargs, out_val=out)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out
