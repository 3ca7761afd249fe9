"""Launch rules shared by the kernel modules: the target a launch is planned for, the launch-plan type,
operand precisions, and the launch log the static report and the tests read.

Index rule in every kernel: the image index is widened to int64 where it is read
(``b = tl.program_id(2).to(tl.int64)``) and every image's base pointer is formed from it, so B·N·D past
2^31 elements cannot wrap; offsets inside one image stay int32, which ``check_image_offsets`` makes
safe on the host.

Blocks are picked by rule, never by timing, so every process on one GPU picks the same and results are
bitwise reproducible. The rules read three facts of the device (``Target``): its compute capability,
its SM count (grid fill) and its per-block shared-memory opt-in limit (pipeline stages).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpatchdiv._common import operand_dtype
from fastpatchdiv.kernels import INTERPRETER

# tl.dot takes tiles of at least 16 in every dimension (a constexpr, so kernels can read it).
MIN_DOT = tl.constexpr(16)
# The most bytes a strip's scratch (sign(S) or P, rows x N) may take on a GPU: never N x N.
SCRATCH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Target:
    """What the launch rules read of a GPU: compute capability (90 = sm_90), SM count, and the per-block
    shared-memory opt-in limit in bytes (what triton checks at launch). ``arch = 0`` is the interpreter."""

    arch: int
    sms: int
    max_shared: int
    scratch_bytes: int = SCRATCH_BYTES


# The targets the static report compiles for; the SM count is the largest part of each architecture,
# so a grid that fills it fills the smaller parts too.
TARGETS = {
    80: Target(80, 108, 166_912),  # A100
    86: Target(86, 84, 101_376),  # RTX 3090 / A6000 / A10
    89: Target(89, 142, 101_376),  # RTX 4090 / L4 / L40S
    90: Target(90, 132, 232_448),  # H100 / H200
    100: Target(100, 148, 232_448),  # B200
    120: Target(120, 188, 101_376),  # RTX 5090 / RTX PRO 6000
}
# Under the interpreter every program instance costs milliseconds: the smallest legal tiles, 4 "SMs"
# and a 4 KiB scratch, so small inputs still cross tile, split and strip edges.
INTERPRETER_TARGET = Target(0, 4, 2**31, scratch_bytes=4096)


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch's tiles and options; every op's ``pick_blocks`` returns these."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 2

    def options(self, operands: str | None = None) -> dict:
        """Launch keywords: warps, stages and, for kernels with a tl.dot, the dot's precision and the
        interpreter's bf16 upcast."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if operands is not None:
            opts.update(PRECISION=input_precision(operands), UPCAST=INTERPRETER and operands == "bf16")
        return opts


# ------------------------------------------------------------------------------------------ targets
_forced: list[Target] = []


@contextlib.contextmanager
def use_target(target: Target):
    """Plan every launch for ``target`` instead of the device's: the static report compiles launches for
    GPUs it does not have, and the interpreter tests run a GPU's blocks on the CPU."""
    _forced.append(target)
    try:
        yield target
    finally:
        _forced.pop()


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]  # opt-in
    return Target(10 * props.major + props.minor, props.multi_processor_count, shared)


def launch_target(device: torch.device) -> Target:
    """The target launches on ``device`` are planned for: a forced one, the CUDA device's, or the
    interpreter's."""
    if _forced:
        return _forced[-1]
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_TARGET


def stages(target: Target, stage_bytes: int, fixed_bytes: int = 0, most: int = 3) -> int:
    """Pipeline stages that fit the target's shared memory: ``stage_bytes`` per stage (one A and one B
    tile) plus ``fixed_bytes`` for the epilogue's layout conversion, and 2 KiB of triton's own."""
    fit = (target.max_shared - fixed_bytes - 2048) // stage_bytes
    return max(1, min(most, fit))


def grid_splits(target: Target, programs: int, most: int) -> int:
    """How many ways to split a launch's reduction so ``programs`` x splits reaches twice the SM count."""
    return max(1, min(most, triton.cdiv(2 * target.sms, max(1, programs))))


# --------------------------------------------------------------------------------------- operands
def input_precision(operands: str) -> str:
    """``tl.dot``'s input_precision: exact fp32 is "ieee"; 16-bit operands ignore it."""
    return "ieee" if operands == "fp32" else "tf32"


# ------------------------------------------------------------------------------------------ the log
@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launchers issued it: grid, multiply-adds its tile loops issue (padded
    tiles included), its operand dtype and dot precision."""

    kernel: str
    grid: tuple
    macs: int
    operand_dtype: torch.dtype | None
    precision: str | None


_logs: list[list[Launch]] = []


@contextlib.contextmanager
def record_launches():
    """Collect every ``Launch`` issued inside the block into the list it yields."""
    log: list[Launch] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def launch(kernel, grid: tuple, *args, macs: int = 0, operands: str | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, logged where a ``record_launches`` block is open."""
    kernel[grid](*args, **kwargs)
    for log in _logs:
        dtype = operand_dtype(operands) if operands else None
        log.append(Launch(kernel.fn.__name__, tuple(grid), macs, dtype, kwargs.get("PRECISION")))


def check_image_offsets(*tensors: torch.Tensor) -> None:
    """Raise unless every element offset inside one image, Σ (size − 1)·|stride| over (N, D), fits int32."""
    for t in tensors:
        reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if reach >= 2**31:
            raise ValueError(
                f"one image of shape {tuple(t.shape[1:])} with strides {t.stride()[1:]} spans {reach} elements; "
                "the kernels index inside an image in 32 bits: pass a contiguous tensor or use backend='torch'"
            )


def score_plan(operands: str, target: Target, square: bool = False, stores_tile: bool = False) -> LaunchPlan:
    """Tiles of a score kernel (S = X Yᵀ over D in BLOCK_K chunks): 128 x 64 (128 x 128 when ``square``)
    with 8 warps, two warpgroups of wgmma's M = 64 on sm_90; the interpreter's smallest legal tiles.
    ``stores_tile``: the epilogue writes the tile out, which may stage it through shared memory."""
    if target.arch == 0:
        return LaunchPlan(MIN_DOT.value, MIN_DOT.value, MIN_DOT.value, num_warps=1, num_stages=1)
    op_bytes = operand_dtype(operands).itemsize
    if operands == "fp32":
        # Exact fp32 runs on FFMA, whose operands live in registers: 64 x 64 tiles fit without spilling
        # where 128-row tiles do not; the warp counts are what ptxas fits on every target (static report).
        block_m, block_n, block_k, warps = 64, 64, 16, 4 if square else 8
    else:
        block_m, block_n, block_k, warps = 128, 128 if square else 64, 32 if op_bytes == 4 else 64, 8
    per_stage = (block_m + block_n) * block_k * op_bytes
    fixed = block_m * block_n * 4 if stores_tile else 0
    # On sm_100 triton's tcgen05 pipeline holds 128 registers a thread: a third stage spills there.
    most = (1 if operands == "fp32" else 2) if target.arch == 100 else 3
    return LaunchPlan(block_m, block_n, block_k, num_warps=warps, num_stages=stages(target, per_stage, fixed, most))


def strip_rows(batch: int, n: int, elem_bytes: int, block_m: int, target: Target) -> tuple[int, int]:
    """(images per strip, rows per strip) so a strip's scratch of images x rows x N elements stays within
    the target's scratch bound: whole images while they fit, else strips of whole row blocks."""
    budget = target.scratch_bytes // (n * elem_bytes)
    if budget >= n:
        return max(1, min(batch, budget // n)), n
    return 1, max(block_m, budget // block_m * block_m)


def column_splits(target: Target, programs: int, n: int, block_n: int) -> int:
    """Column blocks per split of a score launch of ``programs`` row programs: enough splits to fill the
    GPU, each a whole number of column blocks. Returns the columns each split covers."""
    col_blocks = triton.cdiv(n, block_n)
    splits = grid_splits(target, programs, col_blocks)
    return triton.cdiv(col_blocks, splits) * block_n
