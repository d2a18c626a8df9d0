"""Clipping sharded gradients on 8 virtual CPU devices (set up in conftest.py).

Under ``jit`` with ``NamedSharding`` inputs the clip is the unsharded one. Under
``shard_map`` each device sees only its shard, so a global norm needs
``axis_name`` to reduce across devices.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _in_a_child import check_in_a_child
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc

INF = math.inf
NAMES = ["clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms"]

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest.py sets 8 virtual CPUs)"
)


def np_norm(x, ord=2):
    x = np.abs(np.asarray(x, np.float64)).ravel()
    return float(np.max(x)) if ord == INF else float(np.sum(x**ord) ** (1 / ord))


def grads_8():
    """Gradients whose leading axes split evenly over 8 devices."""
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(8, 4)) * 3, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
        "h": jnp.asarray(rng.normal(size=(16,)) * 5, jnp.bfloat16),
    }


@functools.cache
def unsharded(name):
    """The clipper's jitted result on the whole, unsharded gradients."""
    tx = getattr(oc, name)(1.0)
    return jax.jit(tx.update)(grads_8(), tx.init(grads_8()))


def _check_named_sharding(name, axis_type=AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(grads_8(), NamedSharding(mesh, P("data")))
    assert len(sharded["w"].sharding.device_set) == 8
    tx = getattr(oc, name)(1.0)
    want, want_state = unsharded(name)
    with jax.set_mesh(mesh):
        got, got_state = jax.jit(tx.update)(sharded, tx.init(sharded))
    for g, w in zip(jax.tree.leaves((got, oc.stats(got_state))),
                    jax.tree.leaves((want, oc.stats(want_state)))):
        assert g.dtype == w.dtype
        # A sharded reduction may add in another order: equal to float rounding.
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   rtol=1e-6 if g.dtype != jnp.bfloat16 else 2**-8)
    assert got["w"].sharding.is_equivalent_to(sharded["w"].sharding, 2)


def test_jit_on_auto_named_sharding_equals_unsharded():
    for name in NAMES:
        _check_named_sharding(name, AxisType.Auto)


def test_jit_on_explicit_named_sharding_equals_unsharded():
    # In a child process: Explicit-sharded runs have aborted a pytest worker inside
    # XLA:CPU (see tests/_in_a_child.py).
    check_in_a_child("test_distributed", "_check_named_sharding", list(NAMES))


def _shard_mapped(tx, mesh, spec, record=True):
    """``tx.update`` run per shard under shard_map (jitted): the clipped tree, and the
    recorded norm (the same on every shard when it is global)."""

    def per_shard(grads):
        updates, state = tx.update(grads, tx.init(grads))
        return (updates, state.stats.norm) if record else (updates, None)

    out_specs = (spec, P() if record else None)
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=out_specs))


@pytest.fixture(scope="module")
def mesh8():
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("ord", [2, 1, INF, 3.0])
def test_shard_map_global_norm_with_axis_name_is_global(mesh8, ord):
    grads = grads_8()
    tx = oc.clip_by_global_norm(1.0, ord=ord, axis_name="data")
    out, recorded = _shard_mapped(tx, mesh8, P("data"))(grads)
    flat_in = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in grads.values()])
    flat_out = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in out.values()])
    # Every shard recorded the norm of the whole tree, in the order asked for.
    np.testing.assert_allclose(float(recorded), np_norm(flat_in, ord), rtol=1e-6)
    # The clipped gradients have global norm 1.0 (the bf16 leaf rounds toward zero).
    assert np_norm(flat_out, ord) <= 1.0 * (1 + 1e-6)
    assert np_norm(flat_out, ord) >= 1.0 - 2**-8


def test_optax_clip_by_global_norm_is_per_shard_under_shard_map(mesh8):
    # Each of the 8 shards clips its own piece to norm 1, so the whole tree ends up
    # with norm sqrt(8) = 2.83: optax.clip_by_global_norm has no axis_name.
    ones = jnp.ones((8, 4))
    spec = P("data")
    optax_clip = optax.clip_by_global_norm(1.0)
    per_shard = jax.shard_map(lambda g: optax_clip.update(g, optax_clip.init(g))[0],
                              mesh=mesh8, in_specs=spec, out_specs=spec)
    assert np_norm(jax.jit(per_shard)(ones)) == pytest.approx(math.sqrt(8), rel=1e-6)
    out, _ = _shard_mapped(oc.clip_by_global_norm(1.0, axis_name="data"), mesh8, spec)(ones)
    assert np_norm(out) == pytest.approx(1.0, rel=1e-6)
    # Without axis_name optaxclip clips per shard too: axis_name is what makes it global.
    out, _ = _shard_mapped(oc.clip_by_global_norm(1.0), mesh8, spec, record=False)(ones)
    assert np_norm(out) == pytest.approx(math.sqrt(8), rel=1e-6)


def test_axis_name_as_a_tuple_of_two_mesh_axes():
    mesh = jax.make_mesh((2, 4), ("hosts", "chips"), axis_types=(AxisType.Auto,) * 2)
    grads = grads_8()
    spec = P(("hosts", "chips"))
    tx = oc.clip_by_global_norm(1.0, axis_name=("hosts", "chips"))
    out, recorded = _shard_mapped(tx, mesh, spec)(grads)
    flat_in = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in grads.values()])
    flat_out = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in out.values()])
    np.testing.assert_allclose(float(recorded), np_norm(flat_in), rtol=1e-6)
    assert 1.0 - 2**-8 <= np_norm(flat_out) <= 1.0 * (1 + 1e-6)
    # Reducing over one axis only covers a quarter or a half of the devices.
    tx = oc.clip_by_global_norm(1.0, axis_name="chips")
    out, _ = _shard_mapped(tx, mesh, spec, record=False)(grads)
    flat_out = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in out.values()])
    assert np_norm(flat_out) == pytest.approx(math.sqrt(2), rel=1e-2)


@pytest.mark.parametrize("ord", [2, 3.0])
def test_shard_map_overflow_path(mesh8, ord):
    # (1e20) ** 2 overflows float32 on every shard; the rescaled path must use the
    # largest entry of all shards and the sum over all shards.
    grads = {"w": jnp.full((8, 2), 1e20, jnp.float32).at[3, 1].set(-3e20)}
    tx = oc.clip_by_global_norm(1.0, ord=ord, axis_name="data")
    out, recorded = _shard_mapped(tx, mesh8, P("data"))(grads)
    want = np_norm(np.asarray(grads["w"], np.float64), ord)
    np.testing.assert_allclose(float(recorded), want, rtol=1e-6)
    np.testing.assert_allclose(np_norm(out["w"], ord), 1.0, rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(out["w"])))


def test_clip_by_norm_with_axis_name_covers_all_shards_of_each_leaf(mesh8):
    grads = {"w": jnp.ones((8, 2)) * 3.0, "b": jnp.full((8,), 0.01)}
    tx = oc.clip_by_norm(1.0, axis_name="data")
    out, recorded = _shard_mapped(tx, mesh8, P("data"))(grads)
    np.testing.assert_allclose(float(recorded["w"]), np_norm(grads["w"]), rtol=1e-6)
    np.testing.assert_allclose(np_norm(out["w"]), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out["b"], grads["b"])  # norm 0.028: untouched
