"""The README's "Does clipping happen before or after momentum?" demo runs as written."""

import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).parents[1]
DEMO = ROOT / "examples" / "ordering_demo.py"
TITLE = "## Does clipping happen before or after momentum?"


def test_ordering_demo_runs_and_shows_the_difference(capsys):
    runpy.run_path(str(DEMO), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    first = next(line for line in lines if line.startswith("clip first ["))
    last = next(line for line in lines if line.startswith("clip last  ["))
    assert first.split(" ", 2)[2] != last.split(" ", 2)[2]  # different trajectories
    assert any(line.startswith("check_order: clip_by_global_norm") for line in lines)
    assert any(line.startswith("clip first, moments/bound: {") for line in lines)
    assert any(line.startswith("clip last: TraceState.trace") for line in lines)


def test_readme_section_is_the_demo_file():
    readme = (ROOT / "README.md").read_text()
    if TITLE not in readme:
        pytest.skip(f"README.md has no '{TITLE}' section yet")
    section = readme.split(TITLE, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section must hold exactly one python block"
    assert blocks[0] == DEMO.read_text(), "README block and examples/ordering_demo.py differ"
