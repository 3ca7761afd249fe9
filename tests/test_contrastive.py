"""Patch-contrastive loss: values and gradients against the float64 oracle, numerics, errors, memory.

The kernel tests (``-m kernel``) exercise negatives="all" through the Triton kernels (CUDA, or CPU under
TRITON_INTERPRET=1, where every program instance costs milliseconds: shapes stay at a few dozen tiles).
"mean" and "window" are the same O(N·D) torch code on every backend and are covered by the default pass.
"""

from __future__ import annotations

import pytest
import torch

from fastpatchdiv.contrastive import PatchContrastiveLoss, patch_contrastive_loss
from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.reference import contrastive_loss_reference
from tests.helpers import (
    assert_close,
    check_contrastive,
    contrastive_grads,
    contrastive_tokens,
    huge_logit_tokens,
    peak_rss_growth,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


# (B, N, D, temperature, grid, window): ragged N and D around the 16-wide tiles; N = 64 uses the default
# square grid.
SHAPES = [
    pytest.param(2, 2, 3, 1.0, (1, 2), 3, id="N2-D3"),
    pytest.param(2, 17, 33, 0.07, (1, 17), 5, id="N17-D33"),
    pytest.param(1, 130, 33, 0.2, (10, 13), 7, id="N130-D33"),
    pytest.param(1, 257, 3, 1.0, (1, 257), 3, id="N257-D3"),
    pytest.param(2, 64, 128, 0.2, None, 7, id="N64-D128"),
]


# ----------------------------------------------------------------------------------------------------
# PyTorch path (default pass): every mode, dtype, temperature, normalize
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, N, D, temperature, grid, window", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("negatives", ["mean", "window", "all"])
def test_torch_path_matches_reference(
    small_torch_tiles, negatives, normalize, dtype, B, N, D, temperature, grid, window
):
    first, last = contrastive_tokens(B, N, D, dtype, scale=D**-0.25)
    check_contrastive(
        first,
        last,
        backend="torch",
        detach_first=(N % 2 == 0),
        temperature=temperature,
        normalize=normalize,
        negatives=negatives,
        grid=grid,
        window=window,
        what=f"torch {negatives}",
    )


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("negatives", ["mean", "window", "all"])
def test_torch_path_noncontiguous(small_torch_tiles, negatives, temperature):
    base = torch.randn(2, 21, 24)
    first = base[:, 1:]  # drop a "class token": a strided view
    last = torch.randn(2, 24, 20).transpose(1, 2)  # transposed storage
    assert not first.is_contiguous() and not last.is_contiguous()
    check_contrastive(
        first,
        last,
        backend="torch",
        detach_first=False,
        temperature=temperature,
        negatives=negatives,
        grid=(4, 5),
        window=3,
        what="torch non-contiguous",
    )


def test_two_dim_input_is_one_image():
    first, last = contrastive_tokens(1, 9, 5, torch.float32)
    for negatives in ("mean", "window", "all"):
        three = patch_contrastive_loss(first, last, negatives=negatives, window=3, reduction="none")
        two = patch_contrastive_loss(first[0], last[0], negatives=negatives, window=3, reduction="none")
        assert two.shape == (1,)
        torch.testing.assert_close(two, three)


@pytest.mark.parametrize("negatives", ["mean", "window", "all"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_gradcheck_torch_path(small_torch_tiles, negatives, normalize):
    first, last = contrastive_tokens(1, 18, 3, torch.float64)  # 18 > 16: two tiles on the torch path
    first.requires_grad_()
    last.requires_grad_()

    def fn(f, z):
        return patch_contrastive_loss(
            f,
            z,
            temperature=0.3,
            normalize=normalize,
            negatives=negatives,
            detach_first=False,
            reduction="none",
            grid=(3, 6),
            window=3,
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, (first, last), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("negatives", ["mean", "window", "all"])
def test_torch_path_huge_logits(small_torch_tiles, negatives, dtype):
    first, last = huge_logit_tokens(dtype)
    loss = check_contrastive(
        first,
        last,
        backend="torch",
        detach_first=False,
        negatives=negatives,
        grid=(3, 6),
        window=3,
        what="torch ±500 logits",
    )
    assert torch.isfinite(loss).all()


def test_torch_path_deterministic(small_torch_tiles):
    first, last = contrastive_tokens(2, 40, 33, torch.float32)
    grads = [contrastive_grads(first, last, negatives="all", backend="torch") for _ in range(2)]
    for g0, g1 in zip(grads[0], grads[1], strict=True):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("negatives", ["mean", "window", "all"])
def test_module_functional_and_reductions(negatives):
    first, last = contrastive_tokens(3, 16, 8, torch.float32)
    kw = dict(temperature=0.2, normalize=True, negatives=negatives, window=3)
    per_image = patch_contrastive_loss(first, last, reduction="none", **kw)
    assert per_image.shape == (3,) and per_image.dtype == torch.float32
    torch.testing.assert_close(patch_contrastive_loss(first, last, **kw), per_image.mean())
    torch.testing.assert_close(patch_contrastive_loss(first, last, reduction="sum", **kw), per_image.sum())
    module = PatchContrastiveLoss(reduction="sum", **kw)
    torch.testing.assert_close(module(first, last), per_image.sum())
    assert "negatives=" in repr(module)

    # reduction="none" with a non-scalar grad_output, through the Module and the function alike.
    weights = torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for call in (
        PatchContrastiveLoss(reduction="none", **kw),
        lambda f, z: patch_contrastive_loss(f, z, reduction="none", **kw),
    ):
        z = last.clone().requires_grad_()
        call(first, z).backward(weights)
        grads.append(z.grad)
    z = last.clone().requires_grad_()
    (patch_contrastive_loss(first, z, reduction="none", **kw) * weights).sum().backward()
    torch.testing.assert_close(grads[0], z.grad)
    torch.testing.assert_close(grads[1], z.grad)


def test_float64_loss_and_default_paper_form():
    first, last = contrastive_tokens(2, 9, 4, torch.float64)
    loss = patch_contrastive_loss(first, last)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, contrastive_loss_reference(first, last).mean())


def _bad(**overrides):
    first, last = contrastive_tokens(2, 9, 4, torch.float32)
    kw = dict(first=first, last=last)
    kw.update(overrides)
    return kw


BAD_INPUTS = [
    pytest.param(_bad(last=torch.randn(2, 8, 4)), ValueError, "same shape", id="shape-mismatch"),
    pytest.param(_bad(first=torch.randn(2, 9, 4, device="meta")), ValueError, "same device", id="device-mismatch"),
    pytest.param(_bad(first=torch.ones(2, 9, 4, dtype=torch.int64)), TypeError, "floating", id="int-dtype"),
    pytest.param(_bad(first=[[1.0]]), TypeError, "torch.Tensor", id="not-a-tensor"),
    pytest.param(_bad(first=torch.randn(9), last=torch.randn(9)), ValueError, "shape", id="1-d"),
    pytest.param(_bad(first=torch.randn(2, 1, 4), last=torch.randn(2, 1, 4)), ValueError, "N >= 2", id="N1"),
    pytest.param(_bad(temperature=0.0), ValueError, "temperature", id="temperature-0"),
    pytest.param(_bad(temperature=-0.5), ValueError, "temperature", id="temperature-negative"),
    pytest.param(_bad(temperature=float("inf")), ValueError, "temperature", id="temperature-inf"),
    pytest.param(_bad(temperature=float("nan")), ValueError, "temperature", id="temperature-nan"),
    pytest.param(_bad(temperature="0.1"), TypeError, "temperature", id="temperature-str"),
    pytest.param(_bad(temperature=torch.tensor(0.5)), TypeError, "a tensor temperature", id="temperature-tensor"),
    pytest.param(_bad(negatives="hard"), ValueError, "negatives", id="negatives"),
    pytest.param(_bad(reduction="max"), ValueError, "reduction", id="reduction"),
    pytest.param(_bad(backend="cuda"), ValueError, "backend", id="backend"),
    pytest.param(
        _bad(first=torch.randn(2, 8, 4), last=torch.randn(2, 8, 4), negatives="window"),
        ValueError,
        "not a square",
        id="grid-not-square",
    ),
    pytest.param(_bad(negatives="window", grid=(2, 4)), ValueError, "grid", id="grid-product"),
    pytest.param(_bad(negatives="all", grid=(3, 4)), ValueError, "grid", id="grid-product-any-mode"),
    pytest.param(_bad(negatives="window", grid=(3, 3, 1)), ValueError, "grid", id="grid-len"),
    pytest.param(_bad(negatives="window", grid=(3, 3), window=4), ValueError, "window", id="window-even"),
    pytest.param(_bad(negatives="window", grid=(3, 3), window=1), ValueError, "window", id="window-1"),
    pytest.param(_bad(negatives="window", grid=(3, 3), window=3.0), ValueError, "window", id="window-float"),
    pytest.param(_bad(temperature=1e-39), ValueError, "1/τ must be finite", id="temperature-tiny"),
    pytest.param(_bad(normalize=1), TypeError, "normalize must be a bool", id="normalize-int"),
    pytest.param(_bad(detach_first="yes"), TypeError, "detach_first must be a bool", id="detach-first-str"),
    pytest.param(_bad(mask=torch.ones(2, 9)), TypeError, "torch.bool", id="mask-float"),
    pytest.param(_bad(mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, "mask must have shape", id="mask-shape"),
    pytest.param(
        _bad(negatives="window", grid=(3, 3), mask=torch.ones(2, 9, dtype=torch.bool)),
        ValueError,
        "takes no mask",
        id="mask-window",
    ),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_inputs_raise(kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        patch_contrastive_loss(kwargs.pop("first"), kwargs.pop("last"), **kwargs)


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="negatives"):
        PatchContrastiveLoss(negatives="hard")
    with pytest.raises(ValueError, match="reduction"):
        PatchContrastiveLoss(reduction="max")


@pytest.mark.skipif(INTERPRETER or torch.cuda.is_available(), reason="needs a CPU-only, non-interpreted run")
def test_triton_backend_without_kernels_raises():
    first, last = contrastive_tokens(1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="backend='triton'"):
        patch_contrastive_loss(first, last, negatives="all", backend="triton")


@pytest.mark.slow
def test_torch_path_memory_is_linear():
    """N = 16384, D = 64: a dense N x N fp32 matrix would be 1 GiB; the tiles stay far below that."""
    grown = peak_rss_growth(
        setup="""
            first = torch.randn(1, 16384, 64)
            last = torch.randn(1, 16384, 64, requires_grad=True)
            """,
        warmup="""
            small = first[:, :256], last[:, :256]
            fastpatchdiv.patch_contrastive_loss(*small, negatives="all", backend="torch").backward()
            last.grad = None
            """,
        call="""
            loss = fastpatchdiv.patch_contrastive_loss(
                first, last, negatives="all", temperature=0.2, normalize=True, backend="torch"
            )
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(last.grad).all()
            """,
    )
    assert grown < 256 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB for N = 16384 (dense would be 1024 MiB)"


# ----------------------------------------------------------------------------------------------------
# Triton kernels (negatives="all")
# ----------------------------------------------------------------------------------------------------

# (B, N, D, temperature, normalize, dtype, detach_first): every dtype with normalize on and off at a
# shape that crosses 16-wide tile edges in N and D, then the edge sizes once each.
KERNEL_CASES = [
    pytest.param(2, 17, 33, 0.07, True, torch.float32, False, id="N17-D33-fp32-norm-t0.07"),
    pytest.param(2, 17, 33, 1.0, False, torch.float32, True, id="N17-D33-fp32-raw-t1"),
    pytest.param(2, 17, 33, 0.2, True, torch.bfloat16, False, id="N17-D33-bf16-norm-t0.2"),
    pytest.param(2, 17, 33, 1.0, False, torch.bfloat16, True, id="N17-D33-bf16-raw-t1"),
    pytest.param(2, 17, 33, 0.07, True, torch.float16, True, id="N17-D33-fp16-norm-t0.07"),
    pytest.param(2, 17, 33, 0.2, False, torch.float16, False, id="N17-D33-fp16-raw-t0.2"),
    pytest.param(3, 2, 3, 0.2, False, torch.float32, False, id="N2-D3-fp32"),
    pytest.param(1, 2, 3, 1.0, True, torch.bfloat16, False, id="N2-D3-bf16"),
    pytest.param(1, 130, 33, 0.2, True, torch.float32, True, id="N130-D33-fp32"),
    pytest.param(1, 257, 3, 1.0, False, torch.float16, True, id="N257-D3-fp16"),
    pytest.param(1, 33, 128, 0.07, True, torch.bfloat16, False, id="N33-D128-bf16"),
]


@pytest.mark.kernel
@pytest.mark.parametrize("B, N, D, temperature, normalize, dtype, detach_first", KERNEL_CASES)
def test_kernel_matches_reference(kernel_device, B, N, D, temperature, normalize, dtype, detach_first):
    first, last = contrastive_tokens(B, N, D, dtype, kernel_device, scale=D**-0.25)
    check_contrastive(
        first,
        last,
        backend="triton",
        detach_first=detach_first,
        temperature=temperature,
        normalize=normalize,
        negatives="all",
        what="kernel all",
    )


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_noncontiguous(kernel_device, dtype):
    first = torch.randn(2, 18, 20, device=kernel_device).to(dtype)[:, 1:]
    last = torch.randn(2, 20, 17, device=kernel_device).to(dtype).transpose(1, 2)
    assert not first.is_contiguous() and not last.is_contiguous()
    check_contrastive(
        first,
        last,
        backend="triton",
        detach_first=False,
        temperature=0.2,
        negatives="all",
        what="kernel non-contiguous",
    )


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_huge_logits(kernel_device, dtype):
    first, last = huge_logit_tokens(dtype, kernel_device)
    loss = check_contrastive(
        first,
        last,
        backend="triton",
        detach_first=False,
        negatives="all",
        what="kernel ±500 logits",
    )
    assert torch.isfinite(loss).all()


@pytest.mark.kernel
def test_kernel_deterministic(kernel_device):
    first, last = contrastive_tokens(2, 33, 20, torch.float32, kernel_device)
    grads = [contrastive_grads(first, last, negatives="all", backend="triton") for _ in range(2)]
    for g0, g1 in zip(grads[0], grads[1], strict=True):
        assert torch.equal(g0, g1)


@pytest.mark.kernel
def test_kernel_reduction_none_and_module(kernel_device):
    first, last = contrastive_tokens(3, 17, 16, torch.float32, kernel_device)
    kw = dict(temperature=0.5, negatives="all", backend="triton")
    per_image = patch_contrastive_loss(first, last, reduction="none", **kw)
    torch.testing.assert_close(PatchContrastiveLoss(reduction="mean", **kw)(first, last), per_image.mean())
    torch.testing.assert_close(patch_contrastive_loss(first, last, reduction="sum", **kw), per_image.sum())
    weights = torch.tensor([1.0, -2.0, 0.0], device=kernel_device)
    z = last.clone().requires_grad_()
    patch_contrastive_loss(first, z, reduction="none", **kw).backward(weights)
    z64 = last.detach().cpu().double().requires_grad_()
    (
        contrastive_loss_reference(first.cpu().double(), z64, temperature=0.5, negatives="all") * weights.cpu().double()
    ).sum().backward()
    assert_close(z.grad, z64.grad, torch.float32, "kernel weighted reduction='none'")
    assert z.grad[2].abs().max() == 0  # a zero grad_output entry gives that image exactly zero gradient


@pytest.mark.kernel
def test_kernel_matches_torch_path(kernel_device):
    first, last = contrastive_tokens(2, 40, 24, torch.float32, kernel_device)
    for normalize in (False, True):
        got = patch_contrastive_loss(
            first, last, negatives="all", normalize=normalize, reduction="none", backend="triton"
        )
        want = patch_contrastive_loss(
            first.cpu(), last.cpu(), negatives="all", normalize=normalize, reduction="none", backend="torch"
        )
        assert_close(got, want, torch.float32, "kernel vs torch path")
