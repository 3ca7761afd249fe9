"""Triton kernels of the patch cosine loss, and their launchers.

Per image, X is (N, D), x̂_i = x_i / max(|x_i|, eps), S = X̂ X̂ᵀ and
    loss = 1/(N(N-1)) · Σ_{i≠j} |S_ij|.
- ``_normalize_kernel``: one pass over X writes X̂ (in the input dtype, for the tensor cores) and |x_i|.
- ``_cosine_fwd_kernel``: tiles (I, J) with J >= I only (S is symmetric): an off-diagonal tile counts
  twice, a diagonal tile masks i = j. Persistent programs walk the triangle of tiles and each writes
  its own partial sum: deterministic, no atomics, and nothing N x N anywhere.
- ``_cosine_bwd_kernel``: G = 2c · (sign(S) ∘ offdiag) X̂. A program owns row block I, keeps X̂_I and
  G_I resident and streams every column block J, recomputing the S tile (FlashAttention's backward
  shape): each G_I has exactly one writer, so the result is bitwise reproducible. The epilogue goes
  back through the normalisation in fp32 from the original x:
  dx_i = (g_i − (g_i·x̂_i) x̂_i) / |x_i|, or g_i / eps where the norm was clamped.
Work: forward N²·D/2 multiply-adds per image, backward 2·N²·D (recompute S, then sign(S) X̂).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.kernels._utils import dot_precision, next_pow2, num_programs_cap, upcast_loads

EPS = 1e-12


@triton.jit
def _normalize_kernel(
    x_ptr,
    xhat_ptr,
    norm_ptr,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    x_rows = x_ptr + b * stride_xb + rows[:, None].to(tl.int64) * stride_xn
    out_rows = xhat_ptr + (b * N + rows[:, None]) * D

    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < D)
        v = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(v * v, axis=1)
    norm = tl.sqrt_rn(sumsq)
    inv = 1.0 / tl.maximum(norm, EPS, propagate_nan=tl.PropagateNan.ALL)
    tl.store(norm_ptr + b * N + rows, norm, mask=row_ok)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < D)
        v = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_rows + cols[None, :], (v * inv[:, None]).to(xhat_ptr.dtype.element_ty), mask=mask)


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
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    base = xhat_ptr + b * N * D
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)

    total = tl.zeros([BLOCK], dtype=tl.float32)
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
            a = tl.load(
                base + rows[:, None].to(tl.int64) * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            bt = tl.load(
                base + cols[None, :].to(tl.int64) * D + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            s = tl.dot(a, bt, s, input_precision=PRECISION)
        keep = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        weight = tl.where(r > c, 2.0, 1.0)
        total += weight * tl.sum(tl.where(keep, tl.abs(s), 0.0), axis=1)
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
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = xhat_ptr + b * N * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dims < D
    tile_ok = row_ok[:, None] & d_ok[None, :]

    xi = tl.load(base + rows[:, None].to(tl.int64) * D + dims[None, :], mask=tile_ok, other=0.0)
    if UPCAST:
        xi = xi.to(tl.float32)
    g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        xj = tl.load(
            base + cols[:, None].to(tl.int64) * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
        )
        if UPCAST:
            xj = xj.to(tl.float32)
        s = tl.dot(xi, tl.trans(xj), input_precision=PRECISION)
        keep = col_ok[None, :] & (rows[:, None] != cols[None, :])
        # sign(0) = 0, as torch's |.| backward gives; a NaN cosine contributes through X̂_j's NaN.
        sgn = tl.where(keep & (s > 0), 1.0, 0.0) - tl.where(keep & (s < 0), 1.0, 0.0)
        g = tl.dot(sgn.to(xj.dtype), xj, g, input_precision=PRECISION)

    # g *= 2c · dL/dloss_b; then back through x̂ = x / max(|x|, eps), in fp32 from the original x.
    g = g * tl.load(scale_ptr + b)
    x = tl.load(
        x_ptr + b * stride_xb + rows[:, None].to(tl.int64) * stride_xn + dims[None, :] * stride_xd,
        mask=tile_ok,
        other=0.0,
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
    """Block sizes and launch options. Picked by rule, not autotuned: the rules are compiled for sm_80 and
    sm_90 in the tests; tune them on a GPU with ``python -m benchmarks``."""

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
    bwd_d = max(16, next_pow2(d))
    if interpreter:
        # Every program instance costs milliseconds there: the smallest legal tiles keep tests short
        # while still crossing tile edges.
        return Blocks(16, min(64, bwd_d), 16, 16, 16, 16, bwd_d, 1, 1)
    fp32 = dtype == torch.float32
    fwd = 64 if n > 32 else max(16, next_pow2(n))
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


def cosine_forward(x: torch.Tensor):
    """x: (B, N, D) fp32/fp16/bf16, any strides, CUDA or CPU under the interpreter.

    Returns (per_image_loss (B,) fp32, xhat (B, N, D) contiguous in x.dtype, norm (B, N) fp32).
    """
    B, N, D = x.shape
    blk = pick_blocks(N, D, x.dtype)
    xhat = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    norm = torch.empty((B, N), dtype=torch.float32, device=x.device)
    _normalize_kernel[(triton.cdiv(N, blk.norm_m), B)](
        x,
        xhat,
        norm,
        N,
        D,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        EPS=EPS,
        BLOCK_M=blk.norm_m,
        BLOCK_D=blk.norm_d,
    )
    nb = triton.cdiv(N, blk.fwd)
    num_tiles = nb * (nb + 1) // 2
    progs = max(1, min(num_tiles, triton.cdiv(num_programs_cap(x.device), B)))
    partial = torch.empty((B, progs), dtype=torch.float32, device=x.device)
    _cosine_fwd_kernel[(progs, B)](
        xhat,
        partial,
        N,
        D,
        num_tiles,
        BLOCK=blk.fwd,
        BLOCK_K=blk.fwd_k,
        PRECISION=dot_precision(x.dtype),
        UPCAST=upcast_loads(x.dtype),
        num_warps=blk.num_warps,
        num_stages=blk.num_stages,
    )
    loss = (partial.double().sum(dim=1) / (N * (N - 1))).float()
    return loss, xhat, norm


def cosine_backward(x: torch.Tensor, xhat: torch.Tensor, norm: torch.Tensor, grad_per_image: torch.Tensor):
    """dL/dx for L = Σ_b grad_per_image[b] · loss_b; returns a contiguous (B, N, D) tensor in x.dtype."""
    B, N, D = x.shape
    blk = pick_blocks(N, D, x.dtype)
    scale = (grad_per_image.float() * (2.0 / (N * (N - 1)))).contiguous()
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    _cosine_bwd_kernel[(triton.cdiv(N, blk.bwd_m), B)](
        x,
        xhat,
        norm,
        scale,
        dx,
        N,
        D,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        EPS=EPS,
        BLOCK_M=blk.bwd_m,
        BLOCK_N=blk.bwd_n,
        BLOCK_D=blk.bwd_d,
        PRECISION=dot_precision(x.dtype),
        UPCAST=upcast_loads(x.dtype),
        num_warps=blk.num_warps,
        num_stages=blk.num_stages,
    )
    return dx
