"""The gradient GEMM of a score strip, shared by the cosine and the contrastive "all" backward.

Both losses have a per-image gradient of the form T X, T an N x N matrix that only its strip of rows
ever holds: T = sign(S) for the cosine loss, P − I (or its transpose) for InfoNCE. The score-strip
kernel of each op writes its strip of T to a scratch of rows x N elements; this kernel multiplies it by
the tokens on the tensor cores:

    out_b (M x D, fp32)  =  (or +=)  T_b (M x K, any dtype, any strides)  @  X_b (K x D, operand dtype)

A program owns one BLOCK_M x BLOCK_N output tile and one range of K; T's tile is converted to the
operand dtype after its load (int8 sign, bf16/fp16/fp32 P), so the product runs on wgmma / mma at any
D. Where the output tiles do not fill the GPU, K is split across programs into an fp32 workspace that
one torch sum reduces in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpatchdiv.kernels._utils import MIN_DOT, LaunchPlan, Target, grid_splits, launch, operand_dtype, stages


@triton.jit
def _strip_gemm_kernel(
    t_ptr,
    x_ptr,
    out_ptr,
    M,
    K,
    D,
    K_PER_SPLIT,
    stride_tb,
    stride_tm,
    stride_tk,
    stride_xb,
    stride_xk,
    stride_xd,
    stride_os,
    stride_ob,
    stride_om,
    stride_od,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M)·cdiv(D, BLOCK_N), splits, images): out[split, b] = T_b[:, K range] X_b[K range]."""
    tl.static_assert(BLOCK_M >= MIN_DOT and BLOCK_N >= MIN_DOT and BLOCK_K >= MIN_DOT)
    n_tiles = tl.cdiv(D, BLOCK_N)
    tile_m = tl.program_id(0) // n_tiles
    tile_n = tl.program_id(0) % n_tiles  # neighbouring programs share T's rows: T is read from HBM once
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D
    t_rows = t_ptr + b * stride_tb + rows[:, None] * stride_tm
    x_cols = x_ptr + b * stride_xb + cols[None, :] * stride_xd
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        # Padding loads as 0 on both sides: it adds nothing to the product.
        x = tl.load(x_cols + ks[:, None] * stride_xk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        t = tl.load(t_rows + ks[None, :] * stride_tk, mask=row_ok[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(t.to(x.dtype), x, acc, input_precision=PRECISION)

    out = out_ptr + split * stride_os + b * stride_ob + rows[:, None] * stride_om + cols[None, :] * stride_od
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def pick_blocks(d: int, operands: str, t_bytes: int, target: Target) -> LaunchPlan:
    """Output tiles of 128 rows (two warpgroups of wgmma's 64) by up to 128 features; K chunks of 64
    16-bit or 32 fp32 values; as many stages as the target's shared memory holds."""
    if target.arch == 0:
        return LaunchPlan(MIN_DOT.value, MIN_DOT.value, MIN_DOT.value, num_warps=1, num_stages=1)
    op_bytes = operand_dtype(operands).itemsize
    block_m, block_n, block_k = 128, min(128, max(64, triton.next_power_of_2(d))), 32 if op_bytes == 4 else 64
    if operands == "fp32":
        # Exact fp32 runs on FFMA, whose operands live in registers: 64 x 64 tiles do not spill.
        block_m, block_n, block_k = 64, 64, 16
    most, warps = 4, 8
    if target.arch == 100 and operands != "fp32":
        # triton's tcgen05 pipeline caps the registers a thread holds: 4 warps, 2 stages and, for TF32,
        # 16-deep K chunks fit there (the static report).
        most, warps = 2, 4
        block_k = 16 if operands == "tf32" else block_k
    # A stage holds T's tile as loaded and converted, and X's tile.
    per_stage = block_m * block_k * (t_bytes + op_bytes) + block_k * block_n * op_bytes
    return LaunchPlan(block_m, block_n, block_k, num_warps=warps, num_stages=stages(target, per_stage, most=most))


def strip_gemm(t: torch.Tensor, x: torch.Tensor, out: torch.Tensor, accumulate: bool, operands: str, target: Target):
    """out (+)= t @ x per image. t: (G, M, K) int8 or float, any strides; x: (G, K, D) in the operand
    dtype, any strides; out: (G, M, D) fp32 (a view is fine). Returns nothing: writes ``out``."""
    G, M, K = t.shape
    D = x.shape[2]
    plan = pick_blocks(D, operands, t.element_size(), target)
    tiles = triton.cdiv(M, plan.block_m) * triton.cdiv(D, plan.block_n)
    k_blocks = triton.cdiv(K, plan.block_k)
    splits = grid_splits(target, tiles * G, k_blocks)
    k_per_split = triton.cdiv(k_blocks, splits) * plan.block_k
    splits = triton.cdiv(K, k_per_split)
    direct = splits == 1 and not accumulate
    # Split K, or adding to ``out``, goes through an fp32 workspace that torch reduces into ``out``: an
    # in-kernel read-modify-write would hold a second accumulator tile in registers (it spills on sm_100).
    dest = out if direct else torch.empty((splits, G, M, D), dtype=torch.float32, device=out.device)
    launch(
        _strip_gemm_kernel,
        (tiles, splits, G),
        t,
        x,
        dest,
        M,
        K,
        D,
        k_per_split,
        *t.stride(),
        *x.stride(),
        0 if direct else dest.stride(0),
        *(out.stride() if direct else dest.stride()[1:]),
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        macs=tiles * G * k_blocks * plan.block_m * plan.block_n * plan.block_k,
        operands=operands,
        **plan.options(operands),
    )
    if not direct:
        total = dest.sum(dim=0) if splits > 1 else dest[0]  # a fixed reduction order: the same bits every run
        if accumulate:
            out.add_(total)
        else:
            out.copy_(total)
