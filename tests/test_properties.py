"""Hypothesis properties of every fixed clipper: the bound, the identity below the
threshold, and idempotence, over shapes, trees and magnitudes from 1e-20 to 1e20.

Each clipper is jitted once per tree structure with the threshold as an argument,
so hypothesis examples reuse the compiled update.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import optaxclip as oc

NAMES = ["clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms"]
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# A few tree structures (each compiles once per clipper): one leaf, and a mix.
SHAPES = [{"a": (3,)}, {"a": (2, 3), "b": (1,), "c": (4,)}]


@functools.cache
def jitted_clip(name):
    def clip(grads, threshold):
        tx = getattr(oc, name)(threshold)
        return tx.update(grads, tx.init(grads))[0]

    return jax.jit(clip)


@functools.cache
def jitted_own_norm(name):
    """The largest norm the clipper itself computes for its scopes (float32)."""

    def own_norm(grads):
        tx = getattr(oc, name)(math.inf)
        stats = tx.update(grads, tx.init(grads))[1].stats
        return jnp.max(jnp.stack(jax.tree.leaves(stats.norm)))

    return jax.jit(own_norm)


def np_scope_norms(name, tree):
    """Float64 norm of every scope the clipper bounds: entries, leaves or the tree."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    if name == "clip_by_value":
        return np.abs(np.concatenate([x.ravel() for x in leaves]))
    if name == "clip_by_norm":
        return np.array([np.linalg.norm(x.ravel()) for x in leaves])
    if name == "clip_by_block_rms":
        return np.array([math.sqrt(np.mean(x.ravel() ** 2)) for x in leaves])
    return np.array([np.linalg.norm(np.concatenate([x.ravel() for x in leaves]))])


@st.composite
def trees(draw, dtype=jnp.float32, max_exponent=20):
    """A tree of one of SHAPES; each leaf is mantissas in [-1, 1] times 10**e,
    with its own e in [-max_exponent, max_exponent]."""
    shapes = draw(st.sampled_from(SHAPES))
    tree = {}
    for key, shape in shapes.items():
        size = math.prod(shape)
        mantissas = draw(st.lists(st.floats(-1, 1, width=32), min_size=size, max_size=size))
        exponent = draw(st.integers(-max_exponent, max_exponent))
        values = np.asarray(mantissas, np.float64).reshape(shape) * 10.0**exponent
        tree[key] = jnp.asarray(values, dtype)
    return tree


thresholds = st.one_of(
    st.just(0.0),
    st.builds(lambda m, e: m * 10.0**e, st.floats(1, 10), st.integers(-20, 20)),
)


def _threshold32(threshold):
    return float(np.float32(threshold))


def _bits(tree):
    return [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in jax.tree.leaves(tree)]


def _check_bound(name, out, threshold):
    norms = np_scope_norms(name, out)
    assert np.all(np.isfinite(norms))
    assert norms.max(initial=0) <= _threshold32(threshold) * (1 + 1e-6), (norms, threshold)


@SETTINGS
@given(name=st.sampled_from(NAMES), grads=trees(), threshold=thresholds)
def test_bound_in_the_clippers_own_norm(name, grads, threshold):
    out = jitted_clip(name)(grads, threshold)
    _check_bound(name, out, threshold)
    assert jax.tree.structure(out) == jax.tree.structure(grads)
    if threshold == 0:
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))


@SETTINGS
@given(
    name=st.sampled_from(NAMES),
    grads=trees(dtype=jnp.bfloat16),
    threshold=st.builds(lambda m, e: m * 10.0**e, st.floats(1, 10), st.integers(-3, 3)),
)
def test_bound_holds_exactly_for_bfloat16(name, grads, threshold):
    # bf16 products are rounded toward zero, so bf16 rounding (2**-9) adds nothing
    # to the float32 bound; what is left is float32 accumulation of the norm.
    out = jitted_clip(name)(grads, threshold)
    assert np_scope_norms(name, out).max() <= _threshold32(threshold) * (1 + 1e-6)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@SETTINGS
@given(
    name=st.sampled_from(NAMES),
    grads=trees(),
    headroom=st.one_of(st.just(1.0), st.floats(1 + 1e-5, 1e3)),
)
def test_identity_at_or_below_the_threshold(name, grads, headroom):
    if headroom == 1.0:  # exactly at the threshold: the clipper's own float32 norm
        threshold = float(jitted_own_norm(name)(grads))
    else:
        threshold = float(np_scope_norms(name, grads).max()) * headroom
    # XLA on CPU flushes subnormal floats to zero, so a subnormal threshold (or a norm
    # that flushed to 0) acts as threshold 0, which zeroes everything.
    assume(threshold >= np.finfo(np.float32).tiny)
    out = jitted_clip(name)(grads, threshold)
    for got, want in zip(_bits(out), _bits(grads)):
        np.testing.assert_array_equal(got, want)


@SETTINGS
@given(name=st.sampled_from(NAMES), grads=trees(), threshold=thresholds)
def test_idempotence(name, grads, threshold):
    once = jitted_clip(name)(grads, threshold)
    twice = jitted_clip(name)(once, threshold)
    if name == "clip_by_value":
        # Element-wise clipping is exactly idempotent.
        for got, want in zip(_bits(twice), _bits(once)):
            np.testing.assert_array_equal(got, want)
        return
    # A clipped output's float32 norm may sit a rounding error above the threshold,
    # so the second pass can rescale by 1 - O(1e-7): idempotent up to an ulp or two.
    for got, want in zip(jax.tree.leaves(twice), jax.tree.leaves(once)):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                   rtol=5e-7, atol=0)
