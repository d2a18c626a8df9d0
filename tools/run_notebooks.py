"""Re-executes the notebooks in place at full size on CPU, saving outputs (``make notebooks``).

Each notebook runs top to bottom in a fresh ``python3`` kernel with
``JAX_PLATFORMS=cpu`` and ``OPTAXCLIP_NOTEBOOK_SIZE=default``; the sharded one gets
eight virtual CPU devices, the others one device. The outputs, plots included, are
written back into the ``.ipynb`` file, and the notebook's metadata records what
produced them: a hash of its code cells, the size, and the devices. The test suite
compares that hash with the code, so an edit to a code cell without re-running
``make notebooks`` fails ``tests/test_notebooks.py``.

``python tools/run_notebooks.py [NAME.ipynb ...]`` runs the named notebooks only.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
# Notebooks that need several devices, and how many virtual CPU devices they get.
DEVICE_COUNTS = {"tpu_sharded.ipynb": 8}
METADATA_KEY = "optaxclip"


def code_hash(notebook: nbformat.NotebookNode) -> str:
    """sha256 of the code cells' sources, in order: what the saved outputs came from."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def execute(path: pathlib.Path) -> float:
    """Runs ``path`` in place; returns the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    devices = DEVICE_COUNTS.get(path.name, 1)
    env = {"JAX_PLATFORMS": "cpu", "OPTAXCLIP_NOTEBOOK_SIZE": "default"}
    # XLA_FLAGS is replaced, not extended, so that one notebook's devices never leak
    # into the next one's kernel.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    start = time.perf_counter()
    try:
        client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                                record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    seconds = time.perf_counter() - start
    notebook.metadata[METADATA_KEY] = {
        "outputs_from": {"code_sha256": code_hash(notebook), "size": "default",
                         "platform": "cpu", "devices": devices}
    }
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str]) -> int:
    paths = [NOTEBOOKS / name for name in argv] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: running ...", flush=True)
        print(f"{path.name}: outputs saved ({execute(path):.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
