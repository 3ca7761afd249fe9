"""Triton kernels of the patch-contrastive loss with ``negatives="all"`` (InfoNCE over all patches).

Per image, A (N, D) are the first-layer tokens, Z (N, D) the last-layer tokens, S = A Zᵀ / τ and
ℓ_i = lse_j(S_ij) − S_ii, the lse over the real columns j.

- ``_contrastive_lse_kernel``, row-stationary like FlashAttention's QKᵀ: a program owns a row block of
  one image and streams the column blocks of its split, keeping a running max and sum per row in fp32
  (log2 units: exp2 of S·log2(e) − max) and picking S_ii out of the diagonal tile. Where row blocks do
  not fill the GPU the columns are split across programs; the host merges the splits' (max, sum) in a
  fixed order. Nothing N x N: 3 floats per row and split.
- With a gradient, row strips (``shared/DESIGN.md``, "Row strips"): ``_contrastive_prob_kernel``
  recomputes a strip of S and writes P − I, P_ij = exp(S_ij − lse_i), to a scratch of rows x N in the
  operand dtype (FlashAttention casts P the same way for its dV product); ``strip_gemm`` then adds
  Pᵀ A_strip into dZ and, with ``detach_first=False``, writes (P − I) Z into the strip of dA, on the
  tensor cores at any D. The loss's upstream gradient is one scalar per image, so the backward only
  scales these sums (by g_b / (N_b τ), in ``fastpatchdiv/contrastive.py``). Work: N²·D for the lse, N²·D
  to recompute the strip, N²·D per gradient; 3·N²·D in all with the first layer detached, as a
  FlashAttention-shaped backward that recomputes S once, but without its BLOCK x D resident accumulator.

Loads are masked with ``other=0`` (a zero row or column adds nothing to a dot). Padded columns (j >= N)
are -inf before the row max, and every column block has at least one real column, so the running max
is finite after the first block. Columns the padding mask drops get MASKED_LOGIT, a finite floor: an
image with no real patch still has finite statistics (its loss is dropped on the host, its lse set to
+inf so its P is 0). The tokens of masked patches arrive zeroed, so they add nothing to any gradient.
Every output has one writer and every partial result is reduced in a fixed order: bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from fastpatchdiv.kernels._utils import (
    MIN_DOT,
    check_image_offsets,
    column_splits,
    launch,
    launch_target,
    operand_dtype,
    score_plan,
    strip_rows,
)
from fastpatchdiv.kernels.strip_gemm import strip_gemm

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
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
def _contrastive_lse_kernel(
    a_ptr,
    z_ptr,
    mask_ptr,
    max_ptr,
    sum_ptr,
    pos_ptr,
    N,
    D,
    stride_ab,
    stride_an,
    stride_ad,
    stride_zb,
    stride_zn,
    stride_zd,
    scale_log2,
    COLS_PER_SPLIT,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), splits, B): for row i of image b over the columns j of split s, in log2 units,
    m = max_j S_ij·log2 e, l = Σ_j 2^(S_ij·log2 e − m), and S_ii·log2 e where the split holds column i (else
    0); each stored at [s, b, i] of a (splits, B, N) fp32 buffer."""
    tl.static_assert(BLOCK_M >= MIN_DOT and BLOCK_N >= MIN_DOT and BLOCK_K >= MIN_DOT)
    b = tl.program_id(2).to(tl.int64)
    row_start = tl.program_id(0) * BLOCK_M
    rows, row_ok, a_rows = _block_rows(a_ptr + b * stride_ab, row_start, stride_an, N, BLOCK_M)
    z_base = z_ptr + b * stride_zb
    c_start = tl.program_id(1) * COLS_PER_SPLIT
    c_end = tl.minimum(N, c_start + COLS_PER_SPLIT)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(c_start, c_end, BLOCK_N):
        cols, col_ok, z_rows = _block_rows(z_base, col_start, stride_zn, c_end, BLOCK_N)
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
    out = (tl.program_id(1) * tl.num_programs(2) + b) * N + rows
    tl.store(max_ptr + out, m_i, mask=row_ok)
    tl.store(sum_ptr + out, l_i, mask=row_ok)
    tl.store(pos_ptr + out, pos, mask=row_ok)


@triton.jit
def _contrastive_prob_kernel(
    a_ptr,
    z_ptr,
    mask_ptr,
    lse2_ptr,
    p_ptr,
    N,
    D,
    ROW0,
    R,
    COLS_PER_SPLIT,
    stride_ab,
    stride_an,
    stride_ad,
    stride_zb,
    stride_zn,
    stride_zd,
    stride_pb,
    stride_pm,
    scale_log2,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_M), splits, images): P_ij − δ_ij for rows i = ROW0 .. ROW0 + R of image g and the
    columns j of split s, into ``p[g, i − ROW0, j]`` in p's dtype; masked columns get 0."""
    tl.static_assert(BLOCK_M >= MIN_DOT and BLOCK_N >= MIN_DOT and BLOCK_K >= MIN_DOT)
    g = tl.program_id(2).to(tl.int64)
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = ROW0 + local
    row_ok = (local < R) & (rows < N)
    a_rows = a_ptr + g * stride_ab + rows[:, None] * stride_an
    z_base = z_ptr + g * stride_zb
    # Rows past the strip get lse = +inf: their P is 0 and never stored.
    lse = tl.load(lse2_ptr + g * N + rows, mask=row_ok, other=float("inf"))
    c_start = tl.program_id(1) * COLS_PER_SPLIT
    c_end = tl.minimum(N, c_start + COLS_PER_SPLIT)
    for col_start in range(c_start, c_end, BLOCK_N):
        cols, col_ok, z_rows = _block_rows(z_base, col_start, stride_zn, c_end, BLOCK_N)
        s = _score_tile(
            a_rows, z_rows, row_ok, col_ok, D, stride_ad, stride_zd, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
        )
        p = tl.exp2(s * scale_log2 - lse[:, None])
        if HAS_MASK:
            real = tl.load(mask_ptr + g * N + cols, mask=col_ok, other=0) != 0
            p = tl.where(real[None, :], p, 0.0)
        p = tl.where(rows[:, None] == cols[None, :], p - 1.0, p)
        out = p_ptr + g * stride_pb + local[:, None] * stride_pm + cols[None, :]
        tl.store(out, p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


def pick_blocks(operands: str, target) -> dict:
    """The launch plan of each kernel (``score_plan``); the gradient GEMM plans its own (strip_gemm)."""
    return dict(lse=score_plan(operands, target), prob=score_plan(operands, target, stores_tile=True))


def _lse(a, z, mask, temperature, operands, plan, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse2 (B, N) fp32 in log2 units, +inf for an image without real patches; ℓ_i (B, N) fp32)."""
    B, N, D = a.shape
    row_blocks = triton.cdiv(N, plan.block_m)
    per_split = column_splits(target, row_blocks * B, N, plan.block_n)
    splits = triton.cdiv(N, per_split)
    m, sums, pos = torch.empty((3, splits, B, N), device=a.device, dtype=torch.float32).unbind(0)
    mask_arg = mask.contiguous() if mask is not None else m  # any pointer: HAS_MASK=False never reads it
    dpad = triton.cdiv(D, plan.block_k) * plan.block_k
    launch(
        _contrastive_lse_kernel,
        (row_blocks, splits, B),
        a,
        z,
        mask_arg,
        m,
        sums,
        pos,
        N,
        D,
        *a.stride(),
        *z.stride(),
        LOG2E / temperature,
        per_split,
        HAS_MASK=mask is not None,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        macs=B * row_blocks * triton.cdiv(N, plan.block_n) * plan.block_m * plan.block_n * dpad,
        operands=operands,
        **plan.options(operands),
    )
    # Merge the splits in a fixed order: lse = M + log2 Σ_s l_s 2^(m_s − M).
    top = m.amax(dim=0)
    lse2 = top + torch.log2((sums * torch.exp2(m - top)).sum(dim=0))
    row_loss = (lse2 - pos.sum(dim=0)) * LN2
    if mask is not None:
        # Such an image's lse is ~MASKED_LOGIT: +inf makes its P exactly 0, as for padded rows.
        lse2.masked_fill_(~mask.any(dim=1, keepdim=True), float("inf"))
    return lse2, row_loss


def _prob_strip(a, z, mask, lse2, p, r0, r, temperature, operands, plan, target) -> None:
    """P − I for rows r0 .. r0 + r of the images a, z hold, into p[:, :r]."""
    G, N, D = a.shape
    row_blocks = triton.cdiv(r, plan.block_m)
    per_split = column_splits(target, row_blocks * G, N, plan.block_n)
    dpad = triton.cdiv(D, plan.block_k) * plan.block_k
    launch(
        _contrastive_prob_kernel,
        (row_blocks, triton.cdiv(N, per_split), G),
        a,
        z,
        mask if mask is not None else lse2,
        lse2,
        p,
        N,
        D,
        r0,
        r,
        per_split,
        *a.stride(),
        *z.stride(),
        *p.stride()[:2],
        LOG2E / temperature,
        HAS_MASK=mask is not None,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        macs=G * row_blocks * triton.cdiv(N, plan.block_n) * plan.block_m * plan.block_n * dpad,
        operands=operands,
        **plan.options(operands),
    )


def contrastive_all_forward(
    a: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    operands: str,
    need_a: bool,
    need_z: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every kernel of the InfoNCE loss, forward and (where asked) the gradients' sums.

    a, z: (B, N, D) in the operand dtype (fp32 for "fp32"/"tf32", else bf16/fp16), any strides, with the
    masked tokens zeroed; mask (B, N) bool or None; operands: "fp32", "tf32", "bf16" or "fp16". Returns
    (ℓ (B, N) fp32, masked rows holding garbage; Σ_i dℓ_i/dA = (P − I) Z and Σ_i dℓ_i/dZ = (P − I)ᵀ A as
    (B, N, D) fp32 without the 1/τ, or None where not asked). No host synchronisation.
    """
    B, N, D = a.shape
    check_image_offsets(a, z)
    target = launch_target(a.device)
    plans = pick_blocks(operands, target)
    lse2, row_loss = _lse(a, z, mask, temperature, operands, plans["lse"], target)
    if not (need_a or need_z):
        return row_loss, None, None
    mask = mask.contiguous() if mask is not None else None
    plan = plans["prob"]
    dtype = operand_dtype(operands)
    group, rows = strip_rows(B, N, dtype.itemsize, plan.block_m, target)
    p = torch.empty((group, rows, N), dtype=dtype, device=a.device)
    da = torch.empty((B, N, D), dtype=torch.float32, device=a.device) if need_a else None
    dz = torch.empty((B, N, D), dtype=torch.float32, device=a.device) if need_z else None
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        ai, zi, pi = a[b0:b1], z[b0:b1], p[: b1 - b0]
        mi = mask[b0:b1] if mask is not None else None
        for r0 in range(0, N, rows):
            r = min(rows, N - r0)
            _prob_strip(ai, zi, mi, lse2[b0:b1], pi, r0, r, temperature, operands, plan, target)
            if need_a:
                strip_gemm(pi[:, :r], zi, da[b0:b1, r0 : r0 + r], False, operands, target)
            if need_z:
                strip_gemm(pi[:, :r].transpose(1, 2), ai[:, r0 : r0 + r], dz[b0:b1], r0 > 0, operands, target)
    return row_loss, da, dz
