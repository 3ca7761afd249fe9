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


def capture_all(args: argparse.Namespace, on_binary=None):
    """Capture every launch of the sweep; ``on_binary(binary)`` is called for each distinct binary as it
    is found, so compiles start while the capture goes on.

    Returns:
        (launches, work, errors): ``launches`` is a list of (context, Launch), context holding arch, op,
        dtype, precision, D, N, B, sms and shared_limit; ``work`` the issued multiply-adds at ``WORK_SHAPE``
        per (op, dtype, precision, D, arch) and call; ``errors`` the launcher failures as records.
    """
    from benchmarks import static_capture as cap

    driver, launches, work, errors = cap.StandInDriver(), [], {}, []
    shapes = set(itertools.product(args.n, args.b))
    with cap.capturing(driver) as captured:
        for arch, dtype_name, D, op in itertools.product(args.arch, args.dtype, args.d, args.ops):
            if op == "mixing" and dtype_name == "fp32-tf32":
                continue  # no matrix product in the mixing kernel: the same launches as fp32
            target = cap.TARGETS[arch]
            _, _, dtype, precision = cap.DTYPES[dtype_name]
            for N, B in sorted(shapes | {WORK_SHAPE}):
                ctx = dict(arch=arch, op=op, dtype=dtype, precision=precision, D=D, N=N, B=B)
                try:
                    found, macs = cap.capture_op(captured, driver, op, target, B, N, D, dtype_name)
                except Exception as exc:  # a launcher that raises is a finding, reported with the shape
                    errors.append(dict(ctx, error=f"capture: {type(exc).__name__}: {str(exc)[:500]}"))
                    continue
                if (N, B) == WORK_SHAPE:
                    work[(op, dtype, precision, D, arch)] = macs
                if (N, B) in shapes:
                    ctx.update(sms=target.sms, shared_limit=target.max_shared)
                    launches += [(ctx, launch) for launch in found]
                    for launch in found if on_binary else ():
                        on_binary(launch.binary)
    return launches, work, errors


def compile_job(binary) -> dict:
    """The picklable job of one binary: the kernel by module and name, and what triton.compile takes."""
    fn = binary.fn.fn
    return dict(
        module=fn.__module__,
        name=fn.__name__,
        arch=binary.arch,
        signature=binary.signature,
        constexprs=binary.constexprs,
        attrs=binary.attrs,
        options=binary.options,
    )


class Compiler:
    """Compiles each distinct binary once, in a pool of processes (ptxas and triton's passes are the cost),
    reading and writing a per-binary result cache."""

    def __init__(self, workers: int, cache: Path | None) -> None:
        from benchmarks import static_compile

        self.cache, self.results, self.futures = cache, {}, {}
        self._tmp = tempfile.TemporaryDirectory(prefix="static-triton-cache-")  # triton's own, thrown away
        context = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers, context, static_compile.init_worker, (self._tmp.name,)
        )
        self.compile_job = static_compile.compile_job

    def submit(self, binary) -> None:
        key = binary.key
        if key in self.results or key in self.futures:
            return
        path = self.cache / f"{key}.json" if self.cache else None
        if path and path.exists():
            self.results[key] = json.loads(path.read_text())
        else:
            self.futures[key] = self.pool.submit(self.compile_job, compile_job(binary))

    def wait(self) -> dict[str, dict]:
        """Every result by binary key, once all compiles are done; progress every 20 s."""
        start, last, todo = time.perf_counter(), 0.0, {f: k for k, f in self.futures.items()}
        print(f"{len(self.results) + len(todo)} distinct compiles: {len(self.results)} cached, {len(todo)} compiled")
        for i, future in enumerate(concurrent.futures.as_completed(todo), 1):
            key = todo[future]
            self.results[key] = future.result()
            if self.cache and "error" not in self.results[key]:
                self.cache.mkdir(parents=True, exist_ok=True)
                (self.cache / f"{key}.json").write_text(json.dumps(self.results[key]))
            if time.perf_counter() - start - last > 20 or i == len(todo):
                last = time.perf_counter() - start
                print(f"  compiled {i}/{len(todo)} after {last:.0f} s", flush=True)
        return self.results

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self._tmp.cleanup()


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
    compiler = Compiler(args.jobs, None if args.no_cache else args.cache_dir)
    try:
        launches, work, errors = capture_all(args, compiler.submit)
        print(f"captured {len(launches)} launches in {time.perf_counter() - start:.0f} s")
        results = compiler.wait()
    finally:
        compiler.close()
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
    doc = static_report.build(launches, results, work, errors, versions(), config)
    paths = static_report.write(doc, args.out)
    for verdict in doc["verdicts"]:
        print(static_report.verdict_line(verdict))
    print(f"done in {time.perf_counter() - start:.0f} s\n" + "\n".join(f"  {p}" for p in paths))
    return 0 if static_report.launchable(doc) else 1
