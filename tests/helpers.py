"""Tolerances, input builders and oracle checks shared by every op's tests.

Tolerances are stated once per dtype, for values and gradients measured against a float64 oracle run
on the same (rounded) inputs. The kernels accumulate in fp32; 16-bit inputs also round the normalised
tokens to their dtype before the matmul units, hence the looser rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from fastpatchdiv import patch_contrastive_loss, patch_cosine_loss
from fastpatchdiv.reference import contrastive_loss_reference, cosine_loss_reference

# dtype -> (atol, rtol); atol is relative to the largest |expected| element, floored at 1e-3 so a tiny
# expectation is judged on absolute error. (The cosine gradient at D = 1 is exactly 0 but the float64
# oracle's is rounding noise of order eps/|x_i|, unbounded: test_cosine asserts exact zeros there.)
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (5e-3, 3e-2),
}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Where the tests of both paths put their tensors: the GPU when there is one, else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    try:
        src = ASTSource(fn=fn, signature=full, constexprs=constexprs)
    except TypeError as exc:  # triton < 3.2 (torch 2.4's 3.0) names and types these arguments differently
        pytest.skip(f"triton {triton.__version__}: its ahead-of-time API differs ({exc}); compile with triton >= 3.2")
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


# ----------------------------------------------------------------------------------------- cosine
def cosine_tokens(shape, dtype, device="cpu") -> torch.Tensor:
    """Fresh random tokens with varied norms.

    fp32/fp64: plain Gaussian directions. 16-bit: tokens ±(μ + 0.5·noise), so every |cos| sits far from
    0: a cosine within rounding of 0 flips sign(S) between the kernel and the float64 oracle and moves
    the gradient by O(1/N), which no 16-bit tolerance can tell from a bug. Signs still vary per pair.
    """
    *lead, n, d = shape
    if dtype in (torch.float32, torch.float64):
        x = torch.randn(*lead, n, d, dtype=torch.float64)
    else:
        mu = torch.randn(*lead, 1, d, dtype=torch.float64)
        signs = torch.randint(0, 2, (*lead, n, 1)).double() * 2 - 1
        x = signs * (mu + 0.5 * torch.randn(*lead, n, d, dtype=torch.float64))
    x = x * torch.exp(0.5 * torch.randn(*lead, n, 1, dtype=torch.float64))
    return x.to(dtype).to(device)


def cosine_oracle(x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None):
    """float64 oracle on the same (rounded) inputs: per-image losses and d(Σ w_b loss_b)/dx."""
    xr = x.detach().double().cpu().requires_grad_()
    loss = cosine_loss_reference(xr, mask=None if mask is None else mask.cpu())
    (loss * weights.double().cpu()).sum().backward()
    return loss, xr.grad


def check_cosine(x: torch.Tensor, backend: str, mask: torch.Tensor | None = None, what: str = "") -> torch.Tensor:
    """Loss (reduction="none") and gradient under a random per-image weight, against the float64 oracle."""
    x = x.detach().requires_grad_()
    weights = torch.rand(x.shape[0], device=x.device) + 0.5
    loss = patch_cosine_loss(x, mask=mask, reduction="none", backend=backend)
    (loss * weights).sum().backward()
    ref_loss, ref_grad = cosine_oracle(x, weights, mask)
    assert loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert_close(loss, ref_loss, x.dtype, f"{what} loss")
    assert_close(x.grad, ref_grad, x.dtype, f"{what} grad")
    return loss


# ------------------------------------------------------------------------------------ contrastive
def contrastive_tokens(B, N, D, dtype, device="cpu", scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random (first, last) in ``dtype``, scaled so unnormalised logits stay O(scale²·sqrt(D))."""
    first = (torch.randn(B, N, D, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    last = (torch.randn(B, N, D, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return first, last


def check_contrastive(first, last, *, detach_first=True, what="", mask=None, **kw) -> torch.Tensor:
    """Run the loss with reduction="none" and a random (B,) grad_output; compare values and gradients.

    The oracle sees the same (rounded) inputs in float64, with the tolerances above.
    """
    # Inputs of two dtypes are judged at the looser tolerance of the two.
    dtype = max(first.dtype, last.dtype, key=lambda d: TOLERANCES[d][0])
    first = first.detach().clone().requires_grad_()
    last = last.detach().clone().requires_grad_()
    loss = patch_contrastive_loss(first, last, detach_first=detach_first, reduction="none", mask=mask, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == (first.shape[0] if first.dim() == 3 else 1,)
    weights = torch.rand(loss.shape, dtype=loss.dtype, device=loss.device) + 0.5
    loss.backward(weights)

    ref_kw = {k: kw[k] for k in ("temperature", "normalize", "negatives", "grid", "window") if k in kw}
    f64 = first.detach().cpu().double().requires_grad_()
    l64 = last.detach().cpu().double().requires_grad_()
    ref = contrastive_loss_reference(f64, l64, mask=None if mask is None else mask.cpu(), **ref_kw)
    (ref * weights.cpu().double()).sum().backward()

    assert_close(loss, ref, dtype, f"{what} loss")
    assert last.grad is not None and last.grad.dtype == last.dtype
    grads = [("d last", last.grad, l64.grad)]
    if detach_first:
        assert first.grad is None, f"{what}: detach_first=True but first received a gradient"
    else:
        assert first.grad is not None and first.grad.dtype == first.dtype
        grads.append(("d first", first.grad, f64.grad))
    for name, got, want in grads:
        assert torch.isfinite(got).all(), f"{what} {name}: non-finite gradient"
        assert_close(got, want, dtype, f"{what} {name}")
    return loss


def huge_logit_tokens(dtype, device="cpu", n=18, d=32):
    """Logits a_i·z_j of ±500 (τ = 1), on and off the diagonal.

    Tokens come in pairs sharing one direction u with |u|² = 500: a_2k = a_2k+1 = u, z_2k = u, z_2k+1 = −u.
    So S_2k,2k = +500, S_2k+1,2k+1 = −500 (the positive loses by 1000), S_2k,2k+1 = −500, S_2k+1,2k = +500.
    """
    u = torch.randn(2, n // 2, d, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True) * 500**0.5
    a = u.repeat_interleave(2, dim=1)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(n // 2)[None, :, None]
    z = sign * a
    return a.to(device=device, dtype=dtype), z.to(device=device, dtype=dtype)


def contrastive_grads(first, last, **kw):
    """(d first, d last) of the mean loss with both inputs trainable, τ = 0.2."""
    f = first.detach().clone().requires_grad_()
    z = last.detach().clone().requires_grad_()
    patch_contrastive_loss(f, z, detach_first=False, temperature=0.2, **kw).backward()
    return f.grad, z.grad


def peak_rss_growth(setup: str, warmup: str, call: str) -> int:
    """Bytes by which a fresh CPU process's peak RSS grows during ``call`` (Python source, like the others).

    ``setup`` builds the inputs (``torch`` and ``fastpatchdiv`` are imported, the seed is 0); ``warmup``
    runs the same op on a small slice first, so the allocator and the BLAS threads are already up and
    only the big call's own memory counts. Runs without the interpreter: this measures the PyTorch path.
    """
    script = "\n".join(
        [
            "import resource, torch, fastpatchdiv",
            "torch.manual_seed(0)",
            textwrap.dedent(setup),
            textwrap.dedent(warmup),
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
            textwrap.dedent(call),
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
            "print((after - before) * 1024)",  # ru_maxrss is in KiB on Linux
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])
