"""The CLI's cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Same case list, providers, value checks, inputs, steps and skip rules as ``python -m benchmarks``; only
the timer differs (pytest-benchmark's rounds, synchronised on CUDA). Memory and the report come from the
CLI. ``FASTPATCHDIV_BENCH=quick|default|full`` picks the sweep (default: quick),
``FASTPATCHDIV_BENCH_DEVICE=cpu|cuda`` the device. ``--benchmark-group-by=group`` compares providers.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import cases
from benchmarks.memory import is_oom
from benchmarks.providers import Providers, first_line, setup, unavailable
from benchmarks.runner import backend

DEVICE = os.environ.get("FASTPATCHDIV_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SWEEP = cases.default_sweep(DEVICE, os.environ.get("FASTPATCHDIV_BENCH", "quick"))
HISTORY: dict = {}
PROVIDERS = Providers()
setup(DEVICE)


@pytest.mark.parametrize("case", cases.cases(SWEEP), ids=lambda c: c.label().replace(" ", "-"))
def test_speed(benchmark, case: cases.Case):
    verdict = cases.precheck(case, SWEEP) or unavailable(case) or cases.too_slow(case, SWEEP, HISTORY)
    if verdict:
        pytest.skip(verdict[1])
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"{case.op} {case.mode} {case.dtype} N={case.N} D={case.D}"
    benchmark.extra_info.update(case.__dict__, macs=cases.macs(case, backend(case.provider, DEVICE, case.dtype)))
    try:
        fn = PROVIDERS.loss_fn(case)
        if case.provider in cases.PEERS and (bad := PROVIDERS.check(case, fn, HISTORY)[0]):
            pytest.fail(bad)
        w = cases.workload(case, fn, rotate=True)
        rounds = SWEEP.cpu_min_reps if DEVICE == "cpu" else 20
        benchmark.pedantic(lambda: (w.step(), sync()), setup=w.clear, rounds=rounds, warmup_rounds=1)
    except Exception as e:  # as the CLI: out of memory, or a provider other than ours failing, is a skip
        if is_oom(e) or case.provider not in cases.MUST_RUN:
            pytest.skip(first_line(e))
        raise
    if benchmark.stats:  # None under --benchmark-disable
        cases.remember(HISTORY, case, benchmark.stats.stats.median)
