"""The user-facing benchmark: a whole jitted train step with each clipper, against Adam alone.

Each step is forward, backward, ``tx.update``, ``optax.apply_updates``, with the
parameters and optimizer state donated; optionally it also returns
``optaxclip.stats(opt_state)``. Every contender of ``contenders.step_contenders``
runs on the same model, parameters and batch, interleaved round-robin in one
process. For each compiled step the table keeps the compile time, XLA's memory
plan and what the HLO says about the gradients (``benchmarks.hlo``).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip
from benchmarks import contenders, hlo, models, suites, timing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class StepSizes:
    label: str
    gpt: models.GPTConfig
    mlp: models.MLPConfig
    repeats: int
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    only: tuple[str, ...] | None = None  # contender names to run; None: all
    with_stats: tuple[str, ...] = (
        "chain(clip_by_global_norm, adam)", "chain(zclip, adam)",
        "skip_nonfinite(chain(clip_by_global_norm, adam))",
    )


FULL_STEP = StepSizes("full", models.GPTConfig(), models.MLPConfig(), repeats=60)
QUICK_STEP = StepSizes(
    "quick",
    models.GPTConfig(vocab=128, width=64, layers=2, heads=2, context=32, batch=4),
    models.MLPConfig(inputs=64, hidden=256, layers=2, batch=32),
    repeats=5, dtypes=("float32",),
    only=("adam", "optax.clip_by_global_norm", "chain(clip_by_global_norm, adam)",
          "skip_nonfinite(chain(clip_by_global_norm, adam))"),
    with_stats=("chain(clip_by_global_norm, adam)",),
)
TINY_STEP = StepSizes(
    "tiny",
    models.GPTConfig(vocab=32, width=16, layers=1, heads=2, context=8, batch=2),
    models.MLPConfig(inputs=8, hidden=16, layers=1, batch=4),
    repeats=2, dtypes=("float32",),
    only=("adam", "optax.clip_by_global_norm", "chain(clip_by_global_norm, adam)"),
    with_stats=("chain(clip_by_global_norm, adam)",),
)
STATS = " +stats"


def step_fn(loss: Callable, tx: optax.GradientTransformation, with_stats: bool) -> Callable:
    def step(params: Any, opt_state: Any, batch: Any) -> tuple:
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if with_stats:
            return params, opt_state, value, optaxclip.stats(opt_state)
        return params, opt_state, value

    return step


class _Step:
    """One compiled, donated train step owning its parameters and optimizer state."""

    def __init__(self, problem: models.Problem, tx: optax.GradientTransformation,
                 with_stats: bool):
        self.batch = problem.batch
        self.params = jax.tree.map(jnp.array, problem.params)
        self.state = jax.tree.map(jnp.array, tx.init(self.params))
        fn = jax.jit(step_fn(problem.loss, tx, with_stats), donate_argnums=(0, 1))
        start = time.perf_counter()
        self.compiled = fn.lower(self.params, self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start

    def __call__(self) -> None:
        out = self.compiled(self.params, self.state, self.batch)
        self.params, self.state = out[0], out[1]
        jax.block_until_ready(out)


def problems(sizes: StepSizes) -> dict[str, Callable[[Any], models.Problem]]:
    return {
        "gpt": lambda dtype: models.gpt_problem(sizes.gpt, dtype),
        "mlp": lambda dtype: models.mlp_problem(sizes.mlp, dtype),
    }


def run(sizes: StepSizes, log: Any = print, keys: tuple[str, ...] | None = None) -> dict:
    """Per model and dtype: step times, compile seconds, memory plan and HLO reading.

    ``keys`` picks ``"model/dtype"`` cases (e.g. ``("gpt/float32",)``); None: all.
    """
    table, skipped = contenders.step_contenders()
    chosen = {k: v for k, v in table.items() if sizes.only is None or k in sizes.only}
    out: dict[str, Any] = {"skipped": skipped, "groups": {k: v.group for k, v in table.items()},
                           "sizes": sizes.label}
    for model, make_problem in problems(sizes).items():
        for dtype_name in sizes.dtypes:
            key = f"{model}/{dtype_name}"
            if keys is not None and key not in keys:
                continue
            problem = make_problem(DTYPES[dtype_name])
            log(f"  train step {key}: {problem.label}, {problem.parameter_count:,} parameters "
                f"in {problem.leaf_count} leaves")
            steps: dict[str, _Step] = {}
            failed: dict[str, str] = {}
            runs = [(name, c, False) for name, c in chosen.items()]
            runs += [(name + STATS, chosen[name], True) for name in sizes.with_stats
                     if name in chosen]
            for name, contender, with_stats in runs:
                try:
                    steps[name] = _Step(problem, contender.make(), with_stats)
                    log(f"    compiled {name} in {steps[name].compile_s:.1f} s")
                except Exception as error:  # noqa: BLE001 - reported in the table
                    failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            samples = timing.interleaved(steps, sizes.repeats)
            out[key] = {
                "model": problem.label,
                "parameters": problem.parameter_count,
                "leaves": problem.leaf_count,
                "times": {k: timing.summary(v) for k, v in samples.items()},
                "compile_s": {k: s.compile_s for k, s in steps.items()},
                "memory": {k: suites._memory(s.compiled) for k, s in steps.items()},
                "hlo": {k: hlo.analyse(s.compiled.as_text()) for k, s in steps.items()
                        if STATS not in k},
                "failed": failed,
            }
            del steps
            gc.collect()
    return out


def render(results: dict) -> list[str]:
    """Markdown: per case, every contender's step time over Adam alone, compile time,
    XLA's temporaries, and how many kernels read each gradient (from the HLO)."""
    lines: list[str] = []
    for key, case in results.items():
        if not isinstance(case, dict) or "times" not in case:
            continue
        times, mem = case["times"], case["memory"]
        ref = times["adam"]["median_ms"]
        ref_min = times["adam"]["min_ms"]
        ref_temp = mem["adam"].get("temp_bytes", 0)
        lines += ["", f"#### Train step {key}: {case['model']}, {case['parameters']:,} "
                  f"parameters in {case['leaves']} leaves", "",
                  "| contender | median ms | / adam | min / adam min | compile s "
                  "| temp MiB | temp - adam's MiB | kernels reading each gradient "
                  "| norm reductions |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, t in sorted(times.items(), key=lambda kv: kv[1]["median_ms"]):
            h = case["hlo"].get(name, {})
            reads = ", ".join(f"{n} kernels: {c}" for n, c in
                              sorted(h.get("gradient_reads", {}).items()))
            norms = ", ".join(f"{k}: {v}" for k, v in h.get("norm_kernels", {}).items())
            temp = mem[name].get("temp_bytes", 0)
            lines.append(
                f"| {name} | {t['median_ms']:.2f} | {t['median_ms'] / ref:.3f}x "
                f"| {t['min_ms'] / ref_min:.3f}x | {case['compile_s'][name]:.1f} "
                f"| {temp / 2**20:.2f} | {(temp - ref_temp) / 2**20:+.2f} | {reads or '-'} "
                f"| {norms or '-'} |")
        if case.get("failed"):
            lines += [""] + [f"* {k} not run: {v}" for k, v in case["failed"].items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Train-step benchmark (one or more cases).")
    parser.add_argument("--sizes", choices=("full", "quick", "tiny"), default="full")
    parser.add_argument("--case", action="append", help="model/dtype, e.g. gpt/float32")
    parser.add_argument("--contender", action="append",
                        help="run only these contenders (names as in the table; repeatable)")
    parser.add_argument("--json", required=True, help="write the results here")
    args = parser.parse_args(argv)
    sizes = {"full": FULL_STEP, "quick": QUICK_STEP, "tiny": TINY_STEP}[args.sizes]
    if args.contender:
        known, _ = contenders.step_contenders()
        unknown = sorted(set(args.contender) - set(known))
        if unknown:
            parser.error(f"--contender: unknown name(s) {unknown}; choose from {sorted(known)}")
        sizes = dataclasses.replace(sizes, only=tuple(args.contender))
    import sys

    results = run(sizes, log=lambda m: print(m, file=sys.stderr, flush=True),
                  keys=tuple(args.case) if args.case else None)
    results["machine"] = timing.machine()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
