"""Identical sampling forwards, executed once and replayed by their cost.

A rollout pushes batches of the same shapes through the denoiser hundreds of times (G2RPO on FLUX: about a
thousand forwards an iteration). Their FLOPs and their memory depend on shapes only, so under ``no_grad``
the first forward of each input signature (shapes, dtypes, module, LoRA on or off) is executed and
measured, and each repeat returns an empty output of the recorded shape while adding the recorded FLOPs and
putting the recorded temporaries on top of what is live at that moment. Training forwards, whose
backward needs their saved activations, always execute. ``plan.replay=false`` executes everything; the
validation (``docs/planning.md``) shows both give the same figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from g2rpo.plan.meter import Meter


@dataclass
class Recorded:
    flops: int
    temporaries: int  # bytes above the live total after the forward, at the forward's own peak
    outputs: list  # (shape, dtype) per tensor leaf, None for other leaves
    spec: object
    others: list
    retained: int = 0  # training forwards: bytes kept for the backward, beyond the outputs
    backward_flops: int | None = None  # training forwards: measured at the first backward
    backward_peak: int = 0  # bytes above the live total at the backward's start, at its own peak


def _signature(module: nn.Module, facts: _Facts, args, kwargs) -> tuple[tuple, bool]:
    """What a forward's cost depends on, and whether any of its inputs requires a gradient."""
    leaves, spec = tree_flatten((args, kwargs))
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.requires_grad))
        elif isinstance(leaf, float):
            parts.append(float)  # a sigma or a scale: its value changes no cost
        else:
            parts.append(leaf)
    adapters = facts.lora_layer.disable_adapters if facts.lora_layer is not None else None
    grad = torch.is_grad_enabled()
    # a training forward whose backward allocates the gradients costs differently from one that accumulates
    accumulating = grad and all(p.grad is not None for p in facts.trainable)
    inputs_need_grad = any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in leaves)
    return (id(module), str(spec), tuple(parts), adapters, grad, accumulating), inputs_need_grad


@dataclass
class _Facts:
    """What a signature reads of a module, found once (walking FLUX's 1,500 modules per forward is slow)."""

    lora_layer: BaseTunerLayer | None
    trainable: list[torch.Tensor]

    @classmethod
    def of(cls, module: nn.Module) -> _Facts:
        layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
        return cls(layers[0] if layers else None, [p for p in module.parameters() if p.requires_grad])


class _Probe(torch.autograd.Function):
    """Identity on a recorded training forward's output: its backward marks where the forward's backward
    starts, so that the backward's FLOPs and peak can be read when it ends (:meth:`Replay.after_backward`)."""

    @staticmethod
    def forward(ctx, replay: Replay, recorded: Recorded, output: torch.Tensor) -> torch.Tensor:
        ctx.replay, ctx.recorded = replay, recorded
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        meter = ctx.replay.meter
        ctx.replay.pending.append((ctx.recorded, meter.current, meter.flops[meter.phase]))
        meter.window_peak = meter.current
        return None, None, grad


class _Replayed(torch.autograd.Function):
    """A repeated training forward: outputs of the recorded shapes, the recorded activations held until the
    backward, which adds the recorded FLOPs and peak and returns gradients for the module's parameters."""

    @staticmethod
    def forward(ctx, replay: Replay, recorded: Recorded, saved: torch.Tensor, *parameters: torch.Tensor):
        ctx.replay, ctx.recorded, ctx.saved = replay, recorded, saved
        ctx.save_for_backward(*parameters)
        anchor = parameters[0]
        return tuple(
            anchor.new_empty(meta[0], dtype=meta[1]) for meta in recorded.outputs if meta is not None
        )

    @staticmethod
    def backward(ctx, *grads):
        meter, recorded = ctx.replay.meter, ctx.recorded
        meter.transient(recorded.backward_peak)
        meter.flops[meter.phase] += recorded.backward_flops
        ctx.saved = None  # the activations it stood for are released by the backward
        # A real backward hands each block's gradients to AccumulateGrad as it goes: they become .grad (the
        # first backward of a step) or are added in place and freed. All at once here, so gradients that are
        # only added come as broadcast views of one element: no allocation that the real one does not make.
        return (
            None,
            None,
            None,
            *[
                p.new_empty(p.shape) if p.grad is None else p.new_empty(()).expand(p.shape)
                for p in ctx.saved_tensors
            ],
        )


class Replay:
    """Wraps modules' ``forward`` to replay repeats on ``meter``; the driver calls :meth:`after_backward`
    after each backward, so that a training forward's first backward is measured."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.cache: dict[tuple, Recorded] = {}
        self.pending: list[tuple[Recorded, int, int]] = []
        self.executed = 0
        self.replayed = 0
        self._token: torch.Tensor | None = None

    def token(self, like: torch.Tensor) -> torch.Tensor:
        """A one-element trainable stand-in, so that a replayed forward's output requires a gradient."""
        if self._token is None:
            self._token = nn.Parameter(like.new_empty((), dtype=torch.float32))
        return self._token

    @contextmanager
    def around(self, modules: list[nn.Module]) -> Iterator[None]:
        originals = {}
        for module in modules:
            originals[module] = module.forward
            module.forward = self._wrapped(module, module.forward)
        try:
            yield
        finally:
            for module, forward in originals.items():
                module.forward = forward

    def after_backward(self) -> None:
        """Complete the recording of the training forward whose backward just ran (one per backward;
        with several, none is recorded and they keep executing)."""
        if len(self.pending) == 1:
            recorded, current, flops = self.pending[0]
            recorded.backward_flops = self.meter.flops[self.meter.phase] - flops
            recorded.backward_peak = max(self.meter.window_peak - current, 0)
        self.pending.clear()

    def _record(self, module: nn.Module, forward, key: tuple, args, kwargs):
        meter = self.meter
        before, flops_before = meter.current, meter.flops[meter.phase]
        meter.window_peak = before
        out = forward(*args, **kwargs)
        leaves, spec = tree_flatten(out)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        output_bytes = sum(t.untyped_storage().nbytes() for t in tensors)
        recorded = Recorded(
            flops=meter.flops[meter.phase] - flops_before,
            temporaries=max(meter.window_peak - meter.current, 0),
            outputs=[(leaf.shape, leaf.dtype) if isinstance(leaf, torch.Tensor) else None for leaf in leaves],
            spec=spec,
            others=[None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves],
            retained=max(meter.current - before - output_bytes, 0),
        )
        self.executed += 1
        if torch.is_grad_enabled():
            if len(tensors) != 1 or not tensors[0].requires_grad:
                return out  # not a shape this replay handles: keep executing it
            leaves = [
                _Probe.apply(self, recorded, leaf) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in leaves
            ]
            out = tree_unflatten(leaves, spec)
        self.cache[key] = recorded
        return out

    def _wrapped(self, module: nn.Module, forward):
        facts = _Facts.of(module)

        def replayable(*args, **kwargs):
            key, inputs_need_grad = _signature(module, facts, args, kwargs)
            recorded = self.cache.get(key)
            grad = torch.is_grad_enabled()
            if recorded is None or (grad and (recorded.backward_flops is None or inputs_need_grad)):
                if recorded is None:
                    return self._record(module, forward, key, args, kwargs)
                return forward(*args, **kwargs)
            self.replayed += 1
            self.meter.flops[self.meter.phase] += recorded.flops
            anchor = next(module.parameters())
            if grad:
                if not facts.trainable:
                    return forward(*args, **kwargs)
                # Gradients that only accumulate change no memory and no FLOPs: one token parameter carries
                # the graph instead of all of them (FLUX: 1,168 in-place additions per backward saved)
                accumulating = key[-1]
                parameters = [self.token(anchor)] if accumulating else facts.trainable
                saved = anchor.new_empty(recorded.retained, dtype=torch.uint8)
                self.meter.transient(recorded.temporaries)
                outputs = iter(_Replayed.apply(self, recorded, saved, *parameters))
                leaves = [
                    next(outputs) if meta is not None else other
                    for meta, other in zip(recorded.outputs, recorded.others)
                ]
                return tree_unflatten(leaves, recorded.spec)
            leaves = [
                anchor.new_empty(meta[0], dtype=meta[1]) if meta is not None else other
                for meta, other in zip(recorded.outputs, recorded.others)
            ]
            self.meter.transient(recorded.temporaries)
            return tree_unflatten(leaves, recorded.spec)

        return replayable
