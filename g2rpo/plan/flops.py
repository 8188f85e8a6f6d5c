"""FLOPs of an execution: ``torch.utils.flop_counter`` with the CPU attention kernels it does not know.

The plan executes on CPU, where ``scaled_dot_product_attention`` dispatches to
``_scaled_dot_product_flash_attention_for_cpu`` (and its backward); ``FlopCounterMode`` counts the CUDA
flash, efficient and cuDNN kernels only, so these two get the same formulas as those (two matmuls forward,
torch's own count backward), and the attention a GPU run would do is counted.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import (
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_attention_backward(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
