"""Triton kernel of the patch mixing loss (the cross-entropy half of a fused linear cross-entropy), and its launcher.

The caller (``fastpatchdiv/mixing.py``) walks the M = B·N patch rows in chunks: it forms a chunk's logits
Z = H Wᵀ + b with one matmul, runs ``cross_entropy_rows_`` on it, and reads the logit gradient back
out of the same buffer for dH = G W, dW += Gᵀ H and db += Σ G. Per row r with logits z (C classes),
label smoothing ε and lse = log Σ_c exp(z_c):
- hard label y:  ℓ = lse − (1−ε)·z_y − (ε/C)·Σ_c z_c,       g_c = p_c − ε/C − (1−ε)·[c = y]
- soft label q:  q' = (1−ε)·q + ε/C,  ℓ = (Σq')·lse − Σ_c q'_c z_c,   g_c = (Σq')·p_c − q'_c
with p = softmax(z): torch's ``F.cross_entropy`` for class indices and for probabilities. Rows that do not
count (ignore_index, padding) get ℓ = 0 and g = 0. g is the gradient of ℓ itself, unscaled: the per-image
factors (1/n_b, grad_output) are applied by the caller on the D-wide side, so fp16 buffers never hold
p/n_b (which underflows fp16 at a few thousand patches).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpatchdiv.kernels import INTERPRETER

# Neutral element of the running max and of exp(): a masked lane loaded as -inf adds exp(-inf) = 0.
NEG_INF = tl.constexpr(float("-inf"))

# Widest class block a program holds, and the fp32 elements of one [BLOCK_M, BLOCK_C] tile on a GPU:
# 4096 fp32 over 8 warps is 16 registers a thread per live tile, well clear of spilling on sm_80/sm_90.
MAX_BLOCK_C = 2048
GPU_TILE_ELEMENTS = 4096
GPU_NUM_WARPS = 8
# Under the interpreter every program instance costs milliseconds: 16 rows a program, and a 256-wide class
# block so that C = 1000 still crosses block edges.
INTERP_BLOCK_M = 16
INTERP_MAX_BLOCK_C = 256


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    target_ptr,
    valid_ptr,
    loss_ptr,
    M,
    C,
    stride_lm,
    stride_tm,
    label_smoothing,
    SOFT: tl.constexpr,
    SMOOTH: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Row losses of one chunk of logits and, with WRITE_GRAD, their logit gradients written over the logits.

    Grid: (cdiv(M, BLOCK_M),); a program owns BLOCK_M rows and all C classes of them, so every output
    element has exactly one writer (bitwise reproducible, no atomics).
    Pass 1 streams the class blocks once with a running max m and sum s (online softmax, fp32) and the
    sums the loss needs (z_y, Σ z_c; or Σ q_c z_c, Σ q_c). lse = m + log s. Pass 2 re-reads each block,
    forms p = exp(z − lse) and stores g (formulas in the module docstring) in the logits' dtype.
    logits: (M, C), row stride ``stride_lm``, unit class stride. target: (M,) int64 class indices, or
    (M, C) probabilities with row stride ``stride_tm`` when SOFT. valid: (M,) int8, 0 = row does not
    count. loss: (M,) fp32.
    """
    # Rows run over all B·N patches, so row·stride passes 2^31 at large batches: int64 from the program id on
    # (kernels/_utils.py's rule widens the image index; here the row is the image-and-patch index).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    # Rows past M read row M - 1 (real data, so no -inf - -inf = NaN) and are masked at every store.
    rows_in = tl.minimum(rows, M - 1)
    valid = tl.load(valid_ptr + rows_in) != 0
    if not SOFT:
        y = tl.load(target_ptr + rows_in)
    row_base = logits_ptr + rows_in[:, None] * stride_lm
    out_base = logits_ptr + rows[:, None] * stride_lm
    eps_over_c = label_smoothing / C
    keep_y = 1.0 - label_smoothing

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_z = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_c z_c, needed only with label smoothing
    dot_t = tl.zeros([BLOCK_M], dtype=tl.float32)  # z_y (hard) or Σ_c q_c z_c (soft)
    sum_q = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_c q_c (soft)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        # other=-inf: the neutral element of the max and of the exp-sum.
        z = tl.load(row_base + cols[None, :], mask=col_ok[None, :], other=NEG_INF).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        # The -inf fill must add nothing to the plain sums below.
        z0 = tl.where(col_ok[None, :], z, 0.0)
        if SMOOTH:
            sum_z += tl.sum(z0, axis=1)
        if SOFT:
            # other=0: the neutral element of Σ q_c and Σ q_c z_c.
            q = tl.load(target_ptr + rows_in[:, None] * stride_tm + cols[None, :], mask=col_ok[None, :], other=0.0)
            q = q.to(tl.float32)
            dot_t += tl.sum(q * z0, axis=1)
            sum_q += tl.sum(q, axis=1)
        else:
            dot_t += tl.sum(tl.where(cols[None, :] == y[:, None], z0, 0.0), axis=1)
    lse = m_i + tl.log(s_i)

    if SOFT:
        mass = keep_y * sum_q + label_smoothing  # Σ_c q'_c
        loss = mass * lse - keep_y * dot_t
    else:
        loss = lse - keep_y * dot_t
    if SMOOTH:
        loss -= eps_over_c * sum_z
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)

    if WRITE_GRAD:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            col_ok = cols < C
            tile_ok = row_ok[:, None] & col_ok[None, :]
            # Only this program's own rows are read back (the pass overwrites them); other=0 is a finite
            # filler for lanes that are never stored.
            z = tl.load(out_base + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            p = tl.exp(z - lse[:, None])
            if SOFT:
                q = tl.load(target_ptr + rows_in[:, None] * stride_tm + cols[None, :], mask=col_ok[None, :], other=0.0)
                q = q.to(tl.float32)
                g = mass[:, None] * p - (keep_y * q + eps_over_c)
            else:
                g = p - eps_over_c - tl.where(cols[None, :] == y[:, None], keep_y, 0.0)
            # Rows that do not count get an exact zero, even where their logits are not finite.
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(out_base + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=tile_ok)


@dataclass(frozen=True)
class Blocks:
    """Block sizes and launch options. Picked by rule, never by timing, so results are bitwise reproducible
    across processes; the GPU rule is compiled for sm_80 and sm_90 in the tests (no spills)."""

    block_m: int
    block_c: int
    num_warps: int


def pick_blocks(num_classes: int, interpreter: bool = INTERPRETER) -> Blocks:
    if interpreter:
        return Blocks(INTERP_BLOCK_M, min(INTERP_MAX_BLOCK_C, max(16, triton.next_power_of_2(num_classes))), 1)
    block_c = min(MAX_BLOCK_C, max(16, triton.next_power_of_2(num_classes)))
    return Blocks(block_m=GPU_TILE_ELEMENTS // block_c, block_c=block_c, num_warps=GPU_NUM_WARPS)


def cross_entropy_rows_(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
    write_grad: bool,
) -> torch.Tensor:
    """Row losses (M,) fp32 of ``logits`` (M, C); with ``write_grad`` the logits are overwritten by dℓ_r/dz_r.

    logits: fp32/fp16/bf16 with unit class stride (CUDA, or CPU under the interpreter). target: (M,) int64
    class indices (already checked to lie in [0, C) where ``valid``) or (M, C) float probabilities with
    unit class stride. valid: (M,) bool.
    """
    M, C = logits.shape
    assert logits.stride(1) == 1, "logits need a unit class stride"
    soft = target.is_floating_point()
    if soft:
        assert target.shape == (M, C) and target.stride(1) == 1, "soft targets need shape (M, C), unit class stride"
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    if M == 0:
        return loss
    blk = pick_blocks(C)
    _cross_entropy_rows_kernel[(triton.cdiv(M, blk.block_m),)](
        logits,
        target,
        valid.to(torch.int8),
        loss,
        M,
        C,
        logits.stride(0),
        target.stride(0) if soft else 0,
        float(label_smoothing),
        SOFT=soft,
        SMOOTH=label_smoothing > 0,
        WRITE_GRAD=write_grad,
        BLOCK_M=blk.block_m,
        BLOCK_C=blk.block_c,
        num_warps=blk.num_warps,
    )
    return loss
