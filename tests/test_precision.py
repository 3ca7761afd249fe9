"""The precision policy (README, "numerics contract"), the same on every path: which operands the matrix work
gets under each setting, and values and gradients against float64 for every policy."""

import pytest
import torch

from fastpatchdiv import (
    PatchContrastiveLoss,
    PatchCosineLoss,
    PatchMixingLoss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
)
from fastpatchdiv._common import resolve_operands
from fastpatchdiv.reference import contrastive_loss_reference, cosine_loss_reference, mixing_loss_reference
from tests.helpers import DEVICE, assert_close, cosine_tokens

# The operands' tolerance row: TF32 keeps 10 mantissa bits like fp16 (exact fp32 on a CPU).
OPERAND_TOLERANCE = {"fp32": torch.float32, "tf32": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def matmul_precision():
    """Set torch.get_float32_matmul_precision() for one test, restored after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------------------ the policy
@pytest.mark.parametrize(
    "dtype, setting, autocast, expected",
    [
        (torch.float32, "highest", None, "fp32"),
        (torch.float32, "high", None, "tf32"),
        (torch.float32, "medium", None, "tf32"),
        (torch.bfloat16, "highest", None, "bf16"),
        (torch.float16, "high", None, "fp16"),
        (torch.float32, "highest", torch.bfloat16, "bf16"),
        (torch.float16, "highest", torch.bfloat16, "bf16"),
        (torch.float64, "high", None, "fp64"),
        (torch.float64, "highest", torch.bfloat16, "fp64"),
    ],
)
def test_auto_follows_torch_matmul(matmul_precision, dtype, setting, autocast, expected):
    matmul_precision(setting)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        assert resolve_operands(dtype, "cpu", "auto") == expected


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_keyword_overrides_the_policy(matmul_precision, precision):
    matmul_precision("high")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_operands(torch.float32, "cpu", precision) == precision


def test_bad_precision_raises_everywhere():
    x = torch.randn(1, 4, 8)
    for call in (
        lambda: patch_cosine_loss(x, precision="tf16"),
        lambda: patch_contrastive_loss(x, x, precision="ieee"),
        lambda: patch_mixing_loss(x, torch.randn(3, 8), None, torch.zeros(1, 4, dtype=torch.long), precision=""),
        lambda: PatchCosineLoss(precision="x"),
        lambda: PatchContrastiveLoss(precision="x"),
        lambda: PatchMixingLoss(8, 3, precision="x"),
    ):
        with pytest.raises(ValueError, match="precision must be one of"):
            call()


@pytest.mark.kernel
@pytest.mark.parametrize(
    "dtype, setting, autocast, precision, op_dtype, dot",
    [
        (torch.float32, "highest", False, "auto", torch.float32, "ieee"),
        (torch.float32, "high", False, "auto", torch.float32, "tf32"),
        (torch.bfloat16, "highest", False, "auto", torch.bfloat16, "tf32"),
        (torch.float32, "highest", True, "auto", torch.bfloat16, "tf32"),
        (torch.bfloat16, "high", False, "fp32", torch.float32, "ieee"),
        (torch.float32, "highest", True, "fp16", torch.float16, "tf32"),
    ],
)
def test_kernels_launch_with_the_policys_operands(
    kernel_device, matmul_precision, dtype, setting, autocast, precision, op_dtype, dot
):
    """Every launch with a tl.dot gets the policy's operand dtype and input_precision (16-bit ignores it)."""
    from fastpatchdiv.kernels._utils import record_launches

    matmul_precision(setting)
    first = torch.randn(2, 20, 24, device=kernel_device, dtype=torch.bfloat16)  # a patch embedding's dtype
    last = torch.randn(2, 20, 24, device=kernel_device, dtype=dtype, requires_grad=True)
    with record_launches() as log, torch.autocast(kernel_device, dtype=torch.bfloat16, enabled=autocast):
        patch_cosine_loss(last, precision=precision).backward()
        first_in = first if autocast else first.to(dtype)
        patch_contrastive_loss(first_in, last, negatives="all", precision=precision).backward()
    dots = [launch for launch in log if launch.precision is not None]
    assert {launch.kernel for launch in dots} >= {"_cosine_strip_kernel", "_contrastive_lse_kernel"}
    for launch in dots:
        assert (launch.operand_dtype, launch.precision) == (op_dtype, dot), launch
    assert last.grad.dtype == dtype


# ---------------------------------------------------------------------------- values against float64
PRECISIONS = ["fp32", "tf32", "bf16", "fp16"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cosine_every_policy(backend, precision):
    x = cosine_tokens((2, 37, 33), torch.float16, DEVICE).float().requires_grad_()
    weights = torch.rand(2, device=DEVICE) + 0.5
    (patch_cosine_loss(x, reduction="none", backend=backend, precision=precision) * weights).sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    ref = cosine_loss_reference(x64)
    (ref * weights.double().cpu()).sum().backward()
    loss = patch_cosine_loss(x.detach(), reduction="none", backend=backend, precision=precision)
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_close(loss, ref, OPERAND_TOLERANCE[precision], f"{precision} loss")
    assert_close(x.grad, x64.grad, OPERAND_TOLERANCE[precision], f"{precision} grad")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_contrastive_all_every_policy(backend, precision):
    first = (0.3 * torch.randn(2, 37, 33, device=DEVICE)).requires_grad_()
    last = (0.3 * torch.randn(2, 37, 33, device=DEVICE)).requires_grad_()
    kw = dict(negatives="all", temperature=0.5, detach_first=False, reduction="none")
    loss = patch_contrastive_loss(first, last, backend=backend, precision=precision, **kw)
    weights = torch.rand(2, device=DEVICE) + 0.5
    (loss * weights).sum().backward()
    f64, l64 = (t.detach().double().cpu().requires_grad_() for t in (first, last))
    ref = contrastive_loss_reference(f64, l64, negatives="all", temperature=0.5)
    (ref * weights.double().cpu()).sum().backward()
    tol = OPERAND_TOLERANCE[precision]
    assert_close(loss, ref, tol, f"{precision} loss")
    assert_close(first.grad, f64.grad, tol, f"{precision} d first")
    assert_close(last.grad, l64.grad, tol, f"{precision} d last")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mixing_every_policy(backend, precision):
    tokens = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    head = torch.nn.Linear(16, 10).to(DEVICE)
    targets = torch.randint(0, 10, (2, 9), device=DEVICE)
    loss = patch_mixing_loss(tokens, head.weight, head.bias, targets, backend=backend, precision=precision)
    loss.backward()
    t64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (tokens, head.weight, head.bias))
    ref = mixing_loss_reference(t64, w64, b64, targets.cpu()).mean()
    ref.backward()
    tol = OPERAND_TOLERANCE[precision]
    assert_close(loss, ref, tol, f"{precision} loss")
    for name, got, want in (("tokens", tokens.grad, t64.grad), ("weight", head.weight.grad, w64.grad)):
        assert_close(got, want, tol, f"{precision} d {name}")


@pytest.mark.parametrize("op", ["cosine", "all"])
def test_autocast_matches_explicit_operands(backend, op):
    """Under autocast "auto" means the autocast dtype: the same bits as asking for it outside autocast."""
    first = torch.randn(2, 20, 24, device=DEVICE).bfloat16()
    last = torch.randn(2, 20, 24, device=DEVICE)  # a final LayerNorm's fp32 output
    run = {
        "cosine": lambda **kw: patch_cosine_loss(last, backend=backend, **kw),
        "all": lambda **kw: patch_contrastive_loss(first, last, negatives="all", backend=backend, **kw),
    }[op]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        auto = run()
    assert auto.dtype == torch.float32
    assert torch.equal(auto, run(precision="bf16"))
