"""Compile one captured launch for its target and read what the compiler says about it.

Runs in the worker processes of ``benchmarks.static`` (ptxas and triton's MLIR passes are the cost), so a
job is plain data: the kernel by module and name, and what ``triton.compile`` takes.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import tempfile
import time
import warnings

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(_BIN, "cuobjdump")


def init_worker(cache_dir: str) -> None:
    """Worker setup: triton's cache in a throw-away folder, and every compile runs ptxas with its log."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    knobs.cache.dir = cache_dir
    # The spill counts come from the ptxas log, which triton prints only when it runs ptxas.
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True


def compile_job(job: dict) -> dict:
    """Compile one launch and measure it.

    Args:
        job: ``module`` and ``name`` of the ``@triton.jit`` kernel, ``arch``, and the captured
            ``signature``, ``constexprs``, ``attrs`` and ``options``.

    Returns:
        ``shared_bytes`` (triton's dynamic shared memory, what it checks against the opt-in limit at launch),
        ``registers``, ``local_bytes`` and ``static_shared`` (cuobjdump -res-usage), ``spill_stores`` and
        ``spill_loads`` (bytes, ptxas log), ``tensor_core``, ``compile_s``; or ``error`` if it failed.
    """
    fn = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    log, start = io.StringIO(), time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as exc:  # a failed compile is a finding of the report, not a crash of it
        return dict(error=f"{type(exc).__name__}: {str(exc)[:1500]}")
    record = dict(compile_s=round(time.perf_counter() - start, 1), shared_bytes=int(kernel.metadata.shared))
    record.update(resource_usage(kernel.asm["cubin"]))
    record.update(ptxas_spills(log.getvalue()))
    record["tensor_core"] = tensor_core(kernel.asm["ttir"], kernel.asm["ptx"])
    return record


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local and static shared bytes of the kernel in ``cubin`` (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return dict(registers=None, stack_bytes=None, static_shared=None, local_bytes=None)
    return dict(zip(("registers", "stack_bytes", "static_shared", "local_bytes"), map(int, m.groups()), strict=True))


def ptxas_spills(log: str) -> dict:
    """Spill store and load bytes from the ptxas log (None for both when no log was printed)."""
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        return dict(spill_stores=None, spill_loads=None)
    return dict(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))


def tensor_core(ttir: str, ptx: str) -> str:
    """The tensor-core instruction a kernel's matrix products compiled to.

    "n/a" for a kernel without ``tt.dot`` in its Triton IR; else "tcgen05" (sm_100), "wgmma" (sm_90),
    "mma" (mma.sync), or "none" when the products run on FMA units (exact fp32)."""
    if not re.search(r"\btt\.dot\b", ttir):
        return "n/a"
    for name, pattern in (("tcgen05", r"\btcgen05\.mma"), ("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync")):
        if re.search(pattern, ptx):
            return name
    return "none"
