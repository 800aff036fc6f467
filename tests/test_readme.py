"""The README's Python examples run as written, in order, in one namespace (each block
builds on the ones above it)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3   # usage, curvature, distributed
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["hvps"]["0.weight"].shape[0] == 4
    assert namespace["HV"].shape == (namespace["op"].shape[0], 4)
