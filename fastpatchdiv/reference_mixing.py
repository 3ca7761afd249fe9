"""Naive formulas of the patch mixing loss: the test oracles (in float64) and the benchmarks' "torch" baseline.

``mixing_loss_reference`` builds the full (B·N, C) logits with ``F.linear`` and calls ``F.cross_entropy``:
O(B·N·C) memory, which is what the fused path avoids. ``mixing_region_loss_reference`` loops over images
and regions. Both return the per-image loss as a (B,) tensor; autograd gives the reference gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _batched(tokens, patch_targets, mask):
    """(N, D) input is one image."""
    if tokens.dim() == 2:
        return tokens.unsqueeze(0), patch_targets.unsqueeze(0), mask.unsqueeze(0) if mask is not None else None
    return tokens, patch_targets, mask


def _counted(targets: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """(B, N) bool: the patches that count (mask True and, for class indices, label != ignore_index)."""
    b, n = targets.shape[:2]
    keep = torch.ones(b, n, dtype=torch.bool, device=targets.device) if mask is None else mask.bool()
    if not targets.is_floating_point():
        keep = keep & (targets != ignore_index)
    return keep


def mixing_loss_reference(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image mean over counted patches of F.cross_entropy(F.linear(h, W, b), y): (B, N, D) -> (B,).

    patch_targets: (B, N) class indices or (B, N, C) probabilities. An image with no counted patch has
    loss 0. Builds the full (B·N, C) logits.
    """
    tokens, patch_targets, mask = _batched(tokens, patch_targets, mask)
    b, n, d = tokens.shape
    logits = F.linear(tokens.reshape(b * n, d), weight, bias)
    keep = _counted(patch_targets, mask, ignore_index)
    if patch_targets.is_floating_point():
        target = patch_targets.reshape(b * n, -1)
        rows = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    else:
        target = patch_targets.reshape(b * n)
        rows = F.cross_entropy(
            logits, target, reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index
        )
    rows = torch.where(keep.reshape(-1), rows, torch.zeros_like(rows)).reshape(b, n)
    count = keep.sum(dim=1)
    return rows.sum(dim=1) / count.clamp_min(1).to(rows.dtype)


def mixing_region_loss_reference(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official code's region form, one image and one region at a time: (B, N, D) -> (B,).

    A region of image b is the set of its counted patches that share a target (a class index, or an
    identical probability row). loss_b = Σ_regions (n_r / n_b) · CE(W · mean_{i in r} h_i + b, target_r).
    """
    tokens, patch_targets, mask = _batched(tokens, patch_targets, mask)
    b, n, _ = tokens.shape
    keep = _counted(patch_targets, mask, ignore_index)
    losses = []
    for img in range(b):
        idx = keep[img].nonzero().flatten().tolist()
        total = tokens.new_zeros(())
        groups: dict = {}
        for i in idx:
            t = patch_targets[img, i]
            key = tuple(t.tolist()) if t.dim() else int(t)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            pooled = tokens[img, members].mean(dim=0, keepdim=True)
            logits = F.linear(pooled, weight, bias)
            target = patch_targets[img, members[0]].unsqueeze(0)
            ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            total = total + len(members) / len(idx) * ce
        losses.append(total)
    if not losses:
        return tokens.new_zeros(0)
    return torch.stack(losses)
