"""Triton kernels of the patch-contrastive loss with ``negatives="all"`` (InfoNCE over all patches).

Per image, A (N, D) are the first-layer tokens, Z (N, D) the last-layer tokens, S = A Zᵀ / τ and
ℓ_i = lse_j(S_ij) − S_ii. The tiling follows FlashAttention's QKᵀ (see shared/DESIGN.md):

- forward, row-stationary: a program owns row block I of one image and streams column blocks J,
  keeping a running max and sum per row in fp32 (in log2 units: exp2 of S·log2(e) − max). It stores
  lse_i (log2 units) and ℓ_i: 2·N floats per image, nothing N x N.
- backward, dZ (column-stationary): a program owns column block J (and one chunk of the feature
  dimension) and streams row blocks I: it recomputes S_IJ, P = exp(S − lse) and accumulates
  (P − I)ᵀ A_I. dA (row-stationary, only with ``detach_first=False``): owns row block I, streams J,
  accumulates (P − I) Z_J. Each output element is written by exactly one program in a fixed order:
  deterministic, no atomics. The per-image factor g_b / (N τ) is applied once at the store.

The feature dimension of the gradient is split into BLOCK_DV chunks over the grid, so a program's
accumulator stays BLOCK_N x BLOCK_DV; each chunk recomputes its S tiles. With D <= BLOCK_DV (128 by
default) that is the ideal 2·N²·D MACs for dZ; with D = 768 and BLOCK_DV = 128 it is (1 + 6)·N²·D.
Recompute is the price for never holding more than a tile; the autotune list offers BLOCK_DV = 256.

Loads are masked with ``other=0`` (a zero row or column adds nothing to a dot); padded columns are
set to -inf before the row max, and every column block has at least one real column, so the running
max is finite after the first block and ``-inf - -inf`` never happens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.kernels._utils import dot_precision, next_pow2, upcast_loads

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _score_tile(
    a_base,
    z_base,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_an,
    stride_ad,
    stride_zn,
    stride_zd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """A_I Z_Jᵀ for one (BLOCK_M, BLOCK_N) tile, fp32, looping over the features in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(
            a_base + rows[:, None] * stride_an + ks[None, :] * stride_ad,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        z = tl.load(
            z_base + cols[:, None] * stride_zn + ks[None, :] * stride_zd,
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            z = z.to(tl.float32)
        acc = tl.dot(a, tl.trans(z), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _contrastive_all_fwd_kernel(
    a_ptr,
    z_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B): lse2_i = log2 Σ_j 2^(S_ij·log2 e) and ℓ_i = (lse2_i − S_ii·log2 e)·ln 2."""
    pid_m = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    a_base = a_ptr + b * stride_ab
    z_base = z_ptr + b * stride_zb
    row_start = pid_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        s = _score_tile(
            a_base,
            z_base,
            rows,
            cols,
            row_ok,
            col_ok,
            D,
            stride_an,
            stride_ad,
            stride_zn,
            stride_zd,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
        )
        s = tl.where(col_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
        # Only the tiles that cross the diagonal hold a positive; skip the select elsewhere.
        if (col_start < row_start + BLOCK_M) & (col_start + BLOCK_N > row_start):
            pos += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
    lse2 = m_i + tl.log2(l_i)
    out = b * N + rows
    tl.store(lse2_ptr + out, lse2, mask=row_ok)
    tl.store(loss_ptr + out, (lse2 - pos) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _contrastive_all_bwd_dz_kernel(
    a_ptr,
    z_ptr,
    lse2_ptr,
    coef_ptr,
    dz_ptr,
    N,
    D,
    stride_ab,
    stride_an,
    stride_ad,
    stride_zb,
    stride_zn,
    stride_zd,
    stride_gb,
    stride_gn,
    stride_gd,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DV), B): dZ_J = coef_b · Σ_I (P_IJ − I_IJ)ᵀ A_I, coef_b = g_b/(N τ)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    a_base = a_ptr + b * stride_ab
    z_base = z_ptr + b * stride_zb
    col_start = pid_n * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < D

    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for row_start in range(0, N, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        s = _score_tile(
            a_base,
            z_base,
            rows,
            cols,
            row_ok,
            col_ok,
            D,
            stride_an,
            stride_ad,
            stride_zn,
            stride_zd,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
        )
        # Padded rows get lse = +inf, so their P is exactly 0.
        lse2 = tl.load(lse2_ptr + b * N + rows, mask=row_ok, other=float("inf"))
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        ds = tl.where(rows[:, None] == cols[None, :], p - 1.0, p)
        a_v = tl.load(
            a_base + rows[:, None] * stride_an + dv[None, :] * stride_ad,
            mask=row_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a_v = a_v.to(tl.float32)
        # Like FlashAttention's dV: P goes to the input dtype so 16-bit inputs use the 16-bit MMA.
        acc = tl.dot(tl.trans(ds.to(a_v.dtype)), a_v, acc, input_precision=PRECISION)
    coef = tl.load(coef_ptr + b)
    tl.store(
        dz_ptr + b * stride_gb + cols[:, None] * stride_gn + dv[None, :] * stride_gd,
        (acc * coef).to(dz_ptr.dtype.element_ty),
        mask=col_ok[:, None] & dv_ok[None, :],
    )


@triton.jit
def _contrastive_all_bwd_da_kernel(
    a_ptr,
    z_ptr,
    lse2_ptr,
    coef_ptr,
    da_ptr,
    N,
    D,
    stride_ab,
    stride_an,
    stride_ad,
    stride_zb,
    stride_zn,
    stride_zd,
    stride_gb,
    stride_gn,
    stride_gd,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), cdiv(D, BLOCK_DV), B): dA_I = coef_b · Σ_J (P_IJ − I_IJ) Z_J."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    a_base = a_ptr + b * stride_ab
    z_base = z_ptr + b * stride_zb
    row_start = pid_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < D
    lse2 = tl.load(lse2_ptr + b * N + rows, mask=row_ok, other=float("inf"))

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        s = _score_tile(
            a_base,
            z_base,
            rows,
            cols,
            row_ok,
            col_ok,
            D,
            stride_an,
            stride_ad,
            stride_zn,
            stride_zd,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
        )
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        ds = tl.where(rows[:, None] == cols[None, :], p - 1.0, p)
        # Padded columns: Z rows load as 0, so their P adds nothing.
        z_v = tl.load(
            z_base + cols[:, None] * stride_zn + dv[None, :] * stride_zd,
            mask=col_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            z_v = z_v.to(tl.float32)
        acc = tl.dot(ds.to(z_v.dtype), z_v, acc, input_precision=PRECISION)
    coef = tl.load(coef_ptr + b)
    tl.store(
        da_ptr + b * stride_gb + rows[:, None] * stride_gn + dv[None, :] * stride_gd,
        (acc * coef).to(da_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------

# Default GPU launch parameters (also what the ahead-of-time compile test builds). 64 x 64 score tiles
# with 64-wide feature chunks: fp32 tiles are 16 KiB each, so two or three pipeline stages fit in the
# shared memory of sm80 and sm90 alike.
FWD_DEFAULTS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
BWD_DEFAULTS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_DV=128, num_warps=8, num_stages=2)
# Under the interpreter every program instance costs milliseconds: the smallest legal tiles.
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DV=16)


def _fwd_configs():
    out = []
    # The first is FWD_DEFAULTS (spill-free in fp32 on sm_80/sm_90); the 64-deep ones suit 16-bit inputs.
    for bm, bn, bk, w, st in ((64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 2)):
        out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st))
    return out


def _bwd_configs():
    out = []
    # The first is BWD_DEFAULTS (spill-free in fp32 on sm_80/sm_90).
    configs = (
        (64, 64, 32, 128, 8, 2),
        (64, 64, 64, 128, 8, 2),
        (64, 64, 64, 64, 4, 3),
        (32, 64, 64, 256, 8, 2),
        (64, 128, 64, 128, 8, 2),
    )
    for bm, bn, bk, bdv, w, st in configs:
        out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DV=bdv), num_warps=w, num_stages=st))
    return out


def _prune_dv(configs, named_args, **kwargs):
    """Drop feature chunks far wider than D (they would only compute padding)."""
    d = named_args["D"]
    keep = [c for c in configs if c.kwargs["BLOCK_DV"] <= max(64, next_pow2(d))]
    return keep or configs[:1]


# Tuning happens per (N, D) bucket on CUDA only; the interpreter calls the plain jit functions.
_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=["N", "D"])(_contrastive_all_fwd_kernel)
_dz_tuned = triton.autotune(configs=_bwd_configs(), key=["N", "D"], prune_configs_by={"early_config_prune": _prune_dv})(
    _contrastive_all_bwd_dz_kernel
)
_da_tuned = triton.autotune(configs=_bwd_configs(), key=["N", "D"], prune_configs_by={"early_config_prune": _prune_dv})(
    _contrastive_all_bwd_da_kernel
)


def _common_args(a: torch.Tensor):
    return dict(
        UPCAST=upcast_loads(a.dtype),
        PRECISION=dot_precision(a.dtype),
    )


def contrastive_all_forward(a: torch.Tensor, z: torch.Tensor, temperature: float):
    """Launch the forward kernel on (B, N, D) tokens of one dtype (any strides).

    Returns (lse2, row_loss), both (B, N) float32: lse2 is the row log-sum-exp in log2 units (what the
    backward needs), row_loss the per-patch loss ℓ_i in natural units.
    """
    B, N, D = a.shape
    lse2 = torch.empty((B, N), device=a.device, dtype=torch.float32)
    loss = torch.empty((B, N), device=a.device, dtype=torch.float32)
    args = (
        a,
        z,
        lse2,
        loss,
        N,
        D,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        z.stride(0),
        z.stride(1),
        z.stride(2),
        LOG2E / temperature,
    )
    if INTERPRETER or a.device.type != "cuda":
        blocks = INTERPRETER_BLOCKS
        grid = (triton.cdiv(N, blocks["BLOCK_M"]), B)
        _contrastive_all_fwd_kernel[grid](
            *args,
            BLOCK_M=blocks["BLOCK_M"],
            BLOCK_N=blocks["BLOCK_N"],
            BLOCK_K=blocks["BLOCK_K"],
            **_common_args(a),
        )
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)  # noqa: E731
        with torch.cuda.device(a.device):
            _fwd_tuned[grid](*args, **_common_args(a))
    return lse2, loss


def _backward_launch(which: str, a, z, lse2, coef, out):
    B, N, D = a.shape
    jit_kernel = _contrastive_all_bwd_dz_kernel if which == "dz" else _contrastive_all_bwd_da_kernel
    tuned = _dz_tuned if which == "dz" else _da_tuned
    owner = "BLOCK_N" if which == "dz" else "BLOCK_M"
    args = (
        a,
        z,
        lse2,
        coef,
        out,
        N,
        D,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        z.stride(0),
        z.stride(1),
        z.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    return jit_kernel, tuned, owner, args


def contrastive_all_backward(
    a: torch.Tensor,
    z: torch.Tensor,
    lse2: torch.Tensor,
    coef: torch.Tensor,
    temperature: float,
    need_a: bool,
    need_z: bool,
):
    """Launch the backward kernels: dZ_b = coef_b (P_b − I)ᵀ A_b and dA_b = coef_b (P_b − I) Z_b.

    ``coef`` is (B,) float32 holding g_b / (N τ), g_b being the gradient of image b's loss, and ``lse2``
    is what ``contrastive_all_forward`` returned. Returns
    (dA or None, dZ or None) in the input dtype, contiguous (B, N, D).
    """
    B, N, D = a.shape
    scale_log2 = LOG2E / temperature
    coef = coef.to(device=a.device, dtype=torch.float32).contiguous()
    results = {}
    for which, needed in (("da", need_a), ("dz", need_z)):
        if not needed:
            results[which] = None
            continue
        out = torch.empty((B, N, D), device=a.device, dtype=a.dtype)
        jit_kernel, tuned, owner, args = _backward_launch(which, a, z, lse2, coef, out)
        if INTERPRETER or a.device.type != "cuda":
            blocks = INTERPRETER_BLOCKS
            grid = (triton.cdiv(N, blocks[owner]), triton.cdiv(D, blocks["BLOCK_DV"]), B)
            jit_kernel[grid](*args, scale_log2, **blocks, **_common_args(a))
        else:
            grid = lambda meta, owner=owner: (  # noqa: E731
                triton.cdiv(N, meta[owner]),
                triton.cdiv(D, meta["BLOCK_DV"]),
                B,
            )
            with torch.cuda.device(a.device):
                tuned[grid](*args, scale_log2, **_common_args(a))
        results[which] = out
    return results["da"], results["dz"]


__all__ = [
    "FWD_DEFAULTS",
    "BWD_DEFAULTS",
    "INTERPRETER_BLOCKS",
    "contrastive_all_forward",
    "contrastive_all_backward",
]
