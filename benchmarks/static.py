"""``python -m benchmarks --static``: every Triton kernel compiled exactly as the launchers launch it, for
each GPU target, on a machine without a GPU; writes static.json and static.md (see benchmarks/README.md).

The launches are captured on meta tensors (``benchmarks.static_capture``) and each distinct binary is
compiled once (``benchmarks.static_compile``), both in one pool of processes; ``benchmarks.static_report``
judges them and writes the files.
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


def capture_task(arch: int, dtype_name: str, ds: list, ops: list, shapes: list) -> dict:
    """Capture every launch of one arch and dtype (runs in a pool process; returns plain data).

    Args:
        arch: compute capability; dtype_name: a key of ``DTYPE_NAMES``; ds, ops: the sweep's D and ops;
            shapes: its (N, B) pairs (the work shape is captured too, for the work records).

    Returns:
        ``launches``: (context, ``Launch.summary()``) pairs, the context holding arch, op, dtype,
        precision, D, N, B, sms and shared_limit; ``binaries``: key -> (``Binary.job()``,
        ``Binary.info()``); ``work``: (op, dtype, precision, D, arch) -> multiply-adds by call at the work
        shape; ``errors``: the launchers that raised, with their shape.
    """
    from benchmarks import static_capture as cap
    from benchmarks.static_report import WORK_SHAPE

    out = dict(launches=[], binaries={}, work={}, errors=[])
    driver, target = cap.StandInDriver(), cap.TARGETS[arch]
    _, _, dtype, precision = cap.DTYPES[dtype_name]
    with cap.capturing(driver) as captured:
        for D, op, (N, B) in itertools.product(ds, ops, sorted(set(shapes) | {WORK_SHAPE})):
            if op == "mixing" and dtype_name == "fp32-tf32":
                continue  # no matrix product in the mixing kernel: the same launches as fp32
            ctx = dict(arch=arch, op=op, dtype=dtype, precision=precision, D=D, N=N, B=B)
            try:
                found, macs = cap.capture_op(captured, driver, op, target, B, N, D, dtype_name)
            except Exception as exc:  # a launcher that raises is a finding, reported with the shape
                out["errors"].append(dict(ctx, error=f"capture: {type(exc).__name__}: {str(exc)[:500]}"))
                continue
            if (N, B) == WORK_SHAPE:
                out["work"][(op, dtype, precision, D, arch)] = macs
            if (N, B) in shapes:
                ctx.update(sms=target.sms, shared_limit=target.max_shared)
                out["launches"] += [(ctx, launch.summary()) for launch in found]
                for launch in found:
                    out["binaries"].setdefault(launch.binary.key, (launch.binary.job(), launch.binary.info()))
    return out


class Pool:
    """A pool of processes that captures the sweep (a task per arch and dtype) and compiles each distinct
    binary once (ptxas and triton's passes are the cost), with a per-binary result cache."""

    def __init__(self, workers: int, cache: Path | None) -> None:
        from benchmarks import static_compile

        self.cache, self.results, self.futures = cache, {}, {}
        self._tmp = tempfile.TemporaryDirectory(prefix="static-triton-cache-")  # triton's own, thrown away
        context = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers, context, static_compile.init_worker, (self._tmp.name,)
        )
        self.compile_job = static_compile.compile_job

    def capture(self, args: argparse.Namespace):
        """Capture the sweep; each distinct binary goes to compile as soon as its task returns.

        Returns:
            (launches, binaries, work, errors), merged in the sweep's order.
        """
        shapes = list(itertools.product(args.n, args.b))
        tasks = [
            self.pool.submit(capture_task, arch, dtype_name, args.d, args.ops, shapes)
            for arch, dtype_name in itertools.product(args.arch, args.dtype)
        ]
        start = time.perf_counter()
        for i, future in enumerate(concurrent.futures.as_completed(tasks), 1):
            for key, (job, _) in future.result()["binaries"].items():
                self.submit(key, job)
            print(f"  captured {i}/{len(tasks)} (arch, dtype) after {time.perf_counter() - start:.0f} s", flush=True)
        launches, binaries, work, errors = [], {}, {}, []
        for part in (task.result() for task in tasks):
            launches += part["launches"]
            binaries |= {key: info for key, (_, info) in part["binaries"].items()}
            work |= part["work"]
            errors += part["errors"]
        return launches, binaries, work, errors

    def submit(self, key: str, job: dict) -> None:
        """Queue the compile of binary ``key`` unless it is queued, done, or in the cache."""
        if key in self.results or key in self.futures:
            return
        try:
            self.results[key] = json.loads((self.cache / f"{key}.json").read_text())
        except (TypeError, OSError, ValueError):  # no cache, not cached, or a torn file: compile it
            self.futures[key] = self.pool.submit(self.compile_job, job)

    def _store(self, key: str) -> None:
        # Written whole, then renamed: two runs sharing the cache never read half a file.
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.cache / f"{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.results[key]))
        os.replace(tmp, self.cache / f"{key}.json")

    def wait(self) -> dict[str, dict]:
        """Every compile result by binary key, once all are done; progress every 20 s."""
        start, last, todo = time.perf_counter(), 0.0, {f: k for k, f in self.futures.items()}
        print(f"{len(self.results) + len(todo)} distinct compiles: {len(self.results)} cached, {len(todo)} compiled")
        for i, future in enumerate(concurrent.futures.as_completed(todo), 1):
            key = todo[future]
            self.results[key] = future.result()
            if self.cache and "error" not in self.results[key]:
                self._store(key)
            if time.perf_counter() - start - last > 20 or i == len(todo):
                last = time.perf_counter() - start
                print(f"  compiled {i}/{len(todo)} after {last:.0f} s", flush=True)
        return self.results

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self._tmp.cleanup()


def versions() -> dict:
    """torch, triton, the commit, and whether the kernels or the package differ from it (``dirty``)."""
    import torch
    import triton

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT.parent, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "kernels", "fastpatchdiv")
    return dict(
        torch=torch.__version__,
        triton=triton.__version__,
        commit=git("rev-parse", "--short", "HEAD"),
        dirty=None if status is None else bool(status),
    )


def main(argv=None) -> int:
    """Run the static report; returns the exit status (1: a launch over its limit, a spill, an error)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("--static compiles the kernels for GPUs: unset TRITON_INTERPRET")
    from benchmarks import static_report

    args = parse_args(argv)
    start = time.perf_counter()
    pool = Pool(args.jobs, None if args.no_cache else args.cache_dir)
    try:
        launches, binaries, work, errors = pool.capture(args)
        print(f"captured {len(launches)} launches in {time.perf_counter() - start:.0f} s")
        results = pool.wait()
    finally:
        pool.close()
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
    doc = static_report.build(launches, binaries, results, work, errors, versions(), config)
    paths = static_report.write(doc, args.out)
    for verdict in doc["verdicts"]:
        print(static_report.verdict_line(verdict))
    print(f"done in {time.perf_counter() - start:.0f} s\n" + "\n".join(f"  {p}" for p in paths))
    return 0 if static_report.launchable(doc) else 1
