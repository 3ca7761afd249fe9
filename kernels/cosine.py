"""Triton kernels of the patch cosine loss, and their launchers.

Per image, X is (N, D), x̂_i = x_i / max(|x_i|, eps), S = X̂ X̂ᵀ and, with N_b real patches (all N
without a mask),
    loss = c_b · Σ_{i≠j} |S_ij|,   c_b = 1/(N_b(N_b − 1)) (0 when N_b < 2).
- ``_normalize_kernel``: writes X̂ (in the input dtype, for the tensor cores) and |x_i|; masked rows
  get x̂ = 0, so every later tile ignores them for free (|0| adds nothing, sign(0) = 0).
- ``_cosine_fwd_kernel``: tiles (I, J) with J >= I only (S is symmetric): an off-diagonal tile counts
  twice, a diagonal tile masks i = j. Persistent programs walk the triangle of tiles and each writes
  its own fp64 partial sum: deterministic, no atomics, and nothing N x N anywhere.
- ``_cosine_bwd_kernel``: G = 2c · (sign(S) ∘ offdiag) X̂. A program owns row block I, keeps X̂_I and
  G_I resident and streams every column block J, recomputing the S tile (FlashAttention's backward
  shape): each G_I has exactly one writer, so the result is bitwise reproducible. The epilogue goes
  back through the normalisation in fp32 from the original x:
  dx_i = (g_i − (g_i·x̂_i) x̂_i) / |x_i|, or g_i / eps where the norm was clamped; 0 for masked rows.
Work: forward N²·D/2 multiply-adds per image, backward 2·N²·D (recompute S, then sign(S) X̂).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.kernels._utils import MIN_DOT, check_image_offsets, compile_options, num_programs_cap

EPS = 1e-12


@triton.jit
def _normalize_kernel(
    x_ptr,
    mask_ptr,
    xhat_ptr,
    norm_ptr,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    HAS_MASK: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B): x̂_i = x_i / max(|x_i|, eps) into ``xhat`` (contiguous, x's dtype), |x_i|
    into ``norm`` (fp32). The norm is taken of x_i / max_d |x_id|, entries in [-1, 1], so tokens whose
    squares overflow fp32 (1e20) still normalise exactly. Rows the mask drops get x̂ = 0 and |x| = 0.
    Three passes over the row (max, sum of squares, write): O(N·D), cheap beside the N²·D tiles."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    x_rows = x_ptr + b * stride_xb + rows[:, None] * stride_xn
    out_rows = xhat_ptr + b * N * D + rows[:, None] * D
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * N + rows, mask=row_ok, other=0) != 0)

    # Rows the mask drops are never read (padding may hold NaN or 1e30): as zeros they get |x| = 0, x̂ = 0.
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (cols[None, :] < D)
        v = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    # A zero row keeps scale 1 (its norm is 0 either way); a NaN reaches the sum of squares below.
    scale = tl.where(amax > 0, amax, 1.0)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (cols[None, :] < D)
        v = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32) / scale[:, None]
        sumsq += tl.sum(v * v, axis=1)
    n = tl.sqrt_rn(sumsq)
    norm = n * scale  # +inf only if the true norm is past fp32's range; x̂ stays exact
    big = norm >= EPS
    n = tl.where(big, n, 1.0)  # the branch of the where() below that clamped rows drop: no 0/0
    tl.store(norm_ptr + b * N + rows, norm, mask=row_ok)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_rows + cols[None, :] * stride_xd, mask=keep[:, None] & (cols[None, :] < D), other=0.0)
        v = v.to(tl.float32)
        # Divide (not multiply by a reciprocal) by the scale: 1/scale can be subnormal and flush to 0.
        xh = tl.where(big[:, None], (v / scale[:, None]) / n[:, None], v / EPS)
        tl.store(out_rows + cols[None, :], xh.to(xhat_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < D))


@triton.jit
def _triangle_row(t):
    """Row r of tile t in the row-major lower triangle, t = r(r+1)/2 + c with c <= r.

    The fp32 sqrt is exact only while 8t+1 < 2^24 (N ~ 64k at 64-wide tiles); past that it can be off by
    one, so nudge r into place with exact integer checks.
    """
    r = ((tl.sqrt_rn(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
    r = tl.where(r * (r + 1) // 2 > t, r - 1, r)
    r = tl.where((r + 1) * (r + 2) // 2 <= t, r + 1, r)
    return r


@triton.jit
def _cosine_fwd_kernel(
    xhat_ptr,
    partial_ptr,
    N,
    D,
    NUM_TILES,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (programs, B): program p of image b sums w · Σ_{i≠j} |S_ij| over tiles t = p, p + programs, ...
    of the lower triangle (w = 2 off the diagonal, 1 on it) into ``partial[b, p]`` (fp64)."""
    tl.static_assert(BLOCK >= MIN_DOT and BLOCK_K >= MIN_DOT)
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    base = xhat_ptr + b * N * D
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)

    # Row sums of a tile stay in fp32 (BLOCK terms); across tiles they add up in fp64, so the loss keeps
    # fp32's relative accuracy however many tiles (N²/BLOCK² of them) a program visits.
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(pid, NUM_TILES, num_progs):
        r = _triangle_row(t)
        c = t - r * (r + 1) // 2
        rows = c * BLOCK + offs  # block I = c
        cols = r * BLOCK + offs  # block J = r >= I
        row_ok = rows < N
        col_ok = cols < N

        s = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < D
            # Padding loads as 0: a zero feature adds nothing to a dot product.
            a = tl.load(base + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(base + cols[None, :] * D + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            s = tl.dot(a, bt, s, input_precision=PRECISION)
        keep = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        weight = tl.where(r > c, 2.0, 1.0)
        total += (weight * tl.sum(tl.where(keep, tl.abs(s), 0.0), axis=1)).to(tl.float64)
    tl.store(partial_ptr + b * num_progs + pid, tl.sum(total, axis=0))


@triton.jit
def _cosine_bwd_kernel(
    x_ptr,
    xhat_ptr,
    norm_ptr,
    scale_ptr,
    dx_ptr,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B): dx_I = back through the normalisation of scale_b · Σ_J sign(S_IJ) X̂_J
    (i ≠ j), scale_b = 2 c_b · dL/dloss_b. BLOCK_D covers all of D: G_I stays resident in registers.
    A masked row has x̂ = 0, so its G is 0; the launcher zeroes its dx (its x may hold anything)."""
    tl.static_assert(BLOCK_M >= MIN_DOT and BLOCK_N >= MIN_DOT and BLOCK_D >= MIN_DOT)
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = xhat_ptr + b * N * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dims < D
    tile_ok = row_ok[:, None] & d_ok[None, :]

    # Padding rows and features load as 0: they add nothing to S or to G.
    xi = tl.load(base + rows[:, None] * D + dims[None, :], mask=tile_ok, other=0.0)
    if UPCAST:
        xi = xi.to(tl.float32)
    g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        xj = tl.load(base + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            xj = xj.to(tl.float32)
        s = tl.dot(xi, tl.trans(xj), input_precision=PRECISION)
        keep = col_ok[None, :] & (rows[:, None] != cols[None, :])
        # sign(0) = 0, as torch's |.| backward gives; a NaN cosine contributes through X̂_j's NaN.
        sgn = tl.where(keep & (s > 0), 1.0, 0.0) - tl.where(keep & (s < 0), 1.0, 0.0)
        g = tl.dot(sgn.to(xj.dtype), xj, g, input_precision=PRECISION)

    # Back through x̂ = x / max(|x|, eps), in fp32 from the original x.
    g = g * tl.load(scale_ptr + b)
    x = tl.load(
        x_ptr + b * stride_xb + rows[:, None] * stride_xn + dims[None, :] * stride_xd, mask=tile_ok, other=0.0
    ).to(tl.float32)
    norm = tl.load(norm_ptr + b * N + rows, mask=row_ok, other=1.0)
    clamped = norm < EPS
    r = tl.where(clamped, EPS, norm)
    xh = x / r[:, None]
    proj = tl.sum(g * xh, axis=1)
    dx = tl.where(clamped[:, None], g, g - proj[:, None] * xh) / r[:, None]
    tl.store(dx_ptr + (b * N + rows[:, None]) * D + dims[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)


@dataclass(frozen=True)
class Blocks:
    """Block sizes and launch options, picked by rule (no timing-based autotune, so every process picks
    the same and results are bitwise reproducible). The rules are compiled for sm_80 and sm_90, spills
    checked, in the tests."""

    norm_m: int
    norm_d: int
    fwd: int
    fwd_k: int
    bwd_m: int
    bwd_n: int
    bwd_d: int
    num_warps: int
    num_stages: int


def pick_blocks(n: int, d: int, dtype: torch.dtype, interpreter: bool = INTERPRETER) -> Blocks:
    bwd_d = max(MIN_DOT.value, triton.next_power_of_2(d))
    if interpreter:
        # Every program instance costs milliseconds there: the smallest legal tiles keep tests short
        # while still crossing tile edges.
        tile = MIN_DOT.value
        return Blocks(16, min(64, bwd_d), tile, tile, tile, tile, bwd_d, 1, 1)
    fp32 = dtype == torch.float32
    fwd = 64 if n > 32 else max(MIN_DOT.value, triton.next_power_of_2(n))
    # The backward keeps X̂_I and a BLOCK_M x BLOCK_D fp32 accumulator resident. These are the largest
    # tiles that ptxas fits without spilling at 8 warps on both sm_80 and sm_90 (16-bit at BLOCK_D <= 128
    # gets wgmma, M = 64); test_kernels_compile_for_cuda keeps the spill count at 0.
    if fp32:
        bwd_m, bwd_n = {64: (32, 64), 128: (32, 32), 256: (32, 32), 512: (16, 32)}.get(max(64, bwd_d), (16, 16))
    else:
        bwd_m, bwd_n = {64: (64, 64), 128: (64, 64), 256: (32, 64), 512: (32, 64)}.get(max(64, bwd_d), (16, 32))
    return Blocks(
        norm_m=16,
        norm_d=min(256, bwd_d),
        fwd=fwd,
        fwd_k=32 if fp32 else 64,
        bwd_m=bwd_m,
        bwd_n=bwd_n,
        bwd_d=bwd_d,
        num_warps=8,
        num_stages=2,
    )


def cosine_forward(
    x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, N, D) fp32/fp16/bf16, any strides, CUDA or CPU under the interpreter; mask: (B, N) bool or None.

    Returns (Σ_{i≠j} |S_ij| per image (B,) fp64, xhat (B, N, D) contiguous in x.dtype, norm (B, N) fp32).
    """
    B, N, D = x.shape
    check_image_offsets(x)
    blk = pick_blocks(N, D, x.dtype)
    xhat = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    norm = torch.empty((B, N), dtype=torch.float32, device=x.device)
    mask_arg = mask.contiguous() if mask is not None else norm  # any pointer: HAS_MASK=False never reads it
    tiles = dict(BLOCK_M=blk.norm_m, BLOCK_D=blk.norm_d)
    _normalize_kernel[(triton.cdiv(N, blk.norm_m), B)](
        x, mask_arg, xhat, norm, N, D, *x.stride(), HAS_MASK=mask is not None, EPS=EPS, **tiles
    )
    nb = triton.cdiv(N, blk.fwd)
    num_tiles = nb * (nb + 1) // 2
    progs = max(1, min(num_tiles, triton.cdiv(num_programs_cap(x.device), B)))
    partial = torch.empty((B, progs), dtype=torch.float64, device=x.device)
    options = compile_options(x.dtype, blk.num_warps, blk.num_stages)
    _cosine_fwd_kernel[(progs, B)](xhat, partial, N, D, num_tiles, BLOCK=blk.fwd, BLOCK_K=blk.fwd_k, **options)
    return partial.sum(dim=1), xhat, norm


def cosine_backward(
    x: torch.Tensor, mask: torch.Tensor | None, xhat: torch.Tensor, norm: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """dL/dx for L = Σ_b scale_b/2 · Σ_{i≠j} |S_ij| (scale_b = 2 c_b · dL/dloss_b, (B,) fp32); returns a
    contiguous (B, N, D) tensor in x.dtype."""
    B, N, D = x.shape
    blk = pick_blocks(N, D, x.dtype)
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    tiles = dict(BLOCK_M=blk.bwd_m, BLOCK_N=blk.bwd_n, BLOCK_D=blk.bwd_d)
    options = compile_options(x.dtype, blk.num_warps, blk.num_stages)
    _cosine_bwd_kernel[(triton.cdiv(N, blk.bwd_m), B)](
        x, xhat, norm, scale, dx, N, D, *x.stride(), EPS=EPS, **tiles, **options
    )
    if mask is not None:
        # Exactly 0 whatever a padded token holds (NaN, or a magnitude that overflows x / eps).
        dx.masked_fill_(~mask.unsqueeze(-1), 0.0)
    return dx
