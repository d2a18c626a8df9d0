"""Packaging facts that a build would not catch by itself.

The build and the archives are checked by ``tools/check_dist.py`` (run by
``make test``); these tests check the sources it builds from: the README works as a
package long description, the version and the dependency floor each have one source,
and the targets that test the floor point at files that exist.
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import min_requirements  # noqa: E402

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Markdown links and images, [text](target) and ![alt](target), and HTML src/href.
MARKDOWN_TARGET = re.compile(r"\]\(\s*<?([^)\s>]+)")
HTML_TARGET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def relative_targets(markdown: str) -> list[str]:
    """Link and image targets that only resolve next to the file (not on a package index)."""
    targets = MARKDOWN_TARGET.findall(markdown) + HTML_TARGET.findall(markdown)
    return [t for t in targets if not re.match(r"^(https?://|mailto:|#)", t)]


def test_relative_target_finder_finds_links_and_images():
    text = ("see [results](benchmarks/RESULTS.md), ![plot](docs/a.png), "
            '<img src="x.png">, [ok](https://example.org/a) and [top](#install)')
    assert relative_targets(text) == ["benchmarks/RESULTS.md", "docs/a.png", "x.png"]


def test_readme_has_no_relative_links_for_the_package_index():
    # README.md is the long description on a package index, where a relative link or
    # image has nothing to resolve against and breaks.
    assert PYPROJECT["project"]["readme"] == "README.md"
    assert relative_targets((ROOT / "README.md").read_text()) == []


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "optaxclip.__version__"
    init = (ROOT / "optaxclip" / "__init__.py").read_text()
    assert len(re.findall(r"^__version__ = ", init, flags=re.M)) == 1


def test_license_is_an_spdx_expression_with_its_file():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    # setuptools reads SPDX strings and license-files without a deprecation notice from 77 on
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_typed_marker_is_shipped():
    assert (ROOT / "optaxclip" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["optaxclip"]
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]


def test_every_runtime_dependency_has_a_floor_that_test_min_pins():
    declared = PYPROJECT["project"]["dependencies"]
    pins = min_requirements.minimums()
    assert len(pins) == len(declared)
    for requirement in declared:
        name, floor = requirement.split(">=")
        assert pins[name.strip()] == floor.strip()


def test_min_requirements_rejects_a_dependency_without_a_floor(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["jax>=0.6.1", "optax"]\n')
    with pytest.raises(SystemExit, match="'optax' has no '>=' lower bound"):
        min_requirements.minimums(pyproject)


def test_min_requirements_check_reports_other_versions():
    assert min_requirements.mismatches({"pytest": "0.0.1"}) == [
        f"pytest: {pytest.__version__} installed, expected exactly 0.0.1"
    ]
    assert min_requirements.mismatches({"no-such-package-here": "1.0"}) == [
        "no-such-package-here: not installed, expected 1.0"
    ]


def test_make_test_min_runs_core_modules_that_exist_and_ci_runs_it():
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^CORE_TESTS := (.*?)(?<!\\)\n", makefile, flags=re.M | re.S)
    assert match, "Makefile has no CORE_TESTS"
    paths = match.group(1).replace("\\\n", " ").split()
    assert "optaxclip" in paths  # the docstring examples too
    for path in paths:
        assert (ROOT / path).exists(), path
    for banned in ("parity", "test_examples", "test_notebooks", "test_benchmarks"):
        assert not any(banned in path for path in paths), banned
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test-min$", ci, flags=re.M)


def test_changelog_has_a_version_policy_and_an_unreleased_section():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, flags=re.M)
    assert headings[:2] == ["Version policy", "Unreleased"]
    assert "state" in changelog.lower() and "checkpoint" in changelog.lower()
