"""Patch-contrastive loss of Gong et al. (2021), "Vision Transformers with Patch Diversification".

Each final patch token z_i should stay close to its own first-layer token a_i and away from the other
patches. With s(u, v) = u·v / τ, pos_i = s(a_i, z_i) and the per-image loss mean_i ℓ_i:

- ``negatives="mean"`` (the paper): ℓ_i = logaddexp(pos_i, s(a_i, m_i)) − pos_i, with
  m_i = (Σ_j z_j − z_i)/(N − 1) the mean of the other patches. O(N·D), plain torch.
- ``negatives="window"`` (the official code): ℓ_i = lse(pos_i, s(a_i, m_i), s(a_i, w_i)) − pos_i with
  w_i = (box_k(Z)_i − z_i)/(k² − 1), box_k the k x k zero-padded sum on the (H, W) patch grid.
  O(N·D), plain torch.
- ``negatives="all"`` (InfoNCE over all patches): ℓ_i = lse_j s(a_i, z_j) − pos_i. O(N²·D) work but
  O(N·D) memory: the fused Triton kernels of ``fastpatchdiv.kernels.contrastive`` (CUDA, or CPU under
  TRITON_INTERPRET=1), else a PyTorch path of exact row strips. Two library ops
  (``fastpatchdiv::contrastive_all_forward`` / ``_backward``) keep it opaque to ``torch.compile``, and
  ``PatchContrastiveFunction`` carries autograd.

Shape:
    first, last: (B, N, D) or (N, D); mask: (B, N) or (N,) bool; loss: scalar, or (B,) for
    ``reduction="none"``.

Example:
    >>> first, last = torch.randn(8, 196, 384), torch.randn(8, 196, 384, requires_grad=True)
    >>> patch_contrastive_loss(first, last, negatives="all", temperature=0.1).backward()
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastpatchdiv._common import (
    check_backend,
    check_flag,
    check_mask,
    check_precision,
    check_reduction,
    check_temperature,
    check_tokens,
    matmul_precision,
    no_autocast,
    normalize_rows,
    operand_dtype,
    pick_backend,
    reduce_images,
    refuse_double_backward,
    resolve_operands,
    round_operands,
    valid_counts,
    work_dtype,
)

NEGATIVES = ("mean", "window", "all")

# The PyTorch path of negatives="all" works on row strips S_I = A_I Zᵀ/τ of B x t x N scores, t chosen so
# a strip stays under this many elements (16 MiB in fp32; t shrinks as N grows, never N x N). Tests
# shrink it to exercise the strips.
_TORCH_TILE_ELEMS = 1 << 22
# Below this P_ii, −log P_ii is no longer exact in fp32 (subnormals): those rows take the log-sum-exp.
_MIN_POSITIVE_P = 1e-30


# ----------------------------------------------------------------------------------------------------
# negatives="all": the PyTorch strip path, the library ops and the autograd Function
# ----------------------------------------------------------------------------------------------------


def _torch_all(
    a: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    operands: str,
    need_a: bool,
    need_z: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row loss ℓ (B, N) and, where asked, the gradients of Σ_i ℓ_i (a unit factor per row).

    A strip holds whole rows, so its log-sum-exp is exact at once and P − I is ready in the same pass:
    dA_I = (P − I) Z and dZ += (P − I)ᵀ A_I. Forward and backward together cost what autograd of the
    naive formula costs (N²·D, plus N²·D for each gradient), with O(t·N) scratch instead of N x N.
    The strip is held transposed, (B, N, t) = Z A_Iᵀ: with t small and N large, both GEMMs then run
    on contiguous operands. Strips are visited in order, so the result is deterministic. Masked columns
    get the dtype's lowest value (finite, so an image without real patches stays finite); masked tokens
    arrive zeroed and add nothing to the gradients.
    One fused softmax per strip gives P and the row losses −log P_ii (the log-sum-exp for rows whose
    P_ii is too small for that). With 16-bit ``operands`` the tokens and P are rounded to them before
    their products, as the kernels multiply them.
    """
    B, N, _ = a.shape
    a, z = round_operands(a, operands), round_operands(z, operands)
    t = max(1, min(N, _TORCH_TILE_ELEMS // max(1, B * N)))
    t = -(-N // -(-N // t))  # as many strips, of equal width: no thin last strip
    row_loss = torch.empty((B, N), dtype=a.dtype, device=a.device)
    da = torch.empty_like(a) if need_a else None
    dz = torch.empty_like(z) if need_z else None  # the first strip writes it, the others add
    dropped = None if mask is None else ~mask.unsqueeze(-1)  # (B, N, 1): column j of every strip
    for i0 in range(0, N, t):
        i1 = min(i0 + t, N)
        ai = a[:, i0:i1]
        # Column k is row i0 + k of S = A Zᵀ / τ; the 1/τ rides on the GEMM (beta = 0 ignores the input).
        s = torch.baddbmm(z.new_empty(()).expand(B, N, i1 - i0), z, ai.transpose(1, 2), beta=0, alpha=1 / temperature)
        if dropped is not None:
            s.masked_fill_(dropped, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=1)  # one fused pass over the strip
        diagonal = p.diagonal(offset=-i0, dim1=1, dim2=2)
        loss = -torch.log(diagonal)  # ℓ_i = lse_i − S_ii = −log P_ii ...
        # ... exact while P_ii is a normal float; rows whose positive lost by more (ℓ > ~69) take the lse.
        lost = diagonal < _MIN_POSITIVE_P
        if mask is not None:
            lost &= mask[:, i0:i1]  # a padded row's P_ii is 0 by design, and its loss is dropped
        if lost.any():
            exact = torch.logsumexp(s, dim=1) - s.diagonal(offset=-i0, dim1=1, dim2=2)
            loss = torch.where(lost, exact, loss)
        del s
        row_loss[:, i0:i1] = loss
        if need_a or need_z:
            diagonal.sub_(1.0)
            p = round_operands(p, operands)
            if need_a:
                da[:, i0:i1] = torch.bmm(p.transpose(1, 2), z)
            if need_z:
                dz.baddbmm_(p, ai, beta=1.0 if i0 else 0.0)
    return row_loss, da, dz


def _image_mean(row_loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_{i real} ℓ_i / N_b per image, 0 where N_b < 2."""
    B, N = row_loss.shape
    if mask is None:
        return row_loss.mean(dim=1)
    nb = valid_counts(mask, B, N, row_loss.device).to(row_loss.dtype)
    total = torch.where(mask, row_loss, torch.zeros_like(row_loss)).sum(dim=1)
    return torch.where(nb >= 2, total / nb.clamp_min(1), torch.zeros_like(total))


def _row_coef(grad: torch.Tensor, mask: torch.Tensor | None, n: int, temperature: float) -> torch.Tensor:
    """g_b / (N_b τ) per image (0 where N_b < 2): d loss / d S carries 1/N_b, dS / d tokens carries 1/τ."""
    nb = valid_counts(mask, grad.shape[0], n, grad.device)
    coef = grad.double() / (nb.clamp_min(1) * temperature)
    return torch.where(nb >= 2, coef, torch.zeros_like(coef))


def _all_forward(a, z, mask, temperature, backend, operands, need_a, need_z):
    """(per-image loss, Σ_i dℓ_i/dA or None, Σ_i dℓ_i/dZ or None) in the work dtype, gradients without
    the 1/τ; either path. A masked row's loss is dropped, so its token's gradient is set to exactly 0
    (the paths leave that row of dA holding the dropped loss's gradient)."""
    work = work_dtype(a.dtype)
    if backend == "triton":
        from fastpatchdiv.kernels.contrastive import contrastive_all_forward

        row_loss, da, dz = contrastive_all_forward(a, z, mask, temperature, operands, need_a, need_z)
    else:
        with matmul_precision(operands):
            row_loss, da, dz = _torch_all(a, z, mask, temperature, operands, need_a, need_z)
    if mask is not None:
        dropped = ~mask.unsqueeze(-1)
        da, dz = (g.masked_fill_(dropped, 0.0) if g is not None else None for g in (da, dz))
    return _image_mean(row_loss, mask).to(work), *(g.to(work) if g is not None else None for g in (da, dz))


@torch.library.custom_op("fastpatchdiv::contrastive_all_forward", mutates_args=())
def contrastive_all_forward_op(
    a: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    backend: str,
    need_a: bool,
    need_z: bool,
    operands: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,), Σ_i dℓ_i/dA, Σ_i dℓ_i/dZ): the gradients (B, N, D) in fp32 (fp64 for fp64 tokens),
    without the 1/τ, where asked, else empty; the same on both paths, so the backward only scales them."""
    if a.shape[0] == 0:
        return _empty_outputs(a, need_a, need_z)
    with no_autocast(a.device.type):
        loss, da, dz = _all_forward(a, z, mask, temperature, backend, operands, need_a, need_z)
    # Outputs may not alias one another: a fresh empty tensor for each gradient not asked for.
    return loss, *(g if g is not None else a.new_empty((0,), dtype=loss.dtype) for g in (da, dz))


def _empty_outputs(a: torch.Tensor, need_a: bool, need_z: bool):
    work = work_dtype(a.dtype)
    grads = (a.new_empty(a.shape if need else (0,), dtype=work) for need in (need_a, need_z))
    return a.new_empty((a.shape[0],), dtype=work), *grads


@contrastive_all_forward_op.register_fake
def _(a, z, mask, temperature, backend, need_a, need_z, operands):
    return _empty_outputs(a, need_a, need_z)


class PatchContrastiveFunction(torch.autograd.Function):
    """``PatchContrastiveFunction.apply(first, last, mask=None, temperature=1.0, backend="auto",
    grad_enabled=True, precision="auto")`` -> per-image InfoNCE losses (B,) over all patches
    (``negatives="all"``).

    first and last are (B, N, D) of one dtype; mask is (B, N) bool or None, with the masked tokens already
    zeroed (they get exactly zero gradient). When a backward can follow (``grad_enabled``, the caller's
    ``torch.is_grad_enabled()``), the forward also forms the gradients' sums and the backward only scales
    them. ``precision`` as in :func:`patch_contrastive_loss`. Inputs are not checked here: use
    :func:`patch_contrastive_loss`. Double backward raises.
    """

    @staticmethod
    def forward(ctx, a, z, mask=None, temperature=1.0, backend="auto", grad_enabled=True, precision="auto"):
        backend = pick_backend(a, backend)
        operands = resolve_operands(a.dtype, a.device.type, precision)
        need_a, need_z = (bool(grad_enabled and n) for n in ctx.needs_input_grad[:2])
        loss, da, dz = torch.ops.fastpatchdiv.contrastive_all_forward(
            a, z, mask, temperature, backend, need_a, need_z, operands
        )
        ctx.temperature, ctx.need = temperature, (need_a, need_z)
        ctx.save_for_backward(a, z, mask, da, dz)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, z, mask, da, dz = ctx.saved_tensors
        need_a, need_z = ctx.need
        if not (need_a or need_z):
            return None, None, None, None, None, None, None
        coef = _row_coef(grad, mask, a.shape[1], ctx.temperature).to(da.dtype if need_a else dz.dtype).view(-1, 1, 1)
        da = (da * coef).to(a.dtype) if need_a else None
        dz = (dz * coef).to(z.dtype) if need_z else None
        grads = refuse_double_backward("patch_contrastive_loss", z if need_z else a, (da, dz))
        return *grads, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# negatives="mean" / "window": O(N·D), a closed-form backward, plain autograd for double backward
# ----------------------------------------------------------------------------------------------------


def _box_mean(z: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Mean of z over the k x k window around each patch of the (H, W) grid, zero padding counted in k²;
    (B, N, D) -> (B, N, D). Times k² it is the window's zero-padded sum (a symmetric operator)."""
    B, N, D = z.shape
    # An NCHW view with channels-last strides: no copy, and the pooling vectorises over D.
    img = z.reshape(B, *grid, D).permute(0, 3, 1, 2)
    # The box is separable: a 1 x k then a k x 1 pass add 2k terms per patch instead of k².
    r = window // 2
    img = F.avg_pool2d(img, (1, window), stride=1, padding=(0, r), count_include_pad=True)
    img = F.avg_pool2d(img, (window, 1), stride=1, padding=(r, 0), count_include_pad=True)
    return img.permute(0, 2, 3, 1).reshape(B, N, D)


def _local_terms(a, z, mask, temperature, grid, window):
    """The logits of ℓ_i = lse(0, neg_i − pos_i[, loc_i − pos_i]) as (B, N, 2 or 3), and N_b as (B, 1).

    a_i·m_i = (a_i·Σ_j z_j − a_i·z_i)/(N_b − 1) and a_i·w_i = (k²·a_i·box_i − a_i·z_i)/(k² − 1): matrix-
    vector products and row dot products, O(N·D) work and no N x N. Masked tokens are zero, so Σ_j runs
    over the real ones."""
    B, N, _ = a.shape
    nb = valid_counts(mask, B, N, a.device).to(a.dtype).unsqueeze(-1)
    az = torch.linalg.vecdot(a, z)
    a_sum = torch.bmm(a, z.sum(dim=1).unsqueeze(-1)).squeeze(-1)
    terms = [torch.zeros_like(az), ((a_sum - az) / (nb - 1).clamp_min(1) - az) / temperature]
    if window:
        a_box = torch.linalg.vecdot(a, _box_mean(z, grid, window)) * (window * window)
        terms.append(((a_box - az) / (window * window - 1) - az) / temperature)
    return torch.stack(terms, dim=-1), nb


def _local_loss(a, z, mask, temperature, grid, window):
    """Per-image loss of "mean" (window = 0) or "window", in plain autograd: the double-backward path."""
    terms, _ = _local_terms(a, z, mask, temperature, grid, window)
    return _image_mean(torch.logsumexp(terms, dim=-1), mask)


class _LocalNegatives(torch.autograd.Function):
    """Per-image losses of negatives="mean" (window = 0) or "window", with the gradient in closed form.

    With π_i = softmax of row i's logits and c_i = g_b/N_b on real rows: dℓ/d(a_i·z_j) weights are
    r_i = c_i π_i1 / ((N_b − 1)τ) for the mean, q_i = c_i π_i2 k² / ((k² − 1)τ) for the window and
    d_i = −c_i (π_i1 + π_i2)/τ − r_i − q_i/k² for the positive, so
        dz_j = Σ_i r_i a_i + box_mean(q a)_j + d_j a_j,   da_i = r_i Σ_j z_j + q_i box_mean(Z)_i + d_i z_i.
    Autograd of the formula forms (B, N, D) temporaries at every node; this takes a matrix-vector
    product, one box pass and two fused updates. Under ``create_graph=True`` the backward differentiates
    the formula itself, so gradient penalties stay exact.
    """

    @staticmethod
    def forward(ctx, a, z, mask, temperature, grid, window):
        terms, nb = _local_terms(a, z, mask, temperature, grid, window)
        ctx.save_for_backward(a, z, mask, torch.softmax(terms, dim=-1), nb)
        ctx.args = (temperature, grid, window)
        return _image_mean(torch.logsumexp(terms, dim=-1), mask)

    @staticmethod
    def backward(ctx, grad):
        a, z, mask, pi, nb = ctx.saved_tensors
        temperature, grid, window = ctx.args
        need_a, need_z = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                loss = _local_loss(a, z, mask, temperature, grid, window)
            inputs = [t for t, need in ((a, need_a), (z, need_z)) if need]
            grads = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
            return (next(grads) if need_a else None), (next(grads) if need_z else None), None, None, None, None
        c = torch.where(nb >= 2, grad.unsqueeze(-1).to(a.dtype) / nb.clamp_min(1), torch.zeros_like(nb))
        if mask is not None:
            c = c * mask
        r = c * pi[..., 1] / ((nb - 1).clamp_min(1) * temperature)
        diag = -c * pi[..., 1:].sum(dim=-1) / temperature - r
        q = None
        if window:
            q = c * pi[..., 2] * (window * window) / ((window * window - 1) * temperature)
            diag = diag - q / (window * window)

        da = dz = None
        if need_z:  # dz_j = Σ_i r_i a_i + box_mean(q a)_j + diag_j a_j
            dz = torch.bmm(r.unsqueeze(1), a).expand_as(a)
            if q is not None:
                dz = dz + _box_mean(q.unsqueeze(-1) * a, grid, window)
            dz = torch.addcmul(dz, diag.unsqueeze(-1), a)
        if need_a:  # da_i = r_i Σ_j z_j + q_i box_mean(z)_i + diag_i z_i
            da = r.unsqueeze(-1) * z.sum(dim=1, keepdim=True)
            if q is not None:
                da = torch.addcmul(da, q.unsqueeze(-1), _box_mean(z, grid, window))
            da = torch.addcmul(da, diag.unsqueeze(-1), z)
        return da, dz, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Checks and the public API
# ----------------------------------------------------------------------------------------------------


def check_grid(grid: tuple[int, int] | None) -> tuple[int, int] | None:
    """``grid`` as a pair of positive ints, or None."""
    if grid is None:
        return None
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def _grid_for(grid: tuple[int, int] | None, n: int, needed: bool) -> tuple[int, int] | None:
    if grid is None:
        if not needed:
            return None
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"negatives='window' needs the patch grid: N = {n} is not a square, pass grid=(H, W) with H * W = {n}"
            )
        return side, side
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid={tuple(grid)} has {grid[0] * grid[1]} patches but the tokens have N = {n}")
    return grid


def check_settings(
    temperature: float,
    normalize: bool,
    negatives: str,
    detach_first: bool,
    reduction: str,
    grid,
    window: int,
    backend: str,
    precision: str = "auto",
):
    """Check every setting that does not depend on the tokens; returns (τ, grid) normalised."""
    check_precision(precision)
    tau = check_temperature(temperature)
    check_flag("normalize", normalize)
    check_flag("detach_first", detach_first)
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    check_reduction(reduction)
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 3, got {window!r}")
    check_backend(backend)
    return tau, check_grid(grid)


def patch_contrastive_loss(
    first: torch.Tensor,
    last: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: bool = False,
    negatives: str = "mean",
    detach_first: bool = True,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    window: int = 7,
    backend: str = "auto",
    precision: str = "auto",
) -> torch.Tensor:
    """Patch-wise contrastive loss between first-layer and last-layer patch tokens.

    With a_i = first_i (detached unless ``detach_first=False``), z_i = last_i, both L2-normalised when
    ``normalize`` (x / max(|x|, 1e-12)), s(u, v) = u·v / τ and pos_i = s(a_i, z_i), an image's loss is
    the mean of ℓ_i over its N_b real patches (all N without a mask) with

    - ``"mean"`` (paper, default): ℓ_i = logaddexp(pos_i, s(a_i, m_i)) − pos_i, m_i = (Σ_j z_j − z_i)/(N_b − 1);
    - ``"window"`` (official code): ℓ_i = logsumexp(pos_i, s(a_i, m_i), s(a_i, w_i)) − pos_i,
      w_i = (Σ_{j in the k x k window around i} z_j − z_i)/(k² − 1) on the ``grid`` (H, W), zero padded
      (padding counts in k² − 1), k = ``window``;
    - ``"all"`` (InfoNCE): ℓ_i = logsumexp_j s(a_i, z_j) − pos_i, fused kernel, O(N·D) memory.

    Sums over j run over real patches only; an image with N_b < 2 has loss 0 and zero gradient. The
    official code computes −log(softmax + 1e-8); this is the exact log-sum-exp form, which differs only
    where the positive's probability is below about 1e-8 (there the official loss saturates near 18.4
    and its gradient vanishes; ours keeps growing linearly).

    Scale: with raw tokens and τ = 1 (the paper's and the official code's setting) the logits are plain dot
    products. In a freshly initialised ViT each last-layer token is still aligned with its own patch
    embedding (the residual stream), so pos_i leads by tens of logits and the loss is 0 until the patches
    over-smooth; ``normalize=True`` makes the logits cosines within ±1/τ and the loss active from the start.

    Args:
        first: first-layer patch tokens (the patch-embedding output), (B, N, D) or (N, D) (one image);
            float32/float16/bfloat16/float64.
        last: final-layer patch tokens, same shape and device as ``first``; another floating dtype is
            fine (both are promoted to the wider one, as autocast leaves them). Prefix tokens (class,
            registers) must already be removed; non-contiguous views such as ``tokens[:, 1:]`` are fine.
        temperature: τ > 0, finite, with 1/τ finite in float32.
        normalize: L2-normalise both token sets first (gradients go through the normalisation).
        negatives: "mean", "window" or "all", as above.
        detach_first: stop the gradient into ``first`` (the paper's setting).
        reduction: "mean" over images, "sum", or "none" for the (B,) per-image losses (B = 1 for 2-D input).
        mask: optional (B, N) (or (N,)) bool, True = a real patch (NaFlexVit's ``patch_valid``); "mean"
            and "all" only ("window" needs the full grid). Masked tokens may hold anything and get
            exactly zero gradient.
        grid: (H, W) patch grid for "window", H * W = N; default square.
        window: odd window size k >= 3 for "window".
        backend: "auto" (Triton kernels for CUDA tensors, or CPU under TRITON_INTERPRET=1; PyTorch
            otherwise and always for float64), "triton" or "torch". Only "all" has a kernel; "mean" and
            "window" are the same O(N·D) torch code on every backend.
        precision: the operands of "all"'s matrix work. "auto" (default) does what ``torch.matmul``
            would: the autocast dtype under ``torch.autocast`` (so fp32 ``last`` and bf16 ``first`` from a
            timm ViT multiply in bf16), else the inputs' dtype, float32 as TF32 where
            ``torch.get_float32_matmul_precision()`` is "high"/"medium". "fp32" (exact), "tf32", "bf16" or
            "fp16" override it. Accumulation, the loss and the log-sum-exp stay fp32.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (B,) for ``reduction="none"``;
        B = 0 gives a (0,) tensor, whose "mean" is NaN as in torch. Input gradients come back in each
        input's dtype.

    Numerics (the README's numerics contract): each logit carries fp32 rounding of about |s|·1e-7 (more
    with 16-bit or TF32 operands), which the softmax passes on to the gradient: gradients keep fp32
    accuracy up to |s| ≈ 100 and lose digits beyond, while the loss keeps its relative accuracy. Logits
    past float32's range give inf/NaN for that image. "mean" and "window" are plain autograd and support
    double backward; "all" raises on double backward.

    Raises:
        TypeError: non-tensor or non-floating inputs, non-numeric temperature, non-bool flags or mask.
        ValueError: shapes other than (B, N, D)/(N, D) or differing between ``first`` and ``last``,
            N < 2, D = 0, differing devices, temperature <= 0, not finite or below 1/float32-max,
            unknown ``negatives``, ``reduction`` or ``backend``, ``grid`` not a pair of positive ints
            multiplying to N (or N not square with ``grid=None`` for "window"), ``window`` even or < 3,
            a mask with "window" or of the wrong shape or device, ``backend="triton"`` on a device/dtype
            the kernels do not take.
    """
    tau, grid = check_settings(
        temperature, normalize, negatives, detach_first, reduction, grid, window, backend, precision
    )
    a = check_tokens("first", first)
    z = check_tokens("last", last)
    if first.shape != last.shape:
        raise ValueError(f"first and last must have the same shape, got {tuple(first.shape)} and {tuple(last.shape)}")
    if first.device != last.device:
        raise ValueError(f"first and last must be on the same device, got {first.device} and {last.device}")
    mask = check_mask(mask, a, first.dim() == 2)
    if mask is not None and negatives == "window":
        raise ValueError("negatives='window' needs the full patch grid and takes no mask; use 'mean' or 'all'")
    grid = _grid_for(grid, a.shape[1], needed=negatives == "window")
    common = torch.promote_types(a.dtype, z.dtype)
    operands = resolve_operands(common, a.device.type, precision)  # read before autocast is turned off
    a, z = a.to(common), z.to(common)
    backend = pick_backend(a, backend)
    if detach_first:
        a = a.detach()
    with no_autocast(a.device.type):
        if mask is not None:
            # Padding may hold anything (NaN): zeroed tokens add nothing, and masked_fill's backward
            # gives them exactly zero gradient.
            dropped = ~mask.unsqueeze(-1)
            a, z = a.masked_fill(dropped, 0.0), z.masked_fill(dropped, 0.0)
        if negatives == "all" and backend == "triton":
            if normalize:
                a, z = normalize_rows(a.float())[0], normalize_rows(z.float())[0]
            # The kernels take their operands as they multiply them; autograd casts the gradients back.
            a, z = a.to(operand_dtype(operands)), z.to(operand_dtype(operands))
            per_image = PatchContrastiveFunction.apply(a, z, mask, tau, backend, torch.is_grad_enabled(), operands)
        else:
            work = work_dtype(common)
            a, z = a.to(work), z.to(work)
            if normalize:
                a, z = normalize_rows(a)[0], normalize_rows(z)[0]
            if negatives == "all":
                per_image = PatchContrastiveFunction.apply(a, z, mask, tau, "torch", torch.is_grad_enabled(), operands)
            else:
                per_image = _LocalNegatives.apply(a, z, mask, tau, grid, window if negatives == "window" else 0)
        return reduce_images(per_image, reduction)


class PatchContrastiveLoss(nn.Module):
    """Module form of :func:`patch_contrastive_loss`: ``forward(first, last, mask=None)``.

    Every setting is checked here, at construction; the grid's product is checked against N at the
    first call, when N is known.
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
        precision: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature, self.grid = check_settings(
            temperature, normalize, negatives, detach_first, reduction, grid, window, backend, precision
        )
        self.precision = precision
        self.normalize = normalize
        self.negatives = negatives
        self.detach_first = detach_first
        self.reduction = reduction
        self.window = window
        self.backend = backend

    def forward(self, first: torch.Tensor, last: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return patch_contrastive_loss(
            first,
            last,
            temperature=self.temperature,
            normalize=self.normalize,
            negatives=self.negatives,
            detach_first=self.detach_first,
            reduction=self.reduction,
            mask=mask,
            grid=self.grid,
            window=self.window,
            backend=self.backend,
            precision=self.precision,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, normalize={self.normalize}, negatives={self.negatives!r}, "
            f"detach_first={self.detach_first}, reduction={self.reduction!r}, grid={self.grid}, "
            f"window={self.window}, backend={self.backend!r}, precision={self.precision!r}"
        )


__all__ = ["NEGATIVES", "PatchContrastiveFunction", "PatchContrastiveLoss", "patch_contrastive_loss"]
