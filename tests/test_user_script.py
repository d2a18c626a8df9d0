"""The user-style script that ``make typecheck`` type-checks also runs as written."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "typing"))

import user_script  # noqa: E402


def test_user_script_runs_and_sees_the_clip_stats(capsys):
    user_script.main()
    out = capsys.readouterr().out
    assert "'clip_by_global_norm/norm'" in out and "'zclip/norm'" in out
    assert "scale_by_adam/mu" in out  # assert_moments_bounded's report
