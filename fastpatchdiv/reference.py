"""Naive PyTorch formulas that build the full N x N matrix.

They are the test oracles (called in float64) and the "torch" baseline of the benchmarks. Memory is
O(B * N^2): do not call them at high resolution. Every function takes (B, N, D) tokens and returns the
per-image loss as a (B,) tensor in the input dtype; autograd gives the reference gradients.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def normalize_rows(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x_i / max(|x_i|, eps) along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_loss_reference(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-image 1/(N(N-1)) * sum_{i != j} |cos(x_i, x_j)| for x of shape (B, N, D) -> (B,)."""
    n = x.shape[-2]
    xn = normalize_rows(x, eps)
    s = (xn @ xn.transpose(-1, -2)).abs()
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return (s * off_diagonal).sum(dim=(-1, -2)) / (n * (n - 1))


def contrastive_loss_reference(
    first: torch.Tensor,
    last: torch.Tensor,
    temperature: float = 1.0,
    normalize: bool = False,
    negatives: str = "mean",
    grid: tuple[int, int] | None = None,
    window: int = 7,
) -> torch.Tensor:
    """Per-image patch-contrastive loss from the full score matrix S = A Zᵀ / τ, (B, N, D) x2 -> (B,).

    A = first, Z = last (both row-normalised when ``normalize``); pos_i = S_ii and, per ``negatives``:
    - "mean":   ℓ_i = logaddexp(pos_i, neg_i) − pos_i with neg_i = Σ_{j≠i} S_ij / (N − 1);
    - "window": ℓ_i = lse(pos_i, neg_i, loc_i) − pos_i with loc_i = Σ_{j in k x k window of i, j≠i} S_ij / (k² − 1)
                on the (H, W) patch grid (row-major, square by default), zero padding counted in k² − 1;
    - "all":    ℓ_i = lse_j S_ij − pos_i.
    The loss of an image is mean_i ℓ_i. No detaching: autograd gives gradients for both inputs.
    """
    a, z = first, last
    if a.dim() == 2:
        a, z = a.unsqueeze(0), z.unsqueeze(0)
    n = a.shape[-2]
    if normalize:
        a, z = normalize_rows(a), normalize_rows(z)
    s = a @ z.transpose(-1, -2) / temperature
    pos = s.diagonal(dim1=-2, dim2=-1)
    if negatives == "all":
        return (torch.logsumexp(s, dim=-1) - pos).mean(dim=-1)
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    neg = (s * ~eye).sum(dim=-1) / (n - 1)
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
    return (torch.logsumexp(torch.stack(terms, dim=-1), dim=-1) - pos).mean(dim=-1)
