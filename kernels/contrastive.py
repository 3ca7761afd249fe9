"""Triton kernels of the patch-contrastive loss with ``negatives="all"`` (InfoNCE over all patches).

Per image, A (N, D) are the first-layer tokens, Z (N, D) the last-layer tokens, S = A Zᵀ / τ and
ℓ_i = lse_j(S_ij) − S_ii, the lse over the real columns j. The tiling follows FlashAttention's QKᵀ:

- forward, row-stationary: a program owns row block I of one image and streams column blocks J,
  keeping a running max and sum per row in fp32 (in log2 units: exp2 of S·log2(e) − max). It stores
  lse_i (log2 units) and ℓ_i: 2·N floats per image, nothing N x N.
- backward, one kernel for both gradients: a program owns a block of rows of X and streams blocks of
  Y, recomputing the score tile X Yᵀ and P = exp(S − lse), and accumulates (P − I) Y. For dZ
  (column-stationary) X = Z, Y = A and the tile is Sᵀ; for dA (row-stationary, only with
  ``detach_first=False``) X = A, Y = Z. Each output element is written by exactly one program in a
  fixed order: deterministic, no atomics. The per-image factor g_b / (N_b τ) is applied at the store.

The feature dimension of the gradient is split into BLOCK_DV chunks over the grid, so a program's
accumulator stays BLOCK_OWN x BLOCK_DV; each chunk recomputes its S tiles. With D <= BLOCK_DV that is
the ideal 2·N²·D multiply-adds for dZ; with D = 768 and BLOCK_DV = 128 it is (1 + 6)·N²·D. Recompute
is the price for never holding more than a tile.

Loads are masked with ``other=0`` (a zero row or column adds nothing to a dot). Padded columns (j >= N)
are set to -inf before the row max, and every column block has at least one of them real, so the
running max is finite after the first block. Columns the padding mask drops get MASKED_LOGIT, a finite
floor: an image with no real patch still has finite statistics (its loss is dropped on the host). The
tokens of masked patches arrive zeroed, so they add nothing to any gradient.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.kernels._utils import MIN_DOT, check_image_offsets, compile_options

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
MASKED_LOGIT = tl.constexpr(-3.0e38)


@triton.jit
def _block_rows(base, start, stride_n, N, BLOCK: tl.constexpr):
    """Rows start .. start + BLOCK of one image: (indices, in-range mask, (BLOCK, 1) row pointers)."""
    rows = start + tl.arange(0, BLOCK)
    return rows, rows < N, base + rows[:, None] * stride_n


@triton.jit
def _score_tile(
    x_rows,
    y_rows,
    x_ok,
    y_ok,
    D,
    stride_xd,
    stride_yd,
    BLOCK_X: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """X Yᵀ for one (BLOCK_X, BLOCK_Y) tile in fp32, over the features in BLOCK_K chunks; ``x_rows`` and
    ``y_rows`` are (BLOCK, 1) pointers to each row's first feature."""
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(x_rows + ks[None, :] * stride_xd, mask=x_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_rows + ks[None, :] * stride_yd, mask=y_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _contrastive_all_fwd_kernel(
    a_ptr,
    z_ptr,
    mask_ptr,
    lse2_ptr,
    loss_ptr,
    N,
    D,
    stride_ab,
    stride_an,
    stride_ad,
    stride_zb,
    stride_zn,
    stride_zd,
    scale_log2,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B): lse2_i = log2 Σ_j 2^(S_ij·log2 e) and ℓ_i = (lse2_i − S_ii·log2 e)·ln 2."""
    tl.static_assert(BLOCK_M >= MIN_DOT and BLOCK_N >= MIN_DOT and BLOCK_K >= MIN_DOT)
    b = tl.program_id(1).to(tl.int64)
    row_start = tl.program_id(0) * BLOCK_M
    rows, row_ok, a_rows = _block_rows(a_ptr + b * stride_ab, row_start, stride_an, N, BLOCK_M)
    z_base = z_ptr + b * stride_zb

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols, col_ok, z_rows = _block_rows(z_base, col_start, stride_zn, N, BLOCK_N)
        s = _score_tile(
            a_rows, z_rows, row_ok, col_ok, D, stride_ad, stride_zd, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
        )
        s = s * scale_log2
        if HAS_MASK:
            real = tl.load(mask_ptr + b * N + cols, mask=col_ok, other=0) != 0
            s = tl.where(real[None, :], s, MASKED_LOGIT)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
        # Only the tiles that cross the diagonal hold a positive; skip the select elsewhere.
        if (col_start < row_start + BLOCK_M) & (col_start + BLOCK_N > row_start):
            pos += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
    lse2 = m_i + tl.log2(l_i)
    out = b * N + rows
    tl.store(lse2_ptr + out, lse2, mask=row_ok)
    tl.store(loss_ptr + out, (lse2 - pos) * LN2, mask=row_ok)


@triton.jit
def _contrastive_all_bwd_kernel(
    x_ptr,
    y_ptr,
    lse2_ptr,
    coef_ptr,
    out_ptr,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_yb,
    stride_yn,
    stride_yd,
    stride_ob,
    stride_on,
    stride_od,
    scale_log2,
    LSE_ON_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_X), cdiv(D, BLOCK_DV), B): out_I = coef_b · Σ_J (T_IJ − I_IJ) Y_J with T = P for
    dA (X = A, Y = Z, lse on X's rows) and T = Pᵀ for dZ (X = Z, Y = A, ``LSE_ON_Y``), coef_b = g_b/(N_b τ)."""
    tl.static_assert(BLOCK_X >= MIN_DOT and BLOCK_Y >= MIN_DOT and BLOCK_K >= MIN_DOT and BLOCK_DV >= MIN_DOT)
    b = tl.program_id(2).to(tl.int64)
    rows_x, x_ok, x_rows = _block_rows(x_ptr + b * stride_xb, tl.program_id(0) * BLOCK_X, stride_xn, N, BLOCK_X)
    y_base = y_ptr + b * stride_yb
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    acc = tl.zeros((BLOCK_X, BLOCK_DV), dtype=tl.float32)
    if not LSE_ON_Y:
        # Padded rows get lse = +inf, so their P is exactly 0.
        lse_x = tl.load(lse2_ptr + b * N + rows_x, mask=x_ok, other=float("inf"))

    for y_start in range(0, N, BLOCK_Y):
        rows_y, y_ok, y_rows = _block_rows(y_base, y_start, stride_yn, N, BLOCK_Y)
        s = _score_tile(
            x_rows, y_rows, x_ok, y_ok, D, stride_xd, stride_yd, BLOCK_X, BLOCK_Y, BLOCK_K, UPCAST, PRECISION
        )
        if LSE_ON_Y:
            lse_y = tl.load(lse2_ptr + b * N + rows_y, mask=y_ok, other=float("inf"))
            p = tl.exp2(s * scale_log2 - lse_y[None, :])
        else:
            p = tl.exp2(s * scale_log2 - lse_x[:, None])
        ds = tl.where(rows_x[:, None] == rows_y[None, :], p - 1.0, p)
        # Padded Y rows load as 0, so whatever their P is adds nothing.
        y_v = tl.load(
            y_rows + dv[None, :] * stride_yd,
            mask=y_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            y_v = y_v.to(tl.float32)
        # Like FlashAttention's dV: P goes to the input dtype so 16-bit inputs use the 16-bit MMA.
        acc = tl.dot(ds.to(y_v.dtype), y_v, acc, input_precision=PRECISION)
    coef = tl.load(coef_ptr + b)
    tl.store(
        out_ptr + b * stride_ob + rows_x[:, None] * stride_on + dv[None, :] * stride_od,
        (acc * coef).to(out_ptr.dtype.element_ty),
        mask=x_ok[:, None] & dv_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Block sizes and launch options, picked by rule (no timing-based autotune, so every process picks
    the same and results are bitwise reproducible). 64 x 64 forward score tiles: fp32 tiles are 16 KiB
    each, so the pipeline stages fit the shared memory of sm_80 and sm_90 alike; 16-bit inputs take
    64-deep feature chunks. The backward owns ``bwd_own`` rows and streams ``bwd_stream``; the rules are
    compiled for sm_80 and sm_90 with the spill count checked in the tests."""

    block_m: int
    block_n: int
    bwd_own: int
    bwd_stream: int
    block_k: int
    block_dv: int
    num_warps: int
    fwd_stages: int
    bwd_stages: int


def pick_blocks(d: int, dtype: torch.dtype, arch: int = 90, interpreter: bool = INTERPRETER) -> Blocks:
    """``arch`` is the compute capability as an int (80 for sm_80)."""
    if interpreter:
        # Every program instance costs milliseconds there: the smallest legal tiles.
        tile = MIN_DOT.value
        return Blocks(tile, tile, tile, tile, tile, tile, num_warps=1, fwd_stages=1, bwd_stages=1)
    fp32 = dtype == torch.float32
    # A feature chunk much wider than D would only compute padding. On sm_80 the fp32 backward spills
    # at 64 x 64 x 128 (ptxas), and at a 64-wide chunk too: it streams 32 rows over 128-wide chunks.
    if fp32 and arch < 90:
        stream, block_dv = 32, 128
    else:
        stream, block_dv = 64, 128 if d > 64 else 64
    return Blocks(
        block_m=64,
        block_n=64,
        bwd_own=64,
        bwd_stream=stream,
        block_k=32 if fp32 else 64,
        block_dv=block_dv,
        num_warps=8,
        fwd_stages=3,
        bwd_stages=2,
    )


def _launch_blocks(x: torch.Tensor) -> Blocks:
    major, minor = torch.cuda.get_device_capability(x.device) if x.is_cuda else (9, 0)
    return pick_blocks(x.shape[-1], x.dtype, arch=10 * major + minor)


def contrastive_all_forward(
    a: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on (B, N, D) tokens of one dtype (any strides); mask (B, N) bool or None.

    Returns (lse2, row_loss), both (B, N) float32: lse2 is the row log-sum-exp in log2 units (what the
    backward needs; +inf in an image without real patches), row_loss the per-patch loss ℓ_i in natural
    units (masked rows hold garbage).
    """
    B, N, D = a.shape
    check_image_offsets(a, z)
    blk = _launch_blocks(a)
    lse2 = torch.empty((B, N), device=a.device, dtype=torch.float32)
    loss = torch.empty((B, N), device=a.device, dtype=torch.float32)
    mask_arg = mask.contiguous() if mask is not None else lse2  # any pointer: HAS_MASK=False never reads it
    tiles = dict(HAS_MASK=mask is not None, BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, BLOCK_K=blk.block_k)
    options = compile_options(a.dtype, blk.num_warps, blk.fwd_stages)
    _contrastive_all_fwd_kernel[(triton.cdiv(N, blk.block_m), B)](
        a, z, mask_arg, lse2, loss, N, D, *a.stride(), *z.stride(), LOG2E / temperature, **tiles, **options
    )
    if mask is not None:
        # Such an image's lse is ~MASKED_LOGIT: +inf makes its P exactly 0 in the backward, as for padded
        # rows, instead of 2^(0 − MASKED_LOGIT) = inf times its zeroed tokens.
        lse2.masked_fill_(~mask.any(dim=1, keepdim=True), float("inf"))
    return lse2, loss


def contrastive_all_backward(
    a: torch.Tensor,
    z: torch.Tensor,
    lse2: torch.Tensor,
    coef: torch.Tensor,
    temperature: float,
    need_a: bool,
    need_z: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dA_b = coef_b (P_b − I) Z_b and dZ_b = coef_b (P_b − I)ᵀ A_b, each only where asked.

    ``coef`` is (B,) float32 holding g_b / (N_b τ), g_b being the gradient of image b's loss, and
    ``lse2`` is what ``contrastive_all_forward`` returned. Returns (dA or None, dZ or None) in the input
    dtype, contiguous (B, N, D).
    """
    B, N, D = a.shape
    blk = _launch_blocks(a)
    coef = coef.to(device=a.device, dtype=torch.float32).contiguous()
    options = compile_options(a.dtype, blk.num_warps, blk.bwd_stages)
    grads = []
    # dA: X = A owns rows i; dZ: X = Z owns columns j and the lse belongs to the streamed A rows.
    for needed, x, y, lse_on_y in ((need_a, a, z, False), (need_z, z, a, True)):
        if not needed:
            grads.append(None)
            continue
        out = torch.empty((B, N, D), device=a.device, dtype=a.dtype)
        tiles = dict(
            LSE_ON_Y=lse_on_y, BLOCK_X=blk.bwd_own, BLOCK_Y=blk.bwd_stream, BLOCK_K=blk.block_k, BLOCK_DV=blk.block_dv
        )
        grid = (triton.cdiv(N, blk.bwd_own), triton.cdiv(D, blk.block_dv), B)
        _contrastive_all_bwd_kernel[grid](
            x,
            y,
            lse2,
            coef,
            out,
            N,
            D,
            *x.stride(),
            *y.stride(),
            *out.stride(),
            LOG2E / temperature,
            **tiles,
            **options,
        )
        grads.append(out)
    return grads[0], grads[1]
