"""global_norm and the norm core against numpy float64 references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import _norms

ORDERS = [1, 2, math.inf, 3.0, 0.5]


def np_global_norm(arrays, ord):
    """The p-norm of all entries of ``arrays`` together, in numpy float64."""
    magnitudes = np.concatenate(
        [np.abs(np.asarray(a).astype(np.complex128)).ravel() for a in arrays] + [np.zeros(0)]
    )
    if magnitudes.size == 0:
        return 0.0
    if ord == math.inf:
        return float(np.max(magnitudes))
    return float(np.sum(magnitudes**ord) ** (1.0 / ord))


# Jitted once for the whole module; ord is static. Most tests feed the same tree
# structure, so each order compiles once.
jit_global_norm = jax.jit(oc.global_norm, static_argnames="ord")


def tree_of(f32=(0.0, 0.0), f16=(0.0, 0.0), bf16=(0.0, 0.0), c64=(0.0, 0.0)):
    """The tree structure most tests share: one two-entry leaf of each float dtype."""
    return {
        "f32": jnp.array(f32, jnp.float32),
        "f16": jnp.array(f16, jnp.float16),
        "bf16": jnp.array(bf16, jnp.bfloat16),
        "c64": jnp.array(c64, jnp.complex64),
    }


def check(tree, ord, rtol=2e-6):
    """Both the eager and the jitted norm match the float64 reference."""
    want = np_global_norm(jax.tree.leaves(tree), ord)
    for got in (oc.global_norm(tree, ord=ord), jit_global_norm(tree, ord=ord)):
        chex.assert_shape(got, ())
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(float(got), want, rtol=rtol)
    return float(got)


@pytest.mark.parametrize("ord", ORDERS)
def test_matches_float64_reference_and_is_float32_scalar(ord):
    check(tree_of((0.3, -1.7), (2.5, -0.125), (7.0, 0.5), (1 - 2j, 0.25j)), ord)


def test_fp16_accumulates_in_float32():
    tree = [jnp.array([300.0, 1.0], jnp.float16)]
    for got in (oc.global_norm(tree), jit_global_norm(tree)):
        assert float(got) == pytest.approx(math.hypot(300.0, 1.0), rel=1e-6)  # 300.0017
    assert check(tree_of(f16=(300.0, 1.0)), 2) == pytest.approx(300.0017, rel=1e-6)


@pytest.mark.parametrize("ord", ORDERS)
def test_huge_float32_entries_do_not_overflow(ord):
    # 1e20 ** 2 and 1e20 ** 3 are inf in float32; the norm itself is not.
    assert check([jnp.array([1e20, 1.0], jnp.float32)], ord, rtol=1e-6) == pytest.approx(1e20)
    check(tree_of((1e20, -3e19), (1.0, 2.0), (1e20, 1.0)), ord, rtol=1e-6)


@pytest.mark.parametrize("ord", ORDERS)
def test_tiny_entries_do_not_underflow(ord):
    # (1e-30) ** 2 underflows to 0 in float32; the norm itself does not.
    assert check(tree_of((1e-30, 2e-30), bf16=(3e-30, 0.0)), ord, rtol=1e-5) > 0


@pytest.mark.parametrize("ord", ORDERS)
def test_huge_complex_entry_is_not_overflowed_or_truncated(ord):
    assert check(tree_of(c64=(3e20 + 4e20j, 1.0)), ord, rtol=1e-6) == pytest.approx(5e20)


def test_none_masked_node_and_integer_leaves_are_skipped():
    tree = {
        "w": jnp.array([3.0, 4.0]),
        "none": None,
        "masked": optax.MaskedNode(),
        "int": jnp.array([100, 100], jnp.int32),
        "bool": jnp.array([True]),
    }
    assert float(oc.global_norm(tree)) == 5.0
    assert float(jit_global_norm(tree)) == 5.0


@pytest.mark.parametrize("tree", [{}, [], None, [None, optax.MaskedNode()], [jnp.arange(3)]])
def test_empty_tree_has_norm_zero(tree):
    for got in (oc.global_norm(tree), jit_global_norm(tree)):
        chex.assert_type(got, jnp.float32)
        assert float(got) == 0.0


@pytest.mark.parametrize("ord", ORDERS)
def test_nan_gives_nan_and_inf_gives_inf(ord):
    for norm in (oc.global_norm, jit_global_norm):
        assert math.isnan(float(norm(tree_of((1.0, jnp.nan), bf16=(2.0, 3.0)), ord=ord)))
        assert math.isnan(float(norm(tree_of((jnp.inf, 1.0), c64=(jnp.nan, 0)), ord=ord)))
        assert float(norm(tree_of((1.0, -2.0), f16=(-jnp.inf, 0.0)), ord=ord)) == math.inf
        assert float(norm(tree_of((1e20, 2.0), c64=(jnp.inf, 0)), ord=ord)) == math.inf


@pytest.mark.parametrize("ord", ORDERS)
def test_gradient_is_finite_at_zero(ord):
    grad = jax.jit(jax.grad(lambda tree: oc.global_norm(tree, ord=ord)))(
        {"w": jnp.zeros(3), "c": jnp.zeros(2, jnp.complex64)}
    )
    for leaf in jax.tree.leaves(grad):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_gradient_matches_reference_away_from_zero():
    x = jnp.array([3.0, -4.0])
    np.testing.assert_allclose(jax.grad(oc.global_norm)(x), [0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, -2.5, float("nan"), "fro", True, [2]])
def test_bad_ord_raises_value_error_naming_ord(bad):
    with pytest.raises(ValueError, match="ord"):
        oc.global_norm([jnp.ones(2)], ord=bad)


@pytest.mark.parametrize("bad", [1, ["a", 2], {"a": 1}])
def test_bad_axis_name_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="axis_name"):
        oc.global_norm([jnp.ones(2)], axis_name=bad)


def test_ord_none_means_two():
    x = [jnp.array([3.0, 4.0])]
    assert float(oc.global_norm(x, ord=None)) == 5.0


def test_leaf_norms_per_leaf_against_reference():
    tree = {"a": jnp.array([1e20, 1.0]), "b": None, "c": jnp.array([3.0, 4.0])}
    tree["i"] = jnp.array([7, 7])
    got = _norms.leaf_norms(tree, 3.0)
    assert got["b"] is None
    assert float(got["i"]) == 0.0
    np.testing.assert_allclose(float(got["a"]), np_global_norm([tree["a"]], 3.0), rtol=1e-6)
    np.testing.assert_allclose(float(got["c"]), np_global_norm([tree["c"]], 3.0), rtol=1e-6)


@pytest.mark.parametrize("ord", ORDERS)
def test_unit_norms_over_axes_against_reference(ord):
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 4)).astype(np.float32) * np.float32(1e19)
    (got,) = _norms.unit_norms([jnp.asarray(kernel)], ord, axes=[0])
    want = [np_global_norm([kernel[:, j]], ord) for j in range(4)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)
