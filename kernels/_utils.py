"""Launch-time helpers shared by the kernel modules.

One rule for indices in every kernel: the image index is widened to int64 where it is read
(``b = tl.program_id(1).to(tl.int64)``) and every image's base pointer is formed from it, so B·N·D past
2^31 elements cannot wrap; offsets inside one image stay int32, which ``check_image_offsets`` makes
safe on the host. 2-D tiles of int64 offsets cost registers: the fp32 cosine backward spilled with them.
"""

import functools

import torch
import triton.language as tl

from fastpatchdiv.kernels import INTERPRETER

# tl.dot takes tiles of at least 16 in every dimension (a constexpr, so kernels can read it).
MIN_DOT = tl.constexpr(16)


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


def compile_options(dtype: torch.dtype, num_warps: int, num_stages: int) -> dict:
    """The launch keywords every tile kernel takes: dot precision, interpreter upcast, warps, stages."""
    return dict(PRECISION=dot_precision(dtype), UPCAST=upcast_loads(dtype), num_warps=num_warps, num_stages=num_stages)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_cap(device: torch.device) -> int:
    """How many persistent programs fill the device: a few per SM on CUDA, few under the interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def check_image_offsets(*tensors: torch.Tensor) -> None:
    """Raise unless every element offset inside one image, Σ (size − 1)·|stride| over (N, D), fits int32."""
    for t in tensors:
        reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if reach >= 2**31:
            raise ValueError(
                f"one image of shape {tuple(t.shape[1:])} with strides {t.stride()[1:]} spans {reach} elements; "
                "the kernels index inside an image in 32 bits: pass a contiguous tensor or use backend='torch'"
            )
