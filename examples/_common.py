"""Shared helpers for the examples: size flags, the results table, and PNG plots.

Every example takes the same flags:

* ``--tiny``: a smoke-test size that runs in seconds (the test suite uses it);
* no flag: the default size, a few seconds to a minute on a 2-core CPU;
* ``--full``: the full size of the original experiment;
* ``--out DIR``: where the plot (and any logs) go, ``examples/out`` by default.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, on a server or in CI

import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"
SIZES = ("tiny", "default", "full")


def parse_args(
    description: str, argv: Sequence[str] | None, extra: Any = None
) -> argparse.Namespace:
    """Parses ``--tiny`` / ``--full`` / ``--out`` (plus ``extra(parser)`` flags).

    The chosen size is ``args.size``, one of ``"tiny"``, ``"default"``, ``"full"``.
    """
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny",
                      help="smoke-test size (seconds)")
    size.add_argument("--full", action="store_const", dest="size", const="full",
                      help="the full size of the original experiment")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"output directory for plots and logs (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.size is None:
        args.size = "default"
    return args


def fmt(value: Any, digits: int = 4) -> str:
    """A number for the table: ``nan`` / ``inf`` spelled out, others in ``g`` format."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    number = float(value)
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.{digits}g}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (the first column left-aligned)."""
    cells = [list(header)] + [[fmt(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def save_figure(fig: Any, out_dir: os.PathLike | str, name: str) -> pathlib.Path:
    """Saves ``fig`` as ``out_dir/name`` (a PNG), closes it, and returns the path."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def finite_or_nan(values: Sequence[float]) -> list[float]:
    """Values for a log-scale plot: non-finite or non-positive values become NaN (gaps)."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]
