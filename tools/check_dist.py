"""Builds the sdist and the wheel and checks what a user would download.

``python tools/check_dist.py`` (run by ``make test`` and ``make dist``):

1. builds both into ``dist/`` with ``python -m build`` (an isolated build, so the
   ``[build-system]`` table is what is tested) and fails if setuptools printed a
   deprecation warning (the license-table notice, for one);
2. runs ``twine check --strict`` on both, which renders README.md as the long
   description;
3. checks that the wheel holds ``optaxclip/py.typed``, the LICENSE file and every
   module of the package, and that its metadata carries the SPDX license, the version
   of ``optaxclip/__init__.py`` and the runtime dependencies of pyproject.toml;
4. checks that the sdist holds the LICENSE, ``py.typed``, README.md and pyproject.toml.
"""

from __future__ import annotations

import ast
import email.parser
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
# Text that setuptools prints for configuration it is about to stop accepting.
WARNING_MARKERS = ("SetuptoolsDeprecationWarning", "DeprecationWarning", "deprecated")


def source_version() -> str:
    """``__version__`` from optaxclip/__init__.py, read without importing it."""
    tree = ast.parse((ROOT / "optaxclip" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__version__" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise SystemExit("optaxclip/__init__.py defines no __version__")


def run(*command: str) -> str:
    """Runs ``command`` in the repository root; returns stdout and stderr together."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        print(output)
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(command)}")
    return output


def build() -> tuple[pathlib.Path, pathlib.Path]:
    shutil.rmtree(DIST, ignore_errors=True)
    output = run(sys.executable, "-m", "build", "--outdir", str(DIST), ".")
    warnings = [line for line in output.splitlines()
                if any(marker in line for marker in WARNING_MARKERS)]
    if warnings:
        print(output)
        raise SystemExit("the build printed deprecation warnings:\n  " + "\n  ".join(warnings))
    (sdist,) = DIST.glob("*.tar.gz")
    (wheel,) = DIST.glob("*.whl")
    return sdist, wheel


def check_wheel(wheel: pathlib.Path, version: str) -> list[str]:
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"optaxclip-{version}.dist-info"
        metadata_text = archive.read(f"{dist_info}/METADATA").decode()
    expected = {"optaxclip/py.typed", f"{dist_info}/licenses/LICENSE"}
    expected |= {f"optaxclip/{p.name}" for p in (ROOT / "optaxclip").glob("*.py")}
    problems += [f"wheel lacks {name}" for name in sorted(expected - names)]

    metadata = email.parser.Parser().parsestr(metadata_text)
    if metadata["Version"] != version:
        problems.append(f"wheel version {metadata['Version']} != __version__ {version}")
    if metadata["License-Expression"] != "Apache-2.0":
        problems.append(f"License-Expression is {metadata['License-Expression']!r}")
    if "LICENSE" not in (metadata.get_all("License-File") or []):
        problems.append("metadata names no License-File LICENSE")
    if any(c.startswith("License ::") for c in metadata.get_all("Classifier") or []):
        problems.append("a License :: classifier next to the SPDX expression")
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    requires = {r.replace(" ", "") for r in metadata.get_all("Requires-Dist") or []
                if "extra ==" not in r}
    missing = {d.replace(" ", "") for d in declared} - requires
    problems += [f"wheel metadata lacks Requires-Dist {d}" for d in sorted(missing)]
    if metadata["Description-Content-Type"] != "text/markdown":
        problems.append(f"Description-Content-Type {metadata['Description-Content-Type']!r}")
    return problems


def check_sdist(sdist: pathlib.Path, version: str) -> list[str]:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {"LICENSE", "README.md", "pyproject.toml", "optaxclip/py.typed",
                "optaxclip/__init__.py"}
    problems = [f"sdist lacks {name}" for name in sorted(expected - names)]
    if sdist.name != f"optaxclip-{version}.tar.gz":
        problems.append(f"sdist is named {sdist.name}")
    return problems


def main() -> int:
    version = source_version()
    sdist, wheel = build()
    print(f"built {sdist.name} and {wheel.name}")
    print(run(sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)).strip())
    problems = check_wheel(wheel, version) + check_sdist(sdist, version)
    if problems:
        print("distribution problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"wheel and sdist hold py.typed, LICENSE and the package; version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
