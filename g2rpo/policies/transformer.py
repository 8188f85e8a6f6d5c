"""What every diffusers transformer policy shares: frozen parts, LoRA or full fine-tuning, the reference
model, FSDP sharding and export. The subclasses (SD3, FLUX) only say how to encode, call the transformer,
lay out latents and build the sigma grid."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from g2rpo.distributed import full_tensors, world
from g2rpo.policies.base import FlowPolicy
from g2rpo.policies.reference import FrozenReference
from g2rpo.types import Conditioning


def load_pipeline(
    pipeline_class: type[DiffusionPipeline], path: str, dtype: str, hub_name: str, **kwargs
) -> Any:
    """``pipeline_class.from_pretrained`` from a local directory or the Hugging Face cache, never the network,
    with a message that says how to get the weights when they are missing."""
    try:
        return pipeline_class.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=True, **kwargs
        )
    except (OSError, ValueError) as error:
        raise missing_weights(hub_name, path, error) from error


def missing_weights(hub_name: str, path: str, error: Exception) -> FileNotFoundError:
    """The error a loader raises when ``path`` holds no weights: how to get them."""
    return FileNotFoundError(
        f"model: cannot load {hub_name} weights from {path!r} without network access.\n"
        f"  Download them once with `hf download {path}` (accept the model licence on the Hub and run "
        "`hf auth login` first),\n"
        "  or point model.pipeline.path at a local directory that contains model_index.json.\n"
        f"  ({type(error).__name__}: {error})"
    )


def set_attention_backend(transformer: nn.Module, backend: str) -> None:
    """``model.attention_backend``: diffusers' attention dispatcher (``flash``, ``_native_flash``, ``sage``,
    ``xformers``, ...) for every attention of ``transformer``. Refused where it would be silent or reach the
    network: processors that call torch's SDPA themselves (SD3's joint attention, for which torch picks
    the flash or memory-efficient kernel on CUDA), and the ``*_hub`` backends, which download kernels."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName if not b.value.endswith("_hub")]
    if backend not in names:
        raise ValueError(f"model.attention_backend={backend!r}: choose one of {', '.join(names)} (or null)")
    fixed = sorted(
        {type(m.processor).__name__ for m in transformer.modules()
         if getattr(m, "processor", None) is not None and not hasattr(m.processor, "_attention_backend")}
    )  # fmt: skip
    if fixed:
        raise ValueError(
            f"model.attention_backend={backend!r}: {', '.join(fixed)} calls torch's scaled_dot_product_attention "
            "itself (torch picks the flash or memory-efficient kernel on CUDA); set model.attention_backend=null"
        )
    transformer.set_attention_backend(backend)


class TransformerPolicy(FrozenReference, FlowPolicy):
    """A diffusers pipeline whose transformer is trained: LoRA through peft (``lora`` given) or full
    fine-tuning (``lora=None``); text encoders and VAE frozen.

    The reference model for KL terms is the same transformer with its adapters disabled (LoRA, no copy)
    or a frozen copy of the initial weights (full fine-tuning, made by ``enable_reference``).
    """

    trained_module = "transformer"
    #: the transformer's lists of blocks: FSDP units, and what gradient checkpointing recomputes
    block_lists: tuple[str, ...] = ("transformer_blocks",)

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: int,
        lora: LoraConfig | None = None,
        max_sequence_length: int = 128,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
        text_cache_size: int = 0,
        attention_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.pipeline = pipeline  # not a Module: holds the same component objects registered below
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.text_encoders = nn.ModuleList(
            encoder
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if (encoder := getattr(pipeline, name, None)) is not None
        )
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self.vae_scale = pipeline.vae_scale_factor if self.vae is not None else 1  # the pipeline's own factor
        self._check_resolution(resolution, "model.resolution")

        for frozen in (self.vae, self.text_encoders):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        if lora is not None:
            self.transformer.requires_grad_(False)
            self.transformer.add_adapter(lora)
            cast_training_params(self.transformer, dtype=torch.float32)
        else:
            self.transformer.requires_grad_(True)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.init_reference(is_lora=lora is not None)
        if attention_backend is not None:
            set_attention_backend(self.transformer, attention_backend)
        self.compile_options = dict(compile_options or {}) if compile else None
        if text_cache_size < 0:
            raise ValueError(f"model.text_cache_size must be >= 0 (0: no cache), got {text_cache_size}")
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        if compile:
            self.compile_blocks(self.transformer)

    def blocks(self, transformer: nn.Module) -> Iterator[nn.Module]:
        """The repeated blocks of ``transformer`` (``block_lists``)."""
        for name in self.block_lists:
            yield from getattr(transformer, name)

    def compile_blocks(self, transformer: nn.Module) -> None:
        """Regional compilation (``model.compile``): ``torch.compile`` of each repeated block, as diffusers'
        ``compile_repeated_blocks`` does for the models that declare ``_repeated_blocks`` (SD3's transformer
        declares none, so the blocks come from ``block_lists``, the same units FSDP shards). Blocks share one
        code object and dynamo treats their weights as inputs, so one graph serves every block: the warm-up
        is one block's compile, not the whole model's. LoRA layers and the disabled-adapter reference are
        traced inside the block (a second graph for the reference). ``compile_options`` go to
        ``torch.compile`` verbatim (``mode``, ``dynamic``, ``backend``)."""
        for block in self.blocks(transformer):
            block.compile(**self.compile_options)

    def enable_reference(self) -> None:
        """A compiled block's compiled call is bound to that block, and ``deepcopy`` keeps the binding: the
        full-fine-tuning reference copy would run the trained weights. Its blocks are compiled afresh."""
        fresh = self.reference_copy is None
        super().enable_reference()
        if fresh and self.reference_copy is not None and self.compile_options is not None:
            self.compile_blocks(self.reference_copy)

    @property
    def latent_multiple(self) -> int:
        """What the image side must be a multiple of."""
        return self.vae_scale * self.transformer.config.patch_size

    def _check_resolution(self, resolution: int, key: str) -> None:
        if resolution % self.latent_multiple:
            raise ValueError(
                f"{key}={resolution} must be a multiple of {self.latent_multiple} (the VAE's "
                f"downsampling x the transformer's patch size for {type(self).__name__})"
            )

    @contextmanager
    def sampling_resolution(self, resolution: int) -> Iterator[None]:
        """Sample at another resolution than the one trained (an evaluation protocol pins its own: G2RPO's
        FLUX trains at 720 px and is evaluated at 1024)."""
        self._check_resolution(resolution, "eval.resolution")
        trained, self.resolution = self.resolution, resolution
        try:
            yield
        finally:
            self.resolution = trained

    @property
    def input_weight(self) -> Tensor:
        """A frozen weight of the transformer's input layer: its device and dtype are the model's."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.input_weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The frozen weights' dtype (``transformer.dtype`` scans every parameter: too slow per call)."""
        return self.input_weight.dtype

    @torch.no_grad()
    def encode(
        self, prompts: list[str], negative: bool = True, sources: Tensor | None = None
    ) -> Conditioning:
        embeds, pooled = self.cached_text(list(prompts))
        context = None if sources is None else self.encode_source(sources)
        if not negative:
            return Conditioning(embeds, pooled, context_latents=context)
        # The negative prompt is the same "" for every row: encode it once and broadcast (a view).
        negative_embeds, negative_pooled = self.cached_text([""])
        return Conditioning(
            embeds,
            pooled,
            negative_embeds.expand(len(prompts), -1, -1),
            negative_pooled.expand(len(prompts), -1),
            context,
        )

    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token and pooled embeddings of ``prompts`` from the pipeline's own ``encode_prompt``."""
        raise NotImplementedError

    def cached_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`encode_text` through a least-recently-used cache of ``model.text_cache_size`` prompts (0: none).
        Prompt sets repeat every epoch, and a T5-XXL forward per prompt (SD3.5, FLUX.1) is the one text cost
        that grows with the encoder. The encoders are frozen, so a cached row is the prompt's encoding up to the
        kernels' batch-size-dependent rounding (about 1e-7). Rows stay on the model's device: SD3.5's
        333 x 4096 bf16 tokens are 2.7 MB a prompt."""
        if not self.text_cache_size:
            return self.encode_text(prompts)
        cache = self._text_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            embeds, pooled = self.encode_text(missing)
            cache.update(zip(missing, zip(embeds, pooled)))
        for prompt in prompts:
            cache.move_to_end(prompt)
        rows = [cache[p] for p in prompts]
        while len(cache) > max(self.text_cache_size, len(set(prompts))):
            cache.popitem(last=False)
        return torch.stack([e for e, _ in rows]), torch.stack([p for _, p in rows])

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """[-1, 1] pixels (pixel-space model), or the VAE's mode shifted and scaled as :meth:`decode` undoes."""
        pixels = images.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return pixels
        config = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return (latents.float() - (config.shift_factor or 0.0)) * config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:  # pixel-space model: latents are images in [-1, 1]
            images = latents
        else:
            config = self.vae.config
            latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
            images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pt")

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        return self.pipeline.scheduler.config

    def shard(self, mesh: DeviceMesh, cpu_offload: bool = False) -> None:
        """FSDP2, as torchtitan shards a transformer: each block is a unit, the root holds the rest
        (embeddings, final norm and projection); a full-fine-tuning reference copy is sharded the same way.
        The text encoders and the VAE run once per prompt or image outside the trained loop and stay
        replicated. A 2-D mesh (nodes x devices) shards within a node and replicates across nodes (HSDP).
        Activation checkpointing is the model's own (``model.gradient_checkpointing``)."""
        if cpu_offload and mesh.device_type == "cpu":
            raise ValueError(
                "module.fsdp_cpu_offload=true moves shards off an accelerator: the run is on the CPU"
            )
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        for transformer in (self.transformer, self.reference_copy):
            if transformer is not None:
                for block in self.blocks(transformer):
                    fully_shard(block, mesh=mesh, offload_policy=offload)
                fully_shard(transformer, mesh=mesh, offload_policy=offload)

    def save_pretrained(self, directory: str | Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors``, which the stock pipeline's ``load_lora_weights``
        reads; full fine-tuning: the transformer in diffusers' layout.

        Called on every rank: sharded weights are gathered (a collective), then rank 0 writes."""
        directory = Path(directory)
        if self.is_lora:
            layers = full_tensors(get_peft_model_state_dict(self.transformer))
            if world()[0] == 0:
                type(self.pipeline).save_lora_weights(
                    directory,
                    transformer_lora_layers=layers,
                    # rank and alpha: without them a loader would assume alpha = rank (scale 1)
                    transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
                )
            return
        weights = full_tensors(self.transformer.state_dict())
        if world()[0] != 0:
            return
        # an unsharded copy built on the meta device, holding the gathered weights, writes the diffusers layout
        with torch.device("meta"):
            plain = type(self.transformer).from_config(self.transformer.config)
        plain.load_state_dict(weights, assign=True)
        plain.save_pretrained(directory / "transformer")
