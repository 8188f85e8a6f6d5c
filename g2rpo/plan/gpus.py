"""The GPUs a plan is priced on: peak dense bf16 tensor throughput, memory and its bandwidth.

Figures are the vendor's datasheets, dense (the datasheets print bf16 "with sparsity", twice these).
Memory is what ``nvidia-smi`` reports as total. A run is planned to fit when its peak allocated memory
is at most ``USABLE`` of it: the rest goes to the CUDA context, NCCL buffers and the caching allocator's
fragmentation (``memory_reserved`` runs 5-10% above ``max_memory_allocated`` in diffusion training).
"""

from __future__ import annotations

from dataclasses import dataclass

USABLE = 0.9


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense
    memory_gib: float
    bandwidth_tbs: float
    source: str

    @property
    def usable_bytes(self) -> float:
        return USABLE * self.memory_gib * 2**30


GPUS = {
    gpu.name: gpu
    for gpu in (
        GPU("H100-SXM", 989.0, 79.6, 3.35, "NVIDIA H100 Tensor Core GPU datasheet (SXM5 80GB)"),
        GPU("H200", 989.0, 140.4, 4.8, "NVIDIA H200 Tensor Core GPU datasheet (SXM 141GB)"),
        GPU("A100-80GB", 312.0, 80.0, 2.039, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"),
        GPU("B200", 2250.0, 179.1, 8.0, "NVIDIA HGX B200 datasheet (per GPU: one eighth of the 8-GPU board)"),
    )
}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"plan.gpu={name!r} is not known; choose one of {', '.join(GPUS)}")
    return GPUS[name]
