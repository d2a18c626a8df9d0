"""Update clippers: clip_update_rms and clip_update_norm.

Each is checked against a float64 numpy reference over a sequence of updates
(warmup, spikes, a NaN step, a zero step), eagerly and under ``jit``, through a
``flax.serialization`` checkpoint, and for its place in a chain: ``check_order``
accepts an update clipper after the preconditioner and still rejects a gradient
clipper there.
"""

from __future__ import annotations

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

PARAMS = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
NORM_KW = {"window": 6, "z": 2.0, "min_history": 3}


def updates_sequence(seed: int = 0, steps: int = 14) -> list[dict]:
    """Updates of a steady size with spikes at steps 6 and 11, a NaN at 9, zeros at 12."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        factor = {6: 40.0, 11: 25.0}.get(step, 1.0)
        tree = {"w": rng.normal(size=(3, 4)) * factor, "b": rng.normal(size=(4,)) * factor}
        if step == 9:
            tree["b"][1] = np.nan
        if step == 12:
            tree = {k: np.zeros_like(v) for k, v in tree.items()}
        out.append({k: jnp.asarray(v, jnp.float32) for k, v in tree.items()})
    return out


def run(tx, sequence, *, jit: bool):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(PARAMS)
    outs, states = [], []
    for grads in sequence:
        out, state = update(grads, state, PARAMS)
        outs.append(out)
        states.append(state)
    return outs, states


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


# ---------------------------------------------------------------- references


def rms_reference(update: dict, max_rms: float) -> tuple[dict, dict]:
    out, rms = {}, {}
    for key, value in f64(update).items():
        rms[key] = math.sqrt(np.mean(value**2))
        scale = 1.0 if rms[key] <= max_rms else max_rms / rms[key]
        out[key] = value * (scale if math.isfinite(rms[key]) else math.nan)
    return out, rms


def norm_reference(sequence, *, window, z, min_history, cap):
    """Float64 clip_update_norm: (outputs, thresholds) per step."""
    recorded, outs, thresholds = [], [], []
    for update in sequence:
        values = f64(update)
        norm = math.sqrt(sum(np.sum(v**2) for v in values.values()))
        recent = np.asarray(recorded[-window:])
        relative = math.inf
        if len(recent) >= min_history:
            relative = float(np.mean(recent) + z * np.std(recent))
        threshold = min(relative, cap)
        if not math.isfinite(norm):
            scale = math.nan
        else:
            scale = 1.0 if norm <= threshold else threshold / norm
        outs.append({k: v * scale for k, v in values.items()})
        thresholds.append(threshold)
        if math.isfinite(norm) and norm > 0:
            recorded.append(norm)
    return outs, thresholds


# ---------------------------------------------------------------- clip_update_rms


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_clip_update_rms_matches_the_reference(jit):
    sequence = updates_sequence()
    tx = oc.clip_update_rms(1.5)
    outs, states = run(tx, sequence, jit=jit)
    for step, (update, out, state) in enumerate(zip(sequence, outs, states)):
        want, rms = rms_reference(update, 1.5)
        for key in want:
            np.testing.assert_allclose(np.asarray(out[key], np.float64), want[key], rtol=2e-6,
                                       atol=1e-30, err_msg=f"step {step} {key}")
            recorded = float(state.stats.norm[key])
            assert recorded == pytest.approx(rms[key], rel=2e-6, nan_ok=True)
            if rms[key] <= 1.5:  # under the limit: bit-identical
                np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(update[key]))


@pytest.mark.parametrize("name", ["clip_update_rms", "clip_update_norm"])
def test_eager_and_jit_agree(name):
    """Within one float32 rounding: XLA fuses the scale's division differently under jit."""
    sequence = updates_sequence(seed=3)
    tx = oc.clip_update_rms(1.0) if name == "clip_update_rms" else oc.clip_update_norm(**NORM_KW)
    eager, eager_states = run(tx, sequence, jit=False)
    jitted, jit_states = run(tx, sequence, jit=True)
    for a, b in zip(jax.tree.leaves((eager, eager_states[-1])),
                    jax.tree.leaves((jitted, jit_states[-1])), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=3e-7, atol=0)


def test_clip_update_rms_stats_and_spec():
    tx = oc.clip_update_rms(0.5)
    _, state = tx.update({"w": jnp.full((4,), 2.0), "b": jnp.full((2,), 0.1)}, tx.init(None))
    report = oc.stats(state)
    assert float(report["clip_update_rms/norm"]) == 2.0  # the largest per-leaf RMS
    assert float(report["clip_update_rms/threshold"]) == 0.5
    assert float(report["clip_update_rms/clipped_fraction"]) == 0.5
    spec = oc.spec_of(tx)
    assert (spec.scope, spec.role, spec.rms) == ("leaf", "update", True)


# ---------------------------------------------------------------- clip_update_norm


@pytest.mark.parametrize("cap", [None, 4.0])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_clip_update_norm_matches_the_reference(jit, cap):
    sequence = updates_sequence()
    tx = oc.clip_update_norm(cap, **NORM_KW)
    outs, states = run(tx, sequence, jit=jit)
    want_outs, want_thresholds = norm_reference(
        sequence, cap=math.inf if cap is None else cap, **NORM_KW
    )
    for step, (out, state) in enumerate(zip(outs, states)):
        assert float(state.stats.threshold) == pytest.approx(want_thresholds[step], rel=1e-5)
        for key, want in want_outs[step].items():
            np.testing.assert_allclose(np.asarray(out[key], np.float64), want, rtol=1e-5,
                                       atol=1e-30, err_msg=f"step {step} {key}")
    # The spikes were clipped, the NaN step was poisoned and not recorded, zeros not recorded.
    assert float(states[6].stats.scale) < 0.2
    assert bool(jnp.all(jnp.isnan(outs[9]["w"])))
    assert int(states[-1].history.num_recorded) == len(sequence) - 2


def test_clip_update_norm_warmup_is_uncapped_without_max_norm():
    tx = oc.clip_update_norm(**NORM_KW)
    state = tx.init(None)
    for norm in (1.0, 100.0):  # fewer than min_history recorded: never clipped
        out, state = tx.update([jnp.array([norm])], state)
        assert float(out[0][0]) == norm
        assert float(state.stats.threshold) == math.inf


def test_clip_update_norm_checkpoint_resumes_bit_identically():
    sequence = updates_sequence(seed=5)
    tx = oc.clip_update_norm(3.0, **NORM_KW)
    full_outs, full_states = run(tx, sequence, jit=True)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for grads in sequence[:7]:
        _, state = update(grads, state, PARAMS)
    restored = flax.serialization.from_bytes(tx.init(PARAMS), flax.serialization.to_bytes(state))
    for step, grads in enumerate(sequence[7:], start=7):
        out, restored = update(grads, restored, PARAMS)
        assert_trees_equal(out, full_outs[step])
    assert_trees_equal(restored, full_states[-1])


def test_clip_update_rms_checkpoint_resumes_bit_identically():
    sequence = updates_sequence(seed=6)
    tx = optax.chain(optax.scale_by_adam(), oc.clip_update_rms(0.8), optax.scale(-0.1))
    full_outs, full_states = run(tx, sequence[:8], jit=True)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for grads in sequence[:4]:
        _, state = update(grads, state, PARAMS)
    restored = flax.serialization.from_bytes(tx.init(PARAMS), flax.serialization.to_bytes(state))
    for step, grads in enumerate(sequence[4:8], start=4):
        out, restored = update(grads, restored, PARAMS)
        assert_trees_equal(out, full_outs[step])
    assert_trees_equal(restored, full_states[-1])


def test_clip_update_norm_stats_report_history():
    tx = oc.clip_update_norm(**NORM_KW)
    state = tx.init(None)
    for norm in (1.0, 2.0, 0.0):
        _, state = tx.update([jnp.array([norm])], state)
    report = oc.stats(state)
    assert int(report["clip_update_norm/num_recorded"]) == 2  # the zero is not recorded
    assert set(report) == {f"clip_update_norm/{k}" for k in
                           ("norm", "threshold", "scale", "clipped", "num_recorded")}


@pytest.mark.parametrize("kwargs, argument", [
    ({"window": 1}, "window"),
    ({"window": 4, "min_history": 5}, "min_history"),
    ({"min_history": 1}, "min_history"),
    ({"z": -1.0}, "z"),
    ({"max_norm": -1.0}, "max_norm"),
])
def test_clip_update_norm_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        oc.clip_update_norm(**kwargs)


def test_clip_update_rms_bad_threshold():
    with pytest.raises(ValueError, match="max_rms"):
        oc.clip_update_rms(-1.0)


# ---------------------------------------------------------------- ordering


UPDATE_CLIPPERS = {
    "clip_update_rms": lambda: oc.clip_update_rms(1.0),
    "clip_update_norm": lambda: oc.clip_update_norm(),
}


@pytest.mark.parametrize("name", sorted(UPDATE_CLIPPERS))
def test_check_order_accepts_update_clippers_after_the_preconditioner(name):
    make = UPDATE_CLIPPERS[name]
    tx = optax.chain(optax.scale_by_adam(), make(), optax.scale(-1e-3))
    stages = oc.check_order(tx, PARAMS)
    assert [s.kind for s in stages] == ["moment", "update_clipper", "other"]
    assert stages[1].name == name
    # After a whole optimizer too, and inside a wrapper.
    assert oc.check_order(optax.chain(optax.adamw(1e-3), make()), PARAMS)
    assert oc.check_order(oc.skip_nonfinite(optax.chain(optax.scale_by_adam(), make())), PARAMS)


@pytest.mark.parametrize("name", sorted(UPDATE_CLIPPERS))
def test_a_gradient_clipper_after_the_moments_still_raises(name):
    make = UPDATE_CLIPPERS[name]
    tx = optax.chain(optax.scale_by_adam(), make(), oc.clip_by_global_norm(1.0),
                     optax.scale(-1e-3))
    with pytest.raises(oc.OrderingError, match="clip_by_global_norm .* runs after scale_by_adam"):
        oc.check_order(tx, PARAMS)


def test_update_clipper_in_a_real_adam_step_bounds_the_step():
    """The clip bounds Adam's step when the second moment is stale (a spike after calm)."""

    def calm_state(tx):
        # Long after warmup (bias corrections ~1), moments of gradients of size 1e-3.
        state = tx.init(PARAMS)
        adam = state[0]
        return (adam._replace(
            count=jnp.asarray(10_000, jnp.int32),
            mu=jax.tree.map(lambda x: jnp.full_like(x, 1e-3), adam.mu),
            nu=jax.tree.map(lambda x: jnp.full_like(x, 1e-6), adam.nu),
        ), *state[1:])

    spike = {"w": jnp.full((3, 4), 10.0), "b": jnp.full((4,), 10.0)}
    plain = optax.chain(optax.scale_by_adam(), optax.scale(-1.0))
    unclipped, _ = plain.update(spike, calm_state(plain), PARAMS)
    tx = optax.chain(optax.scale_by_adam(), oc.clip_update_rms(1.0), optax.scale(-1.0))
    out, state = tx.update(spike, calm_state(tx), PARAMS)
    # Stale v: Adam's step is (1 - b1) / sqrt(1 - b2) = 3.16 times its usual size.
    assert float(jnp.sqrt(jnp.mean(unclipped["w"] ** 2))) == pytest.approx(3.16, rel=1e-2)
    np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(out["w"] ** 2))), 1.0, rtol=1e-6)
    assert bool(oc.stats(state)["clip_update_rms/clipped"])
