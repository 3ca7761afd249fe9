"""Patch-contrastive loss of Gong et al. (2021), "Vision Transformers with Patch Diversification".

Each final patch token z_i should stay close to its own first-layer token a_i and away from the other
patches. With s(u, v) = u·v / τ, pos_i = s(a_i, z_i) and the per-image loss mean_i ℓ_i:

- ``negatives="mean"`` (the paper): ℓ_i = logaddexp(pos_i, s(a_i, m_i)) − pos_i, with
  m_i = (Σ_j z_j − z_i)/(N − 1) the mean of the other patches. O(N·D), plain torch.
- ``negatives="window"`` (the official code): ℓ_i = lse(pos_i, s(a_i, m_i), s(a_i, w_i)) − pos_i with
  w_i = (box_k(Z)_i − z_i)/(k² − 1), box_k the k x k zero-padded sum on the (H, W) patch grid.
  O(N·D), plain torch.
- ``negatives="all"`` (InfoNCE over all patches): ℓ_i = lse_j s(a_i, z_j) − pos_i. O(N²·D) work but
  O(N·D) memory: a fused Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), else a blockwise
  PyTorch path with the same tiling. See ``kernels/contrastive.py`` and shared/DESIGN.md.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from fastpatchdiv._common import EPS, check_reduction, check_tokens, pick_backend, reduce_images

NEGATIVES = ("mean", "window", "all")

# The PyTorch path of negatives="all" works on row strips S_I = A_I Zᵀ/τ of B x t x N scores, t chosen so
# a strip stays under this many elements (16 MiB in fp32; t shrinks as N grows, never N x N). Tests
# shrink it to exercise the strips.
_TORCH_TILE_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------------
# negatives="all": the autograd Function around the kernels and the PyTorch strip path
# ----------------------------------------------------------------------------------------------------


def _torch_all(a: torch.Tensor, z: torch.Tensor, temperature: float, need_a: bool, need_z: bool):
    """Row loss ℓ (B, N) and, where asked, the gradients for a unit per-image factor coef = 1.

    A strip holds whole rows, so its log-sum-exp is exact at once and P − I is ready in the same pass:
    dA_I = (P − I) Z and dZ += (P − I)ᵀ A_I. Forward and backward together cost what autograd of the
    naive formula costs (N²·D, plus N²·D for each gradient), with O(t·N) scratch instead of N x N.
    The strip is held transposed, (B, N, t) = Z A_Iᵀ: with t small and N large, both GEMMs then run
    on contiguous operands (1.4x faster end to end at N = 65536 on a 2-core CPU), and the softmax
    takes one exp per element. Strips are visited in order, so the result is deterministic.
    """
    B, N, _ = a.shape
    t = max(1, min(N, _TORCH_TILE_ELEMS // (B * N)))
    row_loss = torch.empty((B, N), dtype=a.dtype, device=a.device)
    da = torch.empty_like(a) if need_a else None
    dz = torch.zeros_like(z) if need_z else None
    for i0 in range(0, N, t):
        i1 = min(i0 + t, N)
        ai = a[:, i0:i1]
        p = torch.bmm(z, ai.transpose(1, 2)).mul_(1.0 / temperature)  # column k is row i0 + k of S
        pos = p.diagonal(offset=-i0, dim1=1, dim2=2).clone()
        m = p.amax(dim=1, keepdim=True)
        total = p.sub_(m).exp_().sum(dim=1, keepdim=True)
        row_loss[:, i0:i1] = (m + total.log()).squeeze(1) - pos
        if need_a or need_z:
            p.div_(total)
            p.diagonal(offset=-i0, dim1=1, dim2=2).sub_(1.0)
            if need_a:
                da[:, i0:i1] = torch.bmm(p.transpose(1, 2), z)
            if need_z:
                dz.baddbmm_(p, ai)
    return row_loss, da, dz


class _AllNegatives(torch.autograd.Function):
    """(A, Z) of shape (B, N, D) -> per-image loss (B,).

    Kernel path: saves only the row log-sum-exp and recomputes P tile by tile in the backward. PyTorch
    path: when a backward can follow (``grad_enabled``, the caller's grad mode), the forward's strips
    also form the gradients for a unit scale, and the backward only scales them.
    """

    @staticmethod
    def forward(ctx, a, z, temperature, backend, grad_enabled=True):
        ctx.temperature, ctx.backend = temperature, backend
        if backend == "triton":
            from fastpatchdiv.kernels.contrastive import contrastive_all_forward

            lse, row_loss = contrastive_all_forward(a, z, temperature)
            ctx.save_for_backward(a, z, lse)
        else:
            need_a, need_z = (grad_enabled and n for n in ctx.needs_input_grad[:2])
            row_loss, da, dz = _torch_all(a, z, temperature, need_a, need_z)
            ctx.save_for_backward(da, dz)
        return row_loss.mean(dim=1)

    @staticmethod
    def backward(ctx, grad):
        need_a, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_z):
            return None, None, None, None, None
        # d(mean_i ℓ_i)/dS = (P − I)/N, and dS/dA, dS/dZ carry 1/τ: fold it all into one factor per image.
        if ctx.backend == "triton":
            from fastpatchdiv.kernels.contrastive import contrastive_all_backward

            a, z, lse = ctx.saved_tensors
            coef = grad.reshape(-1).float() / (a.shape[1] * ctx.temperature)
            return (*contrastive_all_backward(a, z, lse, coef, ctx.temperature, need_a, need_z), None, None, None)
        da, dz = ctx.saved_tensors
        ref = da if da is not None else dz
        coef = (grad.reshape(-1) / (ref.shape[1] * ctx.temperature)).to(ref.dtype)[:, None, None]
        da = da * coef if need_a else None
        dz = dz * coef if need_z else None
        return da, dz, None, None, None


# ----------------------------------------------------------------------------------------------------
# negatives="mean" / "window": O(N·D) torch ops, autograd does the backward
# ----------------------------------------------------------------------------------------------------


def _box_sum(z: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Σ of z over the k x k window around each patch of the (H, W) grid, zero padded; (B, N, D) -> (B, N, D)."""
    B, N, D = z.shape
    # An NCHW view with channels-last strides: no copy, and the pooling vectorises over D (3x faster
    # than a transposed copy at a 256 x 256 grid on CPU).
    img = z.reshape(B, *grid, D).permute(0, 3, 1, 2)
    # The box is separable: a 1 x k then a k x 1 pass add 2k terms per patch instead of k² (2x faster
    # at the default k = 7 on CPU). count_include_pad=True divides by k in each pass, so the zero-padded
    # box sum is avg * k².
    r = window // 2
    img = F.avg_pool2d(img, (1, window), stride=1, padding=(0, r), count_include_pad=True)
    img = F.avg_pool2d(img, (window, 1), stride=1, padding=(r, 0), count_include_pad=True)
    return (img * (window * window)).permute(0, 2, 3, 1).reshape(B, N, D)


def _mean_window_loss(a, z, temperature, negatives, grid, window):
    N = a.shape[1]
    az = torch.linalg.vecdot(a, z)  # a_i·z_i, (B, N)
    # a_i·mean_{j≠i} z_j = (a_i·Σ_j z_j − a_i·z_i)/(N − 1): a matrix-vector product, no (B, N, D) temporary.
    a_sum = torch.bmm(a, z.sum(dim=1).unsqueeze(-1)).squeeze(-1)
    terms = [torch.zeros_like(az), ((a_sum - az) / (N - 1) - az) / temperature]
    if negatives == "window":
        # w_i = (box_i − z_i)/(k² − 1): the window's other patches (the box includes z_i itself).
        a_box = torch.linalg.vecdot(a, _box_sum(z, grid, window))
        terms.append(((a_box - az) / (window * window - 1) - az) / temperature)
    # lse(pos, neg, ...) − pos = lse(0, neg − pos, ...): the differences are formed before exp.
    return torch.logsumexp(torch.stack(terms, dim=-1), dim=-1).mean(dim=-1)


# ----------------------------------------------------------------------------------------------------
# Checks and the public API
# ----------------------------------------------------------------------------------------------------


def _check_grid(grid, n: int, needed: bool) -> tuple[int, int] | None:
    if grid is None:
        if not needed:
            return None
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"negatives='window' needs the patch grid: N = {n} is not a square, pass grid=(H, W) with H * W = {n}"
            )
        return side, side
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid={tuple(grid)} has {grid[0] * grid[1]} patches but the tokens have N = {n}")
    return int(grid[0]), int(grid[1])


def _check_args(first, last, temperature, negatives, reduction, grid, window, backend):
    a = check_tokens("first", first)
    z = check_tokens("last", last)
    if first.shape != last.shape:
        raise ValueError(f"first and last must have the same shape, got {tuple(first.shape)} and {tuple(last.shape)}")
    if first.device != last.device:
        raise ValueError(f"first and last must be on the same device, got {first.device} and {last.device}")
    if first.dtype != last.dtype:
        raise TypeError(f"first and last must have the same dtype, got {first.dtype} and {last.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a positive finite number, got {temperature!r}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    check_reduction(reduction)
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 3, got {window!r}")
    grid = _check_grid(grid, a.shape[1], needed=negatives == "window")
    backend = pick_backend(a, backend)
    return a, z, float(temperature), grid, backend


def patch_contrastive_loss(
    first: torch.Tensor,
    last: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: bool = False,
    negatives: str = "mean",
    detach_first: bool = True,
    reduction: str = "mean",
    grid: tuple[int, int] | None = None,
    window: int = 7,
    backend: str = "auto",
) -> torch.Tensor:
    """Patch-wise contrastive loss between first-layer and last-layer patch tokens.

    With a_i = first_i (detached unless ``detach_first=False``), z_i = last_i, both L2-normalised when
    ``normalize`` (x / max(|x|, 1e-12)), s(u, v) = u·v / τ and pos_i = s(a_i, z_i), an image's loss is
    mean_i ℓ_i with

    - ``"mean"`` (paper, default): ℓ_i = logaddexp(pos_i, s(a_i, m_i)) − pos_i, m_i = (Σ_j z_j − z_i)/(N − 1);
    - ``"window"`` (official code): ℓ_i = logsumexp(pos_i, s(a_i, m_i), s(a_i, w_i)) − pos_i,
      w_i = (Σ_{j in the k x k window around i} z_j − z_i)/(k² − 1) on the ``grid`` (H, W), zero padded
      (padding counts in k² − 1), k = ``window``;
    - ``"all"`` (InfoNCE): ℓ_i = logsumexp_j s(a_i, z_j) − pos_i, fused kernel, O(N·D) memory.

    The official code computes −log(softmax + 1e-8); this is the exact log-sum-exp form, which differs
    only where the positive's probability is below about 1e-8 (there the official loss saturates near
    18.4 and its gradient vanishes; ours keeps growing linearly).

    Args:
        first: first-layer patch tokens, (B, N, D) or (N, D) (one image); float32/float16/bfloat16/float64.
        last: final-layer patch tokens, same shape, dtype and device as ``first``. Prefix tokens (class,
            registers) must already be removed; non-contiguous views such as ``tokens[:, 1:]`` are fine.
        temperature: τ > 0, finite.
        normalize: L2-normalise both token sets first (gradients go through the normalisation).
        negatives: "mean", "window" or "all", as above.
        detach_first: stop the gradient into ``first`` (the paper's setting).
        reduction: "mean" over images, "sum", or "none" for the (B,) per-image losses (B = 1 for 2-D input).
        grid: (H, W) patch grid for "window", H * W = N; default square.
        window: odd window size k >= 3 for "window".
        backend: "auto" (Triton kernels for CUDA tensors, or CPU under TRITON_INTERPRET=1; PyTorch
            otherwise and always for float64), "triton" or "torch". Only "all" has a kernel; "mean" and
            "window" are the same O(N·D) torch code on every backend.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (B,) for ``reduction="none"``.
        Input gradients come back in the input dtype.

    Raises:
        TypeError: non-tensor or non-floating inputs, differing dtypes, non-numeric temperature.
        ValueError: shapes other than (B, N, D)/(N, D) or differing between ``first`` and ``last``,
            N < 2, D = 0, differing devices, temperature <= 0 or not finite, unknown ``negatives``,
            ``reduction`` or ``backend``, ``grid`` not a pair of positive ints multiplying to N (or N
            not square with ``grid=None`` for "window"), ``window`` even or < 3, ``backend="triton"``
            on a device/dtype the kernels do not take.
    """
    a, z, tau, grid, backend = _check_args(first, last, temperature, negatives, reduction, grid, window, backend)
    if detach_first:
        a = a.detach()
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    if negatives == "all" and not (backend == "triton" and a.shape[0] > 0):
        backend = "torch"
    if negatives == "all" and backend == "triton":
        if normalize:
            # Normalise in fp32, then hand the kernel tokens in the input dtype (its MMA dtype).
            a = _normalize(a.to(work)).to(a.dtype)
            z = _normalize(z.to(work)).to(z.dtype)
        per_image = _AllNegatives.apply(a, z, tau, backend, torch.is_grad_enabled())
    else:
        a, z = a.to(work), z.to(work)
        if normalize:
            a, z = _normalize(a), _normalize(z)
        if negatives == "all":
            per_image = _AllNegatives.apply(a, z, tau, "torch", torch.is_grad_enabled())
        else:
            per_image = _mean_window_loss(a, z, tau, negatives, grid, window)
    return reduce_images(per_image, reduction)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Autograd of x / clamp_min(|x|, eps) is (g − (g·x̂)x̂)/|x|, or g/eps where the norm was clamped.
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


class PatchContrastiveLoss(nn.Module):
    """Module form of :func:`patch_contrastive_loss`; ``forward(first, last)`` takes (B, N, D) or (N, D).

    The keyword arguments are those of the function and are checked on every call (the checks depend
    on the tokens' shape); the constructor rejects bad values it can already see.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        normalize: bool = False,
        negatives: str = "mean",
        detach_first: bool = True,
        reduction: str = "mean",
        grid: tuple[int, int] | None = None,
        window: int = 7,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        check_reduction(reduction)
        self.temperature = temperature
        self.normalize = normalize
        self.negatives = negatives
        self.detach_first = detach_first
        self.reduction = reduction
        self.grid = grid
        self.window = window
        self.backend = backend

    def forward(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return patch_contrastive_loss(
            first,
            last,
            temperature=self.temperature,
            normalize=self.normalize,
            negatives=self.negatives,
            detach_first=self.detach_first,
            reduction=self.reduction,
            grid=self.grid,
            window=self.window,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, normalize={self.normalize}, negatives={self.negatives!r}, "
            f"detach_first={self.detach_first}, reduction={self.reduction!r}, grid={self.grid}, "
            f"window={self.window}, backend={self.backend!r}"
        )


__all__ = ["patch_contrastive_loss", "PatchContrastiveLoss", "NEGATIVES"]
