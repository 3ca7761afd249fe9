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
from benchmarks.providers import setup
from benchmarks.runner import Runner, device_slug, environment

FILTERS = ("ops", "providers", "modes", "dtypes", "ns", "ds", "tokens", "time_cap_s", "mem_cap_gib", "budget_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="see benchmarks/README.md")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--quick", action="store_true", help="smoke run (CI): N in {64, 144}, D=32, few repeats")
    kind.add_argument("--full", action="store_true", help="every mode, N and D of the device, peers included")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    for flag, dest, kw in (
        ("--ops", "ops", dict(nargs="+", choices=list(cases.OPS))),
        ("--providers", "providers", dict(nargs="+", choices=cases.PROVIDERS)),
        ("--modes", "modes", dict(nargs="+", choices=cases.MODES)),
        ("--dtype", "dtypes", dict(nargs="+", choices=list(cases.DTYPES), help="16-bit: CUDA only")),
        ("--n", "ns", dict(nargs="+", type=int, help="patch counts (window needs squares)")),
        ("--d", "ds", dict(nargs="+", type=int, help="feature sizes (lifts the CPU's D=768-only-at-N=196)")),
        ("--tokens", "tokens", dict(type=int, help="B·N held constant (B = max(1, tokens // N))")),
        ("--time-cap", "time_cap_s", dict(type=float, help="CPU: skip cases estimated slower per call (s)")),
        ("--mem-cap-gib", "mem_cap_gib", dict(type=float, help="CPU: skip naive cases whose N x N needs more")),
        ("--budget-s", "budget_s", dict(type=float, help="start no case after this many seconds (rest: skipped)")),
    ):
        p.add_argument(flag, dest=dest, **kw)
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>[-kind|-partial])")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument(
        "--static",
        action="store_true",
        help="compile every kernel as launched for each GPU target, no GPU needed (python -m benchmarks --static -h)",
    )
    return p.parse_args(argv)


def make_sweep(args: argparse.Namespace) -> cases.Sweep:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sweep = cases.default_sweep(device, "quick" if args.quick else "full" if args.full else "default")
    changes = {k: tuple(v) if isinstance(v, list) else v for k in FILTERS if (v := getattr(args, k)) is not None}
    if "ds" in changes:
        changes["d_max_n"] = ()
    if "providers" in changes:  # a provider asked for by name runs wherever it can
        changes["max_n"] = tuple(m for m in sweep.max_n if m[0] not in changes["providers"])
    return dataclasses.replace(sweep, measure_memory=not args.no_memory, **changes)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:  # the static report has options of its own (benchmarks/static.py)
        from benchmarks import static

        return static.main([a for a in argv if a != "--static"])
    args = parse_args(argv)
    sweep = make_sweep(args)
    setup(sweep.device)
    if sweep.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if sweep.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1 runs the kernels in the (very slow) interpreter: unset it to benchmark")
    todo = cases.cases(sweep)
    if args.list:
        print("\n".join(c.label() for c in todo) + f"\n{len(todo)} cases")
        return 0

    from tqdm import tqdm

    env = environment(sweep.device)
    filtered = any(getattr(args, k) is not None for k in FILTERS[:-1]) or args.no_memory
    suffix = "-partial" if filtered else "" if sweep.kind == "full" else f"-{sweep.kind}"
    out = args.out or Path(__file__).resolve().parent / "results" / (device_slug(env) + suffix)
    start, load = time.perf_counter(), os.getloadavg()[0]
    print(f"{env['device_name']}: {sweep.kind} sweep, {len(todo)} cases -> {out}")
    if sweep.device == "cpu" and load > 0.5:
        print(f"warning: load average {load:.1f} at the start: other processes share the CPU, timings will be noisy")
    if sweep.device == "cpu" and sweep.measure_memory:
        memory.start_cpu_children()
    runner, seconds = Runner(sweep, env, log=tqdm.write), []
    records = runner.ceilings("start of the run")
    for i, case in enumerate(bar := tqdm(todo, unit="case", dynamic_ncols=True)):
        bar.set_postfix_str(case.label(), refresh=True)
        if i and case.op != todo[i - 1].op:  # more rounds, more chances of a quiet moment for the ceiling
            records += runner.ceilings(f"before {case.op}")
        t0 = time.perf_counter()
        records += runner.run(case, elapsed_s=t0 - start)
        seconds.append((round(time.perf_counter() - t0, 1), case.label()))
    records = runner.finish(records + runner.ceilings("end of the run"))
    config = {
        "command": "python -m benchmarks " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
        "sweep": dataclasses.asdict(sweep),
        "threads": torch.get_num_threads(),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "load_average_at_start": round(load, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "slowest_cases_s": sorted(seconds, reverse=True)[:15],  # wall time per case, memory child included
    }
    paths = report.write_all(records, out, config)
    counts = Counter(r["status"] for r in records if r["metric"] == "time")
    print(f"done in {config['elapsed_s']:.0f} s; cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("\n".join(f"  {p}" for p in paths))
    return 0
