"""Time cases into long-format records: one dict per (case, metric), whatever happened to the case.

Metrics per case: ``time`` (ms), ``memory`` (MiB above the inputs), ``throughput`` (TFLOP/s of the
multiply-adds the provider's path performs, ``cases.COST``, or GB/s of the minimal traffic of an O(N·D)
op) and ``roofline`` (throughput over the best ceiling measured in the same run, added by ``finish``).
A peer's first call of a formula adds ``compile`` (s). ``status`` is ok, oom, skipped, error or n/a
(a metric that does not apply), with the reason in ``note``; the values of a case that did not run are None.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from benchmarks import cases, memory
from benchmarks.cases import DTYPES, OPS, Case, Sweep, Workload, compute_dtype, workload
from benchmarks.providers import Providers, first_line, unavailable

RECORD_KEYS = tuple(
    "op provider mode dtype B N D tokens metric unit median p20 p80 status note samples backend device device_name "
    "torch_version triton_version fastpatchdiv_version git_commit date".split()
)
ANOMALY = "anomaly (above 100%): the cost model counts more work than the path did, or the ceiling is low; "


def quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    q = torch.tensor(samples_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def rates(amount: float, stats_ms: tuple) -> tuple[float, float, float]:
    """(median, p20, p80) of ``amount`` per second from (median, p20, p80) ms per call: the slow call (p80)
    gives the low rate."""
    median, p20, p80 = stats_ms
    return tuple(amount / t * 1e3 for t in (median, p80, p20))


def time_samples(w: Workload, sweep: Sweep, warm: Workload | None = None) -> list[float]:
    """Milliseconds per call. CUDA: do_bench (events around each run, warm-up excluded, L2 flushed and input
    grads dropped before each). CPU: one discarded call (or ``warm``'s, a small copy), then at least
    ``cpu_min_reps`` calls (1 if the discarded call, or ``warm``'s case by estimate, is over ``long_call_s``)
    until ``cpu_budget_s`` of calls (<= ``cpu_max_reps``), gradients dropped before each, the GC paused."""
    if sweep.device == "cuda":
        import triton.testing

        kw = dict(warmup=sweep.cuda_warmup_ms, rep=sweep.cuda_rep_ms, grad_to_none=w.grads, return_mode="all")
        return list(triton.testing.do_bench(w.step, **kw))
    w.clear()
    t0 = time.perf_counter()
    (warm or w).step()
    reps, samples = 1 if warm or time.perf_counter() - t0 > sweep.long_call_s else sweep.cpu_min_reps, []
    gc.disable()  # no collector pauses inside the timed calls (refcounting still frees)
    try:
        while len(samples) < sweep.cpu_max_reps and (len(samples) < reps or sum(samples) < sweep.cpu_budget_s * 1e3):
            w.clear()
            t0 = time.perf_counter()
            w.step()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return samples


def _git_commit() -> str | None:
    """HEAD, "+dirty" when code differs from it (earlier results do not change what is measured)."""
    root = str(Path(__file__).resolve().parent.parent)
    git = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, cwd=root)
    try:
        head, dirty = (
            git(["git", "rev-parse", "--short", "HEAD"]),
            git(["git", "status", "--porcelain", ":!benchmarks/results"]),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return None if head.returncode else head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    """The fields every record repeats: machine, versions, date."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = m[1] if (m := re.search(r"model name\s*:\s*(.*)", info)) else platform.machine()
    env = {
        "device": device,
        "device_name": f"{cpu} ({torch.get_num_threads()} threads)",
        "torch_version": torch.__version__,
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    for name in ("triton", "fastpatchdiv"):
        try:
            env[f"{name}_version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # fastpatchdiv run from the source tree (PYTHONPATH)
            env[f"{name}_version"] = getattr(__import__(name), "__version__", None)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {**env, "git_commit": _git_commit(), "date": now.isoformat(timespec="seconds")}


def device_slug(env: dict) -> str:
    """Folder name for the results: the GPU name, or cpu-<model>."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].split(" (")[0].lower()).strip("-")
    return slug if env["device"] == "cuda" else f"cpu-{slug}"


@functools.cache
def backend(provider: str, device: str, dtype: str) -> str:
    """The path a provider takes (the cost model's key): fastpatchdiv's backend="auto" choice, else a name."""
    if provider != "fastpatchdiv":
        return {"torch": "eager", "torch.compile": "inductor"}.get(provider, provider)
    from fastpatchdiv._common import pick_backend

    return pick_backend(torch.empty(2, 2, 2, device=device, dtype=DTYPES[dtype]), "auto")


class Runner:
    """Runs cases in order and keeps what it needs across them: the best ceilings so far, the times of each
    kind of case (the CPU estimate), the providers' compiled functions and value checks."""

    def __init__(self, sweep: Sweep, env: dict, log=print):
        self.sweep, self.env, self.log = sweep, env, log
        self.best: dict[tuple[str, str], float] = {}  # (dtype, unit) -> best rate over every ceiling round
        self.history, self.providers, self._logged = {}, Providers(), set()

    def ceilings(self, when: str) -> list[dict]:
        """A round of ceilings: the fp32 copy bandwidth and each dtype's matmul rate, >= 10 calls each on CPU.
        ``finish`` divides by the best call over every round: load only ever slows a call. An "amp-*" case's
        ceiling is its autocast dtype's. On CPU only fp32's: without AVX-512 a bf16 matmul is emulated (2048³:
        over 100 s on this VM's EPYC, against 0.3 s in fp32), so an "amp-*" case has no CPU ceiling."""
        dev, out = self.sweep.device, []
        n, nbytes = (4096, 2**30) if dev == "cuda" else (2048, 2**28)
        x, y = torch.randn(nbytes // 4, device=dev), torch.empty(nbytes // 4, device=dev)
        runs = [("peak-copy", "fp32", "GB/s", 2 * nbytes / 1e9, lambda: y.copy_(x), "y.copy_(x), read + written")]
        for dtype in dict.fromkeys(map(compute_dtype, self.sweep.dtypes)) if dev == "cuda" else ("fp32",):
            a, b = (torch.randn(n, n, device=dev, dtype=DTYPES[dtype]) for _ in range(2))
            runs.append(("peak-matmul", dtype, "TFLOP/s", 2 * n**3 / 1e12, lambda a=a, b=b: a @ b, f"a @ b, {n}³"))
        sweep = dataclasses.replace(self.sweep, cpu_budget_s=max(self.sweep.cpu_budget_s, 2.0), cpu_min_reps=10)
        for op, dtype, unit, amount, step, what in runs:
            ms = time_samples(Workload(step, []), sweep)
            best = self.best[(dtype, unit)] = max(self.best.get((dtype, unit), 0.0), amount / min(ms) * 1e3)
            note = f"{what}, {when}; best call so far {best:.3g} {unit}"
            case = Case(op, "torch", "forward", dtype, 1, 0, 0, dev)
            out.append(self._record(case, "throughput", unit, rates(amount, quantiles(ms)), note))
        return out

    def run(self, case: Case, elapsed_s: float = 0.0) -> list[dict]:
        """The records of one case: time, memory and throughput (``finish`` adds the roofline), or why not."""
        if verdict := cases.precheck(case, self.sweep) or unavailable(case):
            return self._all(case, *verdict)
        if self.sweep.budget_s is not None and elapsed_s > self.sweep.budget_s:
            return self._all(case, "skipped", f"the run's time budget ({self.sweep.budget_s:g} s) was spent")
        records, w = [], None
        try:
            fn = self.providers.loss_fn(case)
            if case.provider in cases.PEERS:
                bad, compile_s = self.providers.check(case, fn, self.history)
                if compile_s is not None:
                    note = "first call of the value check minus a second call: compilation (cached on disk)"
                    records.append(self._record(case, "compile", "s", (compile_s,) * 3, note))
                if bad:
                    self._log_once(f"error: {case.provider} {case.op}: {bad}")
                    return records + self._all(case, "error", bad)
            if verdict := cases.too_slow(case, self.sweep, self.history):
                return records + self._all(case, *verdict)
            w, guess, small = (
                workload(case, fn, rotate=True),
                cases.estimate_s(case, self.history),
                cases.warmup_case(case),
            )
            long = case.device == "cpu" and guess and guess[0] > self.sweep.long_call_s and small != case
            ms = time_samples(w, self.sweep, workload(small, fn) if long else None)
        except Exception as e:
            w = None  # drop the inputs before _failure frees memory
            return records + self._all(case, *self._failure(case, e))
        stats, w = quantiles(ms), None
        cases.remember(self.history, case, stats[0] * 1e-3)
        records.append(self._record(case, "time", "ms", stats, samples=len(ms)))
        return records + [self._memory(case, fn, stats[0] * 1e-3), self._throughput(case, stats)]

    def _failure(self, case: Case, e: Exception) -> tuple[str, str]:
        """(status, note) for an exception, after freeing what the case left. A provider failing on its own
        (torch.compile, a peer) is skipped with the reason; fastpatchdiv or the eager reference failing is an error."""
        e.__traceback__ = None  # its frames hold the case's tensors
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
        if memory.is_oom(e):
            dev = case.device == "cuda"
            cap = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB device" if dev else "CPU"
            return "oom", f"out of memory ({cap}): {first_line(e, 200)}"
        status = "error" if case.provider in cases.MUST_RUN else "skipped"
        self._log_once(f"{status}: {case.label()}: {case.provider} failed: {first_line(e)}")
        return status, f"{case.provider} failed: {first_line(e)}"

    def _memory(self, case: Case, fn, seconds: float) -> dict:
        status, peak, note = "skipped", None, "memory not measured (--no-memory)"
        if self.sweep.measure_memory and case.device == "cuda":
            try:
                status, peak, note = "ok", memory.cuda_peak_bytes(case, fn), ""
            except Exception as e:
                status, note = self._failure(case, e)
        elif self.sweep.measure_memory:  # a warm-up and the measured step in a child, plus torch.compile's compilation
            status, peak, note = memory.cpu_peak_bytes(case, timeout_s=300 + 10 * seconds)
            if status != "ok":
                self._log_once(f"memory of {case.label()}: {status}: {note}")
        return self._record(case, "memory", "MiB", None if peak is None else (peak / 2**20,) * 3, note, status)

    def _throughput(self, case: Case, stats: tuple) -> dict:
        """Work done per second: 2·MACs of the provider's path (cases.COST), or the minimal bytes of an O(N·D) op."""
        op, path = OPS[case.op], backend(case.provider, case.device, case.dtype)
        if op.min_bytes is not None:
            amount = op.min_bytes(case.B, case.N, case.D, DTYPES[case.dtype].itemsize, case.mode)
        else:
            amount = 2 * (cases.macs(case, path) or float("nan"))
        if amount != amount or amount == 0:
            why = f"no cost model row for {case.provider}/{path}" if amount else "n/a, O(N·D): done in the forward"
            return self._record(case, "throughput", op.rate_unit, None, why, "n/a")
        gb = op.rate_unit == "GB/s"
        rate = rates(amount / (1e9 if gb else 1e12), stats)
        return self._record(case, "throughput", op.rate_unit, rate, f"{'bytes' if gb else '2·MACs'} = {amount:.3g}")

    def finish(self, records: list[dict]) -> list[dict]:
        """A roofline record per case: its throughput over the best ceiling of the whole run. Above 1 the cost
        model or the ceiling is wrong for that case: flagged as an anomaly, not a result."""
        out = []
        for r in (r for r in records if r["metric"] == "throughput" and r["op"] in OPS):
            dtype = compute_dtype(r["dtype"]) if r["unit"] == "TFLOP/s" else "fp32"
            peak = self.best.get((dtype, r["unit"]))
            roof = {**r, "metric": "roofline", "unit": "fraction", "samples": None}
            if r["status"] != "ok" or not peak:
                no_peak = {**roof, "status": "skipped", "note": f"no {dtype} {r['unit']} ceiling measured"}
                no_peak.update(median=None, p20=None, p80=None)  # not the throughput's values
                out.append(roof if peak else no_peak)
                continue
            note = f"of the best {'matmul rate' if r['unit'] == 'TFLOP/s' else 'copy bandwidth'} of the run"
            note = f"{ANOMALY if r['median'] > peak else ''}{note}, {peak:.3g} {r['unit']}"
            out.append({**roof, "note": note, **{k: r[k] / peak for k in ("median", "p20", "p80")}})
        return records + out

    def _all(self, case: Case, status: str, note: str) -> list[dict]:
        units = (("time", "ms"), ("memory", "MiB"), ("throughput", OPS[case.op].rate_unit))
        return [self._record(case, m, u, None, note, status) for m, u in units]

    def _record(self, case: Case, metric, unit, values, note="", status="ok", samples=None) -> dict:
        median, p20, p80 = values if values is not None else (None, None, None)
        path = backend(case.provider, case.device, case.dtype)
        record = dict(op=case.op, provider=case.provider, mode=case.mode, dtype=case.dtype, B=case.B, N=case.N)
        record.update(D=case.D, tokens=case.B * case.N, metric=metric, unit=unit, median=median, p20=p20, p80=p80)
        record.update(status=status, note=note, samples=samples, backend=path, **self.env)
        assert tuple(record) == RECORD_KEYS, "update RECORD_KEYS (and tests/test_benchmarks.py) with the format"
        return record

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            self.log(message)
