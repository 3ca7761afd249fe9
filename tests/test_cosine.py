"""patch_cosine_loss against the float64 N x N oracle: values, gradients, options, bad input, memory."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpatchdiv
from fastpatchdiv import PatchCosineFunction, PatchCosineLoss, patch_cosine_loss
from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.kernels.cosine import _triangle_row
from fastpatchdiv.reference import cosine_loss_reference
from tests.helpers import (
    DEVICE,
    KERNEL_DTYPES,
    assert_close,
    check_cosine,
    cosine_oracle,
    cosine_tokens,
    peak_rss_growth,
)

# N = 2, ragged N and D, D < 16, D not a multiple of the normalise chunk, N past several 16-tiles.
KERNEL_SHAPES = [(2, 2, 5), (2, 37, 33), (1, 130, 20), (3, 17, 16), (1, 50, 70)]
# The PyTorch path tiles by >= 128 rows: N = 300 crosses two tile edges.
TORCH_SHAPES = [(2, 2, 5), (2, 37, 33), (1, 300, 20), (3, 129, 64)]


# --------------------------------------------------------------------------------------------- kernels
@pytest.mark.kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_kernel_matches_reference(kernel_device, shape, dtype):
    check_cosine(cosine_tokens(shape, dtype, kernel_device), "triton")


@pytest.mark.kernel
def test_kernel_many_tiles(kernel_device):
    # 9 row blocks of 16: the fwd triangle has 45 tiles spread over persistent programs.
    check_cosine(cosine_tokens((1, 140, 24), torch.float32, kernel_device), "triton")


@triton.jit
def _decode_triangle_row(t_ptr, out_ptr, COUNT: tl.constexpr):
    offs = tl.arange(0, COUNT)
    tl.store(out_ptr + offs, _triangle_row(tl.load(t_ptr + offs)))


@pytest.mark.kernel
def test_triangle_row_decodes_large_tile_counts(kernel_device):
    """The forward maps a tile number to its row with an fp32 sqrt; check it past fp32's exact range."""
    # First and last tiles of rows 2000..4016: up to 8M tiles, N = 256k at 64-wide tiles.
    rows = torch.arange(2000, 4048, 32, dtype=torch.int64)  # 64 rows
    firsts = rows * (rows + 1) // 2
    t = torch.cat([firsts, firsts + rows]).to(torch.int32)
    out = torch.empty_like(t, device=kernel_device)
    _decode_triangle_row[(1,)](t.to(kernel_device), out, COUNT=t.numel())
    expected = torch.cat([rows, rows]).to(torch.int32)
    assert torch.equal(out.cpu(), expected)


# --------------------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("dtype", (torch.float64,) + KERNEL_DTYPES)
@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_torch_path_matches_reference(shape, dtype):
    check_cosine(cosine_tokens(shape, dtype), "torch")


def test_torch_path_gradcheck(monkeypatch):
    # Small tiles so the symmetric updates of off-diagonal tile pairs are exercised.
    monkeypatch.setattr(fastpatchdiv.cosine, "_tile_size", lambda batch, n: min(16, n))
    x = torch.randn(2, 40, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: patch_cosine_loss(t, reduction="none", backend="torch"), (x,))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 160), d=st.integers(2, 40))
def test_torch_path_any_shape(b, n, d):
    check_cosine(torch.randn(b, n, d, dtype=torch.float64), "torch")


@pytest.mark.parametrize("dtype", (torch.float64,) + KERNEL_DTYPES, ids=str)
def test_one_feature_has_zero_gradient(backend, dtype):
    """D = 1: x̂ = sign(x) is locally constant, so the gradient is exactly 0. (The float64 oracle's autograd
    is not: it carries rounding noise of order eps/|x_i|, unbounded as a token nears 0.)"""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernels take fp32/fp16/bf16")
    x = torch.randn(3, 37, 1, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    loss = patch_cosine_loss(x, reduction="none", backend=backend)
    loss.sum().backward()
    assert_close(loss, cosine_loss_reference(x.detach().double().cpu()), dtype, "D = 1 loss")
    assert x.grad.eq(0).all()


def test_dispatch_without_interpreter_uses_torch_path():
    if torch.cuda.is_available() or INTERPRETER:
        pytest.skip("only meaningful on a CPU-only pass")
    # The acceptance example of the issue, exact to 1e-4 relative.
    x = torch.randn(2, 197, 64)[:, 1:]
    loss = patch_cosine_loss(x)
    ref = cosine_loss_reference(x.double()).mean()
    assert abs(loss.item() - ref.item()) <= 1e-4 * ref.item()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        patch_cosine_loss(x, backend="triton")


# ------------------------------------------------------------------------------ both paths, each option
def test_two_dim_input(backend):
    x = cosine_tokens((29, 18), torch.float32, DEVICE).requires_grad_()
    loss = patch_cosine_loss(x, backend=backend)
    loss.backward()
    ref_loss, ref_grad = cosine_oracle(x.unsqueeze(0), torch.ones(1))
    assert loss.shape == ()
    assert_close(loss, ref_loss[0], torch.float32, "loss")
    assert_close(x.grad, ref_grad[0], torch.float32, "grad")


@pytest.mark.parametrize("view", ["drop_cls", "transposed", "strided_d"])
def test_non_contiguous_inputs(backend, view):
    dev = DEVICE
    if view == "drop_cls":
        x = cosine_tokens((2, 34, 24), torch.float32, dev)[:, 1:]
    elif view == "transposed":
        x = cosine_tokens((2, 24, 33), torch.float32, dev).transpose(1, 2)
    else:
        x = cosine_tokens((2, 33, 48), torch.float32, dev)[..., ::2]
    assert not x.is_contiguous()
    check_cosine(x, backend)


def test_zero_vectors(backend):
    x = cosine_tokens((2, 21, 19), torch.float32)
    x[0, 3] = 0.0
    x[1, [0, 20]] = 0.0
    x = x.to(DEVICE).requires_grad_()
    loss = patch_cosine_loss(x, reduction="sum", backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert (x.grad[0, 3] == 0).all() and (x.grad[1, [0, 20]] == 0).all()
    check_cosine(x, backend)


def test_nan_stays_in_its_image(backend):
    x = cosine_tokens((3, 20, 17), torch.float32)
    x[1, 5, 2] = float("nan")
    x = x.to(DEVICE).requires_grad_()
    loss = patch_cosine_loss(x, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss[[0, 2]].sum().backward()
    ref_loss, ref_grad = cosine_oracle(x[[0, 2]], torch.ones(2))
    assert_close(loss[[0, 2]], ref_loss, torch.float32, "loss of the clean images")
    assert_close(x.grad[[0, 2]], ref_grad, torch.float32, "grad of the clean images")
    assert torch.isnan(patch_cosine_loss(x, backend=backend))  # and the mean says so


def test_backward_is_deterministic(backend):
    x = cosine_tokens((2, 70, 40), torch.float32, DEVICE).requires_grad_()
    grads, losses = [], []
    for _ in range(2):
        x.grad = None
        loss = patch_cosine_loss(x, backend=backend)
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append(x.grad.clone())
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_module_and_function(backend, reduction):
    x = cosine_tokens((3, 19, 12), torch.float32, DEVICE)
    ref_loss, _ = cosine_oracle(x, torch.ones(3))
    expected = {"mean": ref_loss.mean(), "sum": ref_loss.sum(), "none": ref_loss}[reduction]
    grad_out = torch.rand(3, device=x.device) if reduction == "none" else torch.tensor(1.7, device=x.device)
    results = []
    for call in (
        lambda t: patch_cosine_loss(t, reduction=reduction, backend=backend),
        lambda t: PatchCosineLoss(reduction=reduction, backend=backend)(t),
        lambda t: fastpatchdiv._common.reduce_images(PatchCosineFunction.apply(t, None, backend), reduction),
    ):
        xi = x.clone().requires_grad_()
        out = call(xi)
        assert_close(out, expected, torch.float32, f"{reduction} loss")
        out.backward(grad_out)  # non-scalar grad_output for "none"
        results.append(xi.grad)
    xr = x.detach().double().cpu().requires_grad_()
    ref = cosine_loss_reference(xr)
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    ref.backward(grad_out.double().cpu())
    for g in results:
        assert_close(g, xr.grad, torch.float32, f"{reduction} grad")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        ([[1.0, 2.0]], {}, TypeError, "torch.Tensor"),
        (torch.ones(4, 3, dtype=torch.int64), {}, TypeError, "floating dtype"),
        (torch.ones(4, 3, dtype=torch.bool), {}, TypeError, "floating dtype"),
        (torch.randn(7), {}, ValueError, "got 1 dims"),
        (torch.randn(2, 3, 4, 5), {}, ValueError, "got 4 dims"),
        (torch.randn(2, 1, 8), {}, ValueError, "N >= 2"),
        (torch.randn(1, 8), {}, ValueError, "N >= 2"),
        (torch.randn(2, 5, 0), {}, ValueError, "D = 0"),
        (torch.randn(2, 5, 4), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        (torch.randn(2, 5, 4), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        patch_cosine_loss(x, **kwargs)
    if isinstance(x, torch.Tensor) and "backend" not in kwargs:
        with pytest.raises(error, match=match):
            PatchCosineLoss(**kwargs)(x)


@pytest.mark.kernel
def test_wide_tokens_run_on_the_kernels(kernel_device):
    """The kernels stream D in chunks (score tiles) and tiles (strip GEMM): no D limit, e.g. ViT-H's 1280."""
    check_cosine(cosine_tokens((1, 20, 1280), torch.float32, kernel_device), "triton")


def test_float64_routes_to_torch_path():
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    assert fastpatchdiv._common.pick_backend(x, "auto") == "torch"
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        patch_cosine_loss(x, backend="triton")


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_torch_path_memory_is_not_n_squared():
    n = 16384
    growth = peak_rss_growth(
        setup=f"x = torch.randn(1, {n}, 64, requires_grad=True)",
        warmup='fastpatchdiv.patch_cosine_loss(x[:, :64], backend="torch").backward()',
        call='fastpatchdiv.patch_cosine_loss(x, backend="torch").backward()',
    )
    one_nxn = n * n * 4  # 1 GiB
    # Tokens, x̂, the gradient and a few 1024 x 1024 tiles: tens of MiB.
    assert growth < one_nxn / 8, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB, an N x N fp32 is {one_nxn / 2**20:.0f} MiB"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory accounting needs a GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_memory_is_not_n_squared(dtype):
    n, d = 16384, 64
    x = torch.randn(1, n, d, device="cuda", dtype=dtype, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    patch_cosine_loss(x).backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < n * n * 4 / 64, f"peak grew by {growth / 2**20:.1f} MiB"
