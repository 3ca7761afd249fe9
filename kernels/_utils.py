"""Launch-time helpers shared by the kernel modules."""

from __future__ import annotations

import functools

import torch
import triton
from fastpatchdiv.kernels import INTERPRETER


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: fp32 follows ``torch.get_float32_matmul_precision()``.

    "highest" (torch's default) -> exact fp32 ("ieee"); "high"/"medium" -> tf32, as torch.matmul does.
    16-bit inputs ignore it.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def upcast_loads(dtype: torch.dtype) -> bool:
    """The interpreter keeps bf16 as raw bits, so its arithmetic is wrong: upcast tiles right after the load."""
    return INTERPRETER and dtype == torch.bfloat16


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_cap(device: torch.device) -> int:
    """How many persistent programs fill the device: a few per SM on CUDA, few under the interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)
