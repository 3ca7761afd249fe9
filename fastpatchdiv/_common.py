"""Input checks, backend dispatch, numerics helpers and reductions shared by every loss.

Each public loss checks its arguments here, once, before its library op runs, so the messages read the
same across ops and ``torch.compile`` sees only the op.
"""

from __future__ import annotations

import contextlib
import math
from numbers import Real

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
EPS = 1e-12
# Floating dtypes the Triton kernels take; float64 always goes to the PyTorch path.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels scale logits by 1/τ in fp32: a smaller τ would make that factor infinite.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max
# The ``precision`` keyword: how the matrix work's operands are held (README, "numerics contract").
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
_SIXTEEN_BIT = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_OPERAND_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    from fastpatchdiv.kernels import INTERPRETER

    return INTERPRETER


# ------------------------------------------------------------------------------------------- checks
def check_tokens(name: str, x: torch.Tensor) -> torch.Tensor:
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


def check_mask(mask: torch.Tensor | None, x3: torch.Tensor, two_dim: bool) -> torch.Tensor | None:
    """A (B, N) bool mask of real patches for tokens ``x3`` (B, N, D); (N,) for 2-D tokens."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = a real patch), got {mask.dtype}")
    want = tuple(x3.shape[1:2]) if two_dim else tuple(x3.shape[:2])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask must have shape {want} (the tokens' {'(N,)' if two_dim else '(B, N)'}), got {tuple(mask.shape)}"
        )
    if mask.device != x3.device:
        raise ValueError(f"mask must be on the tokens' device {x3.device}, got {mask.device}")
    return mask.reshape(x3.shape[:2])


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor):
        raise TypeError(
            f"temperature must be a Python number, got {temperature!r}: a tensor temperature (learnable τ) is "
            "not supported, the ops take τ as a constant (pass float(t) for a fixed one)"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a positive finite number, got {temperature!r}")
    tau = float(temperature)
    if torch.compiler.is_compiling():
        # Under torch.compile(dynamic=True) τ may be symbolic, with no value to test here: the checks
        # become the graph's runtime asserts.
        torch._check(tau >= MIN_TEMPERATURE, lambda: f"temperature must be >= {MIN_TEMPERATURE:.3g}")
        torch._check(tau < math.inf, lambda: "temperature must be finite")
        return tau
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if tau < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.3g} (1/τ must be finite in float32), got {tau!r}")
    return tau


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_flag(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def pick_backend(x: torch.Tensor, backend: str) -> str:
    """'triton' for CUDA tensors or CPU tensors under the interpreter, 'torch' otherwise.

    float64 always takes the PyTorch path: the kernels compute in fp32.
    """
    check_backend(backend)
    kernel_ok = x.dtype in KERNEL_DTYPES and (x.is_cuda or (x.device.type == "cpu" and interpreting()))
    if backend == "auto":
        return "triton" if kernel_ok else "torch"
    if backend == "triton" and not kernel_ok:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1) of dtype "
            f"float32/float16/bfloat16; got a {x.device.type} tensor of {x.dtype}"
        )
    return backend


# ----------------------------------------------------------------------------------------- numerics
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None where autocast is off."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def resolve_operands(dtype: torch.dtype, device_type: str, precision: str) -> str:
    """The operands of a loss's matrix work: "fp32" (exact), "tf32", "bf16", "fp16", or "fp64".

    ``precision="auto"`` follows what ``torch.matmul`` would do at the call: under ``torch.autocast``
    the autocast dtype; outside it the inputs' dtype, fp32 taking TF32 where
    ``torch.get_float32_matmul_precision()`` is "high" or "medium". float64 stays float64 (autocast
    leaves it alone too). Any other value is taken as given. Read where the loss is called: the ops run
    with autocast off.
    """
    if precision != "auto":
        return precision
    if dtype == torch.float64:
        return "fp64"
    cast = _autocast_dtype(device_type)
    if cast in _SIXTEEN_BIT:
        return _SIXTEEN_BIT[cast]
    if dtype in _SIXTEEN_BIT:
        return _SIXTEEN_BIT[dtype]
    return "tf32" if _tf32_allowed() else "fp32"


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    # torch.compile cannot trace the getter: a compiled graph takes the setting it was traced under.
    return torch.get_float32_matmul_precision() != "highest"


def operand_dtype(operands: str) -> torch.dtype:
    """The dtype the matrix work's operands are held in for ``resolve_operands``'s answer."""
    return torch.float64 if operands == "fp64" else _OPERAND_DTYPES[operands]


def round_operands(t: torch.Tensor, operands: str) -> torch.Tensor:
    """``t`` (fp32/fp64) rounded to 16-bit operands and back: what the PyTorch paths multiply, so their
    products are exact and accumulate in ``t``'s dtype, as on the tensor cores. Identity otherwise (a CPU
    has no TF32; a CUDA PyTorch path gets it from ``matmul_precision``)."""
    if operands in ("bf16", "fp16"):
        return t.to(_OPERAND_DTYPES[operands]).to(t.dtype)
    return t


@contextlib.contextmanager
def matmul_precision(operands: str):
    """On CUDA, ``torch.matmul``'s fp32 products exact ("fp32") or TF32 ("tf32") for the block; the
    PyTorch paths' GEMMs then follow the same policy as the kernels."""
    if operands not in ("fp32", "tf32") or not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = operands == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss accumulates and is returned in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(device_type: str):
    """Autocast off, so the ops' matmuls run in the dtypes chosen here and accumulate in fp32."""
    if device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ = x / max(|x|, eps) per row and |x|, in x's dtype, without overflow in the norm.

    The plain norm comes first; where a sum of squares overflowed (tokens past ~1e19 in fp32 or bf16),
    the norm is taken again of x / max_j |x_j| (entries in [-1, 1]) and x̂ = (x / max) / that norm, so
    tokens of any finite magnitude normalise exactly. The scale is detached: x̂ does not depend on it, so
    the gradient is that of x / |x|. Underflow needs no care: squares underflow only in rows whose norm
    is far below eps, which the clamp replaces anyway. A row with a NaN stays NaN.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    xhat = x / norm.clamp_min(EPS)
    over = torch.isinf(norm)
    # Compiled graphs take both forms always: a data-dependent branch would break the graph.
    if not (torch.compiler.is_compiling() or over.any()):
        return xhat, norm.squeeze(-1)
    scale = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(over & (scale > 0), scale, torch.ones_like(scale))
    xs = x / scale
    n = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    # Only the overflowed rows change, and their norm is >= 1 in units of their max: no 0/0 either way.
    xhat = torch.where(over, xs / torch.where(over, n, torch.ones_like(n)), xhat)
    return xhat, torch.where(over, n * scale, norm).squeeze(-1)


# ----------------------------------------------------------------------------------- double backward
class _SecondOrderRefused(torch.autograd.Function):
    """Identity on the gradients, tied to the inputs they depend on; differentiating it raises."""

    @staticmethod
    def forward(ctx, name, *tensors):
        ctx.name = name
        return tuple(t.view_as(t) for t in tensors[1:])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.name}: double backward (a gradient of its gradient, e.g. a gradient penalty) is not supported: "
            "the fused backward is not itself differentiable. Of fastpatchdiv's losses, only "
            "patch_contrastive_loss with negatives='mean' or 'window' supports it."
        )


def refuse_double_backward(name: str, anchor: torch.Tensor, grads: tuple) -> tuple:
    """``grads`` as a Function's backward returns them; under ``create_graph=True`` they come back tied to
    ``anchor`` (an input that requires grad) through a node that raises when differentiated, so a second
    derivative fails loudly instead of silently missing this loss's terms."""
    if not (torch.is_grad_enabled() and anchor.requires_grad):
        return grads
    present = [g for g in grads if g is not None]
    tied = iter(_SecondOrderRefused.apply(name, anchor, *present))
    return tuple(next(tied) if g is not None else None for g in grads)


# --------------------------------------------------------------------------------------- reductions
def valid_counts(mask: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """N_b, the real patches of each image, as a (B,) float64 tensor."""
    if mask is None:
        return torch.full((batch,), float(n), dtype=torch.float64, device=device)
    return mask.sum(dim=1, dtype=torch.float64)


def pair_scale(mask: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """c_b = 1/(N_b(N_b − 1)), the weight of each ordered pair of an image's real patches; 0 where N_b < 2."""
    nb = valid_counts(mask, batch, n, device)
    return torch.where(nb >= 2, 1.0 / (nb * (nb - 1)).clamp_min(1.0), torch.zeros_like(nb))


def reduce_images(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) per-image losses -> the requested reduction ("mean" of an empty batch is NaN, as in torch)."""
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image
