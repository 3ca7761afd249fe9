"""The static report (``python -m benchmarks --static``): its CI subset compiled for sm_80 and sm_86 in TF32
and bf16, the records it writes, and the verdict logic on hand-made records.

No GPU and no interpreter: the report compiles the kernels for GPU targets (it refuses TRITON_INTERPRET=1,
so the subprocess runs without it).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import static_report

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["--arch", "80", "86", "--d", "384", "768", "--dtype", "fp32-tf32", "bf16", "--n", "4096", "--b", "4"]
LAUNCH_FIELDS = {
    "arch", "op", "kernel", "dtype", "precision", "D", "N", "B", "shared_bytes", "shared_limit", "spills",
    "registers", "tensor_core", "programs", "sms",
}  # fmt: skip
WORK_FIELDS = {"op", "dtype", "precision", "D", "issued_macs", "reference_macs", "ratio"}
SHARED_LIMITS = {80: 166_912, 86: 101_376}


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks", "--static", *SUBSET, "--out", str(out), "--cache-dir", str(out / "c")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    path = out / "static.json"
    assert path.exists(), f"exit {proc.returncode}, no static.json\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(path.read_text()), (out / "static.md").read_text()


@pytest.mark.slow
def test_static_subset_records(static_run):
    """Every launch and work record has its fields and consistent values; the exit status follows the
    fit, spill and error verdicts."""
    proc, doc, md = static_run
    assert {"torch", "triton", "commit"} <= doc["versions"].keys()
    launches = doc["launches"]
    assert launches and all(LAUNCH_FIELDS <= r.keys() for r in launches)
    assert {r["arch"] for r in launches} == {80, 86}
    assert {(r["dtype"], r["precision"]) for r in launches} == {("fp32", "tf32"), ("bf16", "bf16")}
    assert {r["op"] for r in launches} == {"cosine", "contrastive-all", "mixing"}
    assert {r["D"] for r in launches} == {384, 768} and {(r["N"], r["B"]) for r in launches} == {(4096, 4)}
    for r in launches:
        assert r["shared_limit"] == SHARED_LIMITS[r["arch"]] and r["sms"] > 0, r
        assert r["programs"] == math.prod(r["grid"]) > 0, r
        assert r["tensor_core"] in {"wgmma", "mma", "tcgen05", "none", "n/a"}, r
        assert isinstance(r["shared_bytes"], int) and isinstance(r["registers"], int) and r["spills"] >= 0, r
    # sm_80/sm_86 have no wgmma; every kernel with a tl.dot runs mma in TF32 and bf16; mixing has no tl.dot
    assert {r["tensor_core"] for r in launches if r["tensor_core"] != "n/a"} == {"mma"}
    assert {r["tensor_core"] for r in launches if r["op"] == "mixing"} == {"n/a"}

    work = doc["work"]
    assert {(w["op"], w["precision"], w["D"]) for w in work} == {
        (op, p, d) for op in ("cosine", "contrastive-all") for p in ("tf32", "bf16") for d in (384, 768)
    }
    for w in work:
        assert WORK_FIELDS <= w.keys(), w
        factor = 2.5 if w["op"] == "cosine" else 3.0
        assert w["reference_macs"] == factor * 4 * 4096**2 * w["D"], w
        assert w["issued_macs"] > 0 and w["ratio"] == pytest.approx(w["issued_macs"] / w["reference_macs"], rel=1e-3)

    names = [v["name"] for v in doc["verdicts"]]
    assert names == ["errors", "fit", "spill", "wgmma", "work", "grid"]
    assert (proc.returncode == 0) == static_report.launchable(doc), proc.stdout[-3000:]
    assert "cannot show" in md and all(static_report.verdict_line(v) in md for v in doc["verdicts"])


@pytest.mark.slow
def test_static_subset_exits_zero(static_run):
    """Every launch of the subset fits its target and nothing spills: exit status 0."""
    proc, doc, _ = static_run
    failed = [line for v in doc["verdicts"] if v["gates_exit"] and v["ok"] is False for line in v["examples"]]
    assert proc.returncode == 0, f"exit {proc.returncode}: " + "\n".join(failed) + proc.stderr[-2000:]


def _launch(**kw) -> dict:
    base = dict(arch=90, op="cosine", kernel="k", dtype="bf16", precision="bf16", D=768, N=4096, B=4)
    base.update(shared_bytes=1000, shared_limit=232_448, spills=0, local_bytes=0, registers=128)
    base.update(tensor_core="wgmma", programs=512, sms=132)
    return base | kw


def _work(**kw) -> dict:
    return dict(op="cosine", dtype="bf16", precision="bf16", D=768, ratio=1.0) | kw


@pytest.mark.parametrize(
    "launch, work, failing",
    [
        (_launch(), _work(), set()),
        (_launch(shared_bytes=232_449), _work(), {"fit"}),
        (_launch(spills=8), _work(), {"spill"}),
        (_launch(local_bytes=16), _work(), {"spill"}),
        (_launch(error="ptxas: boom"), _work(), {"errors"}),
        (_launch(tensor_core="mma"), _work(), {"wgmma"}),
        (_launch(tensor_core="none", precision="ieee", dtype="fp32"), _work(), set()),  # exact fp32: FMA is fine
        (_launch(tensor_core="mma", arch=80, sms=108), _work(), set()),
        (_launch(), _work(ratio=1.3), {"work"}),
        (_launch(), _work(ratio=3.0, D=128), set()),  # the work bound is for D = 384, 768, 1024
        (_launch(programs=100), _work(), {"grid"}),
        (_launch(programs=100, N=196, B=4), _work(), set()),  # B·N < 4096
        (_launch(programs=100, tensor_core="n/a"), _work(), set()),  # no tl.dot: not O(N²·D)
    ],
)
def test_verdicts_flag_each_failure(launch, work, failing):
    doc = dict(launches=[launch], work=[work], errors=[])
    verdicts = static_report.verdicts(doc)
    assert {v["name"] for v in verdicts if v["ok"] is False} == failing
    assert static_report.launchable(dict(verdicts=verdicts)) == (not failing & {"fit", "spill", "errors"})
