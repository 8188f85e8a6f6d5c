"""Real models with fake weights: every parameter and buffer a ``FakeTensor`` (shape, dtype, device, no data).

A model is built exactly as a run builds it (the same Hydra node, the same policy class, peft's LoRA
injection, the reference copy), except that its parameters are created on the meta device
(accelerate's ``init_empty_weights``) and then swapped, tensor for tensor, for fake CPU tensors of the same
shape and dtype. Building on meta first is the way round two things that fail under ``FakeTensorMode``:
peft's adapter injection ("Couldn't swap Linear.weight") and schedulers that read a value at construction
(``.item()`` in ``FlowMatchEulerDiscreteScheduler.__init__``). Schedulers, tokenizers and every other
small tensor stay real, so the iteration's control flow (sigmas, group ids, indices) runs on real values.
Fake *CPU* tensors, because autograd's backward on fake CUDA tensors aborts on a CPU-only build.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

ARCHITECTURES = Path(__file__).parent / "architectures"


def new_fake_mode() -> FakeTensorMode:
    """Real tensors (noise, sigmas, rewards) may meet fake ones: they are converted on the fly."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextmanager
def meta_parameters():
    """Every parameter registered inside is created on the meta device; buffers and the rest stay real."""
    with init_empty_weights(include_buffers=False):
        yield


def materialize(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Swap every parameter and buffer of ``module`` for a fake CPU tensor of its shape and dtype, in place,
    keeping tied weights tied and ``requires_grad`` as it was."""
    swapped: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if isinstance(tensor, FakeTensor):
            return tensor
        if id(tensor) not in swapped:
            with mode:
                empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            swapped[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if parameter else empty
        return swapped[id(tensor)]

    for submodule in module.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is not None:
                submodule._parameters[name] = fake(parameter, parameter=True)
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = fake(buffer, parameter=False)
    return module


@cache
def architecture(name: str) -> dict[str, Any]:
    """A shipped architecture (``architectures/<name>.json``): the configs of a hub model's components."""
    path = ARCHITECTURES / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in ARCHITECTURES.glob("*.json"))
        raise FileNotFoundError(f"plan: no architecture {name!r}; shipped: {', '.join(known)}")
    return json.loads(path.read_text())


def component(spec: dict[str, Any]) -> Any:
    """A diffusers or transformers class built from its config on meta parameters (a scheduler for real)."""
    import diffusers
    import transformers

    library = diffusers if spec["library"] == "diffusers" else transformers
    cls = getattr(library, spec["class"])
    config = dict(spec["config"])
    if spec["library"] == "transformers":
        config_cls = getattr(transformers, spec["config_class"])
        return cls(config_cls(**config))
    if hasattr(cls, "from_config"):
        return cls.from_config(config)
    return cls(**config)


def char_tokenizer(max_length: int):
    """A stand-in tokenizer: prompts are padded to ``max_length`` by every pipeline, so token ids do not
    change a single shape; the tokenizer files are the only part of a hub model not shipped."""
    from g2rpo.policies.tiny import char_tokenizer as build

    return build(max_length)


def pipeline(name: str, dtype: str = "bfloat16", **without: Any):
    """The diffusers pipeline of architecture ``name`` on meta parameters in ``dtype``; a component passed
    as ``<component>=False`` (``text_encoder_3=False``: SD3 without T5) is left out, as the loaders do."""
    import diffusers

    spec = architecture(name)
    components: dict[str, Any] = {}
    with meta_parameters():
        for key, part in spec["components"].items():
            if without.get(key, True) is False:
                components[key] = None
            elif part.get("tokenizer"):
                components[key] = char_tokenizer(part["max_length"])
            else:
                components[key] = component(part)
    for key, part in spec["components"].items():
        if part.get("tokenizer") and components.get(part["encoder"]) is None:
            components[key] = None
    built = getattr(diffusers, spec["pipeline"])(**components)
    verbosity = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # "modules ... should be kept in float32": none here, as loaded
    try:
        return built.to(dtype=getattr(torch, dtype))
    finally:
        diffusers.logging.set_verbosity(verbosity)
