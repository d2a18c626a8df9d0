"""Run multi-device checks in a child process, so that a native abort stays there.

Multi-device computations on Explicit-sharded arrays have aborted the whole
interpreter inside XLA:CPU's runtime threads (``Fatal Python error: Aborted`` in a
non-Python thread: three times in about fifteen full-suite runs on a loaded 2-core
machine, in eager and in jitted tests, never when run alone). In a child process
such an abort cannot take a pytest worker and its other tests down.

``check_in_a_child(module, check, names)`` runs ``module.check(name)`` for every
name in one child and fails with the reports. A child that dies by a signal is
started once more for the names it had not reported, and the first abort's stderr
is kept in the failure text; a contract failure (an exception) is reported as it
is and never retried.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import traceback
from pathlib import Path

_TESTS = Path(__file__).parent


def _child(module: str, check: str, names: list[str]) -> None:
    """The child's entry point: one JSON line per name, as each finishes."""
    fn = getattr(importlib.import_module(module), check)
    for name in names:
        try:
            fn(name)
            error = None
        except Exception:  # reported to the parent, which fails the test with it
            error = traceback.format_exc()
        print(json.dumps({"name": name, "error": error}), flush=True)


def _run(module: str, check: str, names: list[str]
         ) -> tuple[dict[str, str | None], subprocess.CompletedProcess]:
    code = (f"import sys; sys.path.insert(0, {str(_TESTS)!r}); import _in_a_child; "
            "_in_a_child._child(sys.argv[1], sys.argv[2], sys.argv[3:])")
    # The child inherits XLA_FLAGS (8 virtual devices) from conftest.py.
    proc = subprocess.run([sys.executable, "-c", code, module, check, *names],
                          capture_output=True, text=True, timeout=900)
    reported = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"name"'):
            record = json.loads(line)
            reported[record["name"]] = record["error"]
    return reported, proc


def check_in_a_child(module: str, check: str, names: list[str]) -> None:
    reported, proc = _run(module, check, names)
    if proc.returncode < 0:  # killed by a signal: the native abort, not an assertion
        first_crash = proc.stderr[-3000:]
        again, proc = _run(module, check, [n for n in names if n not in reported])
        reported |= again
        assert proc.returncode >= 0, (
            f"the child process aborted twice (signal {-proc.returncode});\n"
            f"first:\n{first_crash}\nsecond:\n{proc.stderr[-3000:]}")
    missing = [n for n in names if n not in reported]
    assert not missing and proc.returncode == 0, (
        f"exit code {proc.returncode}, no report for {missing}:\n{proc.stderr[-3000:]}")
    failures = {n: e for n, e in reported.items() if e is not None}
    assert not failures, "\n".join(f"--- {n}\n{e}" for n, e in failures.items())
