"""Checks that the built API reference has an entry for every name in ``optaxclip.__all__``.

``python tools/check_docs.py docs/_build/html`` (run by ``make docs``) looks in the
built HTML for the anchor that autodoc gives each documented object
(``id="optaxclip.<name>"``) and for a non-empty description after it, and fails
naming each public name that has none.
"""

from __future__ import annotations

import html.parser
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optaxclip  # noqa: E402


class _Entries(html.parser.HTMLParser):
    """Collects the ids of object signatures (``<dt id=...>``) and what follows each."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, list[str]] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ids = [value for key, value in attrs if key == "id" and value]
        if tag == "dt" and ids and ids[0].startswith("optaxclip."):
            self._current = ids[0]
            self.text.setdefault(self._current, [])

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self.text[self._current].append(data)


def documented(html_dir: pathlib.Path) -> dict[str, str]:
    """``{object id: the text that follows its signature}`` over every built page."""
    entries: dict[str, str] = {}
    for page in html_dir.rglob("*.html"):
        parser = _Entries()
        parser.feed(page.read_text(encoding="utf-8"))
        for key, chunks in parser.text.items():
            entries.setdefault(key, " ".join("".join(chunks).split()))
    return entries


def main(argv: list[str]) -> int:
    html_dir = pathlib.Path(argv[0] if argv else ROOT / "docs" / "_build" / "html")
    entries = documented(html_dir)
    missing = [n for n in optaxclip.__all__ if f"optaxclip.{n}" not in entries]
    # the signature line alone is not documentation: there must be more text after it
    empty = [n for n in optaxclip.__all__
             if f"optaxclip.{n}" in entries and len(entries[f"optaxclip.{n}"]) <= len(n) + 2]
    if missing or empty:
        for name in missing:
            print(f"no API reference entry for optaxclip.{name}", file=sys.stderr)
        for name in empty:
            print(f"the API reference entry of optaxclip.{name} is empty", file=sys.stderr)
        return 1
    print(f"API reference: all {len(optaxclip.__all__)} names of optaxclip.__all__ documented")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
