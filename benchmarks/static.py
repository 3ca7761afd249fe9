"""``python -m benchmarks --static``: every Triton kernel compiled exactly as the launchers launch it, for
each GPU target, on a machine without a GPU; writes static.json and static.md (see benchmarks/README.md).

The launches are captured on meta tensors (``benchmarks.static_capture``), compiled once per distinct
binary in a pool of processes (``benchmarks.static_compile``), and judged (``benchmarks.static_report``).
Exit status 1 when a launch does not fit its target's shared memory, spills, or fails to capture or compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 86, 89, 90, 100, 120)
DS = (64, 128, 384, 768, 1024)
NS = (196, 4096, 65536)
BS = (1, 4, 83)
DTYPE_NAMES = ("fp32", "fp32-tf32", "bf16", "fp16")
OPS = ("cosine", "contrastive-all", "mixing")
WORK_SHAPE = (4096, 4)  # (N, B) of the work records
ROOT = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks --static", description="see benchmarks/README.md")
    p.add_argument("--arch", nargs="+", type=int, choices=ARCHS, default=list(ARCHS), help="compute capabilities")
    p.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, default=list(DTYPE_NAMES), help="fp32-tf32: TF32")
    p.add_argument("--d", nargs="+", type=int, default=list(DS), help="feature sizes")
    p.add_argument("--n", nargs="+", type=int, default=list(NS), help="patch counts")
    p.add_argument("--b", nargs="+", type=int, default=list(BS), help="images per batch")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "static", help="default: %(default)s")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=_default_cache(), help="per-compile results (%(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compile everything again")
    return p.parse_args(argv)


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastpatchdiv" / "static"


def capture_all(args: argparse.Namespace):
    """Capture every launch of the sweep.

    Returns:
        (launches, work, errors): ``launches`` is a list of (context, Launch), context holding arch, op,
        dtype, precision, D, N, B, sms and shared_limit; ``work`` the issued multiply-adds at ``WORK_SHAPE``
        per (op, dtype, D, call) and arch; ``errors`` the launcher failures as records.
    """
    from benchmarks import static_capture as cap

    driver, launches, work, errors = cap.StandInDriver(), [], {}, []
    shapes = set(itertools.product(args.n, args.b))
    for arch, dtype_name, D, op in itertools.product(args.arch, args.dtype, args.d, args.ops):
        if op == "mixing" and dtype_name == "fp32-tf32":
            continue  # no matrix product in the mixing kernel: the same launches as fp32
        target = cap.TARGETS[arch]
        _, _, dtype, precision = cap.DTYPES[dtype_name]
        for N, B in sorted(shapes | {WORK_SHAPE}):
            ctx = dict(arch=arch, op=op, dtype=dtype, precision=precision, D=D, N=N, B=B)
            try:
                found, macs = cap.capture_op(driver, op, target, B, N, D, dtype_name)
            except Exception as exc:  # a launcher that raises is a finding, reported with the shape
                errors.append(dict(ctx, error=f"capture: {type(exc).__name__}: {str(exc)[:500]}"))
                continue
            if (N, B) == WORK_SHAPE:
                work[(op, dtype, precision, D, arch)] = macs
            if (N, B) in shapes:
                ctx.update(sms=target.sms, shared_limit=target.max_shared)
                launches += [(ctx, launch) for launch in found]
    return launches, work, errors


def compile_jobs(launches) -> dict[str, dict]:
    """One job per distinct binary (kernel source, arch, signature, constexprs, attributes, options)."""
    jobs = {}
    for ctx, launch in launches:
        key = launch.compile_key(ctx["arch"])
        if key not in jobs:
            fn = launch.fn.fn
            jobs[key] = dict(
                module=fn.__module__,
                name=fn.__name__,
                arch=ctx["arch"],
                signature=launch.signature,
                constexprs=launch.constexprs,
                attrs=launch.attrs,
                options=launch.options,
            )
    return jobs


def compile_all(jobs: dict[str, dict], workers: int, cache: Path | None) -> dict[str, dict]:
    """Compile every job not in ``cache`` in a pool of ``workers`` processes; returns results by key."""
    from benchmarks import static_compile

    results = {}
    for key in jobs:
        path = cache / f"{key}.json" if cache else None
        if path and path.exists():
            results[key] = json.loads(path.read_text())
    todo = [key for key in jobs if key not in results]
    print(
        f"{len(jobs)} distinct compiles, {len(jobs) - len(todo)} cached, {len(todo)} to compile ({workers} processes)"
    )
    if not todo:
        return results
    start, last = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory(prefix="static-triton-cache-") as triton_cache:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, multiprocessing.get_context("spawn"), static_compile.init_worker, (triton_cache,)
        )
        with pool:
            futures = {pool.submit(static_compile.compile_job, jobs[key]): key for key in todo}
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                key = futures[future]
                results[key] = future.result()
                if cache and "error" not in results[key]:
                    cache.mkdir(parents=True, exist_ok=True)
                    (cache / f"{key}.json").write_text(json.dumps(results[key]))
                elapsed = time.perf_counter() - start
                if elapsed - last > 20 or i == len(todo):
                    last = elapsed
                    print(f"  compiled {i}/{len(todo)} in {elapsed:.0f} s", flush=True)
    return results


def versions() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(torch=torch.__version__, triton=triton.__version__, commit=commit)


def main(argv=None) -> int:
    """Run the static report; returns the exit status (1: a launch over its limit, a spill, an error)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("--static compiles the kernels for GPUs: unset TRITON_INTERPRET")
    from benchmarks import static_report

    args = parse_args(argv)
    start = time.perf_counter()
    launches, work, errors = capture_all(args)
    print(f"captured {len(launches)} launches in {time.perf_counter() - start:.0f} s")
    jobs = compile_jobs(launches)
    results = compile_all(jobs, args.jobs, None if args.no_cache else args.cache_dir)
    config = dict(
        command="python -m benchmarks --static " + " ".join(sys.argv[1:] if argv is None else argv),
        arch=args.arch,
        dtype=args.dtype,
        D=args.d,
        N=args.n,
        B=args.b,
        ops=args.ops,
        elapsed_s=round(time.perf_counter() - start, 1),
    )
    doc = static_report.build(launches, jobs, results, work, errors, versions(), config)
    paths = static_report.write(doc, args.out)
    for verdict in doc["verdicts"]:
        print(static_report.verdict_line(verdict))
    print(f"done in {time.perf_counter() - start:.0f} s\n" + "\n".join(f"  {p}" for p in paths))
    return 0 if static_report.launchable(doc) else 1
