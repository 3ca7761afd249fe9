"""``python -m benchmarks``: run the sweep, write results.json, results.md and the plots."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks import memory, report, timing
from benchmarks.cases import (
    DTYPES,
    MODES,
    OPS,
    PROVIDERS,
    WARMUP_N,
    Sweep,
    cases,
    compile_in_process,
    default_sweep,
    quiet,
)
from benchmarks.runner import Runner, device_slug, environment

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time and measure fastpatchdiv against the naive PyTorch reference (eager and torch.compile).",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: N in {64, 144}, D=32, few repeats")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--ops", nargs="+", choices=list(OPS), metavar="OP", help=f"any of {', '.join(OPS)}")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, metavar="P", help=f"any of {', '.join(PROVIDERS)}")
    p.add_argument("--modes", nargs="+", choices=MODES, metavar="M", help=f"any of {', '.join(MODES)}")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=list(DTYPES),
        dest="dtypes",
        metavar="DT",
        help="fp32 bf16 fp16 (16-bit: CUDA only)",
    )
    p.add_argument("--n", nargs="+", type=int, dest="ns", metavar="N", help="patch counts (window needs squares)")
    p.add_argument(
        "--d",
        nargs="+",
        type=int,
        dest="ds",
        metavar="D",
        help="feature sizes (lifts the CPU's D=768-only-at-small-N rule)",
    )
    p.add_argument("--tokens", type=int, help="B·N held constant (B = max(1, tokens // N))")
    p.add_argument(
        "--time-cap",
        type=float,
        dest="time_cap_s",
        metavar="S",
        help="CPU: skip cases estimated slower than S seconds per call",
    )
    p.add_argument(
        "--mem-cap-gib",
        type=float,
        metavar="G",
        help="CPU: skip naive cases whose N x N footprint is estimated above G GiB",
    )
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>[-quick|-partial])")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p.parse_args(argv)


FILTERS = ("ops", "providers", "modes", "dtypes", "ns", "ds", "tokens", "time_cap_s", "mem_cap_gib")


def make_sweep(args: argparse.Namespace) -> Sweep:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sweep = default_sweep(device, quick=args.quick)
    changes = {k: getattr(args, k) for k in FILTERS if getattr(args, k) is not None}
    for k in ("ops", "providers", "modes", "dtypes", "ns", "ds"):
        if k in changes:
            changes[k] = tuple(changes[k])
    if "ds" in changes:
        changes["d_max_n"] = ()
    if args.no_memory:
        changes["measure_memory"] = False
    return dataclasses.replace(sweep, **changes)


def describe(sweep: Sweep) -> dict:
    """How the numbers were taken, for the report header."""
    if sweep.device == "cuda":
        how_timed = (
            f"triton.testing.do_bench (warm-up {sweep.cuda_warmup_ms} ms excluded, {sweep.cuda_rep_ms} ms "
            "of runs, L2 flushed and input grads dropped before each run)"
        )
        how_measured = "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
    else:
        how_timed = (
            f"wall clock per call, first call discarded, then >= {sweep.cpu_min_reps} calls and until "
            f"{sweep.cpu_budget_s:g} s (<= {sweep.cpu_max_reps}), {torch.get_num_threads()} threads; a call over "
            f"{timing.LONG_CALL_S:g} s is timed once, and an eager one estimated over that warms up on a "
            f"small copy (B=1, N={WARMUP_N}) instead of a discarded call"
        )
        how_measured = (
            "peak RSS growth (ru_maxrss) of one step in a fresh child process, after a warm-up step "
            f"(torch.compile: the same case; eager: a small copy, B=1, N={WARMUP_N}) and a high-water-mark reset"
        )
    how_timed += (
        "; forward and full rotate among 3 input sets while one input tensor is <= 256 MiB; backward times "
        "loss.backward(retain_graph=True) after an untimed forward"
    )
    how_measured += " (the inputs, and for backward the saved graph, are not counted)"
    return {"timing": how_timed, "memory": how_measured}


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    sweep = make_sweep(args)
    if sweep.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if sweep.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1 runs the kernels in the (very slow) interpreter: unset it to benchmark")
    if sweep.device == "cpu":
        compile_in_process()
    todo = cases(sweep)
    if args.list:
        for c in todo:
            print(c.label())
        print(f"{len(todo)} cases")
        return 0

    from tqdm import tqdm

    env = environment(sweep.device)
    filtered = any(getattr(args, k) is not None for k in FILTERS) or args.no_memory
    out = args.out or RESULTS / (device_slug(env) + ("-quick" if args.quick else "-partial" if filtered else ""))
    runner = Runner(sweep, env, log=tqdm.write)
    start = time.perf_counter()
    print(f"{env['device_name']}: {len(todo)} cases -> {out}")
    load = os.getloadavg()[0]
    if sweep.device == "cpu" and load > 0.5:
        print(f"warning: load average {load:.1f} before the run: other processes share the CPU, timings will be noisy")
    if sweep.device == "cpu" and sweep.measure_memory:
        memory.start_cpu_children()
    records = runner.measure_peaks()
    seconds = []
    for case in (bar := tqdm(todo, unit="case", dynamic_ncols=True)):
        bar.set_postfix_str(case.label(), refresh=True)
        t0 = time.perf_counter()
        records.extend(runner.run(case))
        seconds.append((round(time.perf_counter() - t0, 1), case.label()))
    config = {
        "command": "python -m benchmarks " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
        "tokens": sweep.tokens,
        "sweep": dataclasses.asdict(sweep),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "load_average_at_start": round(load, 2),
        "slowest_cases_s": sorted(seconds, reverse=True)[:15],  # wall time per case, memory child included
        **describe(sweep),
    }
    paths = report.write_all(records, out, config)
    counts = Counter(r["status"] for r in records if r["metric"] == "time")
    print(f"done in {config['elapsed_s']:.0f} s; cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for path in paths:
        print(f"  {path}")
    return 0
