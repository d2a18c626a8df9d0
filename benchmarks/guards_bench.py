"""Guards: the library's ``lax.cond`` form against the select form and a cond with its
branches swapped, in a train step, under vmap and shard_map; and ``clip_by_value``'s
statistic.

Run as a module for the shard_map part, which needs 8 virtual CPU devices set
before jax starts (the runner does this in a subprocess)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.guards_bench
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip
from benchmarks import designs, hlo, models, suites, timing, train_step, trees

THRESHOLD = 0.1


def guard_transforms(with_spike: bool = False
                     ) -> dict[str, Callable[[], optax.GradientTransformation]]:
    inner = lambda: optax.chain(optaxclip.clip_by_global_norm(THRESHOLD), optax.adam(1e-3))
    out = {
        "adam": lambda: optax.adam(1e-3),
        "chain(clip, adam)": inner,
        "library skip_nonfinite": lambda: optaxclip.skip_nonfinite(inner()),
        "select form": lambda: designs.skip_nonfinite_select(inner()),
        # The library is the cond form with the applying branch as the true branch;
        # this one has the branches the other way round, which XLA:CPU compiles to a
        # copy of the whole state out of the conditional.
        "cond form, skip branch first": lambda: designs.skip_nonfinite_cond(inner()),
        "select form, barrier": lambda: designs.skip_nonfinite_barrier(inner()),
    }
    if with_spike:
        out["library skip_on_spike"] = lambda: optaxclip.skip_on_spike(inner())
    return out


def _timed(steps: dict[str, Any], repeats: int) -> dict:
    samples = timing.interleaved(steps, repeats)
    return {k: timing.summary(v) for k, v in samples.items()}


def in_train_step(config: models.GPTConfig | models.MLPConfig, repeats: int,
                  dtype: Any = jnp.float32) -> dict:
    """The guards in the GPT (or MLP) train step: time, XLA's memory plan, HLO reading."""
    problem = (models.gpt_problem(config, dtype) if isinstance(config, models.GPTConfig)
               else models.mlp_problem(config, dtype))
    steps = {name: train_step._Step(problem, make(), False)
             for name, make in guard_transforms(with_spike=True).items()}
    out = {"model": problem.label, "times": _timed(steps, repeats),
           "memory": {k: suites._memory(s.compiled) for k, s in steps.items()},
           "compile_s": {k: s.compile_s for k, s in steps.items()},
           "hlo": {k: hlo.analyse(s.compiled.as_text()) for k, s in steps.items()}}
    del steps
    gc.collect()
    return out


class _Vmapped:
    """``jax.vmap`` of a whole train step over an ensemble of independent models."""

    def __init__(self, problem: models.Problem, tx: optax.GradientTransformation, members: int):
        stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * members), tree)
        self.params = stack(problem.params)
        self.state = stack(tx.init(problem.params))
        self.batch = stack(problem.batch)
        fn = jax.jit(jax.vmap(train_step.step_fn(problem.loss, tx, False)),
                     donate_argnums=(0, 1))
        self.compiled = fn.lower(self.params, self.state, self.batch).compile()

    def __call__(self) -> None:
        self.params, self.state, loss = self.compiled(self.params, self.state, self.batch)
        jax.block_until_ready(loss)


def under_vmap(config: models.MLPConfig, members: int, repeats: int) -> dict:
    problem = models.mlp_problem(config)
    steps = {name: _Vmapped(problem, make(), members)
             for name, make in guard_transforms().items()}
    return {"members": members, **_measured(steps, repeats)}



def _measured(steps: dict, repeats: int) -> dict:
    """Times, memory plans and conditionals of compiled steps; frees them afterwards."""
    out = {"times": _timed(steps, repeats),
           "memory": {k: suites._memory(s_.compiled) for k, s_ in steps.items()},
           "conditionals": {k: hlo.analyse(s_.compiled.as_text())["conditionals"]
                            for k, s_ in steps.items()}}
    steps.clear()
    gc.collect()
    return out

class _Sharded:
    """A data-parallel train step under ``shard_map``: batch split over 8 devices, the
    gradients averaged with ``pmean`` before the (replicated) optimizer update."""

    def __init__(self, problem: models.Problem, tx: optax.GradientTransformation, mesh: Any):
        from jax.sharding import PartitionSpec as P

        def step(params: Any, opt_state: Any, batch: Any) -> tuple:
            loss, grads = jax.value_and_grad(problem.loss)(params, batch)
            grads = jax.lax.pmean(grads, "data")
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, "data")

        from jax.sharding import NamedSharding

        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # each contender donates its own
        self.params = jax.device_put(copy(problem.params), replicated)
        self.state = jax.device_put(copy(tx.init(problem.params)), replicated)
        self.batch = jax.device_put(problem.batch, split)
        sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")),
                                out_specs=(P(), P(), P()))
        fn = jax.jit(sharded, donate_argnums=(0, 1))
        self.compiled = fn.lower(self.params, self.state, self.batch).compile()

    def __call__(self) -> None:
        self.params, self.state, loss = self.compiled(self.params, self.state, self.batch)
        jax.block_until_ready(loss)


def under_shard_map(config: models.MLPConfig, repeats: int) -> dict:
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",))
    problem = models.mlp_problem(config)
    steps = {name: _Sharded(problem, make(), mesh) for name, make in guard_transforms().items()}
    return {"devices": len(devices), **_measured(steps, repeats)}


def shard_map_in_subprocess(config: models.MLPConfig, repeats: int, log: Any = print) -> dict:
    """Runs ``under_shard_map`` in a fresh process with 8 virtual CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    arguments = json.dumps({"config": config.__dict__, "repeats": repeats})
    done = subprocess.run([sys.executable, "-m", "benchmarks.guards_bench",
                           "--shard-map-child", arguments],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log(done.stderr[-2000:])
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def clip_by_value(shapes: trees.Shapes, repeats: int) -> dict:
    """Standalone ``clip_by_value`` update against ``optax.clip`` and the same clamp without
    its statistic; how many kernels read each gradient (1: the max fused with the clamp)."""
    values = trees.make_tree(shapes)
    source = jax.tree.map(jnp.asarray, values)
    txs = {
        "optaxclip.clip_by_value": optaxclip.clip_by_value(1e-3),
        "optax.clip": optax.clip(1e-3),
        "clamp without stats": designs.clip_by_value_nostats(1e-3),
        "clamp + one max reduction": designs.clip_by_value_one_reduction(1e-3),
    }
    contenders = {name: suites._Clip(tx, source, refresh=True) for name, tx in txs.items()}
    readers = {name: hlo.parameter_readers(c.compiled.as_text()) for name, c in contenders.items()}
    kernels = {name: timing.hlo_counts(c.compiled) for name, c in contenders.items()}
    times = _timed(contenders, repeats)
    del contenders
    gc.collect()
    return {"description": trees.describe(shapes), "times": times, "readers": readers,
            "kernels": kernels}


def clip_by_value_step(config: models.GPTConfig, repeats: int, delta: float = 1e-4) -> dict:
    """``clip_by_value`` chained ahead of Adam in the GPT train step, against ``optax.clip``
    and the same clamp without its statistic."""
    problem = models.gpt_problem(config)
    txs = {
        "adam": lambda: optax.adam(1e-3),
        "chain(optaxclip.clip_by_value, adam)":
            lambda: optax.chain(optaxclip.clip_by_value(delta), optax.adam(1e-3)),
        "chain(optax.clip, adam)": lambda: optax.chain(optax.clip(delta), optax.adam(1e-3)),
        "chain(clamp without stats, adam)":
            lambda: optax.chain(designs.clip_by_value_nostats(delta), optax.adam(1e-3)),
        "chain(clamp + one max reduction, adam)":
            lambda: optax.chain(designs.clip_by_value_one_reduction(delta), optax.adam(1e-3)),
    }
    steps = {name: train_step._Step(problem, make(), False) for name, make in txs.items()}
    out = {"model": problem.label, "times": _timed(steps, repeats),
           "memory": {k: suites._memory(s.compiled) for k, s in steps.items()},
           "hlo": {k: hlo.analyse(s.compiled.as_text()) for k, s in steps.items()}}
    del steps
    gc.collect()
    return out


def run(step_config: models.GPTConfig, mlp_config: models.MLPConfig, value_shapes: trees.Shapes,
        repeats: int, members: int = 8, with_shard_map: bool = False,
        log: Any = print) -> dict:
    out: dict[str, Any] = {}
    log("  guards in the GPT train step (f32) ...")
    out["train_step"] = in_train_step(step_config, repeats)
    log("  guards in the MLP train step (f32) ...")
    out["train_step_mlp"] = in_train_step(mlp_config, repeats)
    log("  guards in a vmapped MLP train step ...")
    out["vmap"] = under_vmap(mlp_config, members, repeats)
    if with_shard_map:
        log("  guards under shard_map (8 virtual devices, subprocess) ...")
        out["shard_map"] = shard_map_in_subprocess(mlp_config, repeats, log)
    log("  clip_by_value: standalone and in the train step ...")
    out["clip_by_value"] = clip_by_value(value_shapes, 2 * repeats + 1)
    out["clip_by_value_step"] = clip_by_value_step(step_config, repeats)
    return out


def _mib(m: dict) -> str:
    return f"{m.get('temp_bytes', 0) / 2**20:.2f}"


def render(r: dict) -> list[str]:
    lines: list[str] = []
    for key, title in (("train_step", "Guards in the GPT train step, f32"),
                       ("train_step_mlp", "Guards in the MLP train step, f32"),
                       ("vmap", "Guards in a vmapped MLP train step"),
                       ("shard_map", "Guards under shard_map (8 virtual CPU devices)"),
                       ("clip_by_value_step", "clip_by_value in the GPT train step, f32")):
        part = r.get(key)
        if not part or "times" not in part:
            continue
        times = part["times"]
        ref_name = "adam" if "adam" in times else "chain(clip, adam)"
        ref, ref_min = times[ref_name]["median_ms"], times[ref_name]["min_ms"]
        extra = f", {part['members']} members" if "members" in part else ""
        lines += ["", f"#### {title}{extra}" + (f": {part['model']}" if "model" in part else ""),
                  "", f"| contender | median ms | / {ref_name} | min / min | temp MiB "
                  "| conditionals | kernels reading each gradient |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in sorted(times.items(), key=lambda kv: kv[1]["median_ms"]):
            h = part.get("hlo", {}).get(name, {})
            conds = part.get("conditionals", {}).get(name, h.get("conditionals", ""))
            reads = ", ".join(f"{n}: {c}" for n, c in sorted(h.get("gradient_reads", {}).items()))
            lines.append(f"| {name} | {t['median_ms']:.2f} | {t['median_ms'] / ref:.3f}x "
                         f"| {t['min_ms'] / ref_min:.3f}x | {_mib(part['memory'][name])} "
                         f"| {conds} | {reads or '-'} |")
    v = r.get("clip_by_value")
    if v:
        times = v["times"]
        ref = times["optax.clip"]["median_ms"]
        ref_min = times["optax.clip"]["min_ms"]
        lines += ["", f"#### clip_by_value standalone update: {v['description']}", "",
                  "| contender | median ms | / optax.clip | min / min | kernels | reduces "
                  "| kernels reading each gradient |", "|---|---|---|---|---|---|---|"]
        for name, t in sorted(times.items(), key=lambda kv: kv[1]["median_ms"]):
            k = v["kernels"][name]
            reads = ", ".join(f"{n}: {c}" for n, c in sorted(v["readers"][name].items()))
            lines.append(f"| {name} | {t['median_ms']:.2f} | {t['median_ms'] / ref:.3f}x "
                         f"| {t['min_ms'] / ref_min:.3f}x | {k['kernels']} | {k['reduces']} "
                         f"| {reads} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="guards and clip_by_value benchmark")
    parser.add_argument("--sizes", choices=("full", "quick", "tiny"), default="full")
    parser.add_argument("--shard-map", action="store_true", help="also run under shard_map")
    parser.add_argument("--shard-map-child", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.shard_map_child:
        arguments = json.loads(args.shard_map_child)
        config = models.MLPConfig(**arguments["config"])
        print(json.dumps(under_shard_map(config, arguments["repeats"])))
        return 0
    result = run(**SIZES[args.sizes], with_shard_map=args.shard_map,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"] = timing.machine()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("\n".join(render(result)))
    return 0


SIZES: dict[str, dict[str, Any]] = {
    "full": {"step_config": models.GPTConfig(), "mlp_config": models.MLPConfig(),
             "value_shapes": trees.gpt2_small_shapes(4), "repeats": 30},
    "quick": {"step_config": models.GPTConfig(vocab=128, width=64, layers=2, heads=2,
                                              context=32, batch=4),
              "mlp_config": models.MLPConfig(inputs=64, hidden=256, layers=2, batch=32),
              "value_shapes": trees.gpt2_small_shapes(16), "repeats": 7},
    "tiny": {"step_config": models.GPTConfig(vocab=32, width=16, layers=1, heads=2, context=8,
                                             batch=2),
             "mlp_config": models.MLPConfig(inputs=8, hidden=16, layers=1, batch=4),
             "value_shapes": trees.gpt2_small_shapes(64), "repeats": 2, "members": 2},
}


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
