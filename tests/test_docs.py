"""The API reference is generated from ``optaxclip.__all__`` and checked for every name.

``make docs`` builds it with Sphinx (warnings as errors) and then runs
``tools/check_docs.py``. These tests check the two pieces that make the reference
complete without editing ``docs/``: the directive that writes one autodoc entry per
public name, and the checker that finds each name's entry in the built HTML.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

import optaxclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
sys.path.insert(0, str(ROOT / "tools"))

pytest.importorskip("sphinx", reason="the docs extra (or the test extra) installs sphinx")
pytest.importorskip("docutils", reason="the docs extra (or the test extra) installs docutils")

import check_docs  # noqa: E402
import public_api  # noqa: E402


def test_one_entry_per_public_name_with_the_right_directive():
    lines = public_api.public_api_rst()
    directives = [line for line in lines if line.startswith(".. auto")]
    assert [d.split("::")[1].strip() for d in directives] == [
        f"optaxclip.{name}" for name in optaxclip.__all__]
    kinds = {d.split("::")[1].strip().split(".")[1]: d.split("::")[0][3:] for d in directives}
    assert kinds["clip_by_global_norm"] == "autofunction"
    assert kinds["ClipStats"] == "autoclass"
    assert kinds["OrderingError"] == "autoexception"
    # the summary table links every name too
    assert sum(line.startswith("   * - :py:obj:`~optaxclip.") for line in lines) == len(
        optaxclip.__all__)


def test_a_name_added_to_all_gets_an_entry(monkeypatch):
    monkeypatch.setattr(optaxclip, "__all__", [*optaxclip.__all__, "global_norm_alias"],
                        raising=True)
    monkeypatch.setattr(optaxclip, "global_norm_alias", optaxclip.global_norm, raising=False)
    assert ".. autofunction:: optaxclip.global_norm_alias" in public_api.public_api_rst()


def test_checker_finds_entries_and_reports_missing_and_empty_ones(tmp_path, capsys):
    page = ["<html><body>"]
    for name in optaxclip.__all__[:-2]:
        page.append(f'<dl><dt class="sig" id="optaxclip.{name}">{name}()</dt>'
                    f"<dd><p>What {name} does.</p></dd></dl>")
    empty = optaxclip.__all__[-2]
    page.append(f'<dl><dt id="optaxclip.{empty}">{empty}</dt></dl></body></html>')
    (tmp_path / "api.html").write_text("".join(page))
    assert check_docs.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no API reference entry for optaxclip.{optaxclip.__all__[-1]}" in err
    assert f"the API reference entry of optaxclip.{empty} is empty" in err
    assert f"optaxclip.{optaxclip.__all__[0]}" not in err
