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
