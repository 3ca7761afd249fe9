"""Capture fastpatchdiv's Triton launches for a GPU this machine does not have.

triton's JIT asks its active driver for the device, the stream and the compile target, binds the launch
arguments (signature, constexprs, specialisation attributes such as 16-byte alignment and divisibility by
16) and parses the launch options (num_warps, num_stages, ...), and only then compiles and launches. Here a
stand-in driver reports the chosen target, the launchers run on meta tensors, and the JIT is stopped
where it would compile: what it would have compiled is recorded with its grid, and nothing launches.

The op runners (``cosine_calls``, ``contrastive_calls``, ``mixing_calls``) are the only code that knows
the launchers' names; the launchers plan for a target through ``use_target`` and log the multiply-adds
they issue through ``record_launches`` (``fastpatchdiv.kernels._utils``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction

# The JIT must see real kernels: under TRITON_INTERPRET=1 they are interpreter functions with no compile.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise ImportError("benchmarks.static_capture needs the compiled kernels: unset TRITON_INTERPRET")

from fastpatchdiv.kernels import _utils  # noqa: E402
from fastpatchdiv.kernels import contrastive as kernels_contrastive  # noqa: E402
from fastpatchdiv.kernels import cosine as kernels_cosine  # noqa: E402
from fastpatchdiv.kernels import mixing as kernels_mixing  # noqa: E402
from fastpatchdiv.mixing import _chunk_rows  # noqa: E402

# dtype choice on the command line -> (input dtype, operands of the matrix work, record dtype, precision)
DTYPES = {
    "fp32": (torch.float32, "fp32", "fp32", "ieee"),
    "fp32-tf32": (torch.float32, "tf32", "fp32", "tf32"),
    "bf16": (torch.bfloat16, "bf16", "bf16", "bf16"),
    "fp16": (torch.float16, "fp16", "fp16", "fp16"),
}
OPS = ("cosine", "contrastive-all", "mixing")
MIXING_CLASSES = 1000
TEMPERATURE = 0.1
TARGETS = _utils.TARGETS  # arch -> Target(arch, sms, max_shared)


class StandInDriver:
    """The part of triton's driver the JIT reads before a launch, reporting ``arch`` as the device.

    The device id is the arch, so the JIT keeps one binder (and one compile target) per arch."""

    def __init__(self) -> None:
        self.arch = 90

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@dataclasses.dataclass(eq=False)
class Binary:
    """One binary as triton's JIT bound it: what ``triton.compile`` needs. It stands in for the compiled
    kernel in the JIT's cache, so a launch of the same binary skips the binding work and only records its
    grid (host loops launch a kernel thousands of times at N = 65536, B = 83)."""

    fn: JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    function = None  # what the JIT's launch path passes through to ``run``
    packed_metadata = None

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__.strip("_").removesuffix("_kernel")

    def named_constexprs(self) -> dict:
        names = self.fn.arg_names
        return {names[path[0]]: getattr(v, "value", v) for path, v in self.constexprs.items()}

    @functools.cached_property
    def key(self) -> str:
        """What decides the binary: the kernel's source (with its callees), target, signature, constexprs,
        specialisation attributes and every option (warps and stages among them)."""
        parts = (self.fn.cache_key, self.arch, sorted(self.signature.items()), sorted(self.constexprs.items()))
        parts += (sorted(self.attrs.items()), sorted(self.options.items()), triton.__version__)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]

    def job(self) -> dict:
        """Picklable: the kernel by module and name, and what ``triton.compile`` takes."""
        fn = self.fn.fn
        return dict(
            module=fn.__module__,
            name=fn.__name__,
            arch=self.arch,
            signature=self.signature,
            constexprs=self.constexprs,
            attrs=self.attrs,
            options=self.options,
        )

    def info(self) -> dict:
        """JSON-ready: kernel, function, arch, named constexprs, the arguments triton specialised as
        divisible by 16, warps and stages."""
        names = self.fn.arg_names
        div16 = [names[path[0]] for path, attr in self.attrs.items() if ["tt.divisibility", 16] in map(list, attr)]
        constexprs = {k: v if isinstance(v, int | float | str) else str(v) for k, v in self.named_constexprs().items()}
        return dict(
            kernel=self.kernel,
            function=f"{self.fn.fn.__module__}.{self.fn.fn.__name__}",
            arch=self.arch,
            constexprs=constexprs,
            divisible_by_16=div16,
            num_warps=self.options["num_warps"],
            num_stages=self.options["num_stages"],
        )

    def launch_metadata(self, grid, stream, *args) -> None:
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, *hooks_and_args):
        args = hooks_and_args[2:]  # after the launch enter and exit hooks: the bound arguments, in order
        ints = {name: v for name, v in zip(self.fn.arg_names, args, strict=True) if type(v) is int}
        _sinks[-1].append(Launch(self, (grid_0, grid_1, grid_2), ints))


@dataclasses.dataclass(eq=False)
class Launch:
    """One launch: its binary, its grid (3-D, as triton launches it) and its int arguments by name."""

    binary: Binary
    grid: tuple
    ints: dict
    repeats: dict = dataclasses.field(default_factory=dict)  # call label -> times the call issues it

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def summary(self) -> dict:
        """JSON-ready: binary key, kernel, grid, programs, warps, stages, the calls that issue it and the
        most times one call does."""
        return dict(
            compile=self.binary.key,
            kernel=self.binary.kernel,
            grid=list(self.grid),
            programs=self.programs,
            num_warps=self.binary.options["num_warps"],
            num_stages=self.binary.options["num_stages"],
            calls=list(self.repeats),
            repeats=max(self.repeats.values()),
        )


_sinks: list[list[Launch]] = []


@contextlib.contextmanager
def capturing(driver: StandInDriver) -> Iterator[list[Launch]]:
    """Inside the block, a kernel launch appends a ``Launch`` to the yielded list instead of running.

    The JIT binds the arguments and parses the options as for a real launch; where it would compile, a
    ``Binary`` goes into its cache instead, and the launch path hands that the grid and arguments."""
    captured: list[Launch] = []
    do_compile, touched = JITFunction._do_compile, set()

    def do_compile_(self, key, signature, device, constexprs, options, attrs, warmup):
        binary = Binary(self, driver.arch, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__))
        self.device_caches[device][0][key] = binary
        touched.add((self, device))
        return binary

    JITFunction._do_compile = do_compile_
    # Restored as found: reset_active() would create the default driver, which fails without a GPU.
    active = triton_driver._active
    triton_driver.set_active(driver)
    _sinks.append(captured)
    try:
        yield captured
    finally:
        _sinks.remove(captured)
        JITFunction._do_compile = do_compile
        triton_driver._active = active
        for fn, device in touched:  # the stand-ins must not outlive the capture
            fn.device_caches.pop(device, None)


# ----------------------------------------------------------------------------------------- op runners
# A call is (label, thunk): the thunk launches every kernel of one call of the op on meta tensors.
Call = tuple[str, Callable[[], None]]


def cosine_calls(B: int, N: int, D: int, dtype: torch.dtype, operands: str) -> list[Call]:
    """The loss-only call and the training call (forward + backward kernels) of the cosine op."""
    x = torch.empty(B, N, D, device="meta", dtype=dtype)
    run = functools.partial(kernels_cosine.cosine_forward, x, None, operands)
    return [(f"need_grad={g}", functools.partial(run, g)) for g in (False, True)]


def contrastive_calls(B: int, N: int, D: int, dtype: torch.dtype, operands: str) -> list[Call]:
    """Training calls of contrastive "all": ``first`` detached (need_a=False, the default) and not."""
    a, z = (torch.empty(B, N, D, device="meta", dtype=dtype) for _ in range(2))
    run = functools.partial(kernels_contrastive.contrastive_all_forward, a, z, None, TEMPERATURE, operands)
    return [(f"need_a={n}", functools.partial(run, n, True)) for n in (False, True)]


def mixing_calls(B: int, N: int, D: int, dtype: torch.dtype, operands: str) -> list[Call]:
    """The row cross-entropy on one chunk of the fused linear cross-entropy (C = 1000): hard and soft
    targets with the gradient written, and hard targets loss-only."""
    rows = _chunk_rows(B * N, D, MIXING_CLASSES, "triton")
    logits = torch.empty(rows, MIXING_CLASSES, device="meta", dtype=dtype)
    valid = torch.empty(rows, device="meta", dtype=torch.bool)
    hard = torch.empty(rows, device="meta", dtype=torch.int64)
    soft = torch.empty(rows, MIXING_CLASSES, device="meta", dtype=torch.float32)
    run = kernels_mixing.cross_entropy_rows_
    return [
        ("hard", functools.partial(run, logits, hard, valid, 0.0, True)),
        ("soft", functools.partial(run, logits, soft, valid, 0.0, True)),
        ("hard, loss only", functools.partial(run, logits, hard, valid, 0.0, False)),
    ]


RUNNERS = {"cosine": cosine_calls, "contrastive-all": contrastive_calls, "mixing": mixing_calls}


# ------------------------------------------------------------------------------ targets and work
@contextlib.contextmanager
def planning_for(target, driver: StandInDriver) -> Iterator[None]:
    """Launchers plan their blocks and grids for ``target``, and the JIT binds for its arch."""
    driver.arch = target.arch
    with _utils.use_target(target):
        yield


def capture_op(captured: list, driver: StandInDriver, op: str, target, B: int, N: int, D: int, dtype_name: str):
    """Every launch of ``op``'s calls at one shape, planned for ``target``, inside ``capturing(driver)``.

    Returns:
        (launches, macs): the distinct launches (binary and grid), each with how many times each call
        issues it in ``repeats``; and the multiply-adds each call issues, by label.
    """
    dtype, operands, _, _ = DTYPES[dtype_name]
    launches: dict = {}
    macs: dict[str, int] = {}
    with planning_for(target, driver):
        for label, thunk in RUNNERS[op](B, N, D, dtype, operands):
            captured.clear()
            with _utils.record_launches() as log:
                thunk()
            macs[label] = sum(entry.macs for entry in log)
            for launch in captured:
                first = launches.setdefault((launch.binary.key, launch.grid), launch)
                first.repeats[label] = first.repeats.get(label, 0) + 1
    captured.clear()
    return list(launches.values()), macs
