"""Fault-injection soak: 10,000 steps of ``chain(clip, adam)`` inside each guard.

NaN, +inf and huge (1e30) gradients are injected at random steps (fixed seed).
Parameters and optimizer state must stay finite throughout, and each guard's skip
counter must equal the injections it is meant to catch: ``skip_nonfinite`` the
non-finite ones (huge finite steps are clipped and applied), ``skip_on_spike`` all
of them. The default run covers three clippers; ``make fuzz`` (``OPTAXCLIP_SOAK=all``)
covers every registered clipper.
"""

from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import optaxclip.guards

STEPS = 10_000
WARMUP = 300  # no injection before the spike guard has its history
RATE = 0.02
# monitor_norm measures and never clips: a 1e30 gradient reaches Adam through it.
CLIPPERS = sorted(
    name for name, info in oc.registered_factories().items()
    if info.kind == "clipper" and oc.spec_of(info.build(1.0)).role != "monitor"
)
if os.environ.get("OPTAXCLIP_SOAK") != "all":
    CLIPPERS = ["autoclip", "clip_by_global_norm", "zclip"]
PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


def schedule(seed: int) -> np.ndarray:
    """0: a normal step; 1: a NaN entry; 2: +inf; 3: a huge finite gradient."""
    rng = np.random.default_rng(seed)
    kinds = np.where(rng.random(STEPS) < RATE, rng.integers(1, 4, STEPS), 0)
    kinds[:WARMUP] = 0
    return kinds.astype(np.int32)


RECORDS = (oc.ClipStats, oc.guards.SkipNonfiniteStats, oc.guards.SkipOnSpikeStats)


def without_records(state):
    """The state minus what the clippers and guards record: those show a non-finite
    norm on purpose (the stats never hide one)."""
    return jax.tree.map(lambda node: None if isinstance(node, RECORDS) else node, state,
                        is_leaf=lambda node: isinstance(node, RECORDS))


def soak(tx, kinds: np.ndarray):
    def step(carry, inputs):
        params, state = carry
        kind, key = inputs
        grads = jax.tree.map(lambda p, k: 0.1 * jax.random.normal(k, p.shape), params,
                             {"w": key, "b": jax.random.fold_in(key, 1)})
        bad = jnp.where(kind == 1, jnp.nan, jnp.inf)
        grads["w"] = jnp.where((kind == 1) | (kind == 2), grads["w"].at[0, 0].set(bad),
                               grads["w"])
        grads["w"] = jnp.where(kind == 3, grads["w"] * 1e30, grads["w"])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
            (params, without_records(state))) if jnp.issubdtype(x.dtype, jnp.inexact)]))
        return (params, state), finite

    keys = jax.random.split(jax.random.key(0), STEPS)
    run = jax.jit(lambda carry: jax.lax.scan(step, carry, (jnp.asarray(kinds), keys)))
    (params, state), finite = run((PARAMS, tx.init(PARAMS)))
    return params, state, np.asarray(finite)


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
@pytest.mark.parametrize("clipper", CLIPPERS)
def test_soak_with_injected_faults(guard, clipper):
    info = oc.registered_factories()[clipper]
    inner = optax.chain(info.build(1.0 if info.threshold else None), optax.adam(1e-3))
    tx = getattr(oc, guard)(inner)
    kinds = schedule(seed=zlib.crc32(f"{guard}:{clipper}".encode()))
    params, state, finite = soak(tx, kinds)
    assert finite.all(), f"non-finite params or state first at step {int(np.argmin(finite))}"
    nonfinite, huge = int(np.sum((kinds == 1) | (kinds == 2))), int(np.sum(kinds == 3))
    assert nonfinite > 50 and huge > 25
    expected = nonfinite if guard == "skip_nonfinite" else nonfinite + huge
    assert int(state.guard.num_skipped) == expected
