"""Padding masks (variable-size batches, e.g. NaFlexVit's ``patch_valid``) on every op and path.

Two oracles: the float64 references with ``mask=``, and an independent one that drops the masked tokens
and runs the unmasked reference on each image's real tokens. Masked tokens get exactly zero gradient
whatever they hold; an image with fewer than 2 real patches has loss 0.
"""

import pytest
import torch

from fastpatchdiv import (
    PatchContrastiveFunction,
    PatchCosineFunction,
    PatchMixingFunction,
    patch_contrastive_loss,
    patch_cosine_loss,
)
from fastpatchdiv.reference import contrastive_loss_reference, cosine_loss_reference
from tests.helpers import (
    DEVICE,
    KERNEL_DTYPES,
    assert_close,
    check_contrastive,
    check_cosine,
    contrastive_tokens,
    cosine_tokens,
)

DTYPES = (torch.float64,) + KERNEL_DTYPES


def ragged_mask(batch: int, n: int, device=DEVICE) -> torch.Tensor:
    """Random real patches, not a prefix; the last two images keep 1 and 0 real patches."""
    mask = torch.rand(batch, n) > 0.35
    mask[0, :2] = True  # at least two real patches in the first image
    mask[-2] = False
    mask[-2, n // 2] = True
    mask[-1] = False
    return mask.to(device)


def _dropped(fn, tokens, mask):
    """The independent oracle: fn on each image's real tokens alone (0 below 2 of them)."""
    out = []
    for b in range(tokens[0].shape[0]):
        real = [t[b][mask[b].cpu()].unsqueeze(0) for t in tokens]
        out.append(fn(*real)[0] if real[0].shape[1] >= 2 else real[0].sum() * 0)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_mask_matches_both_oracles(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernels take fp32/fp16/bf16")
    x = cosine_tokens((5, 37, 20), dtype, DEVICE)
    mask = ragged_mask(5, 37)
    loss = check_cosine(x, backend, mask=mask, what="masked cosine")
    dropped = _dropped(cosine_loss_reference, (x.double().cpu(),), mask)
    assert_close(loss, dropped, dtype, "masked cosine vs dropped tokens")
    assert loss[-2:].eq(0).all()


@pytest.mark.parametrize("negatives", ["mean", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contrastive_mask_matches_both_oracles(backend, negatives, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernels take fp32/fp16/bf16")
    first, last = contrastive_tokens(5, 37, 20, dtype, DEVICE, scale=20**-0.25)
    mask = ragged_mask(5, 37)
    kw = dict(negatives=negatives, temperature=0.3, normalize=dtype != torch.float32)
    loss = check_contrastive(first, last, detach_first=False, mask=mask, backend=backend, what="masked", **kw)
    dropped = _dropped(
        lambda a, z: contrastive_loss_reference(a, z, **kw), (first.double().cpu(), last.double().cpu()), mask
    )
    assert_close(loss, dropped, dtype, f"masked {negatives} vs dropped tokens")
    assert loss[-2:].eq(0).all()


# The cosine backward kernel reads a masked row's x (masking that load spills registers) and discards what
# it computes from it; the interpreter's numpy warns about the NaN and 1e30 it reads.
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("op", ["cosine", "mean", "all"])
def test_masked_tokens_may_hold_anything(backend, op):
    """NaN and huge padding: the same loss as zero padding, finite gradients, exactly 0 on masked tokens."""
    first, last = contrastive_tokens(4, 33, 16, torch.float32, DEVICE)
    mask = ragged_mask(4, 33)
    results = []
    for fill in (0.0, float("nan"), 1e30):
        a = first.masked_fill(~mask.unsqueeze(-1), fill)
        z = last.masked_fill(~mask.unsqueeze(-1), fill).requires_grad_()
        a.requires_grad_()
        if op == "cosine":
            loss = patch_cosine_loss(z, mask=mask, reduction="none", backend=backend)
        else:
            loss = patch_contrastive_loss(
                a, z, negatives=op, mask=mask, detach_first=False, reduction="none", backend=backend
            )
        loss.sum().backward()
        for grad in [z.grad] + ([a.grad] if op != "cosine" else []):
            assert torch.isfinite(grad).all(), f"{op}: non-finite gradient with padding {fill}"
            assert grad[~mask].eq(0).all(), f"{op}: masked tokens got a gradient with padding {fill}"
        results.append((loss.detach(), z.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("op", ["cosine", "mean", "all"])
def test_all_true_mask_equals_no_mask(backend, op):
    first, last = contrastive_tokens(2, 19, 12, torch.float32, DEVICE)
    full = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    if op == "cosine":
        a, b = (patch_cosine_loss(last, mask=m, reduction="none", backend=backend) for m in (full, None))
    else:
        a, b = (
            patch_contrastive_loss(first, last, negatives=op, mask=m, reduction="none", backend=backend)
            for m in (full, None)
        )
    assert_close(a, b, torch.float32, f"{op}: all-True mask vs none")


def test_two_dim_tokens_take_a_one_dim_mask(backend):
    x = cosine_tokens((21, 8), torch.float32, DEVICE)
    mask = torch.rand(21, device=DEVICE) > 0.3
    got = patch_cosine_loss(x, mask=mask, backend=backend)
    want = cosine_loss_reference(x.double().cpu()[None], mask=mask.cpu()[None])[0]
    assert_close(got, want, torch.float32, "2-D tokens, (N,) mask")
    with pytest.raises(ValueError, match="mask must have shape"):
        patch_cosine_loss(x, mask=mask[None], backend=backend)


@pytest.mark.parametrize("op", ["cosine", "all", "mixing"])
def test_functions_give_masked_tokens_zero_gradient(backend, op):
    """The autograd Functions under the public calls, fed zeroed padding as documented: masked tokens get
    exactly 0 and every gradient is finite on every path, an image without real patches included."""
    first, last = contrastive_tokens(4, 33, 16, torch.float32, DEVICE)
    mask = ragged_mask(4, 33)
    a, z = (t.masked_fill(~mask.unsqueeze(-1), 0.0).requires_grad_() for t in (first, last))
    if op == "cosine":
        loss = PatchCosineFunction.apply(z, mask, backend)
    elif op == "all":
        loss = PatchContrastiveFunction.apply(a, z, mask, 0.5, backend)
    else:
        head = torch.nn.Linear(16, 10, device=DEVICE)
        targets = torch.randint(0, 10, mask.shape, device=DEVICE)
        loss = PatchMixingFunction.apply(z, head.weight, head.bias, targets, mask, 0.1, -100, backend)
    loss.sum().backward()
    for grad in [z.grad] + ([a.grad] if op == "all" else []):
        assert torch.isfinite(grad).all(), f"{op}: non-finite gradient"
        assert grad[~mask].eq(0).all(), f"{op}: masked tokens got a gradient"
