"""Cost growth: step and compile time against the number of leaves and the total size.

Two sweeps of the standalone ``clip_by_global_norm`` update (clipping every call,
donated fresh input), optaxclip next to optax, interleaved at each point:

* leaves: 10 ... 20,000 leaves holding 1,280,000 f32 entries in all (20,000
  leaves of 8x8 at the end);
* size: 1M ... 128M entries in 100 leaves.

optax's compile time grows faster than linearly in the number of leaves on
XLA:CPU; points where its predicted compile time is over ``OPTAX_COMPILE_LIMIT_S``
(from the two previous points) are not run for optax and say so.

Where the small leaves hold more than the library's packing cap
(``_packing._PACK_TOTAL`` entries per dtype), the leaf sweep also runs
``optaxclip`` with the cap raised to ``RAISED_CAP`` ("optaxclip, cap 2^24"):
the measurement behind keeping or raising the cap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip
from benchmarks import packing, suites, timing, trees
from optaxclip import _packing

TOTAL_ENTRIES = 1_280_000
OPTAX_COMPILE_LIMIT_S = 150.0
RAISED_CAP = 2**24
RAISED = "optaxclip, cap 2^24"


@dataclass(frozen=True)
class GrowthSizes:
    label: str
    leaf_counts: tuple[int, ...]
    sizes: tuple[int, ...]  # total entries, at SIZE_SWEEP_LEAVES leaves
    size_sweep_leaves: int
    repeats: int


# 20,000 leaves is left out of the full sweep: on the shared 2-core machine
# optaxclip's compile of that point had not finished after 8 minutes (RESULTS.md).
FULL_GROWTH = GrowthSizes("full", (10, 100, 1000, 2000, 5000),
                          (2**20, 2**22, 2**24, 2**26), 100, repeats=9)
QUICK_GROWTH = GrowthSizes("quick", (10, 100, 400), (2**18, 2**20), 20, repeats=5)
TINY_GROWTH = GrowthSizes("tiny", (2, 4), (64, 256), 2, repeats=2)


def leaf_shape(total: int, count: int) -> tuple[int, ...]:
    """A near-square 2-D shape of about ``total / count`` entries."""
    per_leaf = max(total // count, 1)
    rows = max(int(math.sqrt(per_leaf)), 1)
    while per_leaf % rows:
        rows -= 1
    return (rows, per_leaf // rows)


def _packed_entries(shapes: trees.Shapes) -> int:
    """Entries in leaves small enough to be packed (all f32 here)."""
    sizes = [math.prod(s) for s in shapes.values()]
    return sum(n for n in sizes if n < _packing._PACK_BELOW)


def _point(shapes: trees.Shapes, repeats: int, with_optax: bool,
           with_raised: bool = True) -> dict:
    source = jax.tree.map(jnp.asarray, trees.make_tree(shapes))
    txs = {"optaxclip": (optaxclip.clip_by_global_norm, None)}
    if with_optax:
        txs["optax"] = (optax.clip_by_global_norm, None)
    if with_raised and _packed_entries(shapes) > _packing._PACK_TOTAL:
        txs[RAISED] = (optaxclip.clip_by_global_norm, RAISED_CAP)
    contenders, compile_s, memory = {}, {}, {}
    for name, (factory, cap) in txs.items():
        settings = (packing.packing(_packing._PACK_BELOW, _packing._PACK_LEAVES, cap)
                    if cap else contextlib.nullcontext())
        with settings:  # read at trace time, i.e. inside _Clip's compile
            start = time.perf_counter()
            contenders[name] = suites._Clip(factory(1.0), source, refresh=True)
            compile_s[name] = time.perf_counter() - start
        memory[name] = suites._memory(contenders[name].compiled)
    samples = timing.interleaved(contenders, repeats)
    out = {"description": trees.describe(shapes), "times":
           {k: timing.summary(v) for k, v in samples.items()},
           "compile_s": compile_s, "memory": memory}
    del contenders, source
    gc.collect()
    return out


def _predicted(points: Sequence[dict], x: Sequence[int], at: int) -> float:
    """Power-law extrapolation of optax's compile seconds from its last two points."""
    known = [(xi, p["compile_s"]["optax"]) for xi, p in zip(x, points) if "optax" in
             p["compile_s"]]
    if len(known) < 2:
        return 0.0
    (x0, y0), (x1, y1) = known[-2:]
    slope = math.log(max(y1, 1e-9) / max(y0, 1e-9)) / math.log(x1 / x0)
    return y1 * (at / x1) ** max(slope, 1.0)


def run(sizes: GrowthSizes, log: Any = print, partial: str | None = None,
        optaxclip_only: bool = False) -> dict:
    """Both sweeps; with ``partial``, the results so far are written there (JSON) after
    every point, so a run stopped at a slow point keeps the earlier ones.

    ``optaxclip_only`` runs neither optax nor the raised packing cap at any point: for
    leaf counts where optax's compile is out of reach (20,000 leaves)."""
    import json

    out: dict[str, Any] = {"leaves": {}, "size": {}, "limit_s": OPTAX_COMPILE_LIMIT_S}
    # The first compile in a process pays one-time costs; pay them before any point.
    _point(trees.many_leaves_shapes(2, (4, 4)), 1, True)

    def save() -> None:
        if partial:
            with open(partial, "w") as f:
                json.dump(out, f, indent=1)

    done: list[dict] = []
    for count in sizes.leaf_counts:
        shape = leaf_shape(TOTAL_ENTRIES if sizes.label != "tiny" else 64, count)
        predicted = _predicted(done, sizes.leaf_counts[: len(done)], count)
        with_optax = predicted <= OPTAX_COMPILE_LIMIT_S and not optaxclip_only
        why = ("--optaxclip-only" if optaxclip_only
               else f"predicted compile {predicted:.0f} s")
        log(f"  growth: {count} leaves of {shape}" + ("" if with_optax
                                                       else f" (optax skipped: {why})"))
        point = _point(trees.many_leaves_shapes(count, shape), sizes.repeats, with_optax,
                       with_raised=not optaxclip_only)
        point["shape"] = shape
        if not with_optax and predicted:
            point["optax_predicted_compile_s"] = predicted
        out["leaves"][str(count)] = point
        done.append(point)
        log(f"    compile s: {point['compile_s']}")
        save()
    for total in sizes.sizes:
        shape = leaf_shape(total, sizes.size_sweep_leaves)
        log(f"  growth: {total:,} entries in {sizes.size_sweep_leaves} leaves of {shape}")
        point = _point(trees.many_leaves_shapes(sizes.size_sweep_leaves, shape), sizes.repeats,
                       True)
        point["shape"] = shape
        out["size"][str(total)] = point
        log(f"    compile s: {point['compile_s']}")
        save()
    return out


def growth_rows(sweep: dict) -> list[dict]:
    """Per point: both medians, both compile times, the ratios, and the step-time growth of
    optaxclip relative to optax's since the previous point (> 1: grew faster)."""
    rows, previous = [], None
    for x, p in sweep.items():
        t, c = p["times"], p["compile_s"]
        row = {"x": int(x), "shape": p.get("shape"), "optaxclip_ms": t["optaxclip"]["median_ms"],
               "optax_ms": t.get("optax", {}).get("median_ms", math.nan),
               "optaxclip_compile_s": c["optaxclip"], "optax_compile_s": c.get("optax", math.nan),
               "optaxclip_temp_mib": p["memory"]["optaxclip"].get("temp_bytes", 0) / 2**20,
               "optax_predicted_compile_s": p.get("optax_predicted_compile_s")}
        row["step_ratio"] = row["optaxclip_ms"] / row["optax_ms"]
        row["compile_ratio"] = row["optaxclip_compile_s"] / row["optax_compile_s"]
        row["relative_growth"] = (row["step_ratio"] / previous["step_ratio"]
                                  if previous and not math.isnan(previous["step_ratio"])
                                  else math.nan)
        rows.append(row)
        previous = row
    return rows


def plot(results: dict, path: str) -> None:
    """Four log-log panels: step and compile time against leaves and against size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("leaves", "ms", "step time (ms)"), ("leaves", "compile_s", "compile time (s)"),
              ("size", "ms", "step time (ms)"), ("size", "compile_s", "compile time (s)")]
    for ax, (sweep, key, ylabel) in zip(axes.T.ravel(), panels):
        rows = growth_rows(results[sweep])
        plotted = False
        for who, style in (("optaxclip", "o-"), ("optax", "s--")):
            # Points not measured (NaN: --optaxclip-only, or optax not run) are left out.
            points = [(r["x"], r[f"{who}_{key}"]) for r in rows if r[f"{who}_{key}"] > 0]
            if points:
                ax.plot(*zip(*points), style, label=who)
                plotted = True
        if not plotted:  # e.g. --no-size-sweep: nothing to draw on a log scale
            ax.text(0.5, 0.5, f"{sweep} sweep not run", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        raised = [(int(x), p["times"][RAISED]["median_ms"] if key == "ms"
                   else p["compile_s"][RAISED])
                  for x, p in results[sweep].items() if RAISED in p["times"]]
        if raised:
            ax.plot(*zip(*raised), "^:", color="C2", label=RAISED)
        if key == "compile_s":
            predicted = [(r["x"], r["optax_predicted_compile_s"]) for r in rows
                         if r["optax_predicted_compile_s"]]
            if predicted:
                ax.plot(*zip(*predicted), "s", mfc="none", color="C1",
                        label="optax, predicted (not run)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("leaves (1.28M entries in all)" if sweep == "leaves"
                      else "entries (100 leaves)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("clip_by_global_norm standalone update: optaxclip vs optax "
                 "(XLA:CPU, 2 shared cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shown(value: float, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or "-" where it was not measured (NaN)."""
    return "-" if math.isnan(value) else f"{value:{spec}}{suffix}"


def render(results: dict) -> list[str]:
    lines: list[str] = []
    for sweep, title in (("leaves", f"leaves, {TOTAL_ENTRIES:,} f32 entries in all"),
                         ("size", "total size, 100 leaves")):
        sweep_points = results.get(sweep, {})
        if not sweep_points:
            continue
        lines += ["", f"#### Growth against {title} (standalone clip_by_global_norm, "
                  "clipping every call)", "",
                  "| x | leaf shape | optaxclip ms | optax ms | step ratio | optaxclip compile s "
                  "| optax compile s | compile ratio | optaxclip temp MiB | cap 2^24 ms "
                  "| cap 2^24 compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row, point in zip(growth_rows(sweep_points), sweep_points.values()):
            raised_t = point["times"].get(RAISED, {}).get("median_ms")
            raised_c = point["compile_s"].get(RAISED)
            predicted = row["optax_predicted_compile_s"]
            optax_c = (f"{row['optax_compile_s']:.2f}" if not math.isnan(row["optax_compile_s"])
                       else "not run" if predicted is None
                       else f"not run (predicted {predicted:.0f})")
            lines.append(
                f"| {row['x']:,} | {'x'.join(map(str, row['shape']))} "
                f"| {row['optaxclip_ms']:.2f} | {_shown(row['optax_ms'], '.2f')} "
                f"| {_shown(row['step_ratio'], '.3f', 'x')} "
                f"| {row['optaxclip_compile_s']:.2f} | {optax_c} "
                f"| {_shown(row['compile_ratio'], '.3f', 'x')} "
                f"| {row['optaxclip_temp_mib']:.2f} "
                f"| {'-' if raised_t is None else f'{raised_t:.2f}'} "
                f"| {'-' if raised_c is None else f'{raised_c:.2f}'} |")
    return lines


SIZES = {"full": FULL_GROWTH, "quick": QUICK_GROWTH, "tiny": TINY_GROWTH}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description="growth of step and compile time")
    parser.add_argument("--sizes", choices=tuple(SIZES), default="full")
    parser.add_argument("--json")
    parser.add_argument("--plot", help="PNG path")
    parser.add_argument("--leaves", type=int, action="append",
                        help="leaf counts to run instead of the preset's")
    parser.add_argument("--no-size-sweep", action="store_true",
                        help="run the sweep over leaf counts only")
    parser.add_argument("--optaxclip-only", action="store_true",
                        help="run neither optax nor the raised packing cap (e.g. 20,000 leaves)")
    args = parser.parse_args(argv)
    sizes = SIZES[args.sizes]
    if args.leaves:
        sizes = dataclasses.replace(sizes, leaf_counts=tuple(args.leaves))
    if args.no_size_sweep:
        sizes = dataclasses.replace(sizes, sizes=())
    result = run(sizes, log=lambda m: print(m, file=sys.stderr, flush=True),
                 partial=args.json, optaxclip_only=args.optaxclip_only)
    result["machine"] = timing.machine()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
