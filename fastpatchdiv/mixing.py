"""Patch mixing loss of Gong et al. (2021), "Vision Transformers with Patch Diversification": a shared linear
head classifies every patch token as the image its pixels came from (after CutMix, ``fastpatchdiv.cutmix``).

- ``mode="patch"`` (the paper): per image, the mean over its patches of CE(W·h_i + b, y_i). Computed as a
  fused linear cross-entropy: the B·N rows are walked in chunks whose (rows x C) logits are about the size
  of the tokens; each chunk's logits come from one matmul, one pass (the Triton kernel of
  ``kernels/mixing.py``, or the same steps in torch) turns them into row losses and overwrites them with
  the logit gradient, and dH = G W, dW += Gᵀ H, db += Σ G follow. The full (B·N, C) logits never exist.
- ``mode="region"`` (the official code): per image and region (patches that share a label), the mean
  token goes through the head. O(B·R·D): plain torch.
"""

import functools
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastpatchdiv._common import (
    check_backend,
    check_mask,
    check_reduction,
    no_autocast,
    pick_backend,
    reduce_images,
    work_dtype,
)

MODES = ("patch", "region")

# Rows per chunk: the chunk's logits (rows x C) are about as large as the tokens (M x D), Liger-Kernel's
# rule, rounded down to a power of two; at least _MIN_CHUNK_ROWS so the matmuls stay efficient when C
# dwarfs D. The PyTorch path also stops at _TORCH_MAX_CHUNK_ROWS (16 MiB of fp32 logits at C = 1000), so
# a chunk's softmax passes run in cache. Tests shrink the chunk through ``_chunk_rows``.
_MIN_CHUNK_ROWS = 256
_TORCH_MAX_CHUNK_ROWS = 4096


def _chunk_rows(m: int, d: int, c: int, backend: str) -> int:
    rows = max(1, m * d // max(c, 1))
    rows = max(_MIN_CHUNK_ROWS, 1 << (rows.bit_length() - 1))
    if backend == "torch":
        rows = min(rows, _TORCH_MAX_CHUNK_ROWS)
    return max(1, min(rows, m))


# ----------------------------------------------------------------------------------------------------
# The fused linear cross-entropy, shared by both backends
# ----------------------------------------------------------------------------------------------------


def _torch_cross_entropy_rows(z, target, valid, label_smoothing: float, write_grad: bool):
    """The PyTorch twin of ``kernels.mixing.cross_entropy_rows_``: (row losses, dℓ_r/dz_r or None) of the
    chunk ``z`` (m, C), same formulas (see that module's docstring). One fused log_softmax gives
    log p = z − lse; the gradient is formed in that buffer (``z`` itself is left alone)."""
    c = z.shape[1]
    keep_y = 1.0 - label_smoothing
    logp = torch.log_softmax(z, dim=1)
    soft = target.is_floating_point()
    if soft:
        q = target.to(logp.dtype)
        loss = torch.linalg.vecdot(q, logp).mul_(-keep_y)
    else:
        # Rows that do not count may hold ignore_index: point them at class 0, their results are masked.
        y = torch.where(valid, target, 0).unsqueeze(1)
        loss = logp.gather(1, y).squeeze(1).mul_(-keep_y)
    if label_smoothing > 0:
        loss -= (label_smoothing / c) * logp.sum(dim=1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not write_grad:
        return loss, None
    p = logp.exp_()
    if soft:
        mass = keep_y * q.sum(dim=1, keepdim=True) + label_smoothing  # Σ_c q'_c
        p.mul_(mass).sub_(q, alpha=keep_y)
    else:
        p.scatter_add_(1, y, torch.full(y.shape, -keep_y, dtype=p.dtype, device=p.device))
    if label_smoothing > 0:
        p.sub_(label_smoothing / c)
    # Rows that do not count get exact zeros, even where their logits are not finite.
    skip = (~valid).nonzero().squeeze(1)
    if skip.numel():
        p.index_fill_(0, skip, 0.0)
    return loss, p


def _counted(patch_targets: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """(B, N) bool: the patches that count (mask True and, for class indices, label != ignore_index)."""
    b, n = patch_targets.shape[:2]
    valid = torch.ones(b, n, dtype=torch.bool, device=patch_targets.device) if mask is None else mask
    if not patch_targets.is_floating_point():
        valid = valid & (patch_targets != ignore_index)
    return valid


def _check_label_range(targets: torch.Tensor, valid: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices outside [0, C) would read outside a logits row: refuse them (one host sync)."""
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"patch_targets must hold class indices in [0, {num_classes}) or ignore_index={ignore_index}; "
            f"got {int(targets[where])} at {where}"
        )


def _fused_linear_cross_entropy(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    label_smoothing: float,
    ignore_index: int,
    backend: str,
    grad_scale: torch.Tensor | None,
    need_tokens: bool,
    need_weight: bool,
    need_bias: bool,
):
    """Per-image losses (B,) and the gradients of Σ_b s_b · loss_b (s = ``grad_scale``, or all ones).

    tokens (B, N, D); weight (C, D); bias (C,) or None, all one dtype; targets (B, N) int64 or (B, N, C).
    Returns (loss in fp32/fp64, dtokens (B·N, D) in the tokens' dtype, dweight (C, D) and dbias (C,) in
    fp32/fp64), a gradient being None where not asked for. The logits are formed in the tokens' dtype on
    the Triton path (16-bit on the tensor cores, as F.linear would) and in fp32/fp64 on the PyTorch path.
    """
    B, N, D = tokens.shape
    C = weight.shape[0]
    M = B * N
    acc = work_dtype(tokens.dtype)
    compute = tokens.dtype if backend == "triton" else acc
    soft = targets.is_floating_point()
    valid = _counted(targets, mask, ignore_index)
    if not soft:
        _check_label_range(targets, valid, C, ignore_index)
    count = valid.sum(dim=1)
    inv_n = torch.where(count > 0, 1.0 / count.clamp_min(1).to(acc), torch.zeros((), dtype=acc, device=count.device))

    h = tokens.reshape(M, D)
    t = targets.reshape(M, C).contiguous() if soft else targets.reshape(M)
    v = valid.reshape(M)
    w = weight.to(compute)
    b = bias.to(compute) if bias is not None else None
    want = need_tokens or need_weight or need_bias
    if want:
        scale = inv_n if grad_scale is None else inv_n * grad_scale.to(acc)
        row_scale = scale.repeat_interleave(N)
        # One factor for every row (nothing ignored or masked): it rides on the dW GEMM as alpha and spares
        # a (rows x D) pass a chunk. One host sync.
        same = M > 0 and bool((row_scale == row_scale[0]).all())
        scale0 = float(row_scale[0]) if same else None
    row_loss = torch.empty(M, dtype=acc, device=tokens.device)
    dtokens = torch.empty(M, D, dtype=tokens.dtype, device=tokens.device) if need_tokens else None
    dweight = torch.zeros(C, D, dtype=acc, device=tokens.device) if need_weight else None
    dbias = torch.zeros(C, dtype=acc, device=tokens.device) if need_bias else None
    if backend == "triton":
        from fastpatchdiv.kernels.mixing import cross_entropy_rows_

        def cross_entropy_rows(z, t, v, eps, write_grad):
            return cross_entropy_rows_(z, t, v, eps, write_grad), z  # the gradient overwrites z

    else:
        cross_entropy_rows = _torch_cross_entropy_rows

    step = _chunk_rows(M, D, C, backend)
    for r0 in range(0, M, step):
        r1 = min(r0 + step, M)
        hc = h[r0:r1].to(compute)
        z = torch.addmm(b, hc, w.t()) if b is not None else torch.mm(hc, w.t())
        row_loss[r0:r1], g = cross_entropy_rows(z, t[r0:r1], v[r0:r1], label_smoothing, want)
        del z
        if not want:
            continue
        # g = dℓ_r/dz_r, unscaled: each row's factor s_r = s_b/n_b is applied on the D-wide side.
        s = row_scale[r0:r1].unsqueeze(1)
        factor = scale0 if scale0 is not None else s
        if need_tokens:
            out = dtokens[r0:r1]
            # mm, then scale: an addmm with beta=0 into ``out`` measured 2x slower on CPU.
            if out.dtype == compute:
                torch.mm(g, w, out=out).mul_(factor)
            else:
                out.copy_(torch.mm(g, w).mul_(factor))
        if need_weight:
            rhs, alpha = (hc, scale0) if scale0 is not None else (torch.mul(hc, s).to(compute), 1.0)
            if dweight.dtype == compute:
                dweight.addmm_(g.t(), rhs, alpha=alpha)
            else:
                dweight.add_(torch.mm(g.t(), rhs), alpha=alpha)
        if need_bias:
            # Σ_r s_r g_r as a GEMV: a column sum of g measured 30x slower on CPU.
            if dbias.dtype == compute:
                dbias.addmv_(g.t(), s.squeeze(1))
            else:
                dbias += torch.mv(g.t(), s.squeeze(1).to(compute))
        del g
    # Rows add up in fp64 (as the other losses' tiles), so fp32 keeps its relative accuracy at any N.
    loss = (row_loss.view(B, N).sum(dim=1, dtype=torch.float64) * inv_n.double()).to(acc)
    return loss, dtokens, dweight, dbias


# ----------------------------------------------------------------------------------------------------
# Library ops: each of the Function's passes is one opaque node for torch.compile
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpatchdiv::mixing_forward", mutates_args=())
def _mixing_forward_op(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    mask: torch.Tensor | None,
    label_smoothing: float,
    ignore_index: int,
    backend: str,
    need_tokens: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,), dtokens (B, N, D), dweight (C, D), dbias (C,)) for unit per-image factors; a gradient not
    asked for comes back as an empty (0,) tensor. Loss and dweight/dbias in fp32 (fp64 for fp64)."""
    with no_autocast(tokens.device.type):
        loss, dt, dw, db = _fused_linear_cross_entropy(
            tokens,
            weight,
            bias,
            patch_targets,
            mask,
            label_smoothing,
            ignore_index,
            backend,
            None,
            need_tokens,
            need_weight,
            need_bias,
        )
    acc = work_dtype(tokens.dtype)
    return (
        loss,
        dt.view(tokens.shape) if dt is not None else tokens.new_empty(0),
        dw if dw is not None else tokens.new_empty(0, dtype=acc),
        db if db is not None else tokens.new_empty(0, dtype=acc),
    )


@_mixing_forward_op.register_fake
def _(
    tokens,
    weight,
    bias,
    patch_targets,
    mask,
    label_smoothing,
    ignore_index,
    backend,
    need_tokens,
    need_weight,
    need_bias,
):
    acc = work_dtype(tokens.dtype)
    c, d = weight.shape
    return (
        tokens.new_empty(tokens.shape[0], dtype=acc),
        tokens.new_empty(tokens.shape) if need_tokens else tokens.new_empty(0),
        tokens.new_empty((c, d), dtype=acc) if need_weight else tokens.new_empty(0, dtype=acc),
        tokens.new_empty(c, dtype=acc) if need_bias else tokens.new_empty(0, dtype=acc),
    )


@torch.library.custom_op("fastpatchdiv::mixing_backward", mutates_args=())
def _mixing_backward_op(
    grad_per_image: torch.Tensor,
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    mask: torch.Tensor | None,
    label_smoothing: float,
    ignore_index: int,
    backend: str,
    need_tokens: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ_b grad_per_image[b] · loss_b by recomputing the chunks, each in its input's dtype; a
    gradient not asked for comes back as an empty (0,) tensor. The path of reduction="none", where each
    image's factor must reach every row before the rows are summed into dW and db."""
    with no_autocast(tokens.device.type):
        _, dt, dw, db = _fused_linear_cross_entropy(
            tokens,
            weight,
            bias,
            patch_targets,
            mask,
            label_smoothing,
            ignore_index,
            backend,
            grad_per_image,
            need_tokens,
            need_weight,
            need_bias,
        )
    return (
        dt.view(tokens.shape) if dt is not None else tokens.new_empty(0),
        dw.to(weight.dtype) if dw is not None else weight.new_empty(0),
        db.to(bias.dtype) if db is not None else weight.new_empty(0),
    )


@_mixing_backward_op.register_fake
def _(
    grad_per_image,
    tokens,
    weight,
    bias,
    patch_targets,
    mask,
    label_smoothing,
    ignore_index,
    backend,
    need_tokens,
    need_weight,
    need_bias,
):
    return (
        tokens.new_empty(tokens.shape) if need_tokens else tokens.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
        bias.new_empty(bias.shape) if need_bias else weight.new_empty(0),
    )


def _refuse_double_backward(backward):
    """``once_differentiable``, with its error node attached whenever the graph of the backward is built.

    once_differentiable only guards when grad_output requires grad; a loss's grad_output (ones) never does,
    so ``create_graph=True`` would silently give gradients without a graph behind them. Under create_graph
    the grad_output is swapped for a detached copy that requires grad, and differentiating the returned
    gradients raises once_differentiable's error.
    """
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            grad_outputs = tuple(g.detach().requires_grad_() for g in grad_outputs)
        return inner(ctx, *grad_outputs)

    return wrapper


class PatchMixingFunction(torch.autograd.Function):
    """Per-image patch mixing losses (B,) of ``mode="patch"``; checks happen in :func:`patch_mixing_loss`.

    ``apply(tokens (B, N, D), weight (C, D), bias (C,) or None, patch_targets, mask=None, label_smoothing=0.0,
    ignore_index=-100, backend="auto", uniform_grad=False, grad_enabled=True)``: tokens, weight and bias of
    one dtype, patch_targets int64 (B, N) or float (B, N, C), mask (B, N) bool.
    With ``uniform_grad`` (reduction "mean"/"sum": every image's loss gets the same factor) the forward
    also forms the gradients, for a unit factor per image, and the backward only scales them: dtokens per
    image by grad_output[b], dweight and dbias by grad_output[0]. Only pass it when the (B,) output is
    reduced by a plain mean or sum. Without it (reduction="none", any per-image weights) the backward
    recomputes the chunks with each image's factor folded into its rows before they are summed into
    dweight and dbias. ``grad_enabled`` is the caller's ``torch.is_grad_enabled()`` (forward always runs
    without grad). Double backward is refused.
    """

    @staticmethod
    def forward(
        ctx,
        tokens,
        weight,
        bias,
        patch_targets,
        mask=None,
        label_smoothing=0.0,
        ignore_index=-100,
        backend="auto",
        uniform_grad=False,
        grad_enabled=True,
    ):
        backend = pick_backend(tokens, backend)
        need = ctx.needs_input_grad
        ctx.need = (
            bool(grad_enabled and need[0]),
            bool(grad_enabled and need[1]),
            bool(grad_enabled and bias is not None and need[2]),
        )
        ctx.in_forward = bool(uniform_grad and any(ctx.need))
        ctx.options = (label_smoothing, ignore_index, backend)
        ctx.dtypes = (tokens.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if ctx.in_forward:
            loss, dt, dw, db = torch.ops.fastpatchdiv.mixing_forward(
                tokens, weight, bias, patch_targets, mask, label_smoothing, ignore_index, backend, *ctx.need
            )
            ctx.save_for_backward(dt, dw, db)
        else:
            loss = torch.ops.fastpatchdiv.mixing_forward(
                tokens, weight, bias, patch_targets, mask, label_smoothing, ignore_index, backend, False, False, False
            )[0]
            if any(ctx.need):
                ctx.save_for_backward(tokens, weight, bias, patch_targets, mask)
        return loss

    @staticmethod
    @_refuse_double_backward
    def backward(ctx, grad_output):
        need_t, need_w, need_b = ctx.need
        gt = gw = gb = None
        if ctx.in_forward:
            dt, dw, db = ctx.saved_tensors
            acc = dw.dtype
            g = grad_output.to(acc)
            # Under uniform_grad every entry of g is the same; g[:1].sum() is that value, and 0 when B = 0.
            g0 = g[:1].sum()
            if need_t:
                gt = (dt.to(acc) * g.view(-1, 1, 1)).to(ctx.dtypes[0])
            if need_w:
                gw = (dw * g0).to(ctx.dtypes[1])
            if need_b:
                gb = (db * g0).to(ctx.dtypes[2])
        elif any(ctx.need):
            tokens, weight, bias, patch_targets, mask = ctx.saved_tensors
            label_smoothing, ignore_index, backend = ctx.options
            options = (label_smoothing, ignore_index, backend, *ctx.need)
            gt, gw, gb = torch.ops.fastpatchdiv.mixing_backward(
                grad_output, tokens, weight, bias, patch_targets, mask, *options
            )
            gt, gw, gb = (x if n else None for x, n in zip((gt, gw, gb), ctx.need, strict=True))
        return gt, gw, gb, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# mode="region": the official code's pooled form, plain torch
# ----------------------------------------------------------------------------------------------------


def _region_loss(tokens, weight, bias, patch_targets, mask, label_smoothing, ignore_index):
    """Per-image region losses (B,); see :func:`patch_mixing_loss`. O(B·R·D + R·C) with R regions."""
    B, N, D = tokens.shape
    acc = work_dtype(tokens.dtype)
    valid = _counted(patch_targets, mask, ignore_index).reshape(-1)
    soft = patch_targets.is_floating_point()
    if soft:
        rows = patch_targets.reshape(B * N, -1)
        _, label_id = torch.unique(rows, dim=0, return_inverse=True)
        num_ids = int(label_id.max()) + 1 if label_id.numel() else 1
    else:
        _check_label_range(patch_targets, valid.view(B, N), weight.shape[0], ignore_index)
        label_id = patch_targets.reshape(-1)
        num_ids = weight.shape[0]
    image = torch.arange(B, device=tokens.device).repeat_interleave(N)
    key = (image * num_ids + label_id)[valid]
    regions, region_of_row = torch.unique(key, return_inverse=True)
    size = torch.bincount(region_of_row, minlength=regions.numel()).to(acc)
    rows_in = tokens.reshape(-1, D)[valid].to(acc)
    sums = tokens.new_zeros(regions.numel(), D, dtype=acc).index_add(0, region_of_row, rows_in)
    pooled = sums / size.unsqueeze(1)
    logits = F.linear(pooled, weight.to(acc), bias.to(acc) if bias is not None else None)
    region_image = regions // num_ids
    if soft:
        # The target of a region: the probability row of its first patch (all its rows are identical).
        first = torch.full((regions.numel(),), B * N, dtype=torch.long, device=tokens.device)
        first = first.scatter_reduce(0, region_of_row, valid.nonzero().squeeze(1), reduce="amin")
        target = rows[first].to(acc)
    else:
        target = regions % num_ids
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    count = torch.zeros(B, dtype=acc, device=tokens.device).index_add(0, region_image, size)
    share = size / count[region_image]
    return torch.zeros(B, dtype=acc, device=tokens.device).index_add(0, region_image, share * ce)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _check_inputs(tokens, weight, bias, patch_targets, mask, label_smoothing, ignore_index, mode):
    """Shapes, dtypes and options, checked once; returns (tokens3, targets3, mask3) with a batch dim."""
    for name, x in (("tokens", tokens), ("weight", weight), ("patch_targets", patch_targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must have a floating dtype (float32, float16, bfloat16, float64), got {tokens.dtype}")
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must have shape (B, N, D) or (N, D), got {tokens.dim()} dims: {tuple(tokens.shape)}")
    d = tokens.shape[-1]
    if d == 0:
        raise ValueError(f"tokens has an empty feature dimension (D = 0): shape {tuple(tokens.shape)}")
    if not weight.is_floating_point() or weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be a floating (C, D) tensor with C >= 1 and D = {d} (the tokens' last dim); "
            f"got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    c = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.shape != (c,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a floating tensor of shape ({c},), got {shape}")
    lead = tuple(tokens.shape[:-1])
    if patch_targets.is_floating_point():
        if tuple(patch_targets.shape) != lead + (c,):
            raise ValueError(
                f"soft patch_targets must have shape {lead + (c,)} (tokens' leading dims, then C); "
                f"got {tuple(patch_targets.shape)}"
            )
    elif patch_targets.dtype == torch.bool or patch_targets.is_complex():
        raise TypeError(
            f"patch_targets must be integer class indices or float probabilities, not {patch_targets.dtype}"
        )
    elif tuple(patch_targets.shape) != lead:
        raise ValueError(f"patch_targets of class indices must have shape {lead}, got {tuple(patch_targets.shape)}")
    if patch_targets.requires_grad:
        raise ValueError("patch_targets must not require grad (the loss gives them no gradient); pass .detach()")
    two_dim = tokens.dim() == 2
    tokens3 = tokens.unsqueeze(0) if two_dim else tokens
    mask3 = check_mask(mask, tokens3, two_dim)
    for name, x in (("weight", weight), ("bias", bias), ("patch_targets", patch_targets)):
        if x is not None and x.device != tokens.device:
            raise ValueError(f"{name} is on {x.device} but tokens are on {tokens.device}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    targets3 = patch_targets.unsqueeze(0) if two_dim else patch_targets
    if not targets3.is_floating_point():
        targets3 = targets3.long()
    return tokens3, targets3, mask3


def patch_mixing_loss(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    mode: str = "patch",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Patch mixing loss: a linear head W, b classifies each patch token as the image its pixels came from.

    The patch-wise mixing loss of Gong et al. 2021 ("Vision Transformers with Patch Diversification",
    sec. 4): after CutMix on the patch grid (:func:`fastpatchdiv.cutmix_patches` gives per-patch labels),
    a shared head is trained to tell each patch's source, which keeps patch tokens distinguishable.
    With logits z_i = W h_i + b and torch's ``F.cross_entropy`` per patch (label smoothing ε as torch
    defines it):

        hard label y_i:    ℓ_i = lse(z_i) − (1−ε)·z_iy − (ε/C)·Σ_c z_ic
        soft label q_i:    ℓ_i = (Σ_c q'_ic)·lse(z_i) − Σ_c q'_ic z_ic,   q' = (1−ε)·q + ε/C

    - ``mode="patch"`` (the paper's form): loss_b = (1/n_b) Σ_{i counted} ℓ_i, n_b = the number of counted
      patches of image b (mask True and label != ignore_index). An image with n_b = 0 has loss 0 and
      zero gradient.
    - ``mode="region"`` (the official code, ``deit/models.py`` of ChengyueGongR/PatchVisionTransformer):
      the counted patches of image b are grouped into regions r of equal target (the kept box and the
      pasted rest after CutMix; an identical probability row for soft targets), and
      loss_b = Σ_r (n_r/n_b) · CE(W·mean_{i in r} h_i + b, target_r). The official code uses
      KL(target_r ‖ softmax) of the same pooled logits, which differs from this CE by the target's entropy
      (a constant; 0 for hard labels without smoothing), and one box mask for the batch; this form takes
      any per-patch labels. O(B·R·D) plain torch; ``torch.unique`` makes it break a torch.compile graph.

    ``reduction="mean"`` is the mean over images of loss_b (the mean of per-image means). With equal-size
    images and nothing ignored it equals the mean over all B·N patches, the paper's "mean over patches";
    with ignored or masked patches each image still weighs 1/B, unlike ``F.cross_entropy``'s mean over
    all counted rows. "sum" sums loss_b; "none" returns the (B,) vector.

    Memory and work (mode="patch"): the B·N rows are processed in chunks whose (rows x C) logits are about
    the size of the tokens, so the (B·N, C) logits never exist. With reduction "mean"/"sum" and a backward
    to follow, the forward forms every gradient (2·M·D·C multiply-adds for the logits and dtokens, 1·M·D·C
    more for dweight; M = B·N) and the backward only scales them. With "none" the forward computes the
    logits only (M·D·C) and the backward recomputes them with each image's factor (3·M·D·C).

    Args:
        tokens: (B, N, D) or (N, D) patch tokens (prefix tokens removed), any strides.
        weight: (C, D) head weight. bias: (C,) or None.
        patch_targets: (B, N) class indices (any integer dtype; ignore_index allowed) or (B, N, C) float
            probabilities (e.g. per-patch mixed labels; ignore_index does not apply, use ``mask``). They
            get no gradient and must not require one.
        label_smoothing: ε in [0, 1], as ``F.cross_entropy``.
        reduction: "mean" (over images, default), "sum", or "none" for (B,).
        ignore_index: class index of patches that do not count (hard labels).
        mask: (B, N) bool, True = a real patch; False patches do not count (padding).
        mode: "patch" (default) or "region".
        backend: "auto" (default), "triton" or "torch". Auto runs the Triton kernel on CUDA tensors and on
            CPU tensors under TRITON_INTERPRET=1, the chunked PyTorch path otherwise and for float64.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (B,) with reduction="none". B = 0
        gives a (0,) tensor ("mean" of it is NaN, as torch's losses give).

    Dtypes: tokens, weight and bias are first promoted to one dtype (``torch.promote_types``): bf16
    tokens from autocast with an fp32 head run in fp32; pass a 16-bit head for the 16-bit path. The op
    runs with autocast disabled. On the Triton path 16-bit logits are formed in the input dtype on the
    tensor cores (as ``F.linear`` gives them) and the softmax, log-sum-exp and all gradient sums run in
    fp32; the PyTorch path computes in fp32 (fp64 for fp64). Gradients come back in each input's dtype.
    mode="patch" is deterministic on both paths: the same input gives the same bits, forward and
    backward (chunks run in order, each kernel row has one writer). mode="region" sums regions with
    ``index_add``: deterministic on CPU, torch's atomics on CUDA.

    Raises:
        TypeError: a non-tensor input, integer tokens, bool/complex targets, a non-int ignore_index.
        ValueError: bad shapes (tokens not 2-D/3-D, D = 0, weight not (C, D), bias not (C,), targets or
            mask not matching the tokens), class indices outside [0, C) that are not ignore_index,
            label_smoothing outside [0, 1], an unknown reduction/mode/backend, inputs on different
            devices, targets that require grad.

    Shape:
        tokens (B, N, D), weight (C, D), bias (C,), patch_targets (B, N) or (B, N, C), mask (B, N)
        -> () or (B,).

    Example:
        >>> head = torch.nn.Linear(384, 1000)
        >>> tokens = torch.randn(8, 196, 384, requires_grad=True)
        >>> labels = torch.randint(0, 1000, (8, 196))
        >>> loss = patch_mixing_loss(tokens, head.weight, head.bias, labels, label_smoothing=0.1)
        >>> loss.backward()
    """
    tokens3, targets3, mask3 = _check_inputs(
        tokens, weight, bias, patch_targets, mask, label_smoothing, ignore_index, mode
    )
    check_reduction(reduction)
    dtype = torch.promote_types(tokens3.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    tokens3, weight = tokens3.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    check_backend(backend)
    if mode == "region":  # plain torch whatever the backend
        with no_autocast(tokens3.device.type):
            per_image = _region_loss(tokens3, weight, bias, targets3, mask3, float(label_smoothing), int(ignore_index))
        return reduce_images(per_image, reduction)
    chosen = pick_backend(tokens3, backend)
    per_image = PatchMixingFunction.apply(
        tokens3,
        weight,
        bias,
        targets3,
        mask3,
        float(label_smoothing),
        int(ignore_index),
        chosen,
        reduction != "none",
        torch.is_grad_enabled(),
    )
    return reduce_images(per_image, reduction)


class PatchMixingLoss(nn.Module):
    """Module form of :func:`patch_mixing_loss` that owns its patch head (so an optimiser sees it).

    ``PatchMixingLoss(in_features, num_classes)`` creates ``self.head = nn.Linear(in_features, num_classes)``
    initialised as the official code's patch head (truncated normal, std 0.02; zero bias); or pass an
    existing linear layer as ``head``. ``forward(tokens, patch_targets, mask=None)``.

    Example:
        >>> crit = PatchMixingLoss(384, 1000, label_smoothing=0.1)
        >>> loss = crit(torch.randn(8, 196, 384), torch.randint(0, 1000, (8, 196)))
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int | None = None,
        *,
        head: nn.Linear | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        mode: str = "patch",
        backend: str = "auto",
    ):
        super().__init__()
        if head is None:
            if in_features is None or num_classes is None:
                raise ValueError("PatchMixingLoss needs in_features and num_classes, or an existing head")
            head = nn.Linear(in_features, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        elif not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.head = head
        self.label_smoothing = label_smoothing
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index
        self.mode = mode
        self.backend = backend

    def forward(self, tokens: torch.Tensor, patch_targets: torch.Tensor, mask: torch.Tensor | None = None):
        return patch_mixing_loss(
            tokens,
            self.head.weight,
            self.head.bias,
            patch_targets,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            mask=mask,
            mode=self.mode,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"
