"""Triton kernels of the patch cosine loss, and their launchers.

Per image, X is (N, D), x̂_i = x_i / max(|x_i|, eps), S = X̂ X̂ᵀ and, with N_b real patches (all N
without a mask),
    loss = c_b · Σ_{i≠j} |S_ij|,   c_b = 1/(N_b(N_b − 1)) (0 when N_b < 2).
- ``_normalize_kernel``: writes X̂ in the operand dtype (the tensor cores') and |x_i|; masked rows get
  x̂ = 0, so every later tile ignores them for free (|0| adds nothing, sign(0) = 0).
- ``_cosine_fwd_kernel`` (the loss alone, when no gradient is needed): tiles (I, J) with J >= I only (S
  is symmetric): an off-diagonal tile counts twice, a diagonal tile masks i = j. N²·D/2 multiply-adds.
- With a gradient, row strips (``shared/DESIGN.md``, "Row strips"): ``_cosine_strip_kernel`` computes a
  strip of rows of S against every column, sums |S| and writes sign(S) (int8, 0 on the diagonal and
  for masked patches) to a scratch of rows x N; ``strip_gemm`` then forms G = sign(S) X̂ on the tensor
  cores. N²·D + N²·D multiply-adds for the loss and G together, against 2.5·N²·D for a symmetric forward
  plus a backward that recomputes S. The loss's upstream gradient is one scalar per image, so the
  backward only scales G (and goes back through the normalisation, in ``fastpatchdiv/cosine.py``).

Why strips and not a FlashAttention-shaped backward: that keeps G_I (BLOCK_M x D, fp32) resident, 96 KB
at D = 384 and 192 KB at D = 768 for wgmma's 64 rows: it spills, or shrinks BLOCK_M below wgmma's 64, or
splits D across programs and recomputes S once per chunk. The strip GEMM is tensor-core shaped at any D;
its price is the scratch traffic, 2 bytes per score against 2·D multiply-adds per score.
Every output has one writer and every partial sum is reduced in a fixed order: bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from fastpatchdiv.kernels._utils import (
    MIN_DOT,
    LaunchPlan,
    check_image_offsets,
    column_splits,
    launch,
    launch_target,
    operand_dtype,
    score_plan,
    strip_rows,
)
from fastpatchdiv.kernels.strip_gemm import strip_gemm

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
def _gram_tile(
    base,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """X̂_rows X̂_colsᵀ for one (BLOCK_M, BLOCK_N) tile of one image's contiguous (N, D) x̂, in fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
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
    return s


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

        s = _gram_tile(base, rows, cols, row_ok, col_ok, D, BLOCK, BLOCK, BLOCK_K, PRECISION, UPCAST)
        keep = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        weight = tl.where(r > c, 2.0, 1.0)
        total += (weight * tl.sum(tl.where(keep, tl.abs(s), 0.0), axis=1)).to(tl.float64)
    tl.store(partial_ptr + b * num_progs + pid, tl.sum(total, axis=0))


@triton.jit
def _cosine_strip_kernel(
    xhat_ptr,
    sign_ptr,
    partial_ptr,
    N,
    D,
    ROW0,
    R,
    COLS_PER_SPLIT,
    stride_sb,
    stride_sm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_M), splits, images): rows ROW0 .. ROW0 + R of image g against the columns of
    split s. Writes sign(S_ij) (i ≠ j) to ``sign[g, i − ROW0, j]`` (int8) and Σ |S_ij| of the program to
    ``partial[g, s, row block]`` (fp64)."""
    tl.static_assert(BLOCK_M >= MIN_DOT and BLOCK_N >= MIN_DOT and BLOCK_K >= MIN_DOT)
    g = tl.program_id(2).to(tl.int64)
    base = xhat_ptr + g * N * D
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = ROW0 + local
    row_ok = (local < R) & (rows < N)
    c_start = tl.program_id(1) * COLS_PER_SPLIT
    c_end = tl.minimum(N, c_start + COLS_PER_SPLIT)

    total = tl.zeros([BLOCK_M], dtype=tl.float64)
    for c0 in range(c_start, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_end
        s = _gram_tile(base, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        keep = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        # A tile's row sums stay fp32 (BLOCK_N terms); across tiles they add up in fp64.
        total += tl.sum(tl.where(keep, tl.abs(s), 0.0), axis=1).to(tl.float64)
        # sign(0) = 0, as torch's |.| backward gives; a NaN cosine reaches G through X̂_j's NaN.
        sgn = tl.where(keep & (s > 0), 1, 0) - tl.where(keep & (s < 0), 1, 0)
        out = sign_ptr + g * stride_sb + local[:, None] * stride_sm + cols[None, :]
        tl.store(out, sgn.to(tl.int8), mask=row_ok[:, None] & col_ok[None, :])
    slot = (g * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(partial_ptr + slot, tl.sum(total, axis=0))


def pick_blocks(operands: str, target) -> dict[str, LaunchPlan]:
    """The launch plan of each kernel: score tiles by ``score_plan``; the normalisation streams rows."""
    norm = LaunchPlan(16, 16, 16, num_warps=1, num_stages=1) if target.arch == 0 else LaunchPlan(16, 256, 16, 4, 1)
    return dict(
        normalize=norm,
        triangle=score_plan(operands, target, square=True),
        strip=score_plan(operands, target, stores_tile=True),
    )


def _normalize(x: torch.Tensor, mask: torch.Tensor | None, operands: str, plan: LaunchPlan) -> torch.Tensor:
    B, N, D = x.shape
    xhat = torch.empty((B, N, D), dtype=operand_dtype(operands), device=x.device)
    norm = torch.empty((B, N), dtype=torch.float32, device=x.device)
    mask_arg = mask.contiguous() if mask is not None else norm  # any pointer: HAS_MASK=False never reads it
    launch(
        _normalize_kernel,
        (triton.cdiv(N, plan.block_m), B),
        x,
        mask_arg,
        xhat,
        norm,
        N,
        D,
        *x.stride(),
        HAS_MASK=mask is not None,
        EPS=EPS,
        BLOCK_M=plan.block_m,
        BLOCK_D=min(plan.block_n, max(16, triton.next_power_of_2(D))),
        **plan.options(),
    )
    return xhat


def _loss_only(xhat: torch.Tensor, operands: str, plan: LaunchPlan, target) -> torch.Tensor:
    """Σ_{i≠j} |S_ij| per image (B,) fp64 from the upper triangle of tiles."""
    B, N, D = xhat.shape
    nb = triton.cdiv(N, plan.block_m)
    num_tiles = nb * (nb + 1) // 2
    progs = max(1, min(num_tiles, triton.cdiv(2 * target.sms, B)))
    partial = torch.empty((B, progs), dtype=torch.float64, device=xhat.device)
    dpad = triton.cdiv(D, plan.block_k) * plan.block_k
    launch(
        _cosine_fwd_kernel,
        (progs, B),
        xhat,
        partial,
        N,
        D,
        num_tiles,
        BLOCK=plan.block_m,
        BLOCK_K=plan.block_k,
        macs=B * num_tiles * plan.block_m**2 * dpad,
        operands=operands,
        **plan.options(operands),
    )
    return partial.sum(dim=1)


def _loss_and_g(xhat: torch.Tensor, operands: str, plan: LaunchPlan, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{i≠j} |S_ij| per image (B,) fp64, G = sign(S) X̂ (B, N, D) fp32), strip by strip."""
    B, N, D = xhat.shape
    group, rows = strip_rows(B, N, 1, plan.block_m, target)
    sums = torch.zeros(B, dtype=torch.float64, device=xhat.device)
    g = torch.empty((B, N, D), dtype=torch.float32, device=xhat.device)
    sign = torch.empty((group, rows, N), dtype=torch.int8, device=xhat.device)
    dpad = triton.cdiv(D, plan.block_k) * plan.block_k
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        for r0 in range(0, N, rows):
            r = min(rows, N - r0)
            row_blocks = triton.cdiv(r, plan.block_m)
            per_split = column_splits(target, row_blocks * (b1 - b0), N, plan.block_n)
            splits = triton.cdiv(N, per_split)
            partial = torch.empty((b1 - b0, splits, row_blocks), dtype=torch.float64, device=xhat.device)
            launch(
                _cosine_strip_kernel,
                (row_blocks, splits, b1 - b0),
                xhat[b0:b1],
                sign,
                partial,
                N,
                D,
                r0,
                r,
                per_split,
                *sign.stride()[:2],
                BLOCK_M=plan.block_m,
                BLOCK_N=plan.block_n,
                BLOCK_K=plan.block_k,
                macs=(b1 - b0) * row_blocks * triton.cdiv(N, plan.block_n) * plan.block_m * plan.block_n * dpad,
                operands=operands,
                **plan.options(operands),
            )
            sums[b0:b1] += partial.sum(dim=(1, 2))
            strip_gemm(sign[: b1 - b0, :r], xhat[b0:b1], g[b0:b1, r0 : r0 + r], False, operands, target)
    return sums, g


def cosine_forward(
    x: torch.Tensor, mask: torch.Tensor | None, operands: str, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every kernel of the cosine loss, forward and (with ``need_grad``) backward.

    x: (B, N, D) fp32/fp16/bf16, any strides, CUDA (or CPU under the interpreter, or meta under the static
    report); mask: (B, N) bool or None; operands: "fp32", "tf32", "bf16" or "fp16", the dtype and
    precision of the matrix work. Returns (Σ_{i≠j} |S_ij| per image, (B,) fp64; G = Σ_j sign(S_ij) x̂_j
    over j ≠ i, (B, N, D) fp32, or None without ``need_grad``). No host synchronisation.
    """
    check_image_offsets(x)
    target = launch_target(x.device)
    plans = pick_blocks(operands, target)
    xhat = _normalize(x, mask, operands, plans["normalize"])
    if not need_grad:
        return _loss_only(xhat, operands, plans["triangle"], target), None
    return _loss_and_g(xhat, operands, plans["strip"], target)
