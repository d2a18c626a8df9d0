"""clip_per_example: float64 numpy reference, optax parity, contracts, noise and state.

The contract matrix (tests/test_contracts.py) assumes the output has the input's
shapes; a per-example clipper removes the example axis, so its contracts are
tested here: bound, identity below the threshold, direction, structure and
dtype, precision, safety, non-finite input, bad hyperparameters, and every way
a state arrives (fresh, donated, restored as numpy arrays).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

MODES = ("eager", "jit", "donated", "restored")


def _grads(seed: int, batch: int = 5, dtype=jnp.float32, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 4), "b": (4,), "s": ()}
    return {k: jnp.asarray(rng.normal(size=(batch,) + s) * scale * (1 + 3 * rng.random()),
                           dtype) for k, s in shapes.items()}


def _reference(grads, max_norm: float, *, reduce="mean", per_layer=False):
    """Float64 numpy: (reduced clipped gradients, per-example global norms, clipped mask)."""
    leaves, treedef = jax.tree.flatten(grads)
    rows = [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves]
    batch = rows[0].shape[0]
    norms = np.sqrt(sum(np.sum(r**2, axis=1) for r in rows))
    if per_layer:
        share = max_norm / math.sqrt(len(rows))
        scales = [np.minimum(1, share / np.where(np.linalg.norm(r, axis=1) > 0,
                                                 np.linalg.norm(r, axis=1), 1)) for r in rows]
        scales = [np.where(np.linalg.norm(r, axis=1) > share, s, 1) for r, s in zip(rows, scales)]
        clipped = np.any(np.stack([s != 1 for s in scales]), axis=0)
    else:
        scale = np.where(norms > max_norm, max_norm / np.where(norms > 0, norms, 1), 1)
        scales, clipped = [scale] * len(rows), scale != 1
    out = [np.sum(r * s[:, None], axis=0).reshape(x.shape[1:]) for r, s, x in
           zip(rows, scales, leaves)]
    if reduce == "mean":
        out = [o / batch for o in out]
    return treedef.unflatten(out), norms, clipped


def _run(tx, grads, state, mode, **extra):
    if mode == "eager":
        return tx.update(grads, state, **extra)
    if mode == "jit":
        return jax.jit(tx.update)(grads, state, **extra)
    if mode == "donated":
        copy = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
        return jax.jit(tx.update, donate_argnums=(1,))(grads, copy, **extra)
    if mode == "restored":
        return tx.update(grads, jax.device_get(state), **extra)
    raise ValueError(mode)


def _close(got, want, rtol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol,
                                   atol=rtol * (np.max(np.abs(b), initial=0) + 1e-30))


# ---------------------------------------------------------------- against numpy and optax


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_matches_float64_reference(mode, reduce, per_layer):
    for seed, max_norm in [(0, 1.0), (1, 3.0), (2, 1e6), (3, 0.01)]:
        grads = _grads(seed)
        tx = oc.clip_per_example(max_norm, reduce=reduce, per_layer=per_layer)
        out, state = _run(tx, grads, tx.init(None), mode)
        want, norms, clipped = _reference(grads, max_norm, reduce=reduce, per_layer=per_layer)
        _close(out, jax.tree.leaves(want), 1e-5)
        stats = oc.stats(state)
        np.testing.assert_allclose(stats["clip_per_example/norm_max"], norms.max(), rtol=1e-5)
        np.testing.assert_allclose(stats["clip_per_example/norm_median"], np.median(norms),
                                   rtol=1e-5)
        assert float(stats["clip_per_example/clipped_fraction"]) == pytest.approx(
            clipped.mean())
        assert float(stats["clip_per_example/threshold"]) == pytest.approx(max_norm)
        assert int(state.count) == 1


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 2.0, math.inf])
def test_parity_with_optax_per_example_global_norm_clip(max_norm):
    grads = _grads(7, batch=8)
    leaves = jax.tree.leaves(grads)
    want, num_clipped = optax.per_example_global_norm_clip(leaves, max_norm)
    out, state = jax.jit(oc.clip_per_example(max_norm, reduce="sum").update)(
        grads, oc.clip_per_example(max_norm).init(None))
    _close(jax.tree.leaves(out), [np.asarray(w, np.float64) for w in want], 2e-6)
    fraction = float(oc.stats(state)["clip_per_example/clipped_fraction"])
    assert fraction * 8 == pytest.approx(int(num_clipped))


@pytest.mark.parametrize("max_norm", [0.5, 2.0])
def test_parity_with_optax_per_example_layer_norm_clip(max_norm):
    grads = _grads(8, batch=6)
    want, _ = optax.per_example_layer_norm_clip(jax.tree.leaves(grads), max_norm, uniform=True)
    out, _ = oc.clip_per_example(max_norm, reduce="sum", per_layer=True).update(
        grads, oc.clip_per_example(1.0).init(None))
    _close(jax.tree.leaves(out), [np.asarray(w, np.float64) for w in want], 2e-6)


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("per_layer", [False, True])
def test_bound_direction_structure_and_dtype(dtype, per_layer):
    for seed in range(4):
        grads = _grads(seed, batch=1, dtype=dtype, scale=10.0)
        tx = oc.clip_per_example(1.0, per_layer=per_layer)
        out, _ = jax.jit(tx.update)(grads, tx.init(None))
        assert jax.tree.structure(out) == jax.tree.structure(grads)
        for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
            assert o.dtype == g.dtype and o.shape == g.shape[1:]
            # Rescaling only: the single example keeps its direction and signs.
            g64, o64 = np.asarray(g[0], np.float64), np.asarray(o, np.float64)
            assert np.all(np.sign(o64) * np.sign(g64) >= 0)
        norm = float(oc.global_norm(out))
        assert norm <= 1.0 * (1 + 1e-6)
        if per_layer:
            share = 1 / math.sqrt(3)
            assert all(float(oc.global_norm(o)) <= share * (1 + 1e-6)
                       for o in jax.tree.leaves(out))


def test_identity_below_threshold():
    grads = _grads(3)
    tx = oc.clip_per_example(1e6, reduce="sum")
    out, state = jax.jit(tx.update)(grads, tx.init(None))
    _close(out, [np.sum(np.asarray(g, np.float64), 0) for g in jax.tree.leaves(grads)], 1e-6)
    assert float(oc.stats(state)["clip_per_example/clipped_fraction"]) == 0
    # One example at or under the threshold comes back bit-identical.
    single = jax.tree.map(lambda x: x[:1], grads)
    out, _ = tx.update(single, tx.init(None))
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(single)):
        np.testing.assert_array_equal(o, g[0])


def test_edge_cases():
    tx_init = oc.clip_per_example(1.0).init(None)
    grads = _grads(4)
    zeros = jax.tree.map(jnp.zeros_like, grads)
    out, state = oc.clip_per_example(1.0).update(zeros, tx_init)
    assert all(np.all(np.asarray(o) == 0) for o in jax.tree.leaves(out))
    assert float(oc.stats(state)["clip_per_example/norm_max"]) == 0

    def loss(g):
        return sum(jnp.sum(o) for o in jax.tree.leaves(
            oc.clip_per_example(1.0).update(g, tx_init)[0]))

    assert all(np.all(np.isfinite(d)) for d in jax.tree.leaves(jax.grad(loss)(zeros)))
    out, _ = oc.clip_per_example(0.0).update(grads, tx_init)
    assert all(np.all(np.asarray(o) == 0) for o in jax.tree.leaves(out))
    out, _ = oc.clip_per_example(math.inf).update(grads, tx_init)
    _close(out, [np.mean(np.asarray(g, np.float64), 0) for g in jax.tree.leaves(grads)], 1e-6)
    # No examples: zeros of the parameters' shapes.
    empty = jax.tree.map(lambda x: x[:0], grads)
    out, state = oc.clip_per_example(1.0).update(empty, tx_init)
    assert [o.shape for o in jax.tree.leaves(out)] == [g.shape[1:] for g in
                                                       jax.tree.leaves(grads)]
    assert all(np.all(np.asarray(o) == 0) for o in jax.tree.leaves(out))
    # None, MaskedNode and integer leaves.
    special = {"none": None, "masked": optax.MaskedNode(), "int": jnp.ones((5, 2), jnp.int32),
               "f": grads["w"]}
    out, _ = oc.clip_per_example(1.0).update(special, tx_init)
    assert out["none"] is None and isinstance(out["masked"], optax.MaskedNode)
    assert out["int"].shape == (2,) and out["f"].shape == (3, 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("per_layer", [False, True])
def test_nonfinite_example_poisons_the_output(bad, per_layer):
    grads = _grads(5)
    grads["w"] = grads["w"].at[2, 0, 0].set(bad)
    out, state = oc.clip_per_example(1.0, per_layer=per_layer).update(
        grads, oc.clip_per_example(1.0).init(None))
    # Never "finite entries silently zeroed while reporting success".
    assert all(np.all(np.isnan(np.asarray(o))) for o in jax.tree.leaves(out)) or per_layer
    assert np.all(np.isnan(np.asarray(out["w"])))
    norm_max = float(oc.stats(state)["clip_per_example/norm_max"])
    assert math.isnan(norm_max) if math.isnan(bad) else norm_max == math.inf


@pytest.mark.parametrize("per_layer", [False, True])
def test_overflowing_finite_norm_gets_its_exact_scale(per_layer):
    grads = [jnp.array([[3e38, 3e38], [1.0, 0.0]], jnp.float32)]
    out, state = jax.jit(oc.clip_per_example(1e3, per_layer=per_layer).update)(
        grads, oc.clip_per_example(1.0).init(None))
    want = (np.array([1e3, 1e3]) / math.sqrt(2) + np.array([1.0, 0.0])) / 2
    np.testing.assert_allclose(out[0], want, rtol=1e-6)
    assert float(oc.stats(state)["clip_per_example/norm_max"]) == math.inf


def test_fp16_norms_do_not_overflow():
    grads = [jnp.array([[300.0, 1.0]], jnp.float16)]
    out, state = oc.clip_per_example(1.0).update(grads, oc.clip_per_example(1.0).init(None))
    assert float(oc.stats(state)["clip_per_example/norm_max"]) == pytest.approx(300.0017, 1e-4)
    assert np.all(np.isfinite(np.asarray(out[0], np.float32)))
    assert float(oc.global_norm(out)) <= 1.0


def test_traced_threshold_is_clamped():
    grads = _grads(6)
    tx = oc.clip_per_example(jnp.float32(1.0))
    state = tx.init(None)

    @jax.jit
    def step(limit):
        return oc.clip_per_example(limit).update(grads, state)[0]

    assert all(np.all(np.asarray(o) == 0) for o in jax.tree.leaves(step(jnp.float32(-2.0))))
    assert all(np.all(np.isnan(np.asarray(o))) for o in jax.tree.leaves(step(jnp.float32(np.nan))))


@pytest.mark.parametrize("kwargs, name", [
    ({"max_norm": -1.0}, "max_norm"), ({"max_norm": np.nan}, "max_norm"),
    ({"max_norm": 1.0, "reduce": "median"}, "reduce"),
    ({"max_norm": 1.0, "per_layer": 1}, "per_layer"),
    ({"max_norm": 1.0, "noise_multiplier": -0.5}, "noise_multiplier"),
    ({"max_norm": 1.0, "noise_multiplier": math.inf}, "noise_multiplier"),
    ({"max_norm": math.inf, "noise_multiplier": 1.0}, "max_norm"),
    ({"max_norm": 1.0, "seed": 1.5}, "seed"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        oc.clip_per_example(**kwargs)


def test_leaves_without_a_common_example_axis_are_refused():
    tx = oc.clip_per_example(1.0)
    with pytest.raises(ValueError, match="example axis"):
        tx.update({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, tx.init(None))


# ---------------------------------------------------------------- noise and state


def test_noise_statistics_and_sensitivity_scale():
    batch, sigma, clip = 4, 2.0, 0.5
    grads = [jnp.zeros((batch, 20000))]
    tx = oc.clip_per_example(clip, reduce="sum", noise_multiplier=sigma, seed=3)
    out, state = jax.jit(tx.update)(grads, tx.init(None))
    assert float(np.std(out[0])) == pytest.approx(sigma * clip, rel=0.03)
    assert abs(float(np.mean(out[0]))) < 0.05
    assert float(oc.stats(state)["clip_per_example/noise_std"]) == pytest.approx(sigma * clip)
    mean_tx = oc.clip_per_example(clip, reduce="mean", noise_multiplier=sigma, seed=3)
    mean_out, _ = jax.jit(mean_tx.update)(grads, mean_tx.init(None))
    np.testing.assert_allclose(mean_out[0], out[0] / batch, rtol=1e-6)


def test_noise_is_independent_across_leaves_dtypes_and_complex_parts():
    """The noise is drawn once per real dtype and sliced into the leaves: every leaf
    and each part of a complex leaf gets its own draw, at the stated std."""
    batch, sigma, clip = 3, 2.0, 0.5
    grads = {"a": jnp.zeros((batch, 60, 50)), "b": jnp.zeros((batch, 3000)),
             "c": jnp.zeros((batch, 3000), jnp.complex64),
             "h": jnp.zeros((batch, 3000), jnp.bfloat16), "s": jnp.zeros((batch,))}
    tx = oc.clip_per_example(clip, reduce="sum", noise_multiplier=sigma, seed=4)
    out, _ = jax.jit(tx.update)(grads, tx.init(None))
    parts = {"a": out["a"].ravel(), "b": out["b"], "c.re": jnp.real(out["c"]),
             "c.im": jnp.imag(out["c"]), "h": out["h"]}
    assert out["a"].shape == (60, 50) and out["s"].shape == () and out["h"].dtype == jnp.bfloat16
    for name, values in parts.items():
        values = np.asarray(values, np.float64)
        assert float(np.std(values)) == pytest.approx(sigma * clip, rel=0.06), name
    names = sorted(parts)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            x = np.asarray(parts[first], np.float64)[:3000]
            y = np.asarray(parts[second], np.float64)[:3000]
            assert abs(np.corrcoef(x, y)[0, 1]) < 0.08, (first, second)


@pytest.mark.parametrize("mode", MODES)
def test_noise_stream_resumes_from_a_checkpoint(mode):
    """Two steps in one run equal one step, a checkpoint restore (numpy arrays), one step."""
    tx = oc.clip_per_example(1.0, noise_multiplier=1.0, seed=11)
    g1, g2 = _grads(1), _grads(2)
    _, s1 = jax.jit(tx.update)(g1, tx.init(None))
    straight, s2 = jax.jit(tx.update)(g2, s1)
    restored = jax.tree.map(np.asarray, jax.device_get(s1))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
    resumed, r2 = _run(tx, g2, restored, mode)
    _close(resumed, [np.asarray(x, np.float64) for x in jax.tree.leaves(straight)], 1e-6)
    np.testing.assert_array_equal(r2.key, s2.key)
    assert not np.array_equal(s1.key, s2.key)  # the key advances every step


def test_noise_key_argument():
    tx = oc.clip_per_example(1.0, noise_multiplier=1.0)
    state = tx.init(None)
    grads = _grads(9)
    a, sa = jax.jit(tx.update)(grads, state, noise_key=jax.random.key(5))
    b, _ = tx.update(grads, state, noise_key=jax.random.key_data(jax.random.key(5)))
    c, _ = tx.update(grads, state, noise_key=jax.random.key(6))
    _close(a, [np.asarray(x, np.float64) for x in jax.tree.leaves(b)], 1e-6)
    assert not np.allclose(a["w"], c["w"])
    np.testing.assert_array_equal(sa.key, state.key)  # the state's key is left alone


def test_in_a_chain_with_adam():
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "s": jnp.zeros(())}
    tx = optax.chain(oc.clip_per_example(1.0, noise_multiplier=0.5), optax.adam(1e-2))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for seed in range(3):
        updates, state = step(_grads(seed), state, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    assert "clip_per_example/norm_max" in oc.stats(state)


def test_registered_as_per_example():
    info = oc.registered_factories()["clip_per_example"]
    assert info.kind == "per_example" and info.threshold == "max_norm"
    out, _ = info.build(1.0).update(_grads(0), info.build(1.0).init(None))
    assert out["w"].shape == (3, 4)


def test_inject_hyperparams_traces_max_norm():
    static = ("noise_multiplier", "seed")
    tx = optax.inject_hyperparams(oc.clip_per_example, static_args=static)(
        max_norm=1.0, noise_multiplier=0.5, seed=2)
    state = tx.init(None)
    step = jax.jit(tx.update)
    _, state = step(_grads(0), state)
    out, state = step(_grads(1), state)
    direct = oc.clip_per_example(1.0, noise_multiplier=0.5, seed=2)
    d_state = direct.init(None)
    _, d_state = direct.update(_grads(0), d_state)
    want, _ = direct.update(_grads(1), d_state)
    _close(out, [np.asarray(w, np.float64) for w in jax.tree.leaves(want)], 1e-5)
    assert float(oc.stats(state)["clip_per_example/noise_std"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="static_args"):
        unlisted = optax.inject_hyperparams(oc.clip_per_example)(max_norm=1.0,
                                                                 noise_multiplier=0.5)
        jax.jit(unlisted.update)(_grads(0), unlisted.init(None))


def test_check_order_places_per_example_clipping_before_the_moments():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    good = optax.chain(oc.clip_per_example(1.0), optax.adam(1e-3))
    stages = oc.check_order(good, params)
    assert [s.kind for s in stages][0] == "clipper"
    with pytest.raises(oc.OrderingError, match="clip_per_example"):
        oc.check_order(optax.chain(optax.scale_by_adam(), oc.clip_per_example(1.0)), params)


# ---------------------------------------------------------------- optaxclip.checked


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 3.0, math.inf])
def test_checked_verifies_per_example_clipping_and_passes_it(reduce, per_layer, noise,
                                                             max_norm):
    from jax.experimental import checkify

    if noise and max_norm == math.inf:
        return  # infinite noise: a non-finite update, which checked reports like any other
    tx = oc.checked(optax.chain(
        oc.clip_per_example(max_norm, reduce=reduce, per_layer=per_layer,
                            noise_multiplier=noise), optax.sgd(0.1)))
    grads = _grads(3, batch=6)
    params = jax.tree.map(lambda x: x[0], grads)
    error, _ = jax.jit(checkify.checkify(tx.update))(grads, tx.init(params), params)
    error.throw()


def _tampered(change):
    """clip_per_example with its output or stats altered, still marked as one."""
    from optaxclip import _spec

    base = oc.clip_per_example(1.0, reduce="sum")

    def update(updates, state, params=None, **extra):
        out, new_state = base.update(updates, state, params, **extra)
        return change(out, new_state)

    setattr(update, _spec.PER_EXAMPLE_ATTRIBUTE, ("sum", False))  # noqa: B010
    return optax.GradientTransformation(base.init, update)


@pytest.mark.parametrize("change, message", [
    (lambda out, s: (jax.tree.map(lambda x: x * 10, out), s), "above the bound"),
    (lambda out, s: (out, s._replace(stats=s.stats._replace(norm_max=s.stats.norm_max * 2))),
     "recorded norm_max"),
    (lambda out, s: (out, s._replace(stats=s.stats._replace(clipped_fraction=s.stats
                                                            .clipped_fraction * 0))),
     "recorded clipped_fraction"),
])
def test_checked_catches_a_per_example_clipper_that_breaks_its_contract(change, message):
    from jax.experimental import checkify

    tx = oc.checked(_tampered(change))
    grads = _grads(4, batch=6, scale=5.0)  # every example above the threshold
    error, _ = checkify.checkify(tx.update)(grads, tx.init(None))
    with pytest.raises(Exception, match=message):
        error.throw()


def test_per_layer_norm_max_does_not_overflow_below_float32s_max():
    """Layer norms of 1e38 (finite, their squares overflow float32): the per-layer
    path summed the squares and recorded a global norm of inf for an example whose
    norm is 1.4e38."""
    grads = {"a": jnp.full((1, 1), 1e38), "b": jnp.full((1, 1), 1e38)}
    tx = oc.clip_per_example(1e38, per_layer=True)
    for update in (tx.update, jax.jit(tx.update)):
        _, state = update(grads, tx.init(None))
        np.testing.assert_allclose(float(state.stats.norm_max), math.sqrt(2) * 1e38, rtol=1e-6)
    # The same under x64 with float64 layers of 1e300 (a fixed 2^-80 is not enough).
    # The recorded stat is float32 (inf there), so the float64 norms are read from
    # the helper that computes them.
    from optaxclip import per_example

    with jax.enable_x64(True):
        layers = [jnp.full((1, 1), 1e300, jnp.float64)] * 2
        norms, _, _ = jax.jit(per_example._example_scales, static_argnums=2)(
            layers, jnp.asarray(1e300, jnp.float64), True)
        np.testing.assert_allclose(np.asarray(norms), [math.sqrt(2) * 1e300], rtol=1e-12)


@pytest.mark.parametrize("max_norm", [np.float64(np.inf), np.float32(np.inf), np.array(np.inf),
                                      jnp.array(jnp.inf), float("inf")])
def test_noise_with_an_infinite_max_norm_is_refused_in_every_static_form(max_norm):
    # Only a Python float was refused: a numpy or jax inf gave an all-inf output.
    with pytest.raises(ValueError, match="finite max_norm"):
        oc.clip_per_example(max_norm, noise_multiplier=1.0)


def test_every_64_bit_seed_gives_its_own_noise():
    # jax.random.key keeps the low 32 bits without x64: 0, 2**32 and -2**63 shared
    # one noise stream, and 2**63 failed in init with an OverflowError.
    grads = {"w": jnp.zeros((2, 3))}

    def noise(seed):
        tx = oc.clip_per_example(1.0, noise_multiplier=1.0, seed=seed)
        return np.asarray(tx.update(grads, tx.init(None))[0]["w"])

    seeds = [0, 1, 2**32, 2**32 + 1, -1, 2**32 - 1, -(2**63), 2**63 - 1]
    draws = [noise(seed) for seed in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert not np.array_equal(draws[i], draws[j]), (seeds[i], seeds[j])
    np.testing.assert_array_equal(noise(7), noise(np.int64(7)))  # and stable
    with pytest.raises(ValueError, match="seed"):
        oc.clip_per_example(1.0, seed=2**63)
