"""The CLI's cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Same case list, inputs, steps and skip rules as ``python -m benchmarks`` (benchmarks/cases.py); only
the timer differs (pytest-benchmark's wall clock around each round, synchronised on CUDA, gradients
dropped before each round). Memory and the report come from the CLI. Environment:

- ``FASTPATCHDIV_BENCH=full`` runs the full sweep of the device (default: the ``--quick`` sweep);
- ``FASTPATCHDIV_BENCH_DEVICE=cpu|cuda`` picks the device (default: cuda if available).

Cases are grouped by (op, mode, dtype, N, D), so ``--benchmark-group-by=group`` compares providers.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from benchmarks.cases import (
    OPS,
    Case,
    LossFns,
    Unavailable,
    cases,
    compile_in_process,
    default_sweep,
    n_input_sets,
    precheck,
    quiet,
    remember,
    too_slow,
    workload,
)
from benchmarks.memory import first_line, is_oom

DEVICE = os.environ.get("FASTPATCHDIV_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SWEEP = default_sweep(DEVICE, quick=os.environ.get("FASTPATCHDIV_BENCH", "quick") != "full")
HISTORY: dict = {}
LOSS_FNS = LossFns(log=lambda message: None)
quiet()
if DEVICE == "cpu":
    compile_in_process()


def _rounds(w, sync) -> int:
    """Run once to warm up (compilation, first touch), once to size the rounds like the CLI's CPU timer."""
    for _ in range(2):
        w.clear()
        start = time.perf_counter()
        w.step()
        sync()
    once = time.perf_counter() - start
    budget = SWEEP.cpu_budget_s if DEVICE == "cpu" else SWEEP.cuda_rep_ms * 1e-3
    return int(min(SWEEP.cpu_max_reps, max(SWEEP.cpu_min_reps, budget / max(once, 1e-9))))


@pytest.mark.parametrize("case", cases(SWEEP), ids=lambda c: c.label().replace(" ", "-"))
def test_speed(benchmark, case: Case):
    verdict = precheck(case, SWEEP) or too_slow(case, SWEEP, HISTORY)
    if verdict:
        pytest.skip(verdict[1])
    try:
        fn = LOSS_FNS(case)
    except Unavailable as e:
        pytest.skip(str(e))
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"{case.op} {case.mode} {case.dtype} N={case.N} D={case.D}"
    op = OPS[case.op]
    benchmark.extra_info.update(dataclasses.asdict(case))
    if op.compute_bound:
        benchmark.extra_info["macs"] = op.macs(case.B, case.N, case.D, case.mode)

    def step():
        w.step()
        sync()

    try:
        w = workload(case, fn, n_input_sets(case))
        benchmark.pedantic(step, setup=w.clear, rounds=_rounds(w, sync))
    except Exception as e:
        if is_oom(e):
            pytest.skip(f"out of memory: {first_line(e)}")
        if case.provider == "torch.compile":
            pytest.skip(f"torch.compile failed: {first_line(e)}")
        raise
    remember(HISTORY, case, benchmark.stats.stats.median)
