"""Input checks, backend dispatch and reductions shared by every loss.

Each public loss checks its arguments once, here, so the messages read the same across ops.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
EPS = 1e-12
# Floating dtypes the Triton kernels take; float64 always goes to the PyTorch path.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    from fastpatchdiv.kernels import INTERPRETER

    return INTERPRETER


def check_tokens(name: str, x) -> torch.Tensor:
    """Return ``x`` viewed as (B, N, D), or raise for anything that is not patch tokens."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (B, N, D) or (N, D), got {x.dim()} dims: {tuple(x.shape)}")
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    if x3.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 patch tokens (N >= 2), got shape {tuple(x.shape)}")
    if x3.shape[2] == 0:
        raise ValueError(f"{name} has an empty feature dimension (D = 0): shape {tuple(x.shape)}")
    return x3


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def pick_backend(x: torch.Tensor, backend: str) -> str:
    """'triton' for CUDA tensors or CPU tensors under the interpreter, 'torch' otherwise.

    float64 always takes the PyTorch path: the kernels compute in fp32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kernel_ok = x.dtype in KERNEL_DTYPES and (x.is_cuda or (x.device.type == "cpu" and interpreting()))
    if backend == "auto":
        return "triton" if kernel_ok else "torch"
    if backend == "triton" and not kernel_ok:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1) of dtype "
            f"float32/float16/bfloat16; got a {x.device.type} tensor of {x.dtype}"
        )
    return backend


def reduce_images(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) float32 per-image losses -> the requested reduction."""
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def per_image_grad(grad_output: torch.Tensor, reduction: str, batch: int) -> torch.Tensor:
    """d(reduced)/d(per-image loss) times grad_output, as a (B,) float32 vector."""
    g = grad_output.float()
    if reduction == "none":
        return g.reshape(batch)
    scale = 1.0 / batch if reduction == "mean" else 1.0
    return (g * scale).reshape(1).expand(batch)
