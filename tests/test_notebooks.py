"""The notebooks are Colab-ready, carry fresh saved outputs, and run without error.

Saved outputs come from ``make notebooks`` (``tools/run_notebooks.py``: full size,
CPU), which records a hash of the code cells in the notebook's metadata; a code edit
without a re-run fails ``test_saved_outputs_are_fresh_and_clean``.

Execution uses nbclient with the ``python3`` kernel, which jupyter_client starts
with this interpreter (``sys.executable``), at the small size
(``OPTAXCLIP_NOTEBOOK_SIZE=small``). The kernel inherits this process's environment,
so it sees the eight virtual CPU devices that the root conftest.py sets up. The
notebooks' own ``assert`` cells check their outcomes (divergence, bounded moments,
the ordering errors, bf16 sharded parameters, a global norm across shards), so a
passing run means those held.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import types

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart.ipynb", "ordering.ipynb", "exploding_gradients.ipynb", "tpu_sharded.ipynb")
ACCELERATORS = {"tpu_sharded.ipynb": ("TPU", "V28")}  # the others: a GPU runtime

sys.path.insert(0, str(ROOT / "tools"))
import run_notebooks  # noqa: E402


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stream_text(notebook: nbformat.NotebookNode) -> str:
    outputs = [out for cell in code_cells(notebook) for out in cell.outputs]
    return "".join(out.get("text", "") for out in outputs if out.output_type == "stream")


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_colab_ready(name):
    notebook = load(name)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    # the first code cell installs optaxclip only inside Colab, from a named source
    first = cells[0].source
    assert 'if "google.colab" in sys.modules:' in first
    assert 'OPTAXCLIP_SOURCE = os.environ.get("OPTAXCLIP_SOURCE", "")' in first
    install_lines = [line for line in first.splitlines() if line.lstrip().startswith("%pip")]
    assert install_lines == ['    %pip install -q "{OPTAXCLIP_SOURCE}"']
    # Colab runtime metadata
    accelerator, gpu_type = ACCELERATORS.get(name, ("GPU", "T4"))
    assert notebook.metadata.accelerator == accelerator
    assert notebook.metadata.colab.gpuType == gpu_type
    # size parameter, device report, and nothing tied to one device type
    source = "\n".join(cell.source for cell in cells)
    assert 'os.environ.get("OPTAXCLIP_NOTEBOOK_SIZE", "default")' in source
    assert "print(\"devices:\", jax.devices())" in source
    for device_specific in (r"\bcuda\b", r"\btpu\b", r"jax\.devices\(.gpu.\)", r"device_put\("):
        assert not re.search(device_specific, source.lower()), (name, device_specific)
    assert notebook.metadata.kernelspec.name == "python3"


class _FakeShell:
    """Records the line magics an install cell would run."""

    def __init__(self) -> None:
        self.magics: list[tuple[str, str]] = []

    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1) -> None:
        self.magics.append((name, line))


def run_install_cell(source: str, monkeypatch, value: str | None) -> _FakeShell:
    """Runs the install cell as Colab would, with a fake shell and a fake google.colab."""
    from IPython.core.inputtransformer2 import TransformerManager

    shell = _FakeShell()
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    if value is None:
        monkeypatch.delenv("OPTAXCLIP_SOURCE", raising=False)
    else:
        monkeypatch.setenv("OPTAXCLIP_SOURCE", value)
    code = TransformerManager().transform_cell(source)
    exec(compile(code, "install cell", "exec"), {"get_ipython": lambda: shell})
    return shell


@pytest.mark.parametrize(
    "value", [None, "", "optaxclip", "optaxclip==0.1.0", "optaxclip[examples]"])
def test_install_cell_refuses_to_guess_a_source(value, monkeypatch):
    first = code_cells(load("quickstart.ipynb"))[0].source
    with pytest.raises(RuntimeError, match="Set OPTAXCLIP_SOURCE in the first code cell") as info:
        run_install_cell(first, monkeypatch, value)
    assert "git+https://github.com/<owner>/optaxclip.git" in str(info.value)


@pytest.mark.parametrize("value", ["git+https://example.org/me/optaxclip.git", "/content/optaxclip",
                                   "./optaxclip"])
def test_install_cell_installs_from_the_named_source(value, monkeypatch):
    for name in NAMES:
        first = code_cells(load(name))[0].source
        shell = run_install_cell(first, monkeypatch, value)
        assert shell.magics == [("pip", 'install -q "{OPTAXCLIP_SOURCE}"')], name


def test_install_cell_installs_nothing_outside_colab(monkeypatch):
    first = code_cells(load("quickstart.ipynb"))[0].source
    from IPython.core.inputtransformer2 import TransformerManager

    shell = _FakeShell()
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    code = TransformerManager().transform_cell(first)
    exec(compile(code, "install cell", "exec"), {"get_ipython": lambda: shell})
    assert shell.magics == []


@pytest.mark.parametrize("name", NAMES)
def test_saved_outputs_are_fresh_and_clean(name):
    notebook = load(name)
    recorded = notebook.metadata.get("optaxclip", {}).get("outputs_from")
    assert recorded, f"{name} has no saved outputs: run `make notebooks`"
    assert recorded["code_sha256"] == run_notebooks.code_hash(notebook), (
        f"{name}: a code cell changed after its outputs were saved; run `make notebooks`")
    assert recorded["size"] == "default"
    cells = code_cells(notebook)
    # every cell ran, in order, once
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    outputs = [out for cell in cells for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"], name
    assert any(out.output_type == "display_data" and "image/png" in out.data
               for out in outputs), f"{name}: no saved plot"
    text = stream_text(notebook)
    assert "devices: [" in text
    assert "Traceback" not in text


def test_sharded_notebook_outputs_come_from_eight_devices():
    notebook = load("tpu_sharded.ipynb")
    assert notebook.metadata.optaxclip.outputs_from.devices == 8
    text = stream_text(notebook)
    assert "mesh: {'data': 4, 'model': 2}" in text
    assert "w1: bfloat16" in text and "spec P(None, 'model')" in text


def test_exploding_notebook_says_what_its_saved_run_shows():
    # the markdown's numbers are the saved full-size run's
    notebook = load("exploding_gradients.ipynb")
    text = stream_text(notebook)
    by_value = [line for line in text.splitlines() if line.startswith("clip_by_value(3.0): final")]
    assert by_value, "the ratio line is missing"
    value_loss = float(by_value[0].split("final val loss ")[1].split(",")[0])
    ratio = float(by_value[0].split(", ")[1].split("x")[0])
    assert 1e4 < value_loss < 3e4 and ratio > 100
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "stalls near 1.8e4" in markdown and "every clipped run converges" not in markdown


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("OPTAXCLIP_NOTEBOOK_SIZE", "small")
    notebook = load(name)
    for cell in code_cells(notebook):  # run from a clean copy, not on top of saved outputs
        cell.outputs, cell.execution_count = [], None
    # one extra cell, in this in-memory copy only: which interpreter ran the kernel
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in code_cells(notebook) for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = stream_text(notebook)
    assert "devices: [" in text
    assert any(out.output_type == "display_data" and "image/png" in out.data
               for out in outputs), "no plot was drawn"
    executable = notebook.cells[-1].outputs[0].text.strip()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    if name == "tpu_sharded.ipynb":
        # the kernel got the test process's eight virtual CPU devices
        assert "mesh: {'data': 4, 'model': 2}" in text
