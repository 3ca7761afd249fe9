"""The benchmark harness (benchmarks/): the smoke run writes every artefact from complete records."""

from __future__ import annotations

import json
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
PROVIDERS = {"fastpatchdiv", "torch", "torch.compile"}
OPS = {"cosine", "contrastive-mean", "contrastive-window", "contrastive-all"}
METRICS = {"time", "memory", "throughput", "roofline"}
STATUSES = {"ok", "oom", "skipped", "error"}


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
    incomplete = {k: v for k, v in metrics.items() if v != METRICS}
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
        if r["status"] == "error"
    ]
    assert not errors, "cases that raised:\n" + "\n".join(errors)
    md = (tmp_path / "results.md").read_text()
    assert all(f"## {op} " in md for op in OPS), md[:2000]
    assert list(tmp_path.glob("*.png")), "no plots"
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {op} |" in summary for op in OPS) and summary in md, summary


def _record(**kw) -> dict:
    base = dict.fromkeys(REQUIRED_KEYS, "x")
    base.update(
        op="cosine",
        mode="forward",
        dtype="fp32",
        B=4,
        D=32,
        tokens=64,
        samples=None,
        device="cpu",
        device_name="test cpu",
        note="",
        backend="torch",
    )
    base.update(kw)
    return base


def test_report_renders_failed_cases(tmp_path):
    """OOM and skipped cases appear in the table with their reason; the report needs no GPU nor a sweep."""
    from benchmarks import report

    records = []
    for n in (16, 64):
        for provider, time_ms in (("fastpatchdiv", 1.0), ("torch", 4.0), ("torch.compile", None)):
            ok = time_ms is not None and not (provider == "torch" and n == 64)
            status, note = (
                ("ok", "")
                if ok
                else (("oom", "out of memory: cap 8 GiB") if provider == "torch" else ("skipped", "no compiler"))
            )
            for metric, unit, value in (
                ("time", "ms", time_ms),
                ("memory", "MiB", 2.0),
                ("throughput", "TFLOP/s", 0.1),
                ("roofline", "fraction", 0.5),
            ):
                v = (value, 0.9 * value, 1.1 * value) if ok else (None, None, None)
                records.append(
                    _record(
                        provider=provider,
                        N=n,
                        metric=metric,
                        unit=unit,
                        median=v[0],
                        p20=v[1],
                        p80=v[2],
                        status=status,
                        note=note,
                    )
                )
    _check_records(records)
    paths = report.write_all(records, tmp_path, {"command": "test", "tokens": 64})
    md = (tmp_path / "results.md").read_text()
    assert "OOM*" in md and "out of memory: cap 8 GiB" in md and "no compiler" in md
    assert "| 16 | 4 | 1 (0.9–1.1) | 4 (3.6–4.4) | skip* | 4× |" in md, md
    assert all(p.exists() for p in paths) and len([p for p in paths if p.suffix == ".png"]) == 3
