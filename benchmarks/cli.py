"""``python -m benchmarks``: run a sweep, write results.json, results.md, summary.md and the plots."""

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

from benchmarks import cases, memory, report
from benchmarks.providers import compile_in_process, quiet
from benchmarks.runner import Runner, device_slug, environment

RESULTS = Path(__file__).resolve().parent / "results"
FILTERS = ("ops", "providers", "modes", "dtypes", "ns", "ds", "tokens", "time_cap_s", "mem_cap_gib", "budget_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(":")[1].strip())
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--quick", action="store_true", help="smoke run (CI): N in {64, 144}, D=32, few repeats")
    kind.add_argument("--full", action="store_true", help="every mode, N and D of the device, peers included")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    for flag, dest, kw in (
        ("--ops", "ops", dict(choices=list(cases.OPS))),
        ("--providers", "providers", dict(choices=cases.PROVIDERS)),
        ("--modes", "modes", dict(choices=cases.MODES)),
        ("--dtype", "dtypes", dict(choices=list(cases.DTYPES), help="16-bit: CUDA only")),
        ("--n", "ns", dict(type=int, help="patch counts (window needs squares)")),
        ("--d", "ds", dict(type=int, help="feature sizes (lifts the CPU full sweep's D=768-only-at-N=196)")),
    ):
        p.add_argument(flag, nargs="+", dest=dest, metavar=dest[:-1].upper(), **kw)
    for flag, dest, kind_, what in (
        ("--tokens", "tokens", int, "B·N held constant (B = max(1, tokens // N))"),
        ("--time-cap", "time_cap_s", float, "CPU: skip cases estimated slower than this many seconds per call"),
        ("--mem-cap-gib", "mem_cap_gib", float, "CPU: skip naive cases whose N x N footprint exceeds this"),
        ("--budget-s", "budget_s", float, "start no case after this many seconds (the rest: skipped)"),
    ):
        p.add_argument(flag, type=kind_, dest=dest, help=what)
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument(
        "--out", type=Path, help="output folder (default: benchmarks/results/<device>[-default|-quick|-partial])"
    )
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p.parse_args(argv)


def make_sweep(args: argparse.Namespace) -> cases.Sweep:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sweep = cases.default_sweep(device, "quick" if args.quick else "full" if args.full else "default")
    changes = {k: getattr(args, k) for k in FILTERS if getattr(args, k) is not None}
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    if "ds" in changes:
        changes["d_max_n"] = ()
    if "providers" in changes:  # a provider asked for by name runs wherever it can
        changes["max_n"] = tuple(m for m in sweep.max_n if m[0] not in changes["providers"])
    return dataclasses.replace(sweep, measure_memory=not args.no_memory, **changes)


def describe(sweep: cases.Sweep) -> dict:
    """How the numbers were taken, for the report header."""
    if sweep.device == "cuda":
        timing = (
            f"triton.testing.do_bench ({sweep.cuda_warmup_ms} ms warm-up, {sweep.cuda_rep_ms} ms of runs, L2 flushed)"
        )
        mem = "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
    else:
        timing = (
            f"wall clock, first call discarded, then >= {sweep.cpu_min_reps} calls until {sweep.cpu_budget_s:g} s (<= "
            f"{sweep.cpu_max_reps}), {torch.get_num_threads()} threads; a call over {sweep.long_call_s:g} s is timed "
            "once (an eager one estimated that long warms up on a small copy, B=1, N=64)"
        )
        mem = "peak RSS growth of one step in a fresh child process after a warm-up step (eager: on a small copy)"
    return {
        "timing": timing + "; input grads dropped before each call; forward and full rotate among 3 input sets "
        "(<= 256 MiB each); backward times loss.backward(retain_graph=True) after an untimed forward",
        "memory": mem + " (inputs, and for backward the saved graph, not counted)",
        "peers": "keops (cosine, contrastive-all), inf-cl (contrastive-all, CUDA only), each checked against the "
        "float64 reference before it is timed (benchmarks/providers.py)",
    }


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
    todo = cases.cases(sweep)
    if args.list:
        print("\n".join(c.label() for c in todo) + f"\n{len(todo)} cases")
        return 0

    from tqdm import tqdm

    env = environment(sweep.device)
    filtered = any(getattr(args, k) is not None for k in FILTERS if k != "budget_s") or args.no_memory
    suffix = "-partial" if filtered else "" if sweep.kind == "full" else f"-{sweep.kind}"
    out = args.out or RESULTS / (device_slug(env) + suffix)
    start, load = time.perf_counter(), os.getloadavg()[0]
    print(f"{env['device_name']}: {sweep.kind} sweep, {len(todo)} cases -> {out}")
    if sweep.device == "cpu" and load > 0.5:
        print(f"warning: load average {load:.1f} at the start: other processes share the CPU, timings will be noisy")
    if sweep.device == "cpu" and sweep.measure_memory:
        memory.start_cpu_children()
    runner = Runner(sweep, env, log=tqdm.write)
    records, seconds = runner.ceilings("start of the run"), []
    for case in (bar := tqdm(todo, unit="case", dynamic_ncols=True)):
        bar.set_postfix_str(case.label(), refresh=True)
        t0 = time.perf_counter()
        records += runner.run(case, elapsed_s=t0 - start)
        seconds.append((round(time.perf_counter() - t0, 1), case.label()))
    records = runner.finish(records + runner.ceilings("end of the run"))
    config = {
        "command": "python -m benchmarks " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
        "tokens": sweep.tokens,
        "sweep": dataclasses.asdict(sweep),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "load_average_at_start": round(load, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "ceilings": {f"{dtype} {unit}": rate for (dtype, unit), rate in runner.best.items()},
        "slowest_cases_s": sorted(seconds, reverse=True)[:15],  # wall time per case, memory child included
        **describe(sweep),
    }
    paths = report.write_all(records, out, config)
    counts = Counter(r["status"] for r in records if r["metric"] == "time")
    print(f"done in {config['elapsed_s']:.0f} s; cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("\n".join(f"  {p}" for p in paths))
    return 0
