"""The README's API example runs as written (it is the first thing a user copies)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_timm_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "timm.create_model" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    loss, last = namespace["loss"], namespace["last"]
    assert loss.ndim == 0 and loss.isfinite()
    assert last.shape[1] == 196


def test_readme_performance_tables_are_the_committed_summaries():
    """Each number in the README's performance tables is a committed benchmark run's summary.md, copied whole."""
    blocks = re.findall(r"<!-- summary: (\S+) -->\n(.*?)<!-- end summary -->", README.read_text(), flags=re.S)
    assert blocks, "the README embeds no benchmark summary"
    for path, body in blocks:
        committed = (README.parent / path).read_text()
        assert body.strip() == committed.strip(), f"the README's table differs from {path}: copy that file in again"
