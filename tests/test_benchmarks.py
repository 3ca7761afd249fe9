"""The benchmark harness (benchmarks/): the smoke run writes every artefact from complete records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Stated here, not imported, so that a change to the record format has to change this test too.
REQUIRED_KEYS = {
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
}
PROVIDERS = {"fastpatchdiv", "torch", "torch.compile", "inf-cl"}  # keops compiles with g++: left out of --quick
OPS = {"cosine", "contrastive-mean", "contrastive-window", "contrastive-all", "mixing"}
METRICS = {"time", "memory", "throughput", "roofline"}  # every case; a peer's first formula adds "compile"
STATUSES = {"ok", "oom", "skipped", "error", "n/a"}


def _check_records(records: list[dict]) -> None:
    for r in records:
        missing = REQUIRED_KEYS - r.keys()
        assert not missing, f"record {r.get('op')}/{r.get('provider')}/{r.get('metric')} lacks {sorted(missing)}"
        assert r["status"] in STATUSES, r
        if r["status"] == "ok":
            assert r["p20"] <= r["median"] <= r["p80"], r
        else:
            assert r["median"] is None and r["note"], r
    metrics = {}
    for r in records:
        if r["op"] in OPS:
            metrics.setdefault((r["op"], r["provider"], r["mode"], r["dtype"], r["N"], r["D"]), set()).add(r["metric"])
    incomplete = {k: v for k, v in metrics.items() if not METRICS <= v <= METRICS | {"compile"}}
    assert not incomplete, f"cases without all four metrics: {incomplete}"


@pytest.mark.slow
def test_quick_run_writes_every_artefact(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((tmp_path / "results.json").read_text())
    records = data["records"]
    _check_records(records)
    cases = [r for r in records if r["op"] in OPS]
    assert {r["provider"] for r in cases} == PROVIDERS
    assert {r["op"] for r in cases} == OPS
    assert {r["mode"] for r in cases} == {"forward", "backward", "full"}
    assert any(r["op"] == "peak-matmul" and r["status"] == "ok" for r in records), "no measured matmul rate"
    errors = [
        f"{r['op']} {r['provider']} {r['mode']} N={r['N']} {r['metric']}: {r['note']}"
        for r in records
        if r["status"] == "error" or "failed" in (r["note"] or "")
    ]
    assert not errors, "cases that raised or whose provider failed:\n" + "\n".join(errors)
    if records[0]["device"] == "cpu":  # Inf-CL's rows say why they are empty
        infcl = {r["note"] for r in cases if r["provider"] == "inf-cl"}
        assert infcl == {"CUDA only"}, infcl
    md = (tmp_path / "results.md").read_text()
    assert all(f"## {op} " in md for op in OPS), md[:2000]
    assert list(tmp_path.glob("*.png")), "no plots"
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {op} |" in summary for op in OPS) and summary in md, summary


def _record(**kw) -> dict:
    base = dict.fromkeys(REQUIRED_KEYS, "x")
    base.update(op="cosine", mode="full", dtype="fp32", B=4, D=32, tokens=64, samples=None, device="cpu")
    base.update(device_name="test cpu", note="", backend="torch", date="2026-01-01")
    base.update(kw)
    return base


def _case_records(provider, n, time_ms, status="ok", note="", roofline=0.5) -> list[dict]:
    values = (("time", "ms", time_ms), ("memory", "MiB", 2.0), ("throughput", "TFLOP/s", 0.1))
    values += (("roofline", "fraction", roofline),)
    out = []
    for metric, unit, v in values:
        triple = dict(median=v, p20=0.9 * v, p80=1.1 * v) if status == "ok" else dict(median=None, p20=None, p80=None)
        out.append(_record(provider=provider, N=n, metric=metric, unit=unit, status=status, note=note, **triple))
    return out


def test_report_renders_failed_cases_peers_and_anomalies(tmp_path):
    """OOM, skipped and "CUDA only" cases appear with their reason, a fraction of peak above 100% is flagged
    with its note, and the peers sit beside the baselines; the report needs no GPU nor a sweep."""
    from benchmarks import report

    records = []
    for n in (16, 64):
        records += _case_records("fastpatchdiv", n, 1.0)
        records += (
            _case_records("torch", n, 4.0)
            if n == 16
            else _case_records("torch", n, 0, "oom", "out of memory: cap 8 GiB")
        )
        records += _case_records("torch.compile", n, 0, "skipped", "torch.compile is unavailable here")
        records += _case_records("keops", n, 8.0, roofline=1.5)
        records += _case_records("inf-cl", n, 0, "skipped", "CUDA only")
    _check_records(records)
    paths = report.write_all(records, tmp_path, {"command": "test", "sweep": {"tokens": 64}})
    md, summary = (tmp_path / "results.md").read_text(), (tmp_path / "summary.md").read_text()
    assert "OOM*" in md and "out of memory: cap 8 GiB" in md and "torch.compile is unavailable here" in md
    assert "| 16 | 4 | 1 (0.9–1.1) | 4 (3.6–4.4) | skip* | 8 (7.2–8.8) | CUDA only* | 4× |  | 8× |  |" in md, md
    assert "150%⚠" in md and report.FLAG_NOTE in md
    assert (
        "| cosine | 16 | 4 | 1 | 4 | skip* | 8 | CUDA only* | 4× |  | 8× |  | 2 / 2 / skip* / 2 / CUDA only* | 50% |"
        in summary
    )
    assert summary in md and "keops" in summary and "\\* inf-cl, cosine N=16, 64: CUDA only" in summary
    assert all(p.exists() for p in paths) and len([p for p in paths if p.suffix == ".png"]) == 3


class _Wrong:
    """A peer form that is off by a factor of 2: the value check must stop it before it is timed."""

    def __call__(self, x):
        from fastpatchdiv.reference import cosine_loss_reference

        return 2 * cosine_loss_reference(x).mean()


def test_a_peer_that_disagrees_is_reported_not_timed(monkeypatch):
    from benchmarks import cases, providers, runner

    monkeypatch.setitem(providers.PEER_FORMS, ("keops", "cosine"), _Wrong())
    monkeypatch.setattr(runner, "unavailable", lambda case: None)  # as if pykeops were installed
    sweep = cases.Sweep("cpu", measure_memory=False)
    run = runner.Runner(sweep, runner.environment("cpu"))
    records = run.run(cases.Case("cosine", "keops", "full", "fp32", 2, 16, 8, "cpu"))
    assert {r["metric"] for r in records} >= {"time", "memory", "throughput"}, records
    for r in records:
        if r["metric"] != "compile":
            assert r["status"] == "error" and r["median"] is None, r
            assert "disagrees with the float64 reference" in r["note"] and "loss" in r["note"], r["note"]


@pytest.mark.slow
def test_keops_provider_on_a_tiny_case():
    """KeOps' forms pass the value check and are timed (compiled with g++ on first use, then cached on disk)."""
    pytest.importorskip("pykeops", reason='pykeops is not installed (pip install -e ".[peers]")')
    from benchmarks import cases, runner

    sweep = cases.Sweep("cpu", measure_memory=False, cpu_budget_s=0.01)
    run = runner.Runner(sweep, runner.environment("cpu"))
    for op in ("cosine", "contrastive-all"):
        records = run.run(cases.Case(op, "keops", "full", "fp32", 2, 64, 32, "cpu"))
        time_record = next(r for r in records if r["metric"] == "time")
        assert time_record["status"] == "ok", time_record
        assert any(r["metric"] == "compile" for r in records), records


@pytest.mark.slow
def test_pytest_benchmark_entry_point_runs_the_cli_cases():
    """``pytest benchmarks/`` (the contract's pytest-benchmark entry) collects the CLI's quick cases and runs them."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_speed.py"]
        + ["--benchmark-disable", "-k", "full and 64 and (cosine or all) and not keops"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTPATCHDIV_BENCH_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 passed" in proc.stdout and "1 skipped" in proc.stdout, proc.stdout[-1000:]  # inf-cl: CUDA only


def test_autocast_case_runs_on_cpu_under_autocast(tmp_path):
    """The "amp-bf16" case (issue 18 item 9): `first` bf16 and `last` fp32 as a timm ViT gives them under
    autocast, every provider's loss under torch.autocast(bfloat16), timed beside the naive formula and
    torch.compile of it; its report section says so, and its ceiling is the bf16 matmul rate."""
    import torch

    from benchmarks import cases, providers, report, runner
    from fastpatchdiv.reference import contrastive_loss_reference

    gen = torch.Generator().manual_seed(0)
    first, last = cases.make_inputs("contrastive-all", 2, 16, 8, "amp-bf16", "cpu", gen)
    assert (first.dtype, first.requires_grad) == (torch.bfloat16, False)  # the patch embedding's output
    assert (last.dtype, last.requires_grad) == (torch.float32, True)  # the final LayerNorm's
    (x,) = cases.make_inputs("cosine", 2, 16, 8, "amp-bf16", "cpu", gen)
    assert x.dtype == torch.float32 and x.requires_grad
    assert {t.dtype for t in cases.make_inputs("mixing", 2, 16, 8, "amp-bf16", "cpu", gen)[:3]} == {torch.float32}

    # the naive provider runs its matmul in bf16: the value of the formula under autocast, not the fp32 one
    naive = providers.Providers().loss_fn(cases.Case("contrastive-all", "torch", "full", "amp-bf16", 2, 16, 8, "cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_value = contrastive_loss_reference(first, last, negatives="all").mean()
    fp32_value = contrastive_loss_reference(first.float(), last, negatives="all").mean()
    assert torch.equal(naive(first, last), amp_value) and not torch.equal(amp_value, fp32_value)

    for peer in cases.PEERS:
        status, note = providers.unavailable(cases.Case("contrastive-all", peer, "full", "amp-bf16", 2, 16, 8, "cpu"))
        assert status == "skipped" and "autocast" in note

    # torch.compile (~10 s to compile here) for the mixed-dtype op only; eager for both
    todo = [
        cases.Case(op, p, "full", "amp-bf16", 2, 64, 32, "cpu")
        for op, p in [("cosine", "fastpatchdiv"), ("cosine", "torch")]
        + [("contrastive-all", p) for p in ("fastpatchdiv", "torch", "torch.compile")]
    ]
    sweep = cases.Sweep("cpu", dtypes=("amp-bf16",), measure_memory=False, cpu_budget_s=0.02, cpu_max_reps=3)
    assert cases.precheck(todo[0], sweep) is None  # CPU autocast runs it (16-bit inputs alone are CUDA only)
    providers.setup("cpu")
    run = runner.Runner(sweep, runner.environment("cpu"))
    records = [r for case in todo for r in run.run(case)]
    assert all(r["status"] == "ok" for r in records if r["metric"] == "time"), records
    cpu = run.finish(records)
    # no bf16 ceiling on CPU (an emulated bf16 matmul there); given one, the roofline is of the bf16 rate
    assert {r["note"] for r in cpu if r["metric"] == "roofline"} == {"no bf16 TFLOP/s ceiling measured"}
    run.best[("bf16", "TFLOP/s")] = 1e3
    roofs = [r for r in run.finish(records) if r["metric"] == "roofline"]
    assert all(r["status"] == "ok" and "1e+03 TFLOP/s" in r["note"] for r in roofs), roofs

    _check_records(cpu)
    report.write_all(cpu, tmp_path, {"command": "test", "sweep": {"tokens": 128}})
    md = (tmp_path / "results.md").read_text()
    assert "## contrastive-all · amp-bf16 · D=32" in md and "under torch.autocast(bf16)" in md, md[:3000]
    assert "fastpatchdiv % of peak, cosine N=64; contrastive-all N=64: no bf16 TFLOP/s ceiling measured" in md
