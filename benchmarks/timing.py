"""Timing: triton.testing.do_bench on CUDA, repeated wall-clock on CPU; the device's measured ceilings.

Every timer returns (median, p20, p80) in milliseconds.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

from benchmarks.cases import DTYPES, Sweep, Workload

QUANTILES = (0.5, 0.2, 0.8)
# CPU: a call longer than this is timed once (after a discarded call, or a small copy's for an eager
# case estimated this long: see time_cpu).
LONG_CALL_S = 5.0


def percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(samples_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(q.tolist())


def time_cuda(w: Workload, warmup_ms: int, rep_ms: int) -> tuple[tuple, None]:
    """do_bench: events around each run, warm-up excluded, L2 flushed and input grads dropped between runs."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(
        w.step, warmup=warmup_ms, rep=rep_ms, grad_to_none=w.grads, quantiles=list(QUANTILES)
    )
    return (med, p20, p80), None  # do_bench does not report its repeat count


def time_cpu(
    w: Workload, budget_s: float, min_reps: int, max_reps: int, warmup: Workload | None = None
) -> tuple[tuple, int]:
    """The first run is discarded (compilation, first touch); then at least ``min_reps`` runs (one if the
    discarded run took over LONG_CALL_S) and until ``budget_s`` of timed runs, at most ``max_reps``.
    ``warmup`` (a small copy of an eager case estimated over LONG_CALL_S) runs instead of the discarded
    run, and one timed run follows. Gradients are dropped before each run, untimed."""
    w.clear()
    t0 = time.perf_counter()
    (warmup or w).step()
    if warmup is not None or time.perf_counter() - t0 > LONG_CALL_S:
        min_reps = 1  # a call this long is not skewed by warm-up; the record's sample count says so
    samples = []
    collecting = gc.isenabled()
    gc.disable()  # no collector pauses inside the timed calls (refcounting still frees the tensors)
    try:
        while len(samples) < max_reps and (len(samples) < min_reps or sum(samples) < budget_s * 1e3):
            w.clear()
            t0 = time.perf_counter()
            w.step()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        if collecting:
            gc.enable()
    return percentiles(samples), len(samples)


def time_workload(w: Workload, sweep: Sweep, warmup: Workload | None = None) -> tuple[tuple, int | None]:
    """(median, p20, p80) ms and the number of timed runs (None when the timer does not say)."""
    if sweep.device == "cuda":
        return time_cuda(w, sweep.cuda_warmup_ms, sweep.cuda_rep_ms)
    return time_cpu(w, sweep.cpu_budget_s, sweep.cpu_min_reps, sweep.cpu_max_reps, warmup)


def matmul_rate(device: str, dtype: str, sweep: Sweep) -> tuple[int, tuple]:
    """Dense matmul rate (TFLOP/s: median, p20, p80) of torch.matmul, n³ with n = 4096 on CUDA, 2048 on CPU."""
    n = 4096 if device == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=device).to(DTYPES[dtype]) for _ in range(2))
    # Every fraction of peak divides by this number: on CPU it gets 2 s of calls (>= 10), not a case's budget.
    sweep = dataclasses.replace(sweep, cpu_budget_s=max(sweep.cpu_budget_s, 2.0), cpu_min_reps=10)
    (med, p20, p80), _ = time_workload(Workload(lambda: a @ b, []), sweep)
    flops = 2 * n**3
    return n, tuple(flops / (t * 1e-3) / 1e12 for t in (med, p80, p20))  # slow time -> low rate


def copy_bandwidth(device: str, sweep: Sweep) -> tuple[int, tuple]:
    """Device-to-device copy (GB/s: median, p20, p80), counting bytes read plus bytes written."""
    nbytes = 2**30 if device == "cuda" else 2**28
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    (med, p20, p80), _ = time_workload(Workload(lambda: y.copy_(x), []), sweep)
    return nbytes, tuple(2 * nbytes / (t * 1e-3) / 1e9 for t in (med, p80, p20))
