"""bfloat16 and float16 gradients: the standalone ``clip_by_global_norm`` update on
GPT-2-small shapes.

optaxclip accumulates the norm of bf16/fp16 leaves in float32 and rounds the scaled
values toward zero (so the bound holds in the leaves' dtype: for bf16 by dropping
the float32 product's low 16 bits, for fp16 by rounding to nearest and stepping
back where that grew the magnitude); ``optax.clip_by_global_norm`` squares in
the leaves' own dtype and returns each leaf's sum in it (``jnp.sum`` accumulates
in float32 inside), so in float16 a leaf whose sum of squares passes 65,504 makes
the norm ``inf`` and the clipped update zero. Both run jitted and donated, with a
fresh copy of the gradients before every timed call (every call clips),
interleaved with the floor (one read pass accumulating in float32, and that
read plus the minimal scale pass) and with three stripped copies of optaxclip's
update that show where its extra time goes (``STRIPPED``): its norm and scale
alone (one conditional, the norm's rescue, where the library has a second for the
scale shared by many leaves), the same without the rescue's conditional, and with
a plain scale in place of the one rounding toward zero. On a GPU each conditional
reads its predicate on the host. The norms each reports are compared with a
float64 reference computed from the same narrow values.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip
from benchmarks import designs, hlo, suites, timing, trees

# Stripped copies of optaxclip's update (designs.make_clip: its norm and scale,
# without the shared scale's own conditional and edge cases), to show where the
# time goes. None is a design to adopt.
ONE_COND = "parts: library norm, apply_scale"
UNGUARDED = "parts: fast-path norm, no conditional (not overflow-safe)"
PLAIN_SCALE = "parts: library norm, plain scale (not bound-exact)"
STRIPPED = (ONE_COND, UNGUARDED, PLAIN_SCALE)
_SHORT = {"bfloat16": "bf16", "float16": "fp16"}


def _floor_read(grads: Any) -> jax.Array:
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))


def _floor_read_write(grads: Any, max_norm: float) -> Any:
    scale = jnp.minimum(1.0, max_norm / jnp.sqrt(_floor_read(grads)))
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype), grads)


DTYPES = ("bfloat16", "float16")


def run(shrink: int = 1, repeats: int = 21, max_norm: float = 1.0, log: Any = print,
        dtype: str = "bfloat16") -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}.")
    shapes = trees.gpt2_small_shapes(shrink)
    values = {k: v.astype(jnp.dtype(dtype)) for k, v in trees.make_tree(shapes).items()}
    source = jax.tree.map(jnp.asarray, values)
    short = _SHORT[dtype]
    log(f"  {short} standalone: {len(shapes)} leaves, {trees.entries(shapes):,} {short} entries")
    txs = {
        "optaxclip": optaxclip.clip_by_global_norm(max_norm),
        "optax": optax.clip_by_global_norm(max_norm),
        "floor_read_write": optax.stateless(lambda g, p: _floor_read_write(g, max_norm)),
        ONE_COND: designs.make_clip(max_norm),
        UNGUARDED: designs.make_clip(max_norm, designs.norm_unguarded),
        PLAIN_SCALE: designs.make_clip(max_norm, designs.norm_library, designs._plain_scale),
    }
    contenders: dict[str, Any] = {n: suites._Clip(tx, source, refresh=True)
                                  for n, tx in txs.items()}
    floor_read = jax.jit(_floor_read).lower(source).compile()
    contenders["floor_read"] = lambda: floor_read(source).block_until_ready()
    kernels = {n: timing.hlo_counts(c.compiled) for n, c in contenders.items()
               if isinstance(c, suites._Clip)}
    readers = {n: hlo.parameter_readers(c.compiled.as_text(), prefix="")
               for n, c in contenders.items() if isinstance(c, suites._Clip)}
    samples = timing.interleaved(contenders, repeats)
    del contenders
    gc.collect()
    reference = float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64)))
                                  for v in values.values())))
    state = optaxclip.clip_by_global_norm(max_norm).init(source)
    _, state = jax.jit(optaxclip.clip_by_global_norm(max_norm).update)(source, state)
    norms = {"float64 reference": reference,
             "optaxclip": float(optaxclip.stats(state)["clip_by_global_norm/norm"]),
             "optax": float(jax.jit(optax.global_norm)(source))}
    return {"description": f"{len(shapes)} leaves, {trees.entries(shapes):,} {short} entries "
                           f"({trees.entries(shapes) * 2 / 2**20:,.1f} MiB)",
            "dtype": dtype, "shrink": shrink,
            "times": {k: timing.summary(v) for k, v in samples.items()},
            "kernels": kernels, "readers": readers, "norms": norms}


def render(result: dict) -> list[str]:
    times = result["times"]
    ref = times["optax"]["median_ms"]
    short = _SHORT[result.get("dtype", "bfloat16")]
    lines = ["", f"#### {short} standalone clip_by_global_norm, GPT-2 small shapes"
                 f"{'' if result['shrink'] == 1 else ' / ' + str(result['shrink'])}: "
                 f"{result['description']}", "",
             "| contender | median ms | q1-q3 ms | min ms | / optax | kernels | reduces |",
             "|---|---|---|---|---|---|---|"]
    for name, t in sorted(times.items(), key=lambda kv: kv[1]["median_ms"]):
        k = result["kernels"].get(name, {})
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['q1_ms']:.2f}-{t['q3_ms']:.2f} "
                     f"| {t['min_ms']:.2f} | {t['median_ms'] / ref:.3f}x "
                     f"| {k.get('kernels', '')} | {k.get('reduces', '')} |")
    norms = result["norms"]
    exact = norms["float64 reference"]
    lines += ["", f"| norm of the {short} gradients | value | relative error |", "|---|---|---|"]
    lines += [f"| {k} | {v:.6g} | {abs(v - exact) / exact:.2e} |" for k, v in norms.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="bf16 / fp16 standalone clip benchmark")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--shrink", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = run(args.shrink, args.repeats, log=lambda m: print(m, file=sys.stderr, flush=True),
                 dtype=args.dtype)
    result["machine"] = timing.machine()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
