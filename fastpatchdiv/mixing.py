"""Patch mixing loss of Gong et al. (2021), "Vision Transformers with Patch Diversification": a shared linear
head classifies every patch token as the image its pixels came from (after CutMix, ``fastpatchdiv.cutmix``).

- ``mode="patch"`` (the paper): per image, the mean over its patches of CE(W·h_i + b, y_i). A fused linear
  cross-entropy: the B·N rows are walked in chunks whose (rows x C) logits are about the size of the
  tokens; each chunk's logits come from one matmul, one pass (the Triton kernel of
  ``fastpatchdiv.kernels.mixing``, or the same steps in torch) turns them into row losses and overwrites
  them with the logit gradient, and dH = G W, dW += Gᵀ H, db += Σ G follow. The full (B·N, C) logits never
  exist. Two library ops (``fastpatchdiv::mixing_forward`` / ``_backward``) keep it opaque to
  ``torch.compile``, and ``PatchMixingFunction`` carries autograd.
- ``mode="region"`` (the official code): per image and region (patches that share a label), the mean
  token goes through the head. O(B·R·D): plain torch.

Shape:
    tokens: (B, N, D) or (N, D); weight: (C, D); bias: (C,); patch_targets: (B, N) class indices or
    (B, N, C) probabilities; mask: (B, N) bool; loss: scalar, or (B,) for ``reduction="none"``.

Example:
    >>> head = torch.nn.Linear(384, 10)
    >>> tokens, labels = torch.randn(8, 196, 384, requires_grad=True), torch.randint(0, 10, (8, 196))
    >>> patch_mixing_loss(tokens, head.weight, head.bias, labels, label_smoothing=0.1).backward()
"""

from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from fastpatchdiv._common import (
    check_backend,
    check_mask,
    check_precision,
    check_reduction,
    check_tokens,
    matmul_precision,
    no_autocast,
    operand_dtype,
    pick_backend,
    reduce_images,
    refuse_double_backward,
    resolve_operands,
    round_operands,
    work_dtype,
)

MODES = ("patch", "region")
# The keyword arguments of patch_mixing_loss that PatchMixingLoss holds.
SETTINGS = ("label_smoothing", "reduction", "ignore_index", "mode", "backend", "precision")

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
# mode="patch": the fused linear cross-entropy, its library ops and the autograd Function
# ----------------------------------------------------------------------------------------------------


def _torch_cross_entropy_rows(
    z: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, label_smoothing: float, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _counted(targets: torch.Tensor, mask: torch.Tensor | None, ignore_index: int, num_classes: int) -> torch.Tensor:
    """(B, N) bool: the patches that count (mask True and, for class indices, label != ignore_index).

    A counted class index outside [0, C) would read outside a logits row: refused here, inside the op or
    the region path, because the check needs the values (one host sync)."""
    valid = torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device) if mask is None else mask
    if targets.is_floating_point():
        return valid
    valid = valid & (targets != ignore_index)
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"patch_targets must hold class indices in [0, {num_classes}) or ignore_index={ignore_index}; "
            f"got {int(targets[where])} at {where}"
        )
    return valid


def _grad_buffers(tokens: torch.Tensor, num_classes: int, need: tuple[bool, bool, bool]):
    """dtokens (B, N, D) in the tokens' dtype (every row gets written), dweight (C, D) and dbias (C,) zeroed
    in fp32/fp64; an empty (0,) tensor for each gradient not asked for (op outputs may not be None)."""
    acc = work_dtype(tokens.dtype)
    return (
        tokens.new_empty(tokens.shape if need[0] else (0,)),
        tokens.new_zeros((num_classes, tokens.shape[-1]) if need[1] else (0,), dtype=acc),
        tokens.new_zeros((num_classes,) if need[2] else (0,), dtype=acc),
    )


@torch.library.custom_op("fastpatchdiv::mixing_forward", mutates_args=())
def mixing_forward_op(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    patch_targets: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    grad: torch.Tensor | None,
    label_smoothing: float,
    ignore_index: int,
    backend: str,
    operands: str,
    need_tokens: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,), dtokens, dweight, dbias): per-image losses and the gradients of Σ_b s_b·loss_b, with
    s = ``grad`` (B,), or ones when it is None, for the gradients the ``need_*`` flags ask for.

    tokens (B, N, D), weight (C, D) and bias (C,) or None of one dtype; patch_targets (B, N) int64 or
    (B, N, C) float; mask (B, N) bool; the tensors that may be None come last. dtokens comes back in the
    tokens' dtype, the loss, dweight and dbias in fp32 (fp64 for fp64); a gradient not asked for is an
    empty (0,) tensor. The Function's forward calls it with ``grad=None``; the backward of
    ``uniform_grad=False`` calls it again with the per-image factors, which must reach every row before
    the rows are summed into dweight and dbias. The GEMMs' operands are ``operands`` ("fp32", "tf32",
    "bf16", "fp16" or "fp64", from ``resolve_operands``): held in that dtype on the Triton path (16-bit
    logits on the tensor cores, as F.linear gives them under autocast), rounded to it and multiplied in
    fp32/fp64 on the PyTorch path.
    """
    B, N, D = tokens.shape
    C = weight.shape[0]
    M = B * N
    need = (need_tokens, need_weight, need_bias)
    want = any(need)
    acc = work_dtype(tokens.dtype)
    compute = operand_dtype(operands) if backend == "triton" else acc
    soft = patch_targets.is_floating_point()
    valid = _counted(patch_targets, mask, ignore_index, C)
    count = valid.sum(dim=1)
    inv_n = torch.where(count > 0, 1.0 / count.clamp_min(1).to(acc), torch.zeros((), dtype=acc, device=count.device))
    dtokens, dweight, dbias = _grad_buffers(tokens, C, need)
    if want and M > 0:
        # Each row's factor s_b/n_b is applied on the D-wide side (g stays the gradient of ℓ_r itself).
        image_scale = inv_n if grad is None else inv_n * grad.to(acc)
        row_scale = image_scale.repeat_interleave(N)
        # dW and db take the largest factor as the GEMMs' alpha and each row's factor relative to it, so a
        # 16-bit operand never holds 1/n_b itself (below fp16's normal range from n_b ≈ 16k patches). When
        # every row has the same factor (nothing ignored or masked, equal image factors), that is all, and
        # a (rows x D) pass a chunk is spared. One host sync.
        lo, hi = torch.stack(torch.aminmax(image_scale)).tolist()
        uniform = lo == hi
        top = lo if uniform else max(abs(lo), abs(hi))
    if backend == "triton":
        from fastpatchdiv.kernels.mixing import cross_entropy_rows_

        def cross_entropy_rows(z, t, v, eps, write_grad):
            return cross_entropy_rows_(z, t, v, eps, write_grad), z  # the gradient overwrites z

    else:
        cross_entropy_rows = _torch_cross_entropy_rows

    h, dt = tokens.reshape(M, D), dtokens.view(M, D) if need_tokens else None
    t = patch_targets.reshape(M, C).contiguous() if soft else patch_targets.reshape(M)
    v = valid.reshape(M)
    row_loss = torch.empty(M, dtype=acc, device=tokens.device)
    step = _chunk_rows(M, D, C, backend)
    with no_autocast(tokens.device.type), matmul_precision(operands):
        w = round_operands(weight.to(compute), operands)
        b = bias.to(compute) if bias is not None else None
        for r0 in range(0, M, step):
            rows = slice(r0, min(r0 + step, M))
            hc = round_operands(h[rows].to(compute), operands)
            z = torch.addmm(b, hc, w.t()) if b is not None else torch.mm(hc, w.t())
            row_loss[rows], g = cross_entropy_rows(z, t[rows], v[rows], label_smoothing, want)
            del z
            if not want:
                continue
            s = row_scale[rows].unsqueeze(1)
            if need_tokens:
                # mm, then scale: torch's CPU addmm with beta=0 into an output slice takes a slow path.
                if dt.dtype == compute:
                    torch.mm(g, w, out=dt[rows]).mul_(top if uniform else s)
                else:
                    dt[rows] = torch.mm(g, w).mul_(top if uniform else s)
            rel = torch.ones_like(s, dtype=compute) if uniform else (s / top).to(compute)
            if need_weight:
                rhs = hc if uniform else hc * rel
                if dweight.dtype == compute:
                    dweight.addmm_(g.t(), rhs, alpha=top)
                else:
                    dweight.add_(torch.mm(g.t(), rhs), alpha=top)
            if need_bias:
                # Σ_r s_r g_r as a GEMV, which BLAS does well, rather than a strided column sum of g.
                dbias.add_(torch.mv(g.t(), rel.squeeze(1)), alpha=top)
            del g
    # Rows add up in fp64 (as the other losses' tiles), so fp32 keeps its relative accuracy at any N.
    loss = (row_loss.view(B, N).sum(dim=1, dtype=torch.float64) * inv_n.double()).to(acc)
    return loss, dtokens, dweight, dbias


@mixing_forward_op.register_fake
def _(tokens, weight, patch_targets, bias, mask, grad, label_smoothing, ignore_index, backend, operands, *need):
    return tokens.new_empty(tokens.shape[0], dtype=work_dtype(tokens.dtype)), *_grad_buffers(tokens, len(weight), need)


@torch.library.custom_op("fastpatchdiv::mixing_backward", mutates_args=())
def mixing_backward_op(
    grad: torch.Tensor, dtokens: torch.Tensor, dweight: torch.Tensor, dbias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``uniform_grad``: the forward's gradients (unit factor per image) scaled by ``grad`` (B,).

    dtokens is scaled image by image, so any ``grad`` is exact for it. dweight and dbias are sums over every
    image, so only a factor shared by all images can scale them: raise unless ``grad`` is uniform (one host
    sync). Outputs have the shapes and dtypes of the inputs (empty stays empty).
    """
    g = grad.to(dweight.dtype)
    if (dweight.numel() or dbias.numel()) and not bool(torch.isclose(g, g[:1], rtol=0, atol=0, equal_nan=True).all()):
        raise RuntimeError(
            "PatchMixingFunction with uniform_grad=True forms dweight and dbias in the forward for one factor "
            "shared by every image, but the per-image losses got different gradients (from "
            f"{g.min().item():.6g} to {g.max().item():.6g}); weigh images unevenly only with uniform_grad=False "
            "(patch_mixing_loss uses it for reduction='none')"
        )
    g0 = g[:1].sum()  # the shared factor, 0 when B = 0
    scaled_tokens = (
        (dtokens.to(g.dtype) * g.view(-1, 1, 1)).to(dtokens.dtype) if dtokens.dim() == 3 else dtokens.clone()
    )
    return scaled_tokens, dweight * g0, dbias * g0


@mixing_backward_op.register_fake
def _(grad, dtokens, dweight, dbias):
    return tuple(torch.empty_like(x) for x in (dtokens, dweight, dbias))


class PatchMixingFunction(torch.autograd.Function):
    """Per-image patch mixing losses (B,) of ``mode="patch"``; checks happen in :func:`patch_mixing_loss`.

    ``apply(tokens (B, N, D), weight (C, D), bias (C,) or None, patch_targets, mask=None, label_smoothing=0.0,
    ignore_index=-100, backend="auto", uniform_grad=False, grad_enabled=True, precision="auto")``: tokens,
    weight and bias of
    one dtype, patch_targets int64 (B, N) or float (B, N, C), mask (B, N) bool with the masked tokens
    already zeroed (a NaN there would reach dW). ``grad_enabled`` is the
    caller's ``torch.is_grad_enabled()`` (a Function's forward always runs without grad).

    With ``uniform_grad`` (for a plain mean or sum of the (B,) output) the forward also forms the
    gradients for a unit factor per image, and the backward only scales them: dtokens image by image,
    dweight and dbias by the one factor every image shares. A backward whose per-image gradients differ
    raises (dweight and dbias would be wrong) unless only the tokens need a gradient. Without it (any
    per-image weights) the backward recomputes the chunks with each image's factor folded into its rows.
    Double backward raises.
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
        precision="auto",
    ):
        backend = pick_backend(tokens, backend)
        operands = resolve_operands(tokens.dtype, tokens.device.type, precision)
        ctx.need = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        ctx.in_forward = bool(uniform_grad and any(ctx.need))
        ctx.options = (label_smoothing, ignore_index, backend, operands)
        ctx.dtypes = (tokens.dtype, weight.dtype, bias.dtype if bias is not None else None)
        inputs = (tokens, weight, patch_targets, bias, mask)
        formed = ctx.need if ctx.in_forward else (False, False, False)
        loss, *grads = torch.ops.fastpatchdiv.mixing_forward(*inputs, None, *ctx.options, *formed)
        # The input a refused second derivative hangs on: the head's weight when it trains (alive anyway).
        anchor = weight if ctx.need[1] else bias if ctx.need[2] else tokens
        if any(ctx.need):
            ctx.save_for_backward(anchor, *(grads if ctx.in_forward else inputs))
        return loss

    @staticmethod
    def backward(ctx, grad):
        if not any(ctx.need):
            return (None,) * 11
        anchor, *saved = ctx.saved_tensors
        with torch.no_grad():
            if ctx.in_forward:
                grads = torch.ops.fastpatchdiv.mixing_backward(grad, *saved)
            else:
                grads = torch.ops.fastpatchdiv.mixing_forward(*saved, grad, *ctx.options, *ctx.need)[1:]
            grads = tuple(g.to(t) if n else None for g, t, n in zip(grads, ctx.dtypes, ctx.need, strict=True))
        return *refuse_double_backward("patch_mixing_loss", anchor, grads), *(None,) * 8


# ----------------------------------------------------------------------------------------------------
# mode="region": the official code's pooled form, plain torch
# ----------------------------------------------------------------------------------------------------


def _region_loss(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-image region losses (B,) over the counted patches ``valid`` (B, N); see :func:`patch_mixing_loss`.
    O(B·R·D + R·C) with R regions."""
    B, N, D = tokens.shape
    acc = work_dtype(tokens.dtype)
    valid = valid.reshape(-1)
    soft = patch_targets.is_floating_point()
    if soft:
        # The distinct probability rows are the labels: a region's target is the row its id names.
        labels, label_id = torch.unique(patch_targets.reshape(B * N, -1), dim=0, return_inverse=True)
        num_ids = max(1, labels.shape[0])
    else:
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
    target = labels[regions % num_ids].to(acc) if soft else regions % num_ids
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    count = torch.zeros(B, dtype=acc, device=tokens.device).index_add(0, region_image, size)
    share = size / count[region_image]
    return torch.zeros(B, dtype=acc, device=tokens.device).index_add(0, region_image, share * ce)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _check_settings(
    label_smoothing: float, reduction: str, ignore_index: int, mode: str, backend: str
) -> tuple[float, str, int, str, str]:
    """The settings (``SETTINGS``, in that order) checked and as float/int, by the function and the Module."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_reduction(reduction)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return float(label_smoothing), reduction, int(ignore_index), mode, check_backend(backend)


def _check_inputs(tokens, weight, bias, patch_targets, mask):
    """Shapes, dtypes and devices; returns (tokens, targets, mask) with a batch dim, targets int64 or float."""
    x3 = check_tokens("tokens", tokens)
    two_dim = tokens.dim() == 2
    for name, x in (("weight", weight), ("patch_targets", patch_targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    d = tokens.shape[-1]
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
    mask3 = check_mask(mask, x3, two_dim)
    for name, x in (("weight", weight), ("bias", bias), ("patch_targets", patch_targets)):
        if x is not None and x.device != tokens.device:
            raise ValueError(f"{name} is on {x.device} but tokens are on {tokens.device}")
    targets3 = patch_targets.unsqueeze(0) if two_dim else patch_targets
    return x3, targets3 if targets3.is_floating_point() else targets3.long(), mask3


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
    precision: str = "auto",
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
        tokens: (B, N, D) or (N, D) patch tokens (prefix tokens removed), N >= 2, any strides.
        weight: (C, D) head weight. bias: (C,) or None.
        patch_targets: (B, N) class indices (any integer dtype; ignore_index allowed) or (B, N, C) float
            probabilities (e.g. per-patch mixed labels; ignore_index does not apply, use ``mask``). They
            get no gradient and must not require one.
        label_smoothing: ε in [0, 1], as ``F.cross_entropy``.
        reduction: "mean" (over images, default), "sum", or "none" for (B,).
        ignore_index: class index of patches that do not count (hard labels).
        mask: (B, N) bool ((N,) for 2-D tokens), True = a real patch; False patches do not count (padding):
            they may hold anything (NaN, inf) and get exactly zero gradient.
        mode: "patch" (default) or "region".
        backend: "auto" (default), "triton" or "torch". Auto runs the Triton kernel on CUDA tensors and on
            CPU tensors under TRITON_INTERPRET=1, the chunked PyTorch path otherwise and for float64.
        precision: the operands of the logit and gradient GEMMs, as in :func:`patch_cosine_loss`: "auto"
            (the autocast dtype under ``torch.autocast``, else the inputs' dtype with float32 following
            ``torch.get_float32_matmul_precision()``), "fp32", "tf32", "bf16" or "fp16" (mode="patch").

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (B,) with reduction="none". B = 0
        gives a (0,) tensor ("mean" of it is NaN, as torch's losses give).

    Dtypes: tokens, weight and bias are first promoted to one dtype (``torch.promote_types``): bf16
    tokens from autocast with an fp32 head run in fp32; pass a 16-bit head for the 16-bit path. The op
    runs with autocast disabled. On the Triton path 16-bit logits are formed in the input dtype on the
    tensor cores (as ``F.linear`` gives them), the softmax and log-sum-exp run in fp32, the logit
    gradients G and each chunk's G·W, Gᵀ·H and Σ G are rounded to the input dtype, and dW and db add the
    chunks up in fp32; the PyTorch path computes in fp32 (fp64 for fp64). Gradients come back in each input's dtype.
    mode="patch" is deterministic on both paths: the same input gives the same bits, forward and
    backward (chunks run in order, each kernel row has one writer). mode="region" sums regions with
    ``index_add``: deterministic on CPU, torch's atomics on CUDA. Double backward (a gradient penalty
    through this loss) raises in mode="patch".

    Raises:
        TypeError: non-tensor tokens, weight or patch_targets, integer tokens, bool/complex targets, a non-int
            ignore_index.
        ValueError: bad shapes (tokens not 2-D/3-D, N < 2, D = 0, weight not (C, D), bias not a (C,) tensor, targets or
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
    label_smoothing, reduction, ignore_index, mode, backend = _check_settings(
        label_smoothing, reduction, ignore_index, mode, backend
    )
    tokens3, targets3, mask3 = _check_inputs(tokens, weight, bias, patch_targets, mask)
    # One dtype for the op's inputs; the GEMMs' operands follow the precision policy, read here, where
    # autocast is still on.
    dtype = torch.promote_types(tokens3.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    operands = resolve_operands(dtype, tokens3.device.type, check_precision(precision))
    tokens3, weight = tokens3.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if mask3 is not None:
        # Padding may hold anything (NaN, inf): a masked row's logit gradient is 0, but 0 times a NaN token
        # would still reach dW through Gᵀ·H. Zeroed tokens add nothing, and masked_fill's backward gives
        # them exactly zero gradient.
        tokens3 = tokens3.masked_fill(~mask3.unsqueeze(-1), 0.0)
    if mode == "region":  # plain torch whatever the backend
        valid = _counted(targets3, mask3, ignore_index, weight.shape[0])
        with no_autocast(tokens3.device.type):
            per_image = _region_loss(tokens3, weight, bias, targets3, valid, label_smoothing)
    else:
        # uniform_grad: a plain mean or sum gives every image the same factor.
        options = (label_smoothing, ignore_index, backend, reduction != "none", torch.is_grad_enabled(), operands)
        per_image = PatchMixingFunction.apply(tokens3, weight, bias, targets3, mask3, *options)
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
        precision: str = "auto",
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
        self.head = head
        self.label_smoothing, self.reduction, self.ignore_index, self.mode, self.backend = _check_settings(
            label_smoothing, reduction, ignore_index, mode, backend
        )
        self.precision = check_precision(precision)

    def forward(self, tokens: torch.Tensor, patch_targets: torch.Tensor, mask: torch.Tensor | None = None):
        settings = {name: getattr(self, name) for name in SETTINGS}
        return patch_mixing_loss(tokens, self.head.weight, self.head.bias, patch_targets, mask=mask, **settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in SETTINGS)
