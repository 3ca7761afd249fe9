"""examples/train_digits.py: the smoke run writes every file; the committed results are the README's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_digits.py"
RESULTS = ROOT / "examples" / "results"
README = ROOT / "README.md"


def _example_module():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mixing", [[], ["--mixing-weight", "0.5"]], ids=["default", "mixing"])
def test_train_digits_quick_writes_results(tmp_path, mixing):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path), *mixing],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "results.json").read_text())
    runs = record["runs"]
    assert [(r["seed"], r["run"]) for r in runs] == [(0, "baseline"), (0, "diversity")]
    depth = record["model"]["depth"]
    for r in runs:
        assert r["steps"] == 3 and len(r["similarity"]) == len(r["similarity_init"]) == depth
        assert all(0 <= s <= 1 for s in r["similarity"]) and 0 <= r["test_accuracy"] <= 1
    baseline, diversity = runs
    assert baseline["similarity_init"] == diversity["similarity_init"], "both runs of a seed start from one init"
    assert baseline["contrastive_weight"] == 0 and diversity["contrastive_weight"] > 0
    assert baseline["final_losses"] == {}
    if mixing:  # CutMix batches for both runs, the mixing loss (and its head) in the diversity run only
        assert baseline["cutmix"] and diversity["cutmix"]
        assert baseline["mixing_weight"] == 0 and diversity["mixing_weight"] == 0.5
        assert set(diversity["final_losses"]) == {"cosine", "contrastive", "mixing"}
        assert 0 < diversity["final_losses"]["mixing"] < 10  # about ln(10) = 2.3 at the start
        assert "mixing 0.5) |" in (tmp_path / "results.md").read_text()
    else:
        assert not diversity["cutmix"] and set(diversity["final_losses"]) == {"cosine", "contrastive"}
    for name in ("similarity.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| baseline (cross-entropy) |" in (tmp_path / "results.md").read_text()


def test_committed_results_md_is_generated_from_results_json():
    """results.md is what the example writes from its results.json, not typed by hand."""
    record = json.loads((RESULTS / "results.json").read_text())
    example = _example_module()
    expected = example.markdown(record["summary"], argparse.Namespace(**record["args"]), record["meta"])
    assert (RESULTS / "results.md").read_text() == expected
    assert len(record["args"]["seeds"]) >= 3 and not record["args"]["quick"]
    assert (RESULTS / "similarity.png").exists() and (RESULTS / "loss.png").exists()


def test_readme_embeds_the_committed_digits_results():
    blocks = re.findall(r"<!-- results: (\S+) -->\n(.*?)<!-- end results -->", README.read_text(), flags=re.S)
    assert [path for path, _ in blocks] == ["examples/results/results.md"], "the README embeds no digits results"
    for path, body in blocks:
        committed = (ROOT / path).read_text()
        assert body.strip() == committed.strip(), f"the README's digits table differs from {path}: copy it in again"
    assert "](examples/results/similarity.png)" in README.read_text()
