"""What real training throws at every op, on every path, against float64 references: autocast and mixed
dtypes, double backward, empty batches, extreme magnitudes and scalars, accuracy at large N, settings
checked at construction, bitwise reproducibility across processes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastpatchdiv import PatchContrastiveLoss, PatchCosineLoss, patch_contrastive_loss, patch_cosine_loss
from fastpatchdiv.reference import contrastive_loss_reference, cosine_loss_reference
from tests.helpers import (
    DEVICE,
    assert_close,
    check_contrastive,
    check_cosine,
    contrastive_tokens,
    cosine_tokens,
    rel_error,
)

NEGATIVES = ["mean", "window", "all"]
# Every op, as (name, loss(x, y, **kw), reference(x, y)) on (B, N, D) tokens with N = 16 (a 4 x 4 grid).
OPS = {
    "cosine": (lambda a, z, **kw: patch_cosine_loss(z, **kw), lambda a, z: cosine_loss_reference(z)),
    **{
        neg: (
            lambda a, z, neg=neg, **kw: patch_contrastive_loss(a, z, negatives=neg, temperature=0.5, **kw),
            lambda a, z, neg=neg: contrastive_loss_reference(a, z, negatives=neg, temperature=0.5),
        )
        for neg in NEGATIVES
    },
}


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16)


# --------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_autocast_multiplies_in_its_dtype(backend, op, grad):
    """fp32 tokens under autocast: fp32 loss and fp32 gradients; the O(N²·D) matrix work (cosine, "all") gets
    the autocast dtype's operands, as torch.matmul would, so it is held to that dtype's tolerance; the O(N·D)
    forms ("mean", "window") stay fp32."""
    loss_fn, ref_fn = OPS[op]
    a, z = contrastive_tokens(2, 16, 24, torch.float32, DEVICE, scale=24**-0.25)
    z.requires_grad_(grad)
    with _autocast(DEVICE) as cast:
        loss = loss_fn(a, z, reduction="none", backend=backend)
    tol = cast.fast_dtype if op in ("cosine", "all") else torch.float32
    assert loss.dtype == torch.float32
    z64 = z.detach().double().cpu().requires_grad_(grad)
    ref = ref_fn(a.double().cpu(), z64)
    assert_close(loss, ref, tol, f"{op} loss under autocast")
    if grad:
        loss.sum().backward()
        ref.sum().backward()
        assert z.grad.dtype == torch.float32
        assert_close(z.grad, z64.grad, tol, f"{op} grad under autocast")


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_mixed_dtypes_are_promoted(backend, negatives):
    """Autocast leaves first in bf16 (a conv output) and last in fp32 (a norm output): promote, don't refuse."""
    first, last = contrastive_tokens(2, 16, 24, torch.float32, DEVICE, scale=24**-0.25)
    first = first.to(torch.bfloat16)
    check_contrastive(
        first, last, detach_first=False, negatives=negatives, temperature=0.5, backend=backend, what="bf16 x fp32"
    )


# ------------------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("op", ["cosine", "all"])
def test_double_backward_raises(backend, op):
    """A gradient penalty through the fused ops must fail loudly, not return a wrong second derivative."""
    loss_fn, _ = OPS[op]
    a, z = contrastive_tokens(2, 16, 8, torch.float32, DEVICE)
    z.requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(a, z, backend=backend), z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()


@pytest.mark.parametrize("negatives", ["mean", "window"])
def test_double_backward_of_plain_autograd_forms_is_exact(negatives):
    """ "mean" and "window" are plain autograd: their gradient penalty matches the float64 reference."""
    a, z = contrastive_tokens(2, 16, 8, torch.float64)
    results = []
    per_image = (lambda *t, **kw: patch_contrastive_loss(*t, reduction="none", **kw), contrastive_loss_reference)
    for fn in per_image:
        zz = z.clone().requires_grad_()
        loss = fn(a, zz, negatives=negatives, temperature=0.5).sum()
        (g,) = torch.autograd.grad(loss, zz, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), zz)
        results.append(h)
    assert_close(results[0], results[1], torch.float64, f"{negatives} second derivative")


# ----------------------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(backend, op):
    loss_fn, _ = OPS[op]
    a, z = contrastive_tokens(0, 16, 8, torch.float32, DEVICE)
    z.requires_grad_()
    per_image = loss_fn(a, z, reduction="none", backend=backend)
    assert per_image.shape == (0,) and per_image.dtype == torch.float32
    assert torch.isnan(loss_fn(a, z, backend=backend))  # the mean of nothing, as torch's losses give
    total = loss_fn(a, z, reduction="sum", backend=backend)
    assert total.item() == 0.0
    total.backward()
    assert z.grad.shape == z.shape


# ------------------------------------------------------------------------------------ extreme magnitudes
# The interpreter evaluates both sides of the normaliser's where(norm >= eps, x / norm, x / eps): at 1e36
# numpy warns about the x / eps that the where drops.
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("magnitude", [1e20, 1e36, 1e-10, 1e-20], ids=["1e20", "1e36", "1e-10", "1e-20"])
def test_cosine_is_scale_invariant(backend, dtype, magnitude):
    """Tokens whose squares overflow fp32 still give the cosine loss of the unit tokens; below eps = 1e-12
    in norm (1e-20) the clamp of the definition takes over, as the float64 reference says."""
    x = cosine_tokens((2, 17, 24), dtype, DEVICE)
    scaled = (x.float() * magnitude).to(dtype)
    assert torch.isfinite(scaled).all()
    loss = check_cosine(scaled, backend, what=f"x * {magnitude:g}")
    if magnitude >= 1e-10:
        assert_close(loss, patch_cosine_loss(x, reduction="none", backend=backend), dtype, "scaled vs unit")


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_normalized_contrastive_with_huge_tokens(backend, negatives):
    """normalize=True must not turn 1e20 tokens into zeros (which gave a constant log N)."""
    first, last = contrastive_tokens(2, 16, 24, torch.float32, DEVICE)
    loss = check_contrastive(
        first * 1e20,
        last * 1e20,
        detach_first=False,
        normalize=True,
        negatives=negatives,
        temperature=0.1,
        backend=backend,
        what="normalized 1e20",
    )
    assert (loss - torch.log(torch.tensor(16.0))).abs().max() > 1e-3


@pytest.mark.parametrize("temperature", [1e-2, 1e6, 1e30], ids=["1e-2", "1e6", "1e30"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_extreme_temperatures(backend, negatives, temperature):
    """Normalised tokens: logits up to 100 (saturated softmax) or ~1e-30 (uniform) against float64."""
    first, last = contrastive_tokens(2, 16, 24, torch.float32, DEVICE)
    check_contrastive(
        first,
        last,
        detach_first=False,
        normalize=True,
        negatives=negatives,
        temperature=temperature,
        backend=backend,
        what=f"tau={temperature:g}",
    )


@pytest.mark.parametrize("temperature", [1e-3, 1e-6])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_tiny_temperature_loss_stays_exact(backend, negatives, temperature):
    """τ <= 1e-3: logits of 1e3-1e6, whose fp32 rounding (about |s|·1e-7) the softmax amplifies, so the
    gradient is only as good as fp32 allows (the docstring says so); the loss keeps fp32's accuracy."""
    first, last = contrastive_tokens(2, 16, 24, torch.float32, DEVICE)
    z = last.clone().requires_grad_()
    loss = patch_contrastive_loss(
        first, z, negatives=negatives, normalize=True, temperature=temperature, reduction="none", backend=backend
    )
    loss.sum().backward()
    ref = contrastive_loss_reference(
        first.double().cpu(), last.double().cpu(), negatives=negatives, normalize=True, temperature=temperature
    )
    assert rel_error(loss, ref) < 1e-5
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("window", [3, 9, 31])
def test_window_larger_than_the_grid(window):
    first, last = contrastive_tokens(2, 12, 8, torch.float32)
    check_contrastive(first, last, negatives="window", grid=(3, 4), window=window, what=f"window {window} on 3 x 4")


# ---------------------------------------------------------------------------------- accuracy at large N
@pytest.mark.slow
@pytest.mark.parametrize("n", [4096, 16384])
def test_fp32_cosine_accuracy_at_large_n(n):
    """One image, D = 4, x = randn + 0.5 (|cos| far from 0): relative error <= 1e-6 against float64.

    The float64 value comes from the same blockwise path in float64 (exact to ~1e-15, and checked
    against the N x N reference below 4096), so N = 16384 needs no 2 GiB matrix.
    """
    x = torch.randn(1, n, 4, dtype=torch.float64) + 0.5
    want = patch_cosine_loss(x, backend="torch")
    if n <= 4096:
        assert rel_error(want, cosine_loss_reference(x)[0]) < 1e-12
    got = patch_cosine_loss(x.float(), backend="torch")
    assert rel_error(got, want) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_fp32_contrastive_accuracy_at_large_n(negatives):
    first = torch.randn(1, 4096, 8, dtype=torch.float64) + 0.5
    last = torch.randn(1, 4096, 8, dtype=torch.float64) + 0.5
    kw = dict(negatives=negatives, temperature=0.5, normalize=True)
    want = patch_contrastive_loss(first, last, **kw)
    got = patch_contrastive_loss(first.float(), last.float(), **kw)
    assert rel_error(got, want) <= 1e-6


@pytest.mark.kernel
def test_kernel_cosine_accuracy_many_tiles(kernel_device):
    """The kernel's partial sums cross programs and tiles in fp64: N = 1024 (2080 tiles at 16) within 1e-6."""
    x = torch.randn(1, 1024, 4, dtype=torch.float64) + 0.5
    want = cosine_loss_reference(x)
    got = patch_cosine_loss(x.float().to(kernel_device), backend="triton")
    assert rel_error(got, want) <= 1e-6


# ---------------------------------------------------------------------------------- settings at init
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(window=4), ValueError, "window"),
        (dict(window=1), ValueError, "window"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(grid=(0, 3)), ValueError, "grid"),
        (dict(grid=(3,)), ValueError, "grid"),
        (dict(negatives="hard"), ValueError, "negatives"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(normalize="yes"), TypeError, "normalize"),
        (dict(detach_first=None), TypeError, "detach_first"),
    ],
)
def test_contrastive_module_checks_settings_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        PatchContrastiveLoss(**kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(backend="cuda"), "backend"), (dict(reduction="avg"), "reduction")])
def test_cosine_module_checks_settings_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchCosineLoss(**kwargs)


# ------------------------------------------------------------------------------- bitwise across processes
REPRO_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch
    from fastpatchdiv import patch_contrastive_loss, patch_cosine_loss
    backend, device = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(2, 40, 24, generator=g).to(device)
    z = torch.randn(2, 40, 24, generator=g).to(device).requires_grad_()
    mask = (torch.rand(2, 40, generator=g) > 0.2).to(device)
    digest = hashlib.sha256()
    for loss in (
        patch_cosine_loss(z, backend=backend),
        patch_cosine_loss(z, mask=mask, backend=backend),
        patch_contrastive_loss(a, z, negatives="all", temperature=0.2, backend=backend),
        patch_contrastive_loss(a, z, negatives="all", mask=mask, backend=backend),
    ):
        z.grad = None
        loss.backward()
        for t in (loss, z.grad):
            digest.update(t.detach().cpu().numpy().tobytes())
    print(digest.hexdigest())
    """
)


@pytest.mark.slow
def test_bitwise_identical_across_processes(backend):
    """Losses and gradients hash the same in two fresh processes (no timing-based tuning anywhere)."""
    env = dict(os.environ)
    if backend == "torch":
        env.pop("TRITON_INTERPRET", None)
    digests = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", REPRO_SCRIPT, backend, DEVICE], capture_output=True, text=True, env=env, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]
