"""The patch cosine loss: autograd Function, PyTorch blockwise path and public API."""

from __future__ import annotations

import torch
from torch import nn

from fastpatchdiv._common import EPS, check_reduction, check_tokens, per_image_grad, pick_backend, reduce_images

# The kernel backward keeps a BLOCK_M x next_pow2(D) fp32 accumulator per program: at D > 1024 it spills
# and an fp32 tile outgrows an H100's shared memory, so wider tokens take the PyTorch path (cuBLAS tiles).
MAX_KERNEL_D = 1024
# Elements of one S tile on the PyTorch path (B images at once): 16 MiB of fp32.
_TILE_ELEMENTS = 1 << 22


def _tile_size(batch: int, n: int) -> int:
    t = 128
    while t < 1024 and batch * (2 * t) ** 2 <= _TILE_ELEMENTS:
        t *= 2
    return min(t, n)


def _normalize(x: torch.Tensor):
    """fp32 (fp64 for fp64 input) x̂ and the unclamped norms."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    norm = torch.linalg.vector_norm(xf, dim=-1)
    return xf / norm.clamp_min(EPS).unsqueeze(-1), norm


def _tiles(n: int, t: int):
    """Upper-triangle tile pairs (i0, i1, j0, j1) with j0 >= i0."""
    for i0 in range(0, n, t):
        for j0 in range(i0, n, t):
            yield i0, min(i0 + t, n), j0, min(j0 + t, n)


def _torch_forward(x: torch.Tensor, need_grad: bool):
    """Per-image losses and, when ``need_grad``, d loss_b / dx (in fp32/fp64) from the same tiles.

    S is symmetric, so only tiles J >= I are formed (N²·D/2 multiply-adds); with ``need_grad`` each tile
    also adds sign(S_IJ) X̂_J into G_I and sign(S_IJ)ᵀ X̂_I into G_J (N²·D more). Done serially, both
    updates are deterministic without atomics, and the backward is left with an O(N·D) scale.
    """
    B, N, _ = x.shape
    xhat, norm = _normalize(x)
    total = torch.zeros(B, dtype=xhat.dtype, device=x.device)
    g = torch.zeros_like(xhat) if need_grad else None
    for i0, i1, j0, j1 in _tiles(N, _tile_size(B, N)):
        xi, xj = xhat[:, i0:i1], xhat[:, j0:j1]
        s = torch.bmm(xi, xj.transpose(1, 2))
        diagonal = i0 == j0
        if diagonal:
            s.diagonal(dim1=1, dim2=2).zero_()
        total += (1 if diagonal else 2) * torch.linalg.vector_norm(s, ord=1, dim=(1, 2))
        if need_grad:
            sgn = s.sign_()
            g[:, i0:i1].baddbmm_(sgn, xj)
            if not diagonal:
                g[:, j0:j1].baddbmm_(sgn.transpose(1, 2), xi)
    c = 1.0 / (N * (N - 1))
    loss = (total * c).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not need_grad:
        return loss, None
    g *= 2 * c
    # Back through x̂ = x / max(|x|, eps): the part of g along x̂ is the norm's; clamped rows scale by 1/eps.
    proj = (g * xhat).sum(dim=-1, keepdim=True)
    dx = torch.where((norm < EPS).unsqueeze(-1), g, g - proj * xhat) / norm.clamp_min(EPS).unsqueeze(-1)
    return loss, dx


class PatchCosineFunction(torch.autograd.Function):
    """(x (B, N, D), reduction, backend, grad_enabled) -> reduced loss. Checks happen in ``patch_cosine_loss``.

    ``grad_enabled`` is the caller's ``torch.is_grad_enabled()`` (forward always runs without grad): the
    PyTorch path forms the gradient inside the forward only when a backward can follow.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduction: str = "mean", backend: str = "triton", grad_enabled: bool = True):
        ctx.reduction, ctx.backend = reduction, backend
        if backend == "triton":
            from fastpatchdiv.kernels.cosine import cosine_forward

            loss, xhat, norm = cosine_forward(x)
            ctx.save_for_backward(x, xhat, norm)
        else:
            loss, dx = _torch_forward(x, need_grad=grad_enabled and ctx.needs_input_grad[0])
            ctx.save_for_backward(dx)
            ctx.input_dtype = x.dtype
        return reduce_images(loss, reduction)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.backend == "triton":
            from fastpatchdiv.kernels.cosine import cosine_backward

            x, xhat, norm = ctx.saved_tensors
            gpi = per_image_grad(grad_output, ctx.reduction, x.shape[0])
            return cosine_backward(x, xhat, norm, gpi), None, None, None
        (dx,) = ctx.saved_tensors
        gpi = per_image_grad(grad_output, ctx.reduction, dx.shape[0]).to(dx.dtype)
        return (dx * gpi.view(-1, 1, 1)).to(ctx.input_dtype), None, None, None


def patch_cosine_loss(x: torch.Tensor, *, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    r"""Mean absolute pairwise cosine similarity between the patch tokens of each image.

    For each image b with tokens x_b1 ... x_bN (prefix tokens such as CLS removed),

        loss_b = 1/(N(N-1)) · Σ_{i≠j} |cos(x_bi, x_bj)|,   cos(u, v) = u·v / (max(|u|, eps) · max(|v|, eps)),

    eps = 1e-12, so a zero token has cosine 0 with everything (no NaN). This is the patch-wise cosine
    loss of Gong et al. 2021 ("Vision Transformers with Patch Diversification"), eq. (2). Memory is
    O(B·N·D): the N x N similarity matrix is never stored, only tiles of it. The Triton path's forward
    visits only the tiles J >= I of the symmetric matrix (N²·D/2 multiply-adds per image) and its
    backward recomputes them (2·N²·D). The PyTorch path, when x requires grad, forms the gradient from
    the same symmetric tiles during the forward (1.5·N²·D in all) and its backward only scales it.

    Args:
        x: (B, N, D) or (N, D) patch tokens, float32, float16, bfloat16 or float64, any strides
            (e.g. ``tokens[:, 1:]``). Gradients come back in x's dtype.
        reduction: "mean" (over images, default), "sum", or "none" for a (B,) tensor.
        backend: "auto" (default), "triton" or "torch". Auto runs the fused Triton kernels on CUDA
            tensors and on CPU tensors when TRITON_INTERPRET=1, and the blockwise PyTorch path otherwise
            (also for float64, and for D > 1024 where the kernel's backward would spill).

    Returns:
        The loss in float32 (float64 for float64 input): a scalar, or (B,) with reduction="none".

    Numerics: fp32 accumulation everywhere. float32 inputs follow
    ``torch.get_float32_matmul_precision()``: exact fp32 products under "highest" (torch's default),
    TF32 on the tensor cores only when you allowed it ("high"/"medium"). fp16/bf16 inputs are normalised
    in fp32 and multiplied in their own dtype on the tensor cores. The kernel paths are deterministic:
    the same input gives the same bits, forward and backward. A NaN in an image makes that image's loss
    NaN; other images are unaffected.

    Raises:
        TypeError: x is not a tensor, or not of a floating dtype.
        ValueError: x has fewer than 2 or more than 3 dims, N < 2, D = 0, an unknown ``reduction`` or
            ``backend``, or backend="triton" for a tensor the kernels cannot take.
    """
    x3 = check_tokens("x", x)
    check_reduction(reduction)
    chosen = pick_backend(x3, backend)
    if chosen == "triton" and x3.shape[-1] > MAX_KERNEL_D:
        if backend == "triton":
            raise ValueError(
                f"backend='triton' supports D <= {MAX_KERNEL_D}, got D = {x3.shape[-1]}; use backend='auto'"
            )
        chosen = "torch"
    return PatchCosineFunction.apply(x3, reduction, chosen, torch.is_grad_enabled())


class PatchCosineLoss(nn.Module):
    """Module form of :func:`patch_cosine_loss`: ``PatchCosineLoss(reduction="mean")(tokens)``."""

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_cosine_loss(x, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
