"""Tolerances and comparison helpers for every op's tests.

Tolerances are stated once per dtype, for values and gradients measured against a float64 oracle run
on the same (rounded) inputs. The kernels accumulate in fp32; 16-bit inputs also round the normalised
tokens to their dtype before the matmul units, hence the looser rows.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol); atol is relative to the largest |expected| element, so it is scale-free.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (5e-3, 3e-2),
}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """allclose against a float64 oracle, with a message saying how many elements differ and where."""
    atol, rtol = TOLERANCES[dtype]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    scale = e.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if e.numel() else 1.0
    bad = ~torch.isclose(a, e, atol=atol * scale, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{a.numel()} elements differ beyond atol={atol}*{scale:.2e}, rtol={rtol}; "
            f"max abs diff {diff.max().item():.3e}; first at {idx}: got {[a[tuple(i)].item() for i in idx]}, "
            f"expected {[e[tuple(i)].item() for i in idx]}"
        )


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
