"""Peak memory of one step above what was allocated before it (inputs; for backward, also the graph).

CUDA: ``torch.cuda.max_memory_allocated`` in this process. CPU: each case runs in a fresh child process
forked from a forkserver that has imported everything but run nothing (``_preload``); the child runs a
warm-up step (``cases.warmup_case``), resets the RSS high-water mark (``/proc/self/clear_refs``), runs the
step and reports the growth of ``ru_maxrss``. Its glibc mmaps every buffer of 64 KiB and more, so freed
buffers go back to the OS instead of being reused unseen by the measured step.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal

import torch

from benchmarks.cases import Case, warmup_case, workload
from benchmarks.providers import Providers, first_line, setup

_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "FASTPATCHDIV_BENCH_FORKSERVER": "1"}
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
_context = None


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


def cuda_peak_bytes(case: Case, fn) -> int:
    w = workload(case, fn)
    w.step()  # warm-up, outside the measurement
    w.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    w.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _preload() -> None:
    """Run in the forkserver, which imports this module first: what every child needs, then out of the
    garbage collector's reach (gc.freeze), so that a child's gc.collect() costs microseconds, not 0.3 s."""
    setup("cpu")
    import torch._inductor.compile_fx  # noqa: F401  (3-4 s to import: once here, not in each child)
    import torch._inductor.select_algorithm  # noqa: F401
    from torch._inductor import codecache, cpu_vec_isa

    try:  # per-process caches of every compilation: torch's source hash, the system key, the vector ISA
        codecache.torch_key(), codecache.CacheBase.get_system(), cpu_vec_isa.pick_vec_isa()
    except Exception:  # a private API moved: the children pay for it
        pass
    try:  # tqdm's lock (taken while torch.fx compiles), made in a child, would be reported as leaked
        __import__("tqdm").tqdm.get_lock()
    except ImportError:
        pass
    gc.freeze()


if os.environ.get("FASTPATCHDIV_BENCH_FORKSERVER") == "1":
    _preload()


def start_cpu_children() -> None:
    """Start the forkserver (glibc reads ``_CHILD_ENV`` at its start) and wait for its imports (~10 s of
    CPU), so that they overlap no timing."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["benchmarks.memory"])
        saved = os.environ.copy()
        os.environ.update(_CHILD_ENV)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    child = _context.Process(target=gc.collect)
    child.start()
    child.join()


def _reset_peak_rss() -> bool:
    """The RSS high-water mark back to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(case: Case, conn) -> None:
    try:
        fn = Providers().loss_fn(case)
        if resettable := _reset_peak_rss():  # else a warm-up would set the mark: measure the first step
            workload(warmup_case(case), fn).step()
        w = workload(case, fn)
        gc.collect()
        _reset_peak_rss()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        w.step()
        note = "" if resettable else "first step measured (no /proc/self/clear_refs): includes one-time allocations"
        conn.send(("ok", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, note))
    except BaseException as e:  # report everything: the parent decides what it means
        conn.send(("oom" if is_oom(e) else "error", None, first_line(e)))
    finally:
        conn.close()


def cpu_peak_bytes(case: Case, timeout_s: float) -> tuple[str, int | None, str]:
    """(status, peak RSS growth in bytes, note) of one step of ``case`` in a fresh child process (Linux)."""
    if _context is None:
        start_cpu_children()
    recv, send = _context.Pipe(duplex=False)
    child = _context.Process(target=_child, args=(case, send), daemon=True)
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
