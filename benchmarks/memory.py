"""Peak memory of one timed step above what was allocated before it (inputs; for backward, also the graph).

CUDA: ``torch.cuda.max_memory_allocated`` in the benchmarking process. CPU: tracemalloc does not see
torch's allocator, so each case runs in a fresh child process and we read its peak RSS
(``getrusage().ru_maxrss``). Children are forked from a forkserver that has imported torch but run
nothing, so a child costs milliseconds instead of a torch import. In the child a warm-up step runs
first (lazy initialisation; torch.compile's compilation), then the RSS high-water mark is reset
(``/proc/self/clear_refs``) and the measured step runs. The eager providers warm up on a small copy
of the case (``cases.warmup_case``): their one-time work does not depend on the shape, and a
same-shape warm-up would double the cost of the long cases (a minute each at N = 65536 on CPU).
torch.compile warms up on the case itself, because it compiles one graph per shape. glibc gets a
fixed mmap threshold so that buffers freed by the warm-up go back to the OS rather than being reused
unseen by the measured run.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal
import sys

import torch

from benchmarks.cases import Case, compile_in_process, loss_fn, quiet, warmup_case, workload

# Allocations of 64 KiB and more are mmapped and unmapped on free, so the RSS follows live memory.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


def first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]


def cuda_peak_bytes(case: Case, fn) -> int:
    """Peak allocated bytes during one step, above those allocated before it (a fresh workload, one input set)."""
    w = workload(case, fn, n_sets=1)
    w.step()  # warm-up outside the measurement (the timer's own warm-up ran on other tensors)
    w.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    w.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# --- CPU: one fresh child per case ------------------------------------------------------------------

_context = None


def _forkserver():
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["benchmarks._preload"])
        saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
        os.environ.update(_MALLOC_ENV)  # read by glibc once, when the forkserver starts
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        _context = ctx
    return _context


def start_cpu_children() -> None:
    """Start the forkserver and wait until its imports are done (~10 s of CPU), so they overlap no timing."""
    child = _forkserver().Process(target=gc.collect)
    child.start()
    child.join()


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(case: Case, conn) -> None:
    quiet()
    try:
        compile_in_process()
        fn = loss_fn(case.op, case.provider)
        resettable = _reset_peak_rss()  # else a warm-up would set the high-water mark: measure the first step
        if resettable:
            warm = workload(warmup_case(case), fn, n_sets=1)
            warm.step()  # lazy initialisation, torch.compile's compilation
            del warm
        w = workload(case, fn, n_sets=1)
        gc.collect()
        note = ""
        if resettable:
            _reset_peak_rss()
        else:
            note = "first step measured (no /proc/self/clear_refs): includes one-time allocations"
        base = _maxrss_bytes()
        w.step()
        conn.send(("ok", _maxrss_bytes() - base, note))
    except BaseException as e:  # report everything: the parent decides what it means
        conn.send(("oom" if is_oom(e) else "error", None, first_line(e)))
    finally:
        conn.close()


def cpu_peak_bytes(case: Case, timeout_s: float) -> tuple[str, int | None, str]:
    """(status, peak RSS growth in bytes, note) of one step of ``case`` in a fresh child process."""
    ctx = _forkserver()
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(case, send), daemon=True)
    child.start()
    send.close()
    try:
        if recv.poll(timeout_s):
            return recv.recv()
        return "error", None, f"memory child timed out after {timeout_s:.0f} s"
    except EOFError:
        child.join(5)
        if child.exitcode == -signal.SIGKILL:
            return "oom", None, "memory child was killed (SIGKILL): out of memory (the kernel's OOM killer)"
        return "error", None, f"memory child died without an answer (exit code {child.exitcode})"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        recv.close()
