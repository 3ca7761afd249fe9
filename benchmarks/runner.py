"""Run cases into long-format records: one dict per (case, metric), whatever happened to the case.

Metrics per case: ``time`` (ms), ``memory`` (MiB above inputs), ``throughput`` (TFLOP/s of the op's
required multiply-adds, or GB/s of its minimal traffic for O(N·D) ops) and ``roofline`` (throughput
over the device's measured matmul rate or copy bandwidth). ``status`` is ok, oom, skipped or error,
with the reason in ``note``; the values of a case that did not run are None.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import torch

from benchmarks import memory, timing
from benchmarks.cases import (
    DTYPES,
    OPS,
    Case,
    LossFns,
    Sweep,
    Unavailable,
    estimate_s,
    fastpatchdiv_backend,
    n_input_sets,
    precheck,
    remember,
    too_slow,
    warmup_case,
    workload,
)

# Every record has exactly these keys, in this order.
RECORD_KEYS = (
    "op",
    "provider",
    "mode",
    "dtype",
    "B",
    "N",
    "D",
    "tokens",
    "metric",
    "unit",
    "median",
    "p20",
    "p80",
    "status",
    "note",
    "samples",
    "backend",
    "device",
    "device_name",
    "torch_version",
    "triton_version",
    "fastpatchdiv_version",
    "git_commit",
    "date",
)
MIB = 2**20


# ----------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        # Results written by earlier runs do not change what is measured: only code makes a run "+dirty".
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    """The fields every record repeats: machine, versions, date."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    return {
        "device": device,
        "device_name": name,
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "fastpatchdiv_version": _version("fastpatchdiv"),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_slug(env: dict) -> str:
    """Folder name for the results: the GPU name, or cpu-<model>."""
    name = env["device_name"].split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if env["device"] == "cuda" else f"cpu-{slug}"


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


class Runner:
    """Runs cases in order and remembers what it needs across them: the device's peaks, each series'
    last time (to skip CPU cases estimated over the time cap), the compiled function of the current shape."""

    def __init__(self, sweep: Sweep, env: dict, log=print):
        self.sweep = sweep
        self.env = env
        self.log = log
        self.peaks: dict[str, dict] = {}  # dtype -> {"TFLOP/s": rate, "GB/s": bandwidth}
        self.history: dict = {}  # see cases.too_slow
        self.loss_fns = LossFns(log)
        self._logged: set[str] = set()

    # --- device ceilings -----------------------------------------------------------------------------

    def measure_peaks(self) -> list[dict]:
        """Measure the matmul rate per dtype and the copy bandwidth; return them as records."""
        device, out = self.sweep.device, []
        _, copy = timing.copy_bandwidth(device, self.sweep)
        out.append(self._peak_record("peak-copy", "fp32", copy, "GB/s", "y.copy_(x), bytes read + written"))
        for dtype in self.sweep.dtypes:
            if device == "cpu" and dtype != "fp32":
                continue
            n, rate = timing.matmul_rate(device, dtype, self.sweep)
            out.append(self._peak_record("peak-matmul", dtype, rate, "TFLOP/s", f"torch.matmul {n}x{n}x{n}"))
            self.peaks[dtype] = {"TFLOP/s": rate[0], "GB/s": copy[0]}
        return out

    def _peak_record(self, op, dtype, values, unit, note) -> dict:
        case = Case(op, "torch", "forward", dtype, 1, 0, 0, self.sweep.device)
        return self._record(case, "throughput", unit, values, "ok", note, backend="eager")

    # --- one case ------------------------------------------------------------------------------------

    def run(self, case: Case) -> list[dict]:
        verdict = precheck(case, self.sweep) or too_slow(case, self.sweep, self.history)
        if verdict:
            return self._all_metrics(case, *verdict)
        try:
            fn = self.loss_fns(case)
        except Unavailable as e:
            self._log_once(f"skipping {case.provider} for {case.op}: {e}")
            return self._all_metrics(case, "skipped", str(e))

        status, note, stats, samples = self._time(case, fn)
        if status != "ok":
            return self._all_metrics(case, status, note)
        seconds = stats[0] * 1e-3
        remember(self.history, case, seconds)
        records = [self._record(case, "time", "ms", stats, "ok", "", samples=samples)]
        records.append(self._memory(case, fn, seconds))
        records.extend(self._roofline(case, stats))
        return records

    def _time(self, case: Case, fn):
        w = warm = None
        try:
            w = workload(case, fn, n_input_sets(case))
            guess = estimate_s(case, self.history)
            if case.device == "cpu" and guess and guess[0] > timing.LONG_CALL_S and warmup_case(case) != case:
                warm = workload(warmup_case(case), fn)  # instead of a discarded same-shape call of a minute
            stats, samples = timing.time_workload(w, self.sweep, warm)
            return "ok", "", stats, samples
        except Exception as e:
            w = warm = None  # noqa: F841  (drop the inputs before _failure frees memory)
            return self._failure(case, e) + (None, None)

    def _failure(self, case: Case, e: Exception) -> tuple[str, str]:
        """(status, note) for an exception; frees what the failed case left behind."""
        e.__traceback__ = None  # its frames hold the case's tensors
        self._free()
        if memory.is_oom(e):
            if case.device == "cuda":
                cap = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB device"
            else:
                cap = f"{self.sweep.mem_cap_gib:g} GiB cap"
            return "oom", f"out of memory ({cap}): {memory.first_line(e, 200)}"
        if case.provider == "torch.compile":
            note = f"torch.compile failed: {memory.first_line(e)}"
            self._log_once(f"skipping {case.label()}: {note}")
            return "skipped", note
        self._log_once(f"error in {case.label()}: {memory.first_line(e)}")
        return "error", memory.first_line(e)

    def _free(self) -> None:
        gc.collect()  # ~0.3 s once inductor is imported: only after failures
        if self.sweep.device == "cuda":
            torch.cuda.empty_cache()

    def _memory(self, case: Case, fn, seconds: float) -> dict:
        if not self.sweep.measure_memory:
            return self._record(case, "memory", "MiB", None, "skipped", "memory not measured (--no-memory)")
        if case.device == "cuda":
            try:
                status, peak, note = "ok", memory.cuda_peak_bytes(case, fn), ""
            except Exception as e:
                (status, note), peak = self._failure(case, e), None
        else:
            # Warm-up and measured run in the child, plus compilation for torch.compile.
            status, peak, note = memory.cpu_peak_bytes(case, timeout_s=300 + 10 * seconds)
            if status != "ok":
                self._log_once(f"memory of {case.label()}: {status}: {note}")
        value = None if peak is None else (peak / MIB,) * 3
        return self._record(case, "memory", "MiB", value, status, note)

    def _roofline(self, case: Case, stats: tuple) -> list[dict]:
        """Achieved throughput of the op's necessary work, and its fraction of the measured ceiling."""
        op = OPS[case.op]
        itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
        if op.compute_bound:
            amount, scale, unit = 2 * op.macs(case.B, case.N, case.D, case.mode), 1e12, "TFLOP/s"
        else:
            amount, scale, unit = op.min_bytes(case.B, case.N, case.D, itemsize, case.mode), 1e9, "GB/s"
        med, p20, p80 = stats
        rate = tuple(amount / (t * 1e-3) / scale for t in (med, p80, p20))  # the slow time gives the low rate
        peak = self.peaks.get(case.dtype, {}).get(unit)
        note = f"{'2·MACs' if op.compute_bound else 'minimal bytes'} = {amount:.3g}"
        records = [self._record(case, "throughput", unit, rate, "ok", note)]
        if peak:
            ceiling = f"measured {'matmul rate' if op.compute_bound else 'copy bandwidth'} {peak:.3g} {unit}"
            records.append(self._record(case, "roofline", "fraction", tuple(r / peak for r in rate), "ok", ceiling))
        else:
            records.append(
                self._record(case, "roofline", "fraction", None, "skipped", f"no measured {unit} peak for {case.dtype}")
            )
        return records

    # --- records -------------------------------------------------------------------------------------

    def _all_metrics(self, case: Case, status: str, note: str) -> list[dict]:
        unit = "TFLOP/s" if OPS[case.op].compute_bound else "GB/s"
        metrics = (("time", "ms"), ("memory", "MiB"), ("throughput", unit), ("roofline", "fraction"))
        return [self._record(case, m, u, None, status, note) for m, u in metrics]

    def _record(self, case: Case, metric, unit, values, status, note, samples=None, backend=None) -> dict:
        median, p20, p80 = values if values is not None else (None, None, None)
        if backend is None:
            backend = {"torch": "eager", "torch.compile": "inductor"}.get(case.provider)
            backend = backend or fastpatchdiv_backend(case.device, case.dtype)
        record = {
            "op": case.op,
            "provider": case.provider,
            "mode": case.mode,
            "dtype": case.dtype,
            "B": case.B,
            "N": case.N,
            "D": case.D,
            "tokens": case.B * case.N,
            "metric": metric,
            "unit": unit,
            "median": median,
            "p20": p20,
            "p80": p80,
            "status": status,
            "note": note,
            "samples": samples,
            "backend": backend,
            **self.env,
        }
        assert tuple(record) == RECORD_KEYS, "update RECORD_KEYS (and tests/test_benchmarks.py) with the format"
        return record

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            self.log(message)
