"""Tolerances and comparison helpers for every op's tests.

Tolerances are stated once per dtype, for values and gradients measured against a float64 oracle run
on the same (rounded) inputs. The kernels accumulate in fp32; 16-bit inputs also round the normalised
tokens to their dtype before the matmul units, hence the looser rows.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol); atol is relative to the largest |expected| element (floored at 1e-3, so an
# all-zero expectation such as the gradient at D = 1 is not judged on rounding noise).
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
    scale = max(e.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if e.numel() else 1.0, 1e-3)
    bad = ~torch.isclose(a, e, atol=atol * scale, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{a.numel()} elements differ"
            f" beyond atol={atol}*{scale:.2e}, rtol={rtol}; "
            f"max abs diff {diff.max().item():.3e}; first at {idx}: got {[a[tuple(i)].item() for i in idx]}, "
            f"expected {[e[tuple(i)].item() for i in idx]}"
        )


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def compile_for_cuda(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 2):
    """Build PTX and cubin for ``fn`` on a machine without a GPU (triton's ahead-of-time path).

    ``signature`` maps every non-constexpr argument to a triton type string ("*bf16", "i32", ...).
    Skips, with triton's own error, where this triton cannot compile without a driver.
    """
    import pytest
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs)
    try:
        return triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    except (ImportError, RuntimeError) as exc:  # no CUDA backend in this triton build
        if "backend" in str(exc).lower() or "ptxas" in str(exc).lower():
            pytest.skip(f"triton {triton.__version__} cannot compile for sm_{arch} here: {exc}")
        raise


def ptxas_spill_bytes(compiled, arch: int):
    """Spill stores ptxas reports for a compiled kernel's PTX, or None where triton's ptxas is not found."""
    import re
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # older triton: no knobs API
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
        )
    found = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(found.group(1)) if found else None
