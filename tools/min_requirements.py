"""The declared dependency floor, as exact pins, and a check that it is what is installed.

``python tools/min_requirements.py`` prints one ``name==version`` line for every
runtime dependency in pyproject.toml, taken from its ``>=`` bound, so the floor has
one source. ``--check`` verifies that the running interpreter has exactly those
versions installed and exits non-zero (naming each mismatch) when it has not.
``make test-min`` uses both.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from importlib import metadata

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
# "name>=1.2.3", optionally with extras and further bounds after a comma.
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)")


def minimums(pyproject: pathlib.Path = PYPROJECT) -> dict[str, str]:
    """``{name: minimum version}`` for every entry of ``[project] dependencies``."""
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = {}
    for requirement in dependencies:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(
                f"{pyproject.name}: dependency {requirement!r} has no '>=' lower bound; "
                "every runtime dependency needs one, so that make test-min can test it"
            )
        pins[match.group(1)] = match.group(2)
    return pins


def mismatches(pins: dict[str, str]) -> list[str]:
    """Each pinned package that is missing or installed at another version."""
    problems = []
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed, expected {version}")
            continue
        if installed != version:
            problems.append(f"{name}: {installed} installed, expected exactly {version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="check the installed versions instead of printing the pins")
    args = parser.parse_args(argv)
    pins = minimums()
    if not args.check:
        print("\n".join(f"{name}=={version}" for name, version in pins.items()))
        return 0
    problems = mismatches(pins)
    if problems:
        print("the installed versions are not the declared minimums:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    print("declared minimums installed: "
          + ", ".join(f"{name}=={version}" for name, version in pins.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
