"""The functional forms (``clip``, ``clip_per_leaf``, ``clip_values``) and ``monitor_norm``.

The functional forms must give exactly what their transformations give, for
generated trees of every float dtype and scale; ``monitor_norm`` must hand the
updates on bit for bit in every execution mode and record the norm the clippers
record. Their parity with PyTorch is in ``tests/parity/test_torch.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
import optaxclip.testing as contracts

DTYPES = ("float16", "bfloat16", "float32", "complex64")
SCALES = (0.0, 1e-30, 1.0, 1e4, 1e30)


@st.composite
def trees(draw):
    """A dict of 1-4 leaves of random shapes and dtypes at one scale, maybe one non-finite entry."""
    count = draw(st.integers(1, 4))
    scale = draw(st.sampled_from(SCALES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(count):
        dtype = jnp.dtype(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        values = rng.normal(size=shape) * scale
        if dtype.kind == "c":
            values = values + 1j * rng.normal(size=shape) * scale
        # Cast through the leaf's dtype, so a large scale saturates fp16 to inf
        # like a real overflowing backward pass.
        tree[f"leaf{i}"] = jnp.asarray(values).astype(dtype)
    special = draw(st.sampled_from([None, math.nan, math.inf]))
    first = tree["leaf0"]
    if special is not None and first.size:
        tree["leaf0"] = first.reshape(-1).at[0].set(special).reshape(first.shape)
    return tree


def _same_bits(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )


@settings(deadline=None)
@given(tree=trees(), limit=st.sampled_from([0.0, 1e-3, 1.0, 1e10, math.inf]),
       ord=st.sampled_from([None, 1.0, math.inf]))
def test_functional_forms_equal_their_transformations(tree, limit, ord):
    pairs = [
        (oc.clip(tree, limit, ord=ord), oc.clip_by_global_norm(limit, ord=ord)),
        (oc.clip_per_leaf(tree, limit, ord=ord), oc.clip_by_norm(limit, ord=ord)),
        (oc.clip_values(tree, limit), oc.clip_by_value(limit)),
    ]
    for (clipped, norm), tx in pairs:
        want, state = tx.update(tree, tx.init(tree))
        _same_bits(clipped, want)
        _same_bits(norm, state.stats.norm)


def test_clip_returns_the_pre_clip_norm_and_keeps_the_bound():
    grads = {"w": jnp.full((3, 4), 2.0, jnp.bfloat16), "b": jnp.ones((4,), jnp.float32)}
    clipped, norm = jax.jit(oc.clip)(grads, 1.0)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), math.sqrt(12 * 4 + 4), rtol=1e-6)
    assert float(oc.global_norm(clipped)) <= 1.0
    assert jax.tree.map(lambda x: x.dtype, clipped) == jax.tree.map(lambda x: x.dtype, grads)


def test_clip_takes_a_traced_threshold_and_differentiates():
    grads = {"w": jnp.array([3.0, 4.0])}
    clipped, _ = jax.jit(oc.clip)(grads, jnp.asarray(2.0))
    np.testing.assert_allclose(clipped["w"], [1.2, 1.6], rtol=1e-6)
    # The clipped norm is the threshold: d|clip(g, t)|/dt = 1 above the ball.
    slope = jax.grad(lambda t: oc.global_norm(oc.clip(grads, t)[0]))(2.0)
    np.testing.assert_allclose(float(slope), 1.0, rtol=1e-6)


@pytest.mark.parametrize("function", [oc.clip, oc.clip_per_leaf, oc.clip_values])
def test_functional_forms_reject_a_negative_threshold_by_name(function):
    with pytest.raises(ValueError, match="max_norm|max_delta"):
        function({"w": jnp.ones(2)}, -1.0)


@settings(deadline=None)
@given(tree=trees(), mode=st.sampled_from(contracts.MODES),
       ord=st.sampled_from([None, 1.0, math.inf]), per_leaf=st.booleans())
def test_monitor_passes_updates_on_bit_for_bit_and_records_the_norm(tree, mode, ord, per_leaf):
    tx = oc.monitor_norm(ord=ord, per_leaf=per_leaf)
    out, state = contracts.run_update(tx, tree, tx.init(tree), mode=mode)
    _same_bits(out, tree)
    reference = oc.clip_by_norm(1.0, ord=ord) if per_leaf else oc.clip_by_global_norm(1.0, ord=ord)
    # The clipper in the same mode: eagerly and under jit XLA may round a norm
    # differently (a complex64 scalar's norm differed in the last bit).
    _, clipper_state = contracts.run_update(reference, tree, reference.init(tree), mode=mode)
    _same_bits(state.stats.norm, clipper_state.stats.norm)
    assert int(state.count) == 1
    assert not any(bool(jnp.any(c)) for c in jax.tree.leaves(state.stats.was_clipped()))


def test_monitor_is_legal_anywhere_and_reports_through_stats():
    params = {"w": jnp.ones((3,)), "b": jnp.ones(())}
    grads = {"w": jnp.array([3.0, 0.0, 4.0]), "b": jnp.asarray(0.0)}
    tx = optax.chain(oc.monitor_norm(), optax.scale_by_adam(),
                     optax.named_chain(("update", oc.monitor_norm())), optax.scale(-0.1))
    oc.check_order(tx, params)  # a monitor after Adam is not a clipper after Adam
    updates, state = tx.update(grads, tx.init(params))
    found = oc.stats(state)
    assert set(found) == {f"{prefix}monitor_norm/{field}" for prefix in ("", "update/")
                          for field in ("norm", "threshold", "scale", "clipped")}
    assert float(found["monitor_norm/threshold"]) == math.inf
    assert not bool(found["monitor_norm/clipped"])
    norms = sorted(float(v) for k, v in found.items() if k.endswith("/norm"))
    np.testing.assert_allclose(norms[-1], 5.0, rtol=1e-6)
    # Adam's first step normalises each entry to about 1: the update norm is sqrt(2).
    np.testing.assert_allclose(norms[0], math.sqrt(2), rtol=1e-3)
    leafwise = oc.monitor_norm(per_leaf=True)
    per_leaf = oc.stats(leafwise.update(grads, leafwise.init(params))[1], per_leaf=True)
    np.testing.assert_allclose(float(per_leaf["monitor_norm/leaves/w/norm"]), 5.0, rtol=1e-6)
    assert float(per_leaf["monitor_norm/leaves/b/norm"]) == 0.0


def test_checked_accepts_the_monitor():
    tx = oc.checked(optax.chain(oc.monitor_norm(), optax.sgd(0.1)))
    grads = {"w": jnp.array([1e30, 1.0])}
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(out["w"], [-1e29, -0.1], rtol=1e-6)


def test_monitor_rejects_bad_arguments_by_name():
    with pytest.raises(TypeError, match="per_leaf"):
        oc.monitor_norm(per_leaf="yes")
    with pytest.raises(ValueError, match="ord"):
        oc.monitor_norm(ord=-1.0)
