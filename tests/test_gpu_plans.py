"""The GPU's launch configurations run under the interpreter: ``use_target`` makes the launchers plan for a
chosen GPU (its tiles, splits and strips) instead of the interpreter's smallest tiles, and every kernel runs
those blocks on shapes that cross their tile edges, against the float64 oracles. Launch rules read from the
target are asserted too (grid fill, scratch bound, shared memory)."""

import dataclasses

import pytest
import torch

from fastpatchdiv.kernels._utils import TARGETS, record_launches, score_plan, use_target
from tests.helpers import KERNEL_DTYPES, check_contrastive, check_cosine, contrastive_tokens, cosine_tokens

# N = 150 crosses a 128-row block and two 64-column blocks; D = 70 crosses a 64- (16-bit) or 32-wide
# (fp32) feature chunk. A scratch of 140 bytes a column puts the 150 rows in strips of at most 128 for
# every scratch dtype (int8 sign, 16-bit or fp32 P), so each image takes two strips.
SHAPE = (2, 150, 70)


def _small_scratch(arch: int):
    return dataclasses.replace(TARGETS[arch], scratch_bytes=140 * SHAPE[1])


@pytest.mark.kernel
@pytest.mark.parametrize("arch", [86, 90])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_cosine_at_gpu_blocks(kernel_device, arch, dtype):
    with use_target(_small_scratch(arch)):
        check_cosine(cosine_tokens(SHAPE, dtype, kernel_device), "triton", what=f"sm_{arch}")


@pytest.mark.kernel
@pytest.mark.parametrize("arch", [86, 90])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_contrastive_all_at_gpu_blocks(kernel_device, arch, dtype):
    first, last = contrastive_tokens(*SHAPE, dtype, kernel_device, scale=0.3)
    mask = torch.rand(SHAPE[:2], device=kernel_device) > 0.2
    with use_target(_small_scratch(arch)):
        check_contrastive(first, last, detach_first=False, negatives="all", temperature=0.5, what=f"sm_{arch}")
        check_contrastive(first, last, mask=mask, negatives="all", temperature=0.5, what=f"sm_{arch} masked")


@pytest.mark.kernel
def test_gpu_blocks_cross_strips_and_splits(kernel_device):
    """The shapes above do reach several strips, column splits and K splits at the GPU's blocks."""
    x = cosine_tokens(SHAPE, torch.float32, kernel_device).requires_grad_()
    with use_target(_small_scratch(90)), record_launches() as log:
        from fastpatchdiv import patch_cosine_loss

        patch_cosine_loss(x).backward()
    strips = [launch for launch in log if launch.kernel == "_cosine_strip_kernel"]
    gemms = [launch for launch in log if launch.kernel == "_strip_gemm_kernel"]
    assert len(strips) == 2 * SHAPE[0] and len(gemms) == len(strips)
    assert any(launch.grid[1] > 1 for launch in strips + gemms)


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("operands", ["fp32", "tf32", "bf16", "fp16"])
def test_score_tiles_fit_and_take_wgmma_shapes(arch, operands):
    """The pipeline stages fit the target's opt-in shared memory; rows come in wgmma's multiples of 64."""
    target = TARGETS[arch]
    for square, stores in ((False, False), (False, True), (True, False)):
        plan = score_plan(operands, target, square=square, stores_tile=stores)
        op_bytes = 4 if operands in ("fp32", "tf32") else 2
        per_stage = (plan.block_m + plan.block_n) * plan.block_k * op_bytes
        assert plan.num_stages * per_stage <= target.max_shared
        assert plan.block_m % 64 == 0 and plan.num_warps % 4 == 0


@pytest.mark.kernel
@pytest.mark.parametrize("arch", [80, 100, 120])
def test_tf32_plans_at_gpu_blocks(kernel_device, arch):
    """TF32 operands take their own tiles (32-deep K; 16-deep in sm_100's GEMM); run them on both ops."""
    from fastpatchdiv import patch_contrastive_loss, patch_cosine_loss
    from fastpatchdiv.reference import contrastive_loss_reference, cosine_loss_reference
    from tests.helpers import assert_close

    first, last = contrastive_tokens(*SHAPE, torch.float32, kernel_device, scale=0.3)
    last.requires_grad_()
    with use_target(_small_scratch(arch)):
        cos = patch_cosine_loss(last, reduction="none", precision="tf32")
        nce = patch_contrastive_loss(first, last, negatives="all", temperature=0.5, reduction="none", precision="tf32")
        (grad,) = torch.autograd.grad((cos + nce).sum(), last)
    f64, l64 = first.double().cpu(), last.detach().double().cpu().requires_grad_()
    ref_cos = cosine_loss_reference(l64)
    ref_nce = contrastive_loss_reference(f64, l64, negatives="all", temperature=0.5)
    (ref_grad,) = torch.autograd.grad((ref_cos + ref_nce).sum(), l64)
    # TF32 keeps fp16's 10 mantissa bits on a GPU (exact fp32 under the interpreter): fp16's tolerance row.
    assert_close(cos, ref_cos, torch.float16, f"sm_{arch} tf32 cosine")
    assert_close(nce, ref_nce, torch.float16, f"sm_{arch} tf32 all")
    assert_close(grad, ref_grad, torch.float16, f"sm_{arch} tf32 grad")
