"""The patch cosine loss of Gong et al. 2021 ("Vision Transformers with Patch Diversification", eq. 2).

Per image, the mean absolute cosine similarity between its patch tokens, computed tile by tile so the
N x N similarity matrix never exists. Three layers: the Triton kernels (``fastpatchdiv.kernels.cosine``)
or the blockwise PyTorch path below, one library op (``fastpatchdiv::cosine_forward``, the loss and,
when a backward can follow, its gradient) that ``torch.compile`` keeps opaque, and
``PatchCosineFunction`` for autograd, whose backward scales that gradient.

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
    check_precision,
    check_reduction,
    check_tokens,
    matmul_precision,
    no_autocast,
    normalize_rows,
    pair_scale,
    pick_backend,
    reduce_images,
    refuse_double_backward,
    resolve_operands,
    round_operands,
    work_dtype,
)

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


def _normalized(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, |x|) in x's dtype; masked rows get x̂ = 0, so they add nothing and get sign(0) = 0."""
    xhat, norm = normalize_rows(x)
    if mask is not None:
        xhat = xhat.masked_fill(~mask.unsqueeze(-1), 0.0)
    return xhat, norm


def _torch_sums(xhat: torch.Tensor, operands: str, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ_{i≠j} |S_ij| per image in fp64, G = sign(S) X̂ or None), from the tiles J >= I of S.

    S is symmetric, so only tiles J >= I are formed (N²·D/2 multiply-adds, the diagonal tiles whole: all of
    N²·D when one tile holds the image); with ``need_grad`` each tile also adds sign(S_IJ) X̂_J into G_I and
    sign(S_IJ)ᵀ X̂_I into G_J (N²·D more). Done serially, both updates are deterministic without atomics.
    G lives in one contiguous buffer per row block: a batched GEMM into a strided slice of a (B, N, D)
    tensor runs image by image on CPU. The operands are x̂ rounded as ``operands`` says.
    """
    B, N, _ = xhat.shape
    xop = round_operands(xhat, operands)
    t = _tile_size(B, N)
    blocks = [xop[:, i0 : i0 + t] for i0 in range(0, N, t)]
    g = [torch.empty_like(blk) for blk in blocks] if need_grad else None
    written = [False] * len(blocks)  # a block's first GEMM writes it (beta = 0), later ones add
    total = torch.zeros(B, dtype=torch.float64, device=xhat.device)
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
    if not need_grad:
        return total, None
    return total, g[0] if len(g) == 1 else torch.cat(g, dim=1)


def _through_norm(
    g: torch.Tensor, xhat: torch.Tensor, norm: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """d loss_b / dx from G = sign(S) X̂, back through x̂ = x / max(|x|, eps):
    dx = 2c (g − (g·x̂) x̂) / |x|, or 2c g / eps where the norm was clamped; exactly 0 for masked rows.
    Three passes over (B, N, D): the projection, one fused multiply-subtract, one scale."""
    clamped = norm < EPS
    proj = torch.linalg.vecdot(g, xhat).masked_fill_(clamped, 0.0)
    factor = (2 * c).to(g.dtype).unsqueeze(-1) / norm.clamp_min(EPS)
    if mask is not None:
        factor = factor.masked_fill(~mask, 0.0)  # exactly 0, whatever a padded token holds
    return torch.addcmul(g, proj.unsqueeze(-1), xhat, value=-1.0).mul_(factor.unsqueeze(-1))


def _forward(
    x: torch.Tensor, mask: torch.Tensor | None, backend: str, need_grad: bool, operands: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image losses and, when ``need_grad``, d loss_b / dx in the work dtype, on either path."""
    B, N, _ = x.shape
    work = work_dtype(x.dtype)
    normalized = None  # (x̂, |x|) in the work dtype: the PyTorch path's operands, both paths' epilogue
    if backend == "triton":
        from fastpatchdiv.kernels.cosine import cosine_forward

        total, g = cosine_forward(x, mask, operands, need_grad)
    else:
        normalized = _normalized(x.to(work), mask)
        with matmul_precision(operands):
            total, g = _torch_sums(normalized[0], operands, need_grad)
    c = pair_scale(mask, B, N, x.device)
    loss = (total * c).to(work)
    if not need_grad:
        return loss, None
    if normalized is None:
        normalized = _normalized(x.to(work), mask)
    return loss, _through_norm(g.to(work), *normalized, c, mask)


# -------------------------------------------------------------------------------------- library ops
@torch.library.custom_op("fastpatchdiv::cosine_forward", mutates_args=())
def cosine_forward_op(
    x: torch.Tensor, mask: torch.Tensor | None, backend: str, need_grad: bool, operands: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), d loss_b / dx (B, N, D) in fp32 (fp64 for fp64 x) when ``need_grad``, else empty), the
    same on both paths: the backward only scales the second by the upstream gradient."""
    if x.shape[0] == 0:
        return _empty_outputs(x, need_grad)
    with no_autocast(x.device.type):
        loss, dx = _forward(x, mask, backend, need_grad, operands)
    return loss, dx if dx is not None else x.new_empty((0,), dtype=loss.dtype)


def _empty_outputs(x: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    work = work_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=work), x.new_empty(x.shape if need_grad else (0,), dtype=work)


@cosine_forward_op.register_fake
def _(x, mask, backend, need_grad, operands):
    return _empty_outputs(x, need_grad)


# ----------------------------------------------------------------------------------------- autograd
class PatchCosineFunction(torch.autograd.Function):
    """``PatchCosineFunction.apply(x, mask=None, backend="auto", grad_enabled=True, precision="auto")``
    -> per-image losses (B,).

    x is (B, N, D); mask is (B, N) bool or None. ``backend`` "auto" picks the kernels only where they can
    run (CUDA, or CPU under TRITON_INTERPRET=1). ``grad_enabled`` is the caller's
    ``torch.is_grad_enabled()`` (a Function's forward always runs without grad): the forward forms the
    gradient only when a backward can follow, and the backward scales it. ``precision`` as in
    :func:`patch_cosine_loss`. Inputs are not checked here: use :func:`patch_cosine_loss`. Double
    backward raises (the backward is not itself differentiable).
    """

    @staticmethod
    def forward(ctx, x, mask=None, backend="auto", grad_enabled=True, precision="auto"):
        backend = pick_backend(x, backend)
        operands = resolve_operands(x.dtype, x.device.type, precision)
        need_grad = bool(grad_enabled and ctx.needs_input_grad[0])
        loss, dx = torch.ops.fastpatchdiv.cosine_forward(x, mask, backend, need_grad, operands)
        ctx.save_for_backward(x, dx)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, dx = ctx.saved_tensors
        dx = (dx * grad.to(dx.dtype).view(-1, 1, 1)).to(x.dtype)
        return *refuse_double_backward("patch_cosine_loss", x, (dx,)), None, None, None, None


# --------------------------------------------------------------------------------------- public API
def patch_cosine_loss(
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    precision: str = "auto",
) -> torch.Tensor:
    r"""Mean absolute pairwise cosine similarity between the patch tokens of each image.

    For each image b with tokens x_b1 ... x_bN (prefix tokens such as CLS removed) of which the N_b
    marked in ``mask`` are real (all N without a mask),

        loss_b = 1/(N_b(N_b-1)) · Σ_{i≠j real} |cos(x_bi, x_bj)|,   cos(u, v) = u·v / (max(|u|, eps) · max(|v|, eps)),

    eps = 1e-12, so a zero token has cosine 0 with everything (no NaN). An image with N_b < 2 has loss 0
    and zero gradient. This is the patch-wise cosine loss of Gong et al. 2021 ("Vision Transformers with
    Patch Diversification", eq. 2). Memory is O(B·N·D): the N x N similarity matrix is never stored.
    Without a gradient the loss visits the tiles J >= I of the symmetric S (N²·D/2 multiply-adds per
    image); with one, the forward also forms the gradient (2·N²·D on the kernels: S by row strips, then
    sign(S) X̂; 1.5-2·N²·D on the PyTorch path) and the backward only scales it. Numerics, precision and
    determinism: the README's numerics contract.

    Args:
        x: (B, N, D) or (N, D) patch tokens, float32, float16, bfloat16 or float64, any strides
            (e.g. ``tokens[:, 1:]``). Gradients come back in x's dtype.
        mask: optional (B, N) (or (N,) for 2-D x) bool, True = a real patch, e.g. NaFlexVit's
            ``patch_valid``. Masked tokens may hold anything (padding, NaN) and get exactly zero gradient.
        reduction: "mean" (over images, default), "sum", or "none" for a (B,) tensor.
        backend: "auto" (default), "triton" or "torch". Auto runs the Triton kernels on CUDA tensors
            (any D) and on CPU tensors when TRITON_INTERPRET=1, and the blockwise PyTorch path otherwise
            and for float64.
        precision: the operands of the matrix work. "auto" (default) does what ``torch.matmul`` would:
            the autocast dtype under ``torch.autocast``, else x's dtype, float32 as TF32 where
            ``torch.get_float32_matmul_precision()`` is "high"/"medium". "fp32" (exact), "tf32", "bf16"
            or "fp16" override it. Accumulation is fp32 either way.

    Returns:
        The loss in float32 (float64 for float64 input): a scalar, or (B,) with reduction="none". An empty
        batch (B = 0) gives a (0,) tensor, whose "mean" is NaN as in torch.

    Raises:
        TypeError: x is not a tensor, or not of a floating dtype; mask not a bool tensor.
        ValueError: x has fewer than 2 or more than 3 dims, N < 2, D = 0, a mask of another shape or
            device, an unknown ``reduction``, ``backend`` or ``precision``, or backend="triton" for a
            tensor the kernels cannot take. Double backward (a gradient of the gradient) raises
            RuntimeError.
    """
    x3 = check_tokens("x", x)
    mask = check_mask(mask, x3, x.dim() == 2)
    check_reduction(reduction)
    backend = pick_backend(x3, backend)
    precision = resolve_operands(x3.dtype, x3.device.type, check_precision(precision))
    per_image = PatchCosineFunction.apply(x3, mask, backend, torch.is_grad_enabled(), precision)
    return reduce_images(per_image, reduction)


class PatchCosineLoss(nn.Module):
    """Module form of :func:`patch_cosine_loss`: ``PatchCosineLoss(reduction="mean")(tokens, mask=None)``.

    Settings are checked here, at construction.
    """

    def __init__(self, reduction: str = "mean", backend: str = "auto", precision: str = "auto"):
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)
        self.precision = check_precision(precision)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return patch_cosine_loss(x, mask=mask, reduction=self.reduction, backend=self.backend, precision=self.precision)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}, precision={self.precision!r}"
