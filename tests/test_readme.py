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
