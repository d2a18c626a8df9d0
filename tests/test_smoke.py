"""The README quickstart runs as written."""

import pathlib
import re


def test_readme_quickstart_runs():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    assert set(metrics) >= {"loss", "clip_by_global_norm/norm", "clip_by_global_norm/clipped"}
    assert float(metrics["clip_by_global_norm/norm"]) > 0
