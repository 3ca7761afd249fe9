"""The patch cosine loss of Gong et al. 2021 ("Vision Transformers with Patch Diversification", eq. 2).

Per image, the mean absolute cosine similarity between its patch tokens, computed tile by tile so the
N x N similarity matrix never exists. Three layers: the Triton kernels (``fastpatchdiv.kernels.cosine``)
or the blockwise PyTorch path below, two library ops (``fastpatchdiv::cosine_forward`` /
``cosine_backward``) that ``torch.compile`` keeps opaque, and ``PatchCosineFunction`` for autograd.

Shape:
    x: (B, N, D) or (N, D) patch tokens; mask: (B, N) or (N,) bool; loss: scalar, or (B,) for
    ``reduction="none"``.

Example:
    >>> x = torch.randn(8, 196, 384, requires_grad=True)
    >>> patch_cosine_loss(x).backward()
"""

import torch
from torch import nn

from fastpatchdiv._common import (
    EPS,
    check_backend,
    check_mask,
    check_reduction,
    check_tokens,
    no_autocast,
    normalize_rows,
    pair_scale,
    pick_backend,
    reduce_images,
    refuse_double_backward,
    work_dtype,
)

# The kernel backward keeps a BLOCK_M x next_pow2(D) fp32 accumulator per program: at D > 1024 it spills
# and an fp32 tile outgrows an H100's shared memory, so wider tokens take the PyTorch path (cuBLAS tiles).
MAX_KERNEL_D = 1024
# Elements of one S tile on the PyTorch path (B images at once): 16 MiB of fp32.
_TILE_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------------------- PyTorch path
def _tile_size(batch: int, n: int) -> int:
    """Rows of an S tile: the whole image when B·N² fits the budget (one dense tile, no tile overheads),
    else the largest of 128 .. 1024 whose B x 2t x 2t stays within it."""
    if batch * n * n <= _TILE_ELEMENTS:
        return n
    t = 128
    while t < 1024 and batch * (2 * t) ** 2 <= _TILE_ELEMENTS:
        t *= 2
    return -(-n // -(-n // t))  # as many tiles, of equal width: no thin last tile


def _torch_forward(
    x: torch.Tensor, mask: torch.Tensor | None, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image losses and, when ``need_grad``, d loss_b / dx (in fp32/fp64) from the same tiles.

    S is symmetric, so only tiles J >= I are formed (N²·D/2 multiply-adds, the diagonal tiles whole: all of
    N²·D when one tile holds the image); with ``need_grad`` each tile also adds sign(S_IJ) X̂_J into G_I and
    sign(S_IJ)ᵀ X̂_I into G_J (N²·D more). Done serially, both updates are deterministic without atomics,
    and the backward is left with an O(N·D) scale. G lives in one contiguous buffer per row block: a batched
    GEMM into a strided slice of a (B, N, D) tensor runs image by image on CPU.
    """
    B, N, _ = x.shape
    xhat, norm = normalize_rows(x.to(work_dtype(x.dtype)))
    if mask is not None:
        xhat = xhat.masked_fill(~mask.unsqueeze(-1), 0.0)  # a zero x̂ adds nothing and gets sign(0) = 0
    t = _tile_size(B, N)
    starts = range(0, N, t)
    blocks = [xhat[:, i0 : i0 + t] for i0 in starts]
    g = [torch.empty_like(blk) for blk in blocks] if need_grad else None
    written = [False] * len(blocks)  # a block's first GEMM writes it (beta = 0), later ones add
    total = torch.zeros(B, dtype=torch.float64, device=x.device)
    for i, xi in enumerate(blocks):
        for j in range(i, len(blocks)):
            xj = blocks[j]
            s = torch.bmm(xi, xj.transpose(1, 2))
            if i == j:
                s.diagonal(dim1=1, dim2=2).zero_()
            # A row of |S| sums in the tile's dtype; rows and tiles add up in fp64, so the loss keeps
            # fp32's relative accuracy at any N (one fp32 sum over all tiles lost bits from N ~ 4096).
            rows = torch.linalg.vector_norm(s, ord=1, dim=2)
            total += (1 if i == j else 2) * rows.sum(dim=1, dtype=torch.float64)
            if need_grad:
                sgn = s.sign_()
                for k, lhs, rhs in ((i, sgn, xj), (j, sgn.transpose(1, 2), xi))[: 1 if i == j else 2]:
                    g[k].baddbmm_(lhs, rhs, beta=1.0 if written[k] else 0.0)
                    written[k] = True
    c = pair_scale(mask, B, N, x.device)
    loss = (total * c).to(xhat.dtype)
    if not need_grad:
        return loss, None
    g = g[0] if len(g) == 1 else torch.cat(g, dim=1)
    # Back through x̂ = x / max(|x|, eps): dx = 2c (g − (g·x̂) x̂) / |x|, or 2c g / eps where the norm was
    # clamped. Three passes over (B, N, D): the projection, one fused multiply-subtract, one scale.
    clamped = norm < EPS
    proj = torch.linalg.vecdot(g, xhat).masked_fill_(clamped, 0.0)
    factor = (2 * c).to(g.dtype).unsqueeze(-1) / norm.clamp_min(EPS)
    if mask is not None:
        factor = factor.masked_fill(~mask, 0.0)  # exactly 0, whatever a padded token holds
    dx = torch.addcmul(g, proj.unsqueeze(-1), xhat, value=-1.0).mul_(factor.unsqueeze(-1))
    return loss, dx


# -------------------------------------------------------------------------------------- library ops
@torch.library.custom_op("fastpatchdiv::cosine_forward", mutates_args=())
def cosine_forward_op(
    x: torch.Tensor, mask: torch.Tensor | None, backend: str, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,), r0, r1). Kernel path: r0 = x̂ (B, N, D) in x's dtype, r1 = |x| (B, N) fp32. PyTorch
    path: r0 = d loss_b / dx (B, N, D) in fp32/fp64 when ``need_grad`` (else empty), r1 empty."""
    B, N, _ = x.shape
    work = work_dtype(x.dtype)
    if B == 0:
        return x.new_empty((0,), dtype=work), *_empty_residuals(x, backend, need_grad)
    with no_autocast(x.device.type):
        if backend == "triton":
            from fastpatchdiv.kernels.cosine import cosine_forward

            sums, xhat, norm = cosine_forward(x, mask)
            return (sums * pair_scale(mask, B, N, x.device)).to(work), xhat, norm
        loss, dx = _torch_forward(x, mask, need_grad)
        return loss, dx if dx is not None else x.new_empty((0,), dtype=work), x.new_empty((0,), dtype=work)


def _empty_residuals(x: torch.Tensor, backend: str, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, D = x.shape
    work = work_dtype(x.dtype)
    if backend == "triton":
        return x.new_empty((B, N, D)), x.new_empty((B, N), dtype=torch.float32)
    return x.new_empty((B, N, D) if need_grad else (0,), dtype=work), x.new_empty((0,), dtype=work)


@cosine_forward_op.register_fake
def _(x, mask, backend, need_grad):
    return x.new_empty((x.shape[0],), dtype=work_dtype(x.dtype)), *_empty_residuals(x, backend, need_grad)


@torch.library.custom_op("fastpatchdiv::cosine_backward", mutates_args=())
def cosine_backward_op(
    x: torch.Tensor, mask: torch.Tensor | None, r0: torch.Tensor, r1: torch.Tensor, grad: torch.Tensor, backend: str
) -> torch.Tensor:
    """dx (B, N, D) in x's dtype for the per-image loss gradient ``grad`` (B,), from the forward's r0, r1."""
    B, N, _ = x.shape
    if B == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    with no_autocast(x.device.type):
        if backend == "triton":
            from fastpatchdiv.kernels.cosine import cosine_backward

            scale = (2.0 * pair_scale(mask, B, N, x.device) * grad.double()).float().contiguous()
            return cosine_backward(x, mask, r0, r1, scale)
        return (r0 * grad.to(r0.dtype).view(-1, 1, 1)).to(x.dtype)


@cosine_backward_op.register_fake
def _(x, mask, r0, r1, grad, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------- autograd
def resolve_backend(x: torch.Tensor, backend: str) -> str:
    """The path a (B, N, D) input takes: ``pick_backend``, and D > MAX_KERNEL_D to the PyTorch path."""
    chosen = pick_backend(x, backend)
    if chosen == "triton" and x.shape[-1] > MAX_KERNEL_D:
        if backend == "triton":
            raise ValueError(
                f"backend='triton' supports D <= {MAX_KERNEL_D}, got D = {x.shape[-1]}; use backend='auto'"
            )
        chosen = "torch"
    return chosen


class PatchCosineFunction(torch.autograd.Function):
    """``PatchCosineFunction.apply(x, mask=None, backend="auto", grad_enabled=True)`` -> per-image losses (B,).

    x is (B, N, D); mask is (B, N) bool or None. ``backend`` "auto" picks the kernels only where they can
    run (CUDA, or CPU under TRITON_INTERPRET=1). ``grad_enabled`` is the caller's
    ``torch.is_grad_enabled()`` (a Function's forward always runs without grad): the PyTorch path forms
    the gradient inside the forward only when a backward can follow. Inputs are not checked here: use
    :func:`patch_cosine_loss`. Double backward raises (the backward is not itself differentiable).
    """

    @staticmethod
    def forward(ctx, x, mask=None, backend="auto", grad_enabled=True):
        backend = resolve_backend(x, backend)
        need_grad = bool(grad_enabled and ctx.needs_input_grad[0])
        loss, r0, r1 = torch.ops.fastpatchdiv.cosine_forward(x, mask, backend, need_grad)
        ctx.backend = backend
        ctx.save_for_backward(x, mask, r0, r1)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, mask, r0, r1 = ctx.saved_tensors
        with torch.no_grad():
            dx = torch.ops.fastpatchdiv.cosine_backward(x, mask, r0, r1, grad, ctx.backend)
        return *refuse_double_backward("patch_cosine_loss", x, (dx,)), None, None, None


# --------------------------------------------------------------------------------------- public API
def patch_cosine_loss(
    x: torch.Tensor, *, mask: torch.Tensor | None = None, reduction: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    r"""Mean absolute pairwise cosine similarity between the patch tokens of each image.

    For each image b with tokens x_b1 ... x_bN (prefix tokens such as CLS removed) of which the N_b
    marked in ``mask`` are real (all N without a mask),

        loss_b = 1/(N_b(N_b-1)) · Σ_{i≠j real} |cos(x_bi, x_bj)|,   cos(u, v) = u·v / (max(|u|, eps) · max(|v|, eps)),

    eps = 1e-12, so a zero token has cosine 0 with everything (no NaN). An image with N_b < 2 has loss 0
    and zero gradient. This is the patch-wise cosine loss of Gong et al. 2021 ("Vision Transformers with
    Patch Diversification", eq. 2). Memory is O(B·N·D): the N x N similarity matrix is never stored,
    only tiles of it. The Triton path's forward visits only the tiles J >= I of the symmetric matrix
    (N²·D/2 multiply-adds per image) and its backward recomputes them (2·N²·D). The PyTorch path, when
    x requires grad, forms the gradient from the same tiles during the forward (2·N²·D in all when one
    dense tile holds the image, B·N² <= 4M; down to 1.5·N²·D as N grows) and its backward only scales it.

    Args:
        x: (B, N, D) or (N, D) patch tokens, float32, float16, bfloat16 or float64, any strides
            (e.g. ``tokens[:, 1:]``). Gradients come back in x's dtype.
        mask: optional (B, N) (or (N,) for 2-D x) bool, True = a real patch, e.g. NaFlexVit's
            ``patch_valid``. Masked tokens may hold anything (padding, NaN) and get exactly zero gradient.
        reduction: "mean" (over images, default), "sum", or "none" for a (B,) tensor.
        backend: "auto" (default), "triton" or "torch". Auto runs the fused Triton kernels on CUDA
            tensors and on CPU tensors when TRITON_INTERPRET=1, and the blockwise PyTorch path otherwise
            (also for float64, and for D > 1024 where the kernel's backward would spill).

    Returns:
        The loss in float32 (float64 for float64 input): a scalar, or (B,) with reduction="none". An empty
        batch (B = 0) gives a (0,) tensor, whose "mean" is NaN as in torch.

    Numerics: fp32 accumulation everywhere (fp64 across tiles), also under ``torch.autocast`` (the ops run
    with autocast off). Norms never overflow (taken of x / max|x| in the kernels, and on the PyTorch path
    where the plain norm overflowed), so tokens of any finite magnitude work. float32 inputs follow
    ``torch.get_float32_matmul_precision()``: exact fp32 products under "highest" (torch's default), TF32 on
    the tensor cores only when you allowed it. fp16/bf16 inputs are normalised in fp32 and multiplied in
    their own dtype on the tensor cores. Deterministic: the same input gives the same bits, forward and
    backward, in any process. A NaN in an image makes that image's loss NaN; other images are unaffected.
    Double backward (e.g. a gradient penalty through this loss) raises.

    Raises:
        TypeError: x is not a tensor, or not of a floating dtype; mask not a bool tensor.
        ValueError: x has fewer than 2 or more than 3 dims, N < 2, D = 0, a mask of another shape or
            device, an unknown ``reduction`` or ``backend``, or backend="triton" for a tensor the kernels
            cannot take.
    """
    x3 = check_tokens("x", x)
    mask = check_mask(mask, x3, x.dim() == 2)
    check_reduction(reduction)
    backend = resolve_backend(x3, backend)
    per_image = PatchCosineFunction.apply(x3, mask, backend, torch.is_grad_enabled())
    return reduce_images(per_image, reduction)


class PatchCosineLoss(nn.Module):
    """Module form of :func:`patch_cosine_loss`: ``PatchCosineLoss(reduction="mean")(tokens, mask=None)``.

    Settings are checked here, at construction.
    """

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return patch_cosine_loss(x, mask=mask, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
