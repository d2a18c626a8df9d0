"""Guards: the select form against the ``lax.cond`` form, in a train step, under vmap and
shard_map; and ``clip_by_value``'s statistic.

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


def guard_transforms() -> dict[str, Callable[[], optax.GradientTransformation]]:
    inner = lambda: optax.chain(optaxclip.clip_by_global_norm(THRESHOLD), optax.adam(1e-3))
    return {
        "chain(clip, adam)": inner,
        "library skip_nonfinite": lambda: optaxclip.skip_nonfinite(inner()),
        "select form": lambda: designs.skip_nonfinite_select(inner()),
        "cond form": lambda: designs.skip_nonfinite_cond(inner()),
    }


def _timed(steps: dict[str, Any], repeats: int) -> dict:
    samples = timing.interleaved(steps, repeats)
    return {k: timing.summary(v) for k, v in samples.items()}


def in_train_step(config: models.GPTConfig, repeats: int) -> dict:
    """The guards in the GPT train step (f32): time and XLA's memory plan."""
    problem = models.gpt_problem(config)
    steps = {name: train_step._Step(problem, make(), False)
             for name, make in guard_transforms().items()}
    out = {"times": _timed(steps, repeats),
           "memory": {k: suites._memory(s.compiled) for k, s in steps.items()}}
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
    out = {"members": members, "times": _timed(steps, repeats),
           "memory": {k: suites._memory(s.compiled) for k, s in steps.items()},
           "conditionals": {k: hlo.analyse(s.compiled.as_text())["conditionals"]
                            for k, s in steps.items()}}
    del steps
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
    out = {"devices": len(devices), "times": _timed(steps, repeats),
           "memory": {k: suites._memory(s.compiled) for k, s in steps.items()},
           "conditionals": {k: hlo.analyse(s.compiled.as_text())["conditionals"]
                            for k, s in steps.items()}}
    del steps
    gc.collect()
    return out


def shard_map_in_subprocess(config: models.MLPConfig, repeats: int, log: Any = print) -> dict:
    """Runs ``under_shard_map`` in a fresh process with 8 virtual CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    arguments = json.dumps({"config": config.__dict__, "repeats": repeats})
    done = subprocess.run([sys.executable, "-m", "benchmarks.guards_bench", arguments],
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
    }
    contenders = {name: suites._Clip(tx, source, refresh=True) for name, tx in txs.items()}
    readers = {name: hlo.parameter_readers(c.compiled.as_text()) for name, c in contenders.items()}
    kernels = {name: timing.hlo_counts(c.compiled) for name, c in contenders.items()}
    times = _timed(contenders, repeats)
    del contenders
    gc.collect()
    return {"description": trees.describe(shapes), "times": times, "readers": readers,
            "kernels": kernels}


def main(argv: list[str]) -> int:
    arguments = json.loads(argv[0])
    config = models.MLPConfig(**arguments["config"])
    print(json.dumps(under_shard_map(config, arguments["repeats"])))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main(sys.argv[1:]))
