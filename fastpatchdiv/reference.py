"""Naive PyTorch formulas that build the full N x N matrix (or the full (B·N, C) logits).

They are the test oracles (called in float64) and the "torch" baseline of the benchmarks. Memory is
O(B * N^2) (O(B * N * C) for the mixing loss): do not call them at high resolution. Every function takes
(B, N, D) tokens and an optional (B, N) bool mask of real patches, and returns the per-image loss as a
(B,) tensor in the input dtype: 0 for an image with fewer than 2 real patches (for the mixing loss, with
no counted patch); autograd gives the reference gradients.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def normalize_rows(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x_i / max(|x_i|, eps) along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _real(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool of real patches and N_b (B,) in x's dtype."""
    if mask is None:
        mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return mask, mask.sum(dim=-1).to(x.dtype)


def cosine_loss_reference(x: torch.Tensor, eps: float = EPS, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image 1/(N_b(N_b-1)) * sum_{i != j real} |cos(x_i, x_j)| for x of shape (B, N, D) -> (B,)."""
    n = x.shape[-2]
    real, nb = _real(x, mask)
    xn = normalize_rows(x, eps)
    s = (xn @ xn.transpose(-1, -2)).abs()
    pairs = ~torch.eye(n, dtype=torch.bool, device=x.device) & real[..., :, None] & real[..., None, :]
    total = torch.where(pairs, s, torch.zeros_like(s)).sum(dim=(-1, -2))
    return torch.where(nb >= 2, total / (nb * (nb - 1)).clamp_min(1), torch.zeros_like(total))


def contrastive_loss_reference(
    first: torch.Tensor,
    last: torch.Tensor,
    negatives: str = "mean",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    grid: tuple[int, int] | None = None,
    normalize: bool = False,
    window: int = 7,
) -> torch.Tensor:
    """Per-image patch-contrastive loss from the full score matrix S = A Zᵀ / τ, (B, N, D) x2 -> (B,).

    A = first, Z = last (both row-normalised when ``normalize``); pos_i = S_ii and, per ``negatives``:
    - "mean":   ℓ_i = logaddexp(pos_i, neg_i) − pos_i with neg_i = Σ_{j≠i} S_ij / (N − 1);
    - "window": ℓ_i = lse(pos_i, neg_i, loc_i) − pos_i with loc_i = Σ_{j in k x k window of i, j≠i} S_ij / (k² − 1)
                on the (H, W) patch grid (row-major, square by default), zero padding counted in k² − 1;
    - "all":    ℓ_i = lse_j S_ij − pos_i.
    The loss of an image is the mean of ℓ_i over its N_b real patches; with a mask, sums over j (and
    N − 1) run over the real patches only ("window" takes no mask). No detaching: autograd gives
    gradients for both inputs.
    """
    a, z = first, last
    if a.dim() == 2:
        a, z = a.unsqueeze(0), z.unsqueeze(0)
    n = a.shape[-2]
    real, nb = _real(a, mask)
    if normalize:
        a, z = normalize_rows(a), normalize_rows(z)
    s = a @ z.transpose(-1, -2) / temperature
    pos = s.diagonal(dim1=-2, dim2=-1)
    columns = real[..., None, :].expand(s.shape)
    if negatives == "all":
        rows = torch.logsumexp(s.masked_fill(~columns, float("-inf")), dim=-1) - pos
        return _mean_real(rows, real, nb)
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    neg = torch.where(columns & ~eye, s, torch.zeros_like(s)).sum(dim=-1) / (nb[..., None] - 1).clamp_min(1)
    terms = [pos, neg]
    if negatives == "window":
        if grid is None:
            side = round(n**0.5)
            grid = (side, side)
        h, w = grid
        idx = torch.arange(n, device=a.device)
        r, c = idx // w, idx % w
        half = window // 2
        near = ((r[:, None] - r[None, :]).abs() <= half) & ((c[:, None] - c[None, :]).abs() <= half) & ~eye
        terms.append((s * near).sum(dim=-1) / (window * window - 1))
    elif negatives != "mean":
        raise ValueError(f"negatives must be 'mean', 'window' or 'all', got {negatives!r}")
    return _mean_real(torch.logsumexp(torch.stack(terms, dim=-1), dim=-1) - pos, real, nb)


def _mean_real(rows: torch.Tensor, real: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    total = torch.where(real, rows, torch.zeros_like(rows)).sum(dim=-1)
    return torch.where(nb >= 2, total / nb.clamp_min(1), torch.zeros_like(total))


# -------------------------------------------------------------------------------------- patch mixing
def mixing_loss_reference(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    mode: str = "patch",
) -> torch.Tensor:
    """Per-image patch mixing loss from the full (B·N, C) logits and ``F.cross_entropy``, (B, N, D) -> (B,).

    ℓ_i = F.cross_entropy(W h_i + b, y_i, label_smoothing=ε) with y (B, N) class indices or (B, N, C)
    probabilities. A patch counts where the mask is True and, for class indices, y_i != ignore_index;
    loss_b is the mean of ℓ_i over the n_b counted patches of image b (0 when n_b = 0).
    - "patch": as above (the paper).
    - "region" (the official code): every token is first replaced by the mean of its region, the counted
      patches of its image with the same target (class index, or identical probability row); the n_r
      patches of region r then share one CE_r and loss_b = Σ_r (n_r / n_b) · CE_r.
    """
    if tokens.dim() == 2:
        tokens, patch_targets = tokens.unsqueeze(0), patch_targets.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None else None
    b, n, d = tokens.shape
    soft = patch_targets.is_floating_point()
    counted, _ = _real(tokens, mask)
    if not soft:
        counted = counted & (patch_targets != ignore_index)
    if mode == "region":
        labels = patch_targets if soft else patch_targets.unsqueeze(-1)
        same = (labels[:, :, None] == labels[:, None, :]).all(dim=-1) & counted[:, None, :]  # (B, N, N)
        tokens = same.to(tokens.dtype) @ tokens / same.sum(dim=-1, keepdim=True).clamp_min(1).to(tokens.dtype)
    elif mode != "patch":
        raise ValueError(f"mode must be 'patch' or 'region', got {mode!r}")
    logits = torch.nn.functional.linear(tokens.reshape(b * n, d), weight, bias)
    target = patch_targets.reshape(b * n, -1) if soft else patch_targets.reshape(b * n)
    rows = torch.nn.functional.cross_entropy(
        logits, target, reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    total = torch.where(counted.reshape(-1), rows, torch.zeros_like(rows)).reshape(b, n).sum(dim=1)
    return total / counted.sum(dim=1).clamp_min(1).to(total.dtype)


def mixing_region_loss_reference(*args, **kwargs) -> torch.Tensor:
    """``mixing_loss_reference(..., mode="region")``, same arguments: the official code's region-pooled form."""
    return mixing_loss_reference(*args, **kwargs, mode="region")
