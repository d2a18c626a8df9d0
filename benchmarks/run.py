"""Runs every benchmark and prints the tables with PASS/MISS per target.

Usage::

    python -m benchmarks.run            # everything at full sizes (about 40 min, 2 cores)
    python -m benchmarks.run --quick    # small sizes, fewer repeats
    python -m benchmarks.run --only train_step --only growth --out results.md

Sections (``--only`` picks some; default all): ``standalone`` (standalone clip,
Adam step on given gradients, compile time, stats, memory; GPT-2 small and
2000 x 64x64), ``train_step`` (the full jitted train step of a GPT-style
transformer and an MLP, f32 and bf16, every registered clipper and guard),
``bf16`` (standalone bf16 and fp16 clip on GPT-2-small shapes), ``growth`` (step and
compile time against leaf count and size, with ``benchmarks/growth.png``),
``guards`` (select against ``lax.cond`` guards, under vmap too, and
``clip_by_value``'s statistic) and ``per_example`` (``clip_per_example`` next to
optax's per-example functions; see ``benchmarks/PER_EXAMPLE.md``).

All contenders of one table run in one process, interleaved round-robin, so the
ratios are what to read; absolute times move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from benchmarks import (
    bf16,
    growth,
    guards_bench,
    per_example,
    suites,
    timing,
    train_step,
    trees,
)
from benchmarks.suites import FULL, QUICK, Sizes

SECTIONS = ("standalone", "train_step", "bf16", "growth", "guards", "per_example")

Target = dict[str, Any]


def run_all(sizes: Sizes, *, with_designs: bool = True, with_adaptive: bool = True,
            log: Any = print) -> dict:
    """Runs benchmarks a to e on both trees and returns every number and ratio."""
    started = time.perf_counter()
    available = suites.adaptive_clippers()
    results: dict[str, Any] = {
        "sizes": sizes.label,
        "machine": timing.machine(),
        "adaptive_available": sorted(available),
        "adaptive_missing": [n for n in suites.ADAPTIVE if n not in available],
        "trees": {},
    }
    for i, (tree_name, shapes) in enumerate(sizes.trees().items()):
        # Adaptive clippers, the not-clipping regime and all but the hybrid design
        # run on the GPT-2 tree only: compiling them for thousands of leaves
        # takes minutes each.
        first = i == 0
        designs_here: bool | str = with_designs and (True if first else "hybrid")
        log(f"[{tree_name}] {trees.describe(shapes)}")
        entry: dict[str, Any] = {"description": trees.describe(shapes), "standalone": {}}
        for regime in suites.REGIMES if first else suites.REGIMES[:1]:
            log(f"  a/d. standalone clip, {regime} ...")
            entry["standalone"][regime] = suites.standalone(
                sizes, shapes, regime, with_designs=designs_here,
                with_adaptive=with_adaptive and first,
            )
        log("  b/c/e. Adam step: time, compile time, memory ...")
        entry["step"] = suites.adam_step(sizes, shapes, None if first else 1,
                                         with_designs=designs_here)
        results["trees"][tree_name] = entry
    results["machine"]["load_avg_after"] = timing.machine()["load_avg_1_5_15"]
    results["targets"] = targets(results)
    results["seconds"] = time.perf_counter() - started
    return results


def _median(table: dict, name: str) -> float:
    return table[name]["median_ms"] if name in table else math.nan


def targets(results: dict) -> list[Target]:
    """Every target of the issue as a ratio of medians, its limit, and PASS or MISS.

    Standalone targets use the ``clip`` regime (every call rescales); the first
    tree (GPT-2 shapes) carries the floor, Adam-step and stats targets.
    """
    out: list[Target] = []

    def add(name: str, table: dict, numerator: str, denominator: str, limit: float) -> None:
        if isinstance(table.get(numerator), dict):
            ratio = _median(table, numerator) / _median(table, denominator)
            low = table[numerator]["min_ms"] / table[denominator]["min_ms"]
        elif numerator in table and denominator in table:  # compile seconds
            ratio, low = table[numerator] / table[denominator], math.nan
        else:
            ratio = low = math.nan
        status = "n/a" if math.isnan(ratio) else ("PASS" if ratio <= limit else "MISS")
        out.append({"target": name, "ratio": ratio, "min_ratio": low, "limit": limit,
                    "status": status})

    for i, (tree_name, entry) in enumerate(results["trees"].items()):
        a, step = entry["standalone"]["clip"]["times"], entry["step"]
        add(f"standalone / optax [{tree_name}]", a, "optaxclip", "optax", 1.0)
        add(f"standalone / torch foreach [{tree_name}]", a, "optaxclip", "torch_foreach", 1.0)
        if i == 0:
            add(f"standalone / floor (norm read + scale r/w) [{tree_name}]", a, "optaxclip",
                "floor_read_write", 1.3)
            add(f"Adam step with clip / Adam alone [{tree_name}]", step["times"],
                "optaxclip+adam", "adam", 1.05)
            add(f"  (bound: floor clip + Adam / Adam alone) [{tree_name}]", step["times"],
                "floor+adam", "adam", 1.05)
        add(f"compile time / optax's [{tree_name}]", step["compile_s"], "optaxclip+adam",
            "optax+adam", 1.0)
        if i == 0:
            add(f"stats overhead: with / without stats [{tree_name}]", a, "optaxclip",
                "nostats", 1.02)
    return out


def render(results: dict) -> str:
    """The results as Markdown tables."""
    lines = [f"Sizes: **{results['sizes']}**; whole run {results.get('seconds', 0):.0f} s.", ""]
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["machine"].items()]
    lines += ["", "### Targets (ratio of medians; ratio of minima alongside)", "",
              "| target | medians | minima | limit | result |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        low = "-" if math.isnan(t["min_ratio"]) else f"{t['min_ratio']:.3f}x"
        lines.append(f"| {t['target']} | {t['ratio']:.3f}x | {low} "
                     f"| <= {t['limit']:.2f}x | {t['status']} |")
    for tree_name, entry in results["trees"].items():
        lines += ["", f"### {tree_name}: {entry['description']}"]
        for regime, table in entry["standalone"].items():
            title = {
                "clip": "a/d. Standalone clip update, clipping on every call "
                        f"(max_norm {table['max_norm']:g}, fresh donated input per call)",
                "noclip": "a. Standalone clip update, not clipping "
                          f"(max_norm {table['max_norm']:.4g} = 2 x norm, output fed back)",
            }[regime]
            lines += _time_table(title, table["times"], "optaxclip", table["hlo"])
        step = entry["step"]
        lines += _time_table("b. Jitted Adam step (params and state donated, clipping active)",
                             step["times"], "adam", step["hlo"])
        lines += ["", "c/e. Adam step: compile time and XLA memory analysis", "",
                  "| step | lower+compile s | / optax+adam | peak MiB | temp MiB |",
                  "|---|---|---|---|---|"]
        ref = step["compile_s"].get("optax+adam", math.nan)
        for name, seconds in step["compile_s"].items():
            mem = step["memory"].get(name, {})
            lines.append(
                f"| {name} | {seconds:.2f} | {seconds / ref:.2f}x "
                f"| {mem.get('peak_bytes', 0) / 2**20:,.1f} "
                f"| {mem.get('temp_bytes', 0) / 2**20:,.1f} |"
            )
    missing = results["adaptive_missing"]
    if missing:
        lines += ["", f"Adaptive clippers not yet available: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def _time_table(title: str, table: dict, reference: str, hlo: dict) -> list[str]:
    ref = _median(table, reference)
    lines = ["", title, "",
             f"| contender | median ms | q1-q3 ms | min ms | / {reference} | kernels | reduces |",
             "|---|---|---|---|---|---|---|"]
    for name, s in sorted(table.items(), key=lambda kv: kv[1]["median_ms"]):
        h = hlo.get(name, {})
        lines.append(
            f"| {name} | {s['median_ms']:.3f} | {s['q1_ms']:.3f}-{s['q3_ms']:.3f} "
            f"| {s['min_ms']:.3f} | {s['median_ms'] / ref:.3f}x "
            f"| {h.get('kernels', '')} | {h.get('reduces', '')} |"
        )
    return lines


def run_sections(sections: tuple[str, ...], quick: bool, with_designs: bool,
                 plot_path: str | None, log: Any = print) -> tuple[dict, str]:
    """Runs the chosen sections; returns all numbers and the Markdown report."""
    results: dict[str, Any] = {}
    parts: list[str] = []
    if "standalone" in sections:
        log("standalone clip, Adam step on given gradients ...")
        results["standalone"] = run_all(QUICK if quick else FULL,
                                        with_designs=with_designs and not quick,
                                        with_adaptive=not quick, log=log)
        parts.append(render(results["standalone"]))
    if "train_step" in sections:
        log("full train step ...")
        results["train_step"] = train_step.run(
            train_step.QUICK_STEP if quick else train_step.FULL_STEP, log=log)
        parts.append("\n".join(["### Full train step (jitted, donated)"]
                               + train_step.render(results["train_step"])))
    if "bf16" in sections:
        log("bf16 and fp16 standalone clip ...")
        lines = ["### bf16 and fp16"]
        for dtype, key in (("bfloat16", "bf16"), ("float16", "fp16")):
            results[key] = bf16.run(8 if quick else 1, 7 if quick else 21, log=log, dtype=dtype)
            lines += bf16.render(results[key])
        parts.append("\n".join(lines))
    if "growth" in sections:
        log("growth ...")
        results["growth"] = growth.run(growth.QUICK_GROWTH if quick else growth.FULL_GROWTH,
                                       log=log)
        if plot_path:
            try:
                growth.plot(results["growth"], plot_path)
            except ImportError:
                log("matplotlib is not installed: no plot")
        parts.append("\n".join(["### Growth"] + growth.render(results["growth"])))
    if "guards" in sections:
        log("guards and clip_by_value ...")
        results["guards"] = guards_bench.run(**guards_bench.SIZES["quick" if quick else "full"],
                                             log=log)
        parts.append("\n".join(["### Guards and clip_by_value"]
                               + guards_bench.render(results["guards"])))
    if "per_example" in sections:
        log("per-example clipping ...")
        results["per_example"] = per_example.run(
            per_example.QUICK if quick else per_example.CASES, 5 if quick else 15)
        parts.append("\n".join(["### Per-example clipping", per_example.render(
            results["per_example"])]))
    results["machine"] = timing.machine()
    return results, "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small trees, few repeats")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--json", help="also write every number as JSON to this file")
    parser.add_argument("--plot", default="benchmarks/growth.png",
                        help="where the growth plot goes ('' for none)")
    parser.add_argument("--no-designs", action="store_true",
                        help="skip the alternative designs (--quick always skips them)")
    args = parser.parse_args(argv)
    results, report = run_sections(
        tuple(args.only) if args.only else SECTIONS, args.quick, not args.no_designs,
        args.plot or None, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
