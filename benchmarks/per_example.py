"""Per-example clipping: ``optaxclip.clip_per_example`` next to optax's functions.

Each case is a tree of per-example gradients (a leading example axis ``B``); every
contender is jitted once and timed interleaved with the others in one process
(``timing.interleaved``), and the table quotes medians and their ratio to optax.
The floor is one read of the per-example gradients (a sum over everything);
clipping needs the norm read and the weighted-sum read, so about twice the floor
is the best a two-pass design can do.

Contenders:
  * ``optax.per_example_global_norm_clip`` (sum of clipped examples) and
    ``optaxclip.clip_per_example(reduce="sum")``;
  * ``optax.per_example_layer_norm_clip(uniform=True)`` and
    ``clip_per_example(reduce="sum", per_layer=True)``;
  * ``clip_per_example(reduce="sum", noise_multiplier=1.0)`` (DP-SGD noise);
  * jax_privacy's ``clip_pytree`` (``jax.vmap`` over the examples, then the sum), when
    it is importable (the ``bench`` extra installs it).

Run: ``python -m benchmarks.per_example [--repeats N] [--quick]``; it prints a
Markdown table (the source of benchmarks/PER_EXAMPLE.md).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import timing, trees

CASES: dict[str, tuple[trees.Shapes, int]] = {
    "MLP 784-128-10, B=128": (
        {"w1": (784, 128), "b1": (128,), "w2": (128, 10), "b2": (10,)}, 128),
    "GPT-2 shapes / 16 (148 leaves), B=8": (trees.gpt2_small_shapes(shrink=16), 8),
}
QUICK = {"MLP 784-128-10, B=128": CASES["MLP 784-128-10, B=128"]}
MAX_NORM = 1.0


def _per_example_grads(shapes: trees.Shapes, batch: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    # Norms spread around MAX_NORM, so some examples clip and some do not.
    scale = rng.lognormal(0.0, 1.0, size=batch).astype(np.float32)
    size = sum(int(np.prod(s)) for s in shapes.values())
    out = {}
    for name, shape in shapes.items():
        values = rng.standard_normal((batch,) + shape, dtype=np.float32)
        out[name] = jnp.asarray(values * (scale / np.sqrt(size)).reshape((-1,) + (1,) * len(shape)))
    return out


def _jax_privacy_contender() -> Callable[[Any], Any] | None:
    try:
        from jax_privacy import clipping  # noqa: PLC0415 - optional
    except ImportError:
        return None
    clip = getattr(clipping, "clip_pytree", None)
    if clip is None:
        return None

    def run(grads: Any) -> Any:
        clipped = jax.vmap(lambda g: clip(g, MAX_NORM))(grads)
        clipped = clipped[0] if isinstance(clipped, tuple) else clipped
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), clipped)

    return run


def contenders(grads: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """Name -> function of the per-example gradients (jitted by the caller)."""
    leaves = jax.tree.leaves(grads)
    state = oc.clip_per_example(MAX_NORM).init(None)

    def ours(**kwargs: Any) -> Callable[[Any], Any]:
        tx = oc.clip_per_example(MAX_NORM, reduce="sum", **kwargs)
        return lambda g: tx.update(g, state)[0]

    out: dict[str, Callable[[Any], Any]] = {
        "floor: one read": lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g)),
        "optax.per_example_global_norm_clip": lambda g: optax.per_example_global_norm_clip(
            jax.tree.leaves(g), MAX_NORM)[0],
        "optaxclip.clip_per_example": ours(),
        "optax.per_example_layer_norm_clip": lambda g: optax.per_example_layer_norm_clip(
            jax.tree.leaves(g), MAX_NORM, uniform=True)[0],
        "optaxclip.clip_per_example(per_layer)": ours(per_layer=True),
        "optaxclip.clip_per_example(noise)": ours(noise_multiplier=1.0),
    }
    privacy = _jax_privacy_contender()
    if privacy is not None:
        out["jax_privacy.clip_pytree"] = privacy
    del leaves
    return out


class _Timed:
    def __init__(self, fn: Callable[[Any], Any], grads: Any):
        self.grads = grads
        self.compiled = jax.jit(fn).lower(grads).compile()
        self.hlo = timing.hlo_counts(self.compiled)

    def __call__(self) -> None:
        jax.block_until_ready(self.compiled(self.grads))


def _largest_difference(got: list[Any], want: list[Any]) -> float:
    return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
               for a, b in zip(got, want))


def check_numerics(grads: dict[str, Any]) -> dict[str, float]:
    """Largest relative difference of our sums from optax's and from jax_privacy's
    (when installed); they must agree."""
    tx = oc.clip_per_example(MAX_NORM, reduce="sum")
    got = jax.tree.leaves(jax.jit(tx.update)(grads, tx.init(None))[0])
    want, _ = optax.per_example_global_norm_clip(jax.tree.leaves(grads), MAX_NORM)
    out = {"optax": _largest_difference(got, want)}
    privacy = _jax_privacy_contender()
    if privacy is not None:
        out["jax_privacy"] = _largest_difference(got, jax.tree.leaves(jax.jit(privacy)(grads)))
    return out


def run(cases: dict[str, tuple[trees.Shapes, int]], repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": timing.machine(), "cases": {}}
    for label, (shapes, batch) in cases.items():
        grads = _per_example_grads(shapes, batch)
        timed = {name: _Timed(fn, grads) for name, fn in contenders(grads).items()}
        samples = timing.interleaved(timed, repeats, warmup=2)
        results["cases"][label] = {
            "entries_per_example": sum(int(np.prod(s)) for s in shapes.values()),
            "leaves": len(shapes),
            "batch": batch,
            "max_rel_diff": check_numerics(grads),
            "timings": {name: timing.summary(s) for name, s in samples.items()},
            "hlo": {name: t.hlo for name, t in timed.items()},
        }
    return results


RATIOS = (
    ("optaxclip.clip_per_example", "optax.per_example_global_norm_clip"),
    ("optaxclip.clip_per_example(per_layer)", "optax.per_example_layer_norm_clip"),
    ("optaxclip.clip_per_example(noise)", "optax.per_example_global_norm_clip"),
    ("optaxclip.clip_per_example", "jax_privacy.clip_pytree"),
)


def render(results: dict[str, Any]) -> str:
    lines = []
    for label, case in results["cases"].items():
        t = case["timings"]
        floor = t["floor: one read"]["median_ms"]
        lines += [
            f"### {label}",
            "",
            f"{case['leaves']} leaves, {case['entries_per_example']:,} entries per example, "
            f"B={case['batch']}; largest relative difference of the clipped sum from "
            + ", ".join(f"{k}'s: {v:.1e}" for k, v in case["max_rel_diff"].items()) + ".",
            "",
            "| contender | median ms | q1-q3 ms | x floor | kernels |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, s in t.items():
            lines.append(
                f"| {name} | {s['median_ms']:.2f} | {s['q1_ms']:.2f}-{s['q3_ms']:.2f} | "
                f"{s['median_ms'] / floor:.2f} | {case['hlo'][name]['kernels']} |"
            )
        lines += ["", "| ratio (median / median) | value |", "|---|---:|"]
        for ours, theirs in RATIOS:
            if ours in t and theirs in t:
                ratio = t[ours]["median_ms"] / t[theirs]["median_ms"]
                lines.append(f"| {ours} / {theirs} | {ratio:.2f} |")
        lines.append("")
    machine = results["machine"]
    lines.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, load "
                 f"{machine['load_avg_1_5_15']}; jax {machine['jax']}, optax {machine['optax']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the MLP case only")
    args = parser.parse_args(argv)
    results = run(QUICK if args.quick else CASES, args.repeats)
    print(render(results))
    medians = [case["timings"]["optaxclip.clip_per_example"]["median_ms"]
               for case in results["cases"].values()]
    return 0 if all(m > 0 for m in medians) and statistics.fmean(medians) > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
