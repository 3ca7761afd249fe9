"""Peak memory of one step above what was allocated before it (inputs; for backward, also the graph).

CUDA: ``torch.cuda.max_memory_allocated`` in the benchmarking process. CPU: tracemalloc does not see
torch's allocator, so each case runs in a fresh child process and we read its peak RSS
(``getrusage().ru_maxrss``). Children are forked from a forkserver that has imported torch, inductor and
the providers but run nothing (``_preload``), so a child costs milliseconds. A child runs a warm-up step
(eager providers: a small copy of the case, ``cases.warmup_case``; torch.compile: the case itself, which
compiles it), resets the RSS high-water mark (``/proc/self/clear_refs``) and runs the measured step.
glibc gets a fixed mmap threshold so that buffers freed by the warm-up go back to the OS rather than
being reused unseen by the measured step.
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

from benchmarks.cases import Case, warmup_case, workload
from benchmarks.providers import Providers, compile_in_process, first_line, quiet

# Allocations of 64 KiB and more are mmapped and unmapped on free, so the RSS follows live memory.
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "FASTPATCHDIV_BENCH_FORKSERVER": "1"}
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


def cuda_peak_bytes(case: Case, fn) -> int:
    """Peak allocated bytes during one step, above those allocated before it (fresh inputs, one warm-up step)."""
    w = workload(case, fn)
    w.step()
    w.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    w.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _preload() -> None:
    """Run once in the forkserver (this module is its preload): what every child needs, imported ahead, then
    moved out of the garbage collector's reach so that a child's gc.collect() costs microseconds, not 0.3 s."""
    quiet()
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401  (3-4 s to import: once here, not in each child)
    import torch._inductor.select_algorithm  # noqa: F401
    from torch._inductor import codecache, cpu_vec_isa

    try:  # per-process caches every compilation consults: hash of torch's sources, system key, vector ISA
        codecache.torch_key()
        codecache.CacheBase.get_system()
        cpu_vec_isa.pick_vec_isa()
    except Exception:  # a private API moved: children pay the cost themselves
        pass
    try:  # tqdm's lock (taken while torch.fx compiles), made in a child, would be reported as leaked at exit
        from tqdm import tqdm

        tqdm.get_lock()
    except ImportError:
        pass
    gc.freeze()


if os.environ.get("FASTPATCHDIV_BENCH_FORKSERVER") == "1":
    _preload()

_context = None


def start_cpu_children() -> None:
    """Start the forkserver with ``_CHILD_ENV`` (read by glibc once, at its start) and wait until its imports
    are done (~10 s of CPU), so that they overlap no timing."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["benchmarks.memory"])
        saved = {k: os.environ.get(k) for k in _CHILD_ENV}
        os.environ.update(_CHILD_ENV)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        _context = ctx
    child = _context.Process(target=gc.collect)
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
    try:
        compile_in_process()
        fn = Providers().loss_fn(case)
        resettable = _reset_peak_rss()  # else a warm-up would set the high-water mark: measure the first step
        if resettable:
            workload(warmup_case(case), fn).step()  # lazy initialisation; torch.compile's compilation
        w = workload(case, fn)
        gc.collect()
        note = "" if resettable else "first step measured (no /proc/self/clear_refs): includes one-time allocations"
        _reset_peak_rss()
        base = _maxrss_bytes()
        w.step()
        conn.send(("ok", _maxrss_bytes() - base, note))
    except BaseException as e:  # report everything: the parent decides what it means
        conn.send(("oom" if is_oom(e) else "error", None, first_line(e)))
    finally:
        conn.close()


def cpu_peak_bytes(case: Case, timeout_s: float) -> tuple[str, int | None, str]:
    """(status, peak RSS growth in bytes, note) of one step of ``case`` in a fresh child process."""
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
