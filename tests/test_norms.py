"""global_norm and the norm core against numpy float64 references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import optaxclip.testing
from optaxclip import _norms, _packing, _reductions, _scaling

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


# --- batched_global_norm: per-example norms, the rescue decided once per batch ----


def example_tree(batch_f32, f16=None, bf16=None, c64=None):
    """Leaves sharing a leading example axis: f32 [B, 3], f16 [B, 2], bf16 [B], c64 [B, 2]."""
    b = len(batch_f32)
    zeros = np.zeros
    return {
        "f32": jnp.asarray(np.asarray(batch_f32, np.float32).reshape(b, 3)),
        "f16": jnp.asarray(zeros((b, 2)) if f16 is None else f16, jnp.float16),
        "bf16": jnp.asarray(zeros((b,)) if bf16 is None else bf16, jnp.bfloat16),
        "c64": jnp.asarray(zeros((b, 2)) if c64 is None else c64, jnp.complex64),
    }


def np_batched_norms(tree, ord, axis=0):
    leaves = [np.moveaxis(np.asarray(x), axis, 0) for x in jax.tree.leaves(tree)
              if _norms.is_float_leaf(x)]
    return [np_global_norm([x[b] for x in leaves], ord) for b in range(leaves[0].shape[0])]


jit_batched = jax.jit(_norms.batched_global_norm, static_argnames=("ord", "axis"))


@pytest.mark.parametrize("ord", ORDERS)
def test_batched_global_norm_matches_float64_reference_per_example(ord):
    tree = example_tree(
        [[0.3, -1.7, 2.0], [1e20, -3e19, 1.0], [0.0, 0.0, 0.0], [1e-30, 2e-30, 0.0]],
        f16=[[2.5, -0.125], [300.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        bf16=[7.0, 1e20, 0.0, 3e-30],
        c64=[[1 - 2j, 0.25j], [3e20 + 4e20j, 1.0], [0.0, 0.0], [0.0, 1e-30j]],
    )
    want = np_batched_norms(tree, ord)
    for got in (_norms.batched_global_norm(tree, ord), jit_batched(tree, ord=ord)):
        chex.assert_shape(got, (4,))
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)
    assert float(got[2]) == 0.0


@pytest.mark.parametrize("ord", ORDERS)
def test_batched_global_norm_equals_vmapped_global_norm(ord):
    rng = np.random.default_rng(3)
    tree = {"w": jnp.asarray(rng.normal(size=(5, 6, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5, 4)), jnp.bfloat16)}
    tree["w"] = tree["w"].at[1].multiply(1e19)
    want = jax.jit(jax.vmap(lambda t: oc.global_norm(t, ord=ord)))(tree)
    np.testing.assert_allclose(jit_batched(tree, ord=ord), want, rtol=2e-6)


def test_batched_global_norm_fp16_accumulates_in_float32():
    got = _norms.batched_global_norm([jnp.array([[300.0, 1.0], [1.0, 0.0]], jnp.float16)])
    np.testing.assert_allclose(got, [math.hypot(300.0, 1.0), 1.0], rtol=1e-6)


@pytest.mark.parametrize("ord", ORDERS)
def test_batched_global_norm_nan_and_inf_stay_in_their_example(ord):
    tree = example_tree([[1.0, jnp.nan, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0]],
                        f16=[[0.0, 0.0], [0.0, 0.0], [-jnp.inf, 1.0]])
    for got in (_norms.batched_global_norm(tree, ord), jit_batched(tree, ord=ord)):
        assert math.isnan(float(got[0]))
        np.testing.assert_allclose(float(got[1]), np_global_norm([[1.0, 2.0, 2.0]], ord),
                                   rtol=1e-6)
        assert float(got[2]) == math.inf


def test_batched_global_norm_other_example_axis():
    tree = {"w": jnp.array([[3.0, 0.0], [4.0, 1e20]]), "b": jnp.array([[0.0, 0.0]])}
    got = _norms.batched_global_norm(tree, axis=1)
    np.testing.assert_allclose(got, [5.0, 1e20], rtol=1e-6)
    np.testing.assert_allclose(_norms.batched_global_norm(tree, axis=-1), got)


def test_batched_global_norm_edge_trees():
    # Non-float leaves fix the example count but add nothing; None/MaskedNode skipped.
    tree = {"i": jnp.zeros((3, 2), jnp.int32), "none": None, "m": optax.MaskedNode()}
    got = _norms.batched_global_norm(tree)
    chex.assert_shape(got, (3,))
    assert got.tolist() == [0.0, 0.0, 0.0]
    chex.assert_shape(_norms.batched_global_norm([jnp.zeros((0, 4))]), (0,))
    with pytest.raises(ValueError, match="at least one array leaf"):
        _norms.batched_global_norm({"a": None})
    with pytest.raises(ValueError, match="disagree"):
        _norms.batched_global_norm([jnp.zeros((2, 3)), jnp.zeros((3,))])
    with pytest.raises(ValueError, match="out of range"):
        _norms.batched_global_norm([jnp.zeros((2, 3)), jnp.zeros(())])
    with pytest.raises(ValueError, match="axis"):
        _norms.batched_global_norm([jnp.zeros((2, 3))], axis=1.0)
    with pytest.raises(ValueError, match="ord"):
        _norms.batched_global_norm([jnp.zeros((2, 3))], ord=0)


@pytest.mark.parametrize("ord", ORDERS)
def test_batched_global_norm_gradient_is_finite_at_zero(ord):
    zeros = {"w": jnp.zeros((3, 4)), "c": jnp.zeros((3, 2), jnp.complex64)}
    grad = jax.jit(jax.grad(lambda t: jnp.sum(_norms.batched_global_norm(t, ord))))(zeros)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))


def _top_level_ops(compiled):
    """Opcodes of the entry computation's instructions (outside fused computations)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    return entry


def test_vmapped_clip_keeps_one_conditional_and_matches_per_example_clip():
    """Under vmap the rescue is decided once for the batch: the compiled update keeps its
    conditional (a batched predicate would have turned it into a select running both)."""
    rng = np.random.default_rng(5)
    grads = {"w": jnp.asarray(rng.normal(size=(4, 8, 3)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    grads["w"] = grads["w"].at[2, 0, 0].set(1e20)  # one example takes the rescue
    tx = oc.clip_by_global_norm(1.0)
    vmapped = jax.jit(jax.vmap(lambda g: tx.update(g, tx.init(g))))
    assert " conditional(" in _top_level_ops(vmapped.lower(grads).compile())
    out, state = vmapped(grads)
    for i in range(4):
        example = jax.tree.map(lambda x, i=i: x[i], grads)
        want, want_state = tx.update(example, tx.init(example))
        np.testing.assert_allclose(state.stats.norm[i], want_state.stats.norm, rtol=1e-6)
        for got, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
            np.testing.assert_allclose(got[i], w, rtol=1e-6, atol=1e-30)


def _optimized_lines(tx, leaves: int) -> int:
    tree = [jax.ShapeDtypeStruct((8, 8), jnp.float32) for _ in range(leaves)]
    update = jax.jit(lambda g: tx.update(g, tx.init(g))[0])
    return update.lower(tree).compile().as_text().count("\n")


def test_the_global_scale_is_computed_once_not_copied_into_every_leaf():
    """The scalar edge-case logic of a global scale (about 40 instructions) must not be
    duplicated into each leaf's scaling kernel: that made the optimized HLO of a
    2,000-leaf tree 5x larger and its compile several times slower. Each added leaf
    costs its parameter, its scaling kernel (a multiply and a select) and a share of
    a packed reduction: 18 lines of optimized HLO now, 50 when the logic was copied
    (a plain ``x * s`` costs 9)."""
    tx = oc.clip_by_global_norm(1.0)
    per_leaf = (_optimized_lines(tx, 120) - _optimized_lines(tx, 60)) / 60
    assert per_leaf < 30, per_leaf


def _mixed_tree(scale: float, seed: int, nonfinite: float | None) -> list:
    rng = np.random.default_rng(seed)
    dtypes = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float32)
    leaves = []
    for i in range(8):
        dtype = dtypes[i % 4]
        magnitude = min(scale, float(jnp.finfo(dtype).max) / 2)
        leaves.append(jnp.asarray(rng.uniform(-1, 1, size=(3, 2)) * magnitude, dtype))
    if nonfinite is not None:
        leaves[7] = leaves[7].at[1, 1].set(nonfinite)
    return leaves


def _bits_flushed(x) -> np.ndarray:
    """Bit patterns, with subnormals as +0: XLA flushes them in arithmetic, and a value
    that reaches the output through no arithmetic (a conditional's operand) keeps it."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16:
        tiny = float(jnp.finfo(x.dtype).tiny)
        x = np.where(np.abs(x.astype(np.float32)) < tiny, np.zeros_like(x), x)
    return x.view(f"u{x.dtype.itemsize}") if x.dtype.itemsize > 1 else x


def test_the_shared_global_scale_gives_the_same_bits_as_the_per_leaf_form(monkeypatch):
    """The conditional form of the global scale (``_clipper._SHARED_FROM`` float leaves
    or more) against the select form, for every global-scope clipper: output and state
    bit for bit over two steps, for zero, tiny, ordinary and huge entries (3e38: a norm
    beyond float32's range), with and without a NaN or inf entry. The two forms are
    chosen by patching ``_SHARED_FROM`` (2, and more leaves than the tree has), so an
    8-leaf tree takes either."""
    from optaxclip import _clipper

    trees = [_mixed_tree(scale, seed, nonfinite)
             for seed, scale in enumerate([0.0, 1e-30, 1.0, 1e30, 3e38])
             for nonfinite in (None, np.nan, np.inf)]
    factories = oc.registered_factories()
    global_scope = [name for name, info in factories.items()
                    if info.kind == "clipper" and getattr(
                        oc.testing.clipper_spec(info.build(*[1.0][:bool(info.threshold)])),
                        "scope", None) == "global"]
    assert {"clip_by_global_norm", "zclip", "autoclip"} <= set(global_scope)
    for name in global_scope:
        info = factories[name]
        for threshold in ([1e-30, 1.0, math.inf] if info.threshold else [None]):
            tx = info.build(threshold) if threshold is not None else info.build()
            results = []
            for shared_from in (2, 10**9):
                monkeypatch.setattr(_clipper, "_SHARED_FROM", shared_from)
                update = jax.jit(lambda g, s, tx=tx: tx.update(g, s))  # a fresh trace
                bits = []
                for grads in trees:
                    out, state = update(grads, tx.init(grads))
                    out, state = update(grads, state)  # adaptive clippers: with history
                    bits += [_bits_flushed(x) for x in jax.tree.leaves((out, state))]
                results.append(bits)
            for got, want in zip(*results):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}({threshold})")


def _stacked_tree(scale: float, seed: int, nonfinite: float | None) -> dict:
    """Leaves with a leading layer axis of 3 (``stacked=True``) and kernels with units."""
    rng = np.random.default_rng(seed)
    shapes = {"w": ((3, 4, 2), jnp.float32), "v": ((3, 2, 5), jnp.bfloat16),
              "b": ((3, 2), jnp.float16), "c": ((3,), jnp.float32)}
    tree = {}
    for key, (shape, dtype) in shapes.items():
        magnitude = min(scale, float(jnp.finfo(dtype).max) / 2)
        tree[key] = jnp.asarray(rng.uniform(-1, 1, size=shape) * magnitude, dtype)
    if nonfinite is not None:
        tree["w"] = tree["w"].at[1, 2, 0].set(nonfinite)
    return tree


@pytest.mark.parametrize("name,stacked", [("adaptive_grad_clip", False),
                                          ("adaptive_grad_clip", True), ("adagc", True),
                                          ("clip_by_norm", True), ("clip_by_block_rms", True)])
def test_unit_scales_behind_one_cond_give_the_same_bits_as_the_select_form(
    monkeypatch, name, stacked
):
    """Per-unit scales (vectors of norms) are computed behind one conditional for the
    tree, not as selects that XLA fuses into every entry's update. Against the select
    form (``_clipper._UNIT_SCALES_FROM`` above every leaf's size): output and state bit for bit over
    two steps, jitted and vmapped (where the predicate is batched), for zero, tiny,
    ordinary and huge entries (3e38: norms beyond float32's range, some units
    overflowing and others not), with and without a NaN or inf entry, at thresholds
    that clip none, some and all units."""
    from optaxclip import _clipper

    info = oc.registered_factories()[name]
    trees = [_stacked_tree(scale, seed, nonfinite)
             for seed, scale in enumerate([0.0, 1e-30, 1.0, 1e30, 3e38])
             for nonfinite in (None, np.nan, np.inf)]
    params = _stacked_tree(1.0, 99, None)
    for threshold in (1e-30, 0.5, math.inf):
        tx = info.build(threshold, stacked=stacked)
        results = []
        for shared_from in (0, 10**9):
            monkeypatch.setattr(_clipper, "_UNIT_SCALES_FROM", shared_from)
            update = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params))  # a fresh trace
            batched = jax.jit(jax.vmap(lambda g, s, tx=tx: tx.update(g, s, params)))
            bits = []
            for grads in trees:
                out, state = update(grads, tx.init(params))
                out, state = update(grads, state)  # adaptive clippers: with history
                pair = jax.tree.map(lambda x: jnp.stack([x, x[::-1] if x.ndim else x]),
                                    (grads, tx.init(params)))
                vmapped = batched(*pair)
                bits += [_bits_flushed(x) for x in jax.tree.leaves((out, state, vmapped))]
            results.append(bits)
        for got, want in zip(*results):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}({threshold})")


@pytest.mark.parametrize("name", ["clip_by_global_norm", "adaptive_grad_clip"])
def test_a_traced_eps_reaches_the_shared_scales(name):
    """``eps`` injected by ``optax.inject_hyperparams`` (a tracer) on the conditional
    forms: the global scale of 40 leaves and the per-unit scales of a large kernel.
    The result equals the static ``eps``'s."""
    if name == "clip_by_global_norm":
        grads = {f"l{i:02d}": jnp.full((3,), 10.0 + i) for i in range(40)}
        params, kwargs, static = None, {"max_norm": 1.0, "eps": 1e-3}, ()
    else:
        grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(128, 64)) * 10,
                                  jnp.float32)}
        params, kwargs = grads, {"clipping": 0.01, "eps": 1e-3}
        static = ("axis", "stacked", "axis_name")
    factory = getattr(oc, name)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    plain = factory(**kwargs)
    assert isinstance(injected.init(grads).hyperparams["eps"], jax.Array)
    got, _ = jax.jit(injected.update)(grads, injected.init(grads), params)
    want, _ = jax.jit(plain.update)(grads, plain.init(grads), params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
    # The case clips: the output is not the input.
    assert not np.allclose(np.asarray(jax.tree.leaves(got)[0]),
                           np.asarray(jax.tree.leaves(grads)[0]))


def test_per_unit_scales_are_computed_once_per_unit_not_per_entry():
    """The update kernel of a kernel-shaped leaf multiplies by a materialised scale: it
    holds a handful of operations per entry, not the scale's edge-case logic (about 60
    operations per unit, which XLA fused into the elementwise update when the scales
    were selects)."""
    tx = oc.adaptive_grad_clip(0.01)
    params = {"w": jnp.ones((256, 512))}
    text = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    kernels = [block for block in text.split("\n\n") if "f32[256,512]" in block.split("{")[0]
               and "fused_computation" in block.split("{")[0]]
    assert kernels, "no elementwise kernel over the leaf"
    sizes = [block.count(" = ") for block in kernels]
    assert max(sizes) < 30, sizes


def _unit_norm_case(untrusted_large: bool, seed: int = 0):
    """Two kernels of 2^17 entries and a small bias whose sums are below the trusted
    range (an attention key bias, gradient about 1e-12); optionally one column of
    the second kernel too."""
    rng = np.random.default_rng(seed)
    big = rng.normal(size=(256, 512)).astype(np.float32)
    other = rng.normal(size=(256, 512)).astype(np.float32)
    if untrusted_large:
        other[:, 3] = rng.normal(size=256) * 1e-30
    small = (rng.normal(size=(4, 32)) * 1e-12).astype(np.float32)
    return [jnp.asarray(big), jnp.asarray(other), jnp.asarray(small)]


@pytest.mark.parametrize("ord", [2, 3.0])
@pytest.mark.parametrize("untrusted_large", [False, True])
def test_large_arrays_keep_their_trusted_sums_when_a_small_one_is_rescued(
    ord, untrusted_large
):
    """One untrusted unit sum sends every array to the rescue. The large arrays
    (``_norms._RESCUE_EACH_FROM`` entries or more) are then read again only when
    one of their own sums is untrusted: in the rescue branch they are used by
    nothing but a conditional of their own. The norms match float64 numpy eagerly,
    under jit and under vmap, whichever way that conditional goes."""
    xs = _unit_norm_case(untrusted_large)
    assert xs[0].size >= _norms._RESCUE_EACH_FROM > xs[2].size
    axes = [(0,), (0,), (0,)]
    norms = lambda xs: _norms.unit_norms(xs, ord, axes=axes)  # noqa: E731
    want = [np.sum(np.abs(np.asarray(x, np.float64)) ** ord, axis=0) ** (1 / ord) for x in xs]
    batched = jax.vmap(norms)([jnp.stack([x, -x]) for x in xs])
    for got in (norms(xs), jax.jit(norms)(xs), [b[1] for b in batched]):
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-6)

    jaxpr = jax.make_jaxpr(norms)(xs).jaxpr
    (outer,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    large = [outer.invars.index(v) - 1 for v in jaxpr.invars[:2]]  # operand positions
    for branch in outer.params["branches"]:
        body = branch.jaxpr
        users = [e.primitive.name for e in body.eqns
                 if any(body.invars[i] in e.invars for i in large)]
        assert set(users) <= {"cond"}, users  # read only behind their own conditional


def test_vmapped_norm_under_grad_and_nested_vmap():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    nested = jax.jit(jax.vmap(jax.vmap(oc.global_norm)))(x)
    np.testing.assert_allclose(nested, np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(jax.vmap(oc.global_norm)(x)))(jnp.zeros((3, 4)))
    assert bool(jnp.all(jnp.isfinite(grad)))
    per_example = jax.vmap(jax.grad(oc.global_norm))(x[0])
    np.testing.assert_allclose(per_example, x[0] / np.linalg.norm(x[0], axis=-1, keepdims=True),
                               rtol=1e-6)


# --- Packing past the cap: chained chunks ----------------------------------------------


@pytest.fixture
def fresh_norm_branches():
    """The norms' cond branches are cached functions, and lax.cond caches their traces
    by identity: fresh ones before and after a test that patches the packing limits
    keep its traces to itself."""
    for guarded in (_norms._global_guarded, _norms._batched_guarded):
        guarded.cache_clear()
    yield
    for guarded in (_norms._global_guarded, _norms._batched_guarded):
        guarded.cache_clear()


def test_leaves_past_the_packing_cap_cost_no_more_hlo_than_packed_ones(
    monkeypatch, fresh_norm_branches
):
    """Past ``_PACK_TOTAL`` entries the small leaves are joined in chained chunks, not
    reduced one by one: each added leaf costs 18 lines of optimized HLO whether it is
    packed freely or past the cap; reduced one by one, past the cap it cost 63 (20,000
    leaves of 8x8 did not compile in 14 minutes)."""
    tx = oc.clip_by_global_norm(1.0)
    monkeypatch.setattr(_packing, "_PACK_TOTAL", 64)  # one 8x8 leaf: the rest are chained
    past_cap = (_optimized_lines(tx, 120) - _optimized_lines(tx, 60)) / 60
    assert past_cap < 30, past_cap
    free, chained = _packing._layout([jnp.zeros((8, 8))] * 600, lambda i: None)
    assert [len(c) for c in free] == [1]
    assert [len(c) for c in chained] == [256, 256, 87]


def _small_leaves(seed: int, scale: float) -> list:
    """100 small leaves of float32 and bfloat16 and one leaf too big to pack (the
    shapes are the same for every seed, so each function compiles once)."""
    shapes = np.random.default_rng(0).integers(1, 6, size=100)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=(int(n), 3)) * scale, (jnp.float32, jnp.bfloat16)[i % 2])
              for i, n in enumerate(shapes)]
    return leaves + [jnp.asarray(rng.normal(size=(_packing._PACK_BELOW,)) * scale, jnp.float32)]


@pytest.mark.parametrize("ord", ORDERS)
def test_chained_chunks_match_the_float64_reference(monkeypatch, fresh_norm_branches, ord):
    """With a cap of 40 entries and chunks of 8 leaves most leaves are past the cap, in
    chained chunks of both dtypes: the global norm (its fast path, and its rescue for
    sums that overflow or underflow float32), its gradient, and the per-example norm,
    eager and under jit and vmap, against float64."""
    monkeypatch.setattr(_packing, "_PACK_TOTAL", 40)
    monkeypatch.setattr(_packing, "_PACK_LEAVES", 8)
    jitted = jax.jit(lambda t: oc.global_norm(t, ord))
    batched = jax.jit(lambda t: _norms.batched_global_norm(t, ord))
    vmapped = jax.jit(jax.vmap(lambda t: oc.global_norm(t, ord)))
    for seed, scale in enumerate([1.0, 3e18, 1e-25]):
        leaves = _small_leaves(seed, scale)
        free, chained = _packing._layout(
            leaves, lambda i, leaves=leaves: _packing._pack_key(leaves[i]))
        assert len(chained) >= 8 and len(free) >= 3
        want = np_global_norm([np.asarray(x, np.float64) for x in leaves], ord)
        np.testing.assert_allclose(float(jitted(leaves)), want, rtol=2e-6)
        if seed == 0:
            np.testing.assert_allclose(float(oc.global_norm(leaves, ord)), want, rtol=2e-6)
        if ord == 2 and scale == 1.0:
            grad = jax.jit(jax.grad(oc.global_norm))(leaves)
            for g, x in zip(grad, leaves):
                np.testing.assert_allclose(np.asarray(g, np.float64),
                                           np.asarray(x, np.float64) / want, rtol=1e-2)
        batch = [jnp.stack([x, 2 * x, -x]) for x in leaves[::3]]
        want_batch = [np_global_norm([np.asarray(x[b], np.float64) for x in batch], ord)
                      for b in range(3)]
        np.testing.assert_allclose(np.asarray(batched(batch)), want_batch, rtol=2e-6)
        np.testing.assert_allclose(np.asarray(vmapped(batch)), want_batch, rtol=2e-6)


@pytest.mark.parametrize("ord", [2, 3.0])
def test_chained_chunks_of_replicated_and_sharded_leaves_under_shard_map(
    monkeypatch, fresh_norm_branches, ord
):
    """Inside ``shard_map`` replicated and sharded leaves are packed apart (their sums
    are reduced across shards differently), and so are their chained chunks: ordering
    a replicated chunk after a sharded one made it vary across shards, and it was
    counted once per shard (a norm of 11.86 for 9.82)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(_packing, "_PACK_TOTAL", 4)
    monkeypatch.setattr(_packing, "_PACK_LEAVES", 2)
    mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
    rng = np.random.default_rng(3)
    norm = jax.jit(jax.shard_map(
        lambda rep, shd: oc.global_norm(rep + shd, ord, axis_name="d"),
        mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))
    for scale in (1.0, 3e18, 1e-25):
        rep = [rng.normal(size=(3,)) * scale for _ in range(7)]
        shd = [rng.normal(size=(4, 3)) * scale for _ in range(7)]
        want = np_global_norm(rep + shd, ord)
        got = norm([jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P()))
                    for x in rep],
                   [jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P("d")))
                    for x in shd])
        np.testing.assert_allclose(float(got), want, rtol=2e-6)


# --- apply_scale: low-precision products rounded toward zero, exactly -----------------


def _all_values(dtype):
    bits = jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(bits, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scale", [0.999999, 0.7071, 1 / 3, 0.0165, 1e-3, 1e-30])
def test_apply_scale_rounds_every_value_toward_zero(dtype, scale):
    """Against an exact reference: the largest representable magnitude at or under
    |float32(g) * float32(scale)|, with g's sign, for all 65,536 bit patterns."""
    values = _all_values(dtype)
    scale32 = np.float32(scale)
    out = np.asarray(jax.jit(_scaling.apply_scale)(values, jnp.float32(scale)))
    v = np.asarray(values).astype(np.float32)
    product = v * scale32  # numpy float32, the same IEEE product
    out32 = out.astype(np.float32)
    finite = np.isfinite(v)
    assert np.array_equal(np.isnan(out32), np.isnan(v))
    assert np.array_equal(out32[np.isinf(v)], v[np.isinf(v)] * scale32)
    ladder = np.unique(np.abs(v[finite]).astype(np.float64))  # representable magnitudes
    normal = finite & (np.abs(product) >= np.finfo(np.float32).tiny)  # XLA:CPU flushes below
    magnitude = np.abs(product[normal]).astype(np.float64)
    want = ladder[np.searchsorted(ladder, magnitude, side="right") - 1]
    np.testing.assert_array_equal(np.abs(out32[normal]).astype(np.float64), want)
    assert np.all(np.abs(out32[finite]) <= np.abs(product[finite]))
    keeps_sign = finite & (v != 0)
    assert np.array_equal(np.signbit(out32[keeps_sign]), np.signbit(v[keeps_sign]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_apply_scale_identity_at_one_and_plain_cast_gradient(dtype):
    values = _all_values(dtype) if dtype != jnp.float32 else jnp.linspace(-3, 3, 11)
    same = _scaling.apply_scale(values, jnp.float32(1.0))
    unsigned = jnp.uint16 if dtype != jnp.float32 else jnp.uint32
    bits_in = np.asarray(jax.lax.bitcast_convert_type(values, unsigned))
    bits_out = np.asarray(jax.lax.bitcast_convert_type(same, unsigned))
    # NaN payloads are XLA's to canonicalise (as in any select); NaN stays NaN.
    nan = np.isnan(np.asarray(values, np.float32))
    np.testing.assert_array_equal(bits_out[~nan], bits_in[~nan])
    assert np.all(np.isnan(np.asarray(same, np.float32))[nan])
    g = jnp.asarray([3.0, -1.5, 0.0, 2.0], dtype)

    def loss(fn, g, s):
        return jnp.sum(fn(g, s).astype(jnp.float32) * jnp.arange(1.0, 5.0))

    def plain(g, s):
        return (g.astype(jnp.float32) * s).astype(g.dtype)

    for s in (0.3, 0.0):
        got = jax.grad(lambda g, s: loss(_scaling.apply_scale, g, s), argnums=(0, 1))(
            g, jnp.float32(s))
        want = jax.grad(lambda g, s: loss(plain, g, s), argnums=(0, 1))(g, jnp.float32(s))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
            assert bool(jnp.all(jnp.isfinite(a)))


def test_apply_scale_complex_leaves_are_scaled_in_their_own_precision():
    g = jnp.array([1 + 2j, -3e20 + 1j, 0j], jnp.complex64)
    out = _scaling.apply_scale(g, jnp.float32(1 / 3))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(g * jnp.complex64(1 / 3)))
    assert _scaling.apply_scale(jnp.array([1, 2]), jnp.float32(0.5)).tolist() == [1, 2]


# ------------------------------------------------ maxima and minima that keep NaN
@pytest.mark.parametrize("seed", range(6))
def test_max_and_min_keeping_nan_match_numpy(seed):
    """Values, NaN wherever one is reduced, jax.grad and vmap, on drawn shapes and axes.

    XLA:CPU's own max and min reductions drop NaN past about 4,096 reduced entries.
    """
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(1, 4))
    shape = tuple(int(rng.integers(1, 9)) for _ in range(ndim - 1)) + (
        int(rng.integers(1, 9000)),)
    axes = [None, -1, tuple(range(ndim))] + ([0] if ndim > 1 else [])
    axis = axes[int(rng.integers(0, len(axes)))]
    x = rng.normal(size=shape).astype(np.float32)
    for ours, ref, initial in ((_reductions.max_keeping_nan, np.max, -1e30),
                              (_reductions.min_keeping_nan, np.min, 1e30)):
        fn = jax.jit(lambda v, f=ours, i=initial: f(v, axis, initial=i))
        np.testing.assert_array_equal(fn(x), ref(x, axis=axis, initial=initial))
        with_nan = x.copy()
        with_nan.flat[[int(rng.integers(0, x.size)), x.size - 1]] = np.nan
        np.testing.assert_array_equal(fn(with_nan), ref(with_nan, axis=axis, initial=initial))
        plain = jnp.max if ours is _reductions.max_keeping_nan else jnp.min
        np.testing.assert_array_equal(
            jax.grad(lambda v, f=ours, i=initial: jnp.sum(f(v, axis, initial=i)))(x),
            jax.grad(lambda v, f=plain: jnp.sum(f(v, axis=axis)))(x))
        rows = with_nan.reshape(shape[0], -1)
        np.testing.assert_array_equal(jax.vmap(ours)(rows), ref(rows, axis=1))
