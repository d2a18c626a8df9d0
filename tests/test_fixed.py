"""The fixed-threshold clippers, each run eagerly and under jax.jit.

Every norm is checked against a numpy float64 reference written here. Most jitted
runs pass the threshold as an argument, so one compilation per tree structure
serves every threshold; the chain, vmap, schedule and order tests jit transforms
with the threshold closed over, as user code usually does.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

INF = math.inf
NAMES = ["clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms"]
FACTORY = {name: getattr(oc, name) for name in NAMES}
ARG_NAME = {
    "clip_by_value": "max_delta",
    "clip_by_norm": "max_norm",
    "clip_by_global_norm": "max_norm",
    "clip_by_block_rms": "threshold",
}


# ---------------------------------------------------------------- references


def np_leaf_norm(x, ord=2):
    magnitude = np.abs(np.asarray(x).astype(np.complex128)).ravel()
    if magnitude.size == 0:
        return 0.0
    if ord == INF:
        return float(np.max(magnitude))
    return float(np.sum(magnitude**ord) ** (1 / ord))


def float_leaves(tree):
    return [
        np.asarray(x)
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]


def np_scope_norms(name, tree):
    """Float64 norms of every scope the clipper bounds: entries, leaves or the whole tree."""
    leaves = float_leaves(tree)
    if name == "clip_by_value":
        return [float(v) for x in leaves for v in np.abs(x.astype(np.complex128)).ravel()]
    if name == "clip_by_norm":
        return [np_leaf_norm(x) for x in leaves]
    if name == "clip_by_block_rms":
        magnitudes = [np.abs(x.astype(np.complex128)) for x in leaves]
        return [math.sqrt(np.mean(m**2)) if m.size else 0.0 for m in magnitudes]
    flat = np.concatenate([x.astype(np.complex128).ravel() for x in leaves])
    return [np_leaf_norm(flat)]


def bits(x):
    """The raw bits of an array, so comparisons are exact (NaN and -0.0 included)."""
    x = np.asarray(x)
    if x.dtype.kind == "c":
        return np.stack([bits(x.real), bits(x.imag)])
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.kind == "f" else x


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(bits(g), bits(w))


# ------------------------------------------------------------------ plumbing


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


@pytest.fixture(params=["eager", "jit"])
def mode(request):
    return request.param


def G(w=((0.0, 0.0), (0.0, 0.0)), h=(0.0, 0.0), c=(0.0,)):
    """The tree structure most tests share (so the jitted updates compile once):
    a float32 matrix, a bfloat16 vector and a complex64 vector."""
    return {
        "w": jnp.array(w, jnp.float32),
        "h": jnp.array(h, jnp.bfloat16),
        "c": jnp.array(c, jnp.complex64),
    }


@functools.cache
def jitted_update(name):
    """``name``'s update under jit with the threshold as an argument: one compilation
    per tree structure serves every threshold a test uses."""

    def update(grads, state, threshold):
        return FACTORY[name](threshold).update(grads, state)

    return jax.jit(update)


def clip(name, threshold, grads, mode, state=None):
    """One update of ``FACTORY[name](threshold)``, eagerly or jitted."""
    tx = FACTORY[name](threshold)
    state = tx.init(grads) if state is None else state
    if mode == "eager":
        return tx.update(grads, state)
    return jitted_update(name)(grads, state, jnp.float32(threshold))


_JITTED = {}


def run(tx, grads, mode, state=None):
    """One update of the transformation ``tx``, eagerly or under its own jit."""
    state = tx.init(grads) if state is None else state
    if mode == "eager":
        return tx.update(grads, state)
    return _JITTED.setdefault(id(tx), (tx, jax.jit(tx.update)))[1](grads, state)


# --------------------------------------------------------------- composition


def test_returns_extra_args_and_works_in_chain(name, mode):
    transform = FACTORY[name](1.0)
    assert isinstance(transform, optax.GradientTransformationExtraArgs)
    grads = G(w=[[3.0, -4.0], [1.0, 0.5]], h=[-12.0, 5.0], c=[2j])
    alone, _ = run(transform, grads, mode)  # a Python-float threshold, closed over
    chained, _ = run(optax.chain(transform, optax.sgd(1.0)), grads, mode)
    chex.assert_trees_all_close(chained, jax.tree.map(jnp.negative, alone))
    assert max(np_scope_norms(name, alone)) <= 1.0 * (1 + 1e-6)
    assert max(np_scope_norms(name, grads)) > 1.0  # the clipper had something to do


def test_per_example_clipping_under_vmap(name, mode):
    transform = FACTORY[name](1.0)
    batch = {
        "w": jnp.arange(12.0).reshape(3, 2, 2) - 5,
        "h": jnp.array([[0.1, 0.0], [9.0, 1.0], [-2.0, 0.5]], jnp.bfloat16),
        "c": jnp.array([[1j], [0.5], [3 - 4j]], jnp.complex64),
    }
    example = jax.tree.map(lambda x: x[0], batch)
    update = jax.vmap(transform.update, in_axes=(0, None))
    if mode == "jit":
        update = jax.jit(update)
    out, state = update(batch, transform.init(example))
    for i in range(3):
        one, got = (jax.tree.map(lambda x, i=i: x[i], tree) for tree in (batch, out))
        want, _ = clip(name, 1.0, one, "jit")
        chex.assert_trees_all_close(got, want, rtol=1e-6)
        assert max(np_scope_norms(name, got)) <= 1 + 1e-6
    chex.assert_shape(state.count, (3,))
    chex.assert_shape(jax.tree.leaves(state.stats.norm), (3,))


# --------------------------------------------------------------- edge cases


def test_zero_gradients_give_zeros_and_finite_gradient(name, mode):
    zeros = G()
    out, state = clip(name, 1.0, zeros, mode)
    assert_bit_identical(out, zeros)
    assert not np.any(np.isnan([float(x) for x in jax.tree.leaves(state.stats.scale)]))
    weights = jnp.array([[1.0, 2.0], [3.0, 4.0]])

    def loss(grads):
        updates, _ = FACTORY[name](1.0).update(grads, FACTORY[name](1.0).init(grads))
        return (jnp.sum(updates["w"] * weights) + jnp.sum(updates["h"].astype(jnp.float32))
                + jnp.sum(jnp.abs(updates["c"])))

    if mode == "eager":
        return  # jax.grad is checked jitted: it runs the same operations, much faster
    grad_fn = jax.jit(jax.grad(loss))
    gradient = grad_fn(zeros)
    for leaf in jax.tree.leaves(gradient):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    # At zero the clipper is the identity, so the gradient is the loss's own weights.
    np.testing.assert_array_equal(gradient["w"], weights)
    np.testing.assert_array_equal(gradient["h"], [1.0, 1.0])
    # Through a step that clips (bf16 rounding toward zero included) it is finite too.
    gradient = grad_fn(G(w=[[3.0, -4.0], [0.0, 1.0]], h=[7.0, -9.0], c=[3 + 4j]))
    for leaf in jax.tree.leaves(gradient):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert np.any(np.asarray(gradient["w"]) != 0)


def test_norm_exactly_at_threshold_is_bit_identical(name, mode):
    grads = G(w=[[0.3, -0.7], [1.1, 0.2]], h=[1.5, -0.25], c=[0.5 - 1j])
    _, state = clip(name, INF, grads, mode)
    # The clipper's own float32 norm (the largest, for per-entry/per-leaf clippers).
    own_norm = max(float(n) for n in jax.tree.leaves(state.stats.norm))
    assert own_norm == pytest.approx(max(np_scope_norms(name, grads)), rel=1e-6)
    out, state = clip(name, own_norm, grads, mode)
    assert_bit_identical(out, grads)
    assert not any(bool(c) for c in jax.tree.leaves(state.stats.was_clipped()))


def test_threshold_zero_gives_zeros(name, mode):
    grads = G(w=[[3.0, -4.0], [1e-30, 0.0]], h=[1e-30, -2.0], c=[1 + 1j])
    out, state = clip(name, 0.0, grads, mode)
    for leaf, grad in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
        assert leaf.dtype == grad.dtype
        np.testing.assert_array_equal(leaf, np.zeros_like(grad))
    assert all(bool(c) for c in jax.tree.leaves(state.stats.was_clipped()))


@pytest.mark.parametrize("bad", [(1.0, INF), (math.nan, 2.0), (-INF, math.nan)])
def test_threshold_inf_is_identity_even_for_non_finite_gradients(name, mode, bad):
    grads = G(w=[[3e30, -4.0], bad], h=[7.0, -1.0], c=[1e30j])
    out, state = clip(name, INF, grads, mode)
    assert_bit_identical(out, grads)
    assert not any(bool(c) for c in jax.tree.leaves(state.stats.was_clipped()))


@pytest.mark.parametrize("bad", [-1.0, -1e-30, -INF, math.nan, jnp.float32(-2.0),
                                 np.array([1.0, 2.0]), True, "1.0"])
def test_invalid_static_threshold_raises_value_error_naming_argument(name, bad):
    with pytest.raises(ValueError, match=ARG_NAME[name]):
        FACTORY[name](bad)


def test_negative_traced_threshold_is_clamped_to_zero(name):
    grads = G(w=[[3.0, -4.0], [1.0, 0.5]], h=[-12.0, 5.0], c=[2j])
    state = FACTORY[name](1.0).init(grads)
    # A traced threshold cannot be checked at construction, so it is clamped.
    out, state = jitted_update(name)(grads, state, jnp.float32(-3.0))
    for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, jnp.zeros_like(leaf))
    assert float(state.stats.threshold) == 0.0


def test_integer_leaves_pass_through_and_do_not_count(name, mode):
    floats = G(w=[[3.0, -4.0], [10.0, 0.0]], h=[2.0, 0.5], c=[1j])
    mixed = dict(floats, step=jnp.array([1000, -7], jnp.int32), flag=jnp.array(True))
    out, state = clip(name, 1.0, mixed, mode)
    want, want_state = clip(name, 1.0, floats, mode)
    np.testing.assert_array_equal(out["step"], [1000, -7])
    assert out["step"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_
    np.testing.assert_array_equal(out["flag"], True)
    assert_bit_identical({k: out[k] for k in floats}, want)
    assert float(oc.stats(state)[f"{name}/norm"]) == float(oc.stats(want_state)[f"{name}/norm"])


def test_output_structure_shapes_and_dtypes_equal_input(name, mode):
    grads = {
        "f32": jnp.ones((2, 3)) * 2,
        "bf16": jnp.full((3,), -5.0, jnp.bfloat16),
        "f16": jnp.full((1, 2), 300.0, jnp.float16),
        "c64": jnp.array([3 + 4j, 1j], jnp.complex64),
        "none": None,
        "masked": optax.MaskedNode(),
        "int": jnp.arange(3),
        "scalar": jnp.float32(-9.0),
        "empty": jnp.zeros((0, 2)),
    }
    out, _ = clip(name, 1.0, grads, mode)
    assert jax.tree.structure(out) == jax.tree.structure(grads)
    assert out["none"] is None and isinstance(out["masked"], optax.MaskedNode)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
    assert max(np_scope_norms(name, out)) <= 1.0 * (1 + 1e-6)


def test_direction_is_preserved(name, mode):
    grads = G(w=[[3.0, -4.0], [0.0, 12.0]], h=[-50.0, 0.5], c=[-3 + 4j])
    out, _ = clip(name, 2.0, grads, mode)
    ratios = []
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
        o64, g64 = np.asarray(o).astype(np.complex128), np.asarray(g).astype(np.complex128)
        nonzero = g64 != 0
        ratio = o64[nonzero] / g64[nonzero]
        # Each entry is a real multiple in (0, 1] of its input: same sign and phase.
        np.testing.assert_allclose(ratio.imag, 0, atol=1e-6)
        assert np.all(ratio.real > 0) and np.all(ratio.real <= 1)
        np.testing.assert_array_equal(o64[~nonzero], 0)
        ratios.append(ratio.real)
    if name == "clip_by_value":
        return
    # Norm clipping: one common factor per scope (bf16 rounds it to 2**-8).
    for ratio in ratios:
        np.testing.assert_allclose(ratio, ratio[0], rtol=2**-7)
    if name == "clip_by_global_norm":
        np.testing.assert_allclose(np.concatenate(ratios), ratios[0][0], rtol=2**-7)


# ------------------------------------------------------------ non-finite input


@pytest.mark.parametrize("bad", [math.nan, INF, -INF])
def test_non_finite_gradients_follow_the_documented_policy(name, mode, bad):
    grads = G(w=[[3.0, -4.0], [0.5, bad]], h=[0.25, 8.0], c=[0.6 + 0.8j])
    out, state = clip(name, 1.0, grads, mode)
    summary = oc.stats(state)
    # The stats show the non-finite norm and never report success.
    assert not math.isfinite(float(summary[f"{name}/norm"]))
    assert bool(summary[f"{name}/clipped"])
    if name == "clip_by_value":
        # inf entries go to the limit (as torch); NaN stays NaN; the rest is clipped.
        want_bad = math.nan if math.isnan(bad) else math.copysign(1.0, bad)
        np.testing.assert_array_equal(out["w"], [[1.0, -1.0], [0.5, want_bad]])
        np.testing.assert_array_equal(out["h"], jnp.array([0.25, 1.0], jnp.bfloat16))
        np.testing.assert_array_equal(out["c"], grads["c"])
        return
    # The clipper's whole scope turns NaN: finite entries are never silently zeroed.
    assert bool(jnp.all(jnp.isnan(out["w"])))
    if name == "clip_by_global_norm":
        assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(out))
        assert math.isnan(float(summary[f"{name}/scale"]))
        assert float(summary[f"{name}/norm"]) == INF or math.isnan(bad)
    else:  # per-leaf scopes: the other leaves are clipped as if the bad one were finite
        want, _ = clip(name, 1.0, G(w=[[3.0, -4.0], [0.5, 1.0]], h=[0.25, 8.0],
                                    c=[0.6 + 0.8j]), mode)
        assert_bit_identical({"h": out["h"], "c": out["c"]}, {"h": want["h"], "c": want["c"]})
        leaf_norm = float(state.stats.norm["w"])
        assert math.isnan(leaf_norm) if math.isnan(bad) else leaf_norm == INF
        assert math.isnan(float(state.stats.scale["w"]))
        assert bool(state.stats.was_clipped()["w"])


# ------------------------------------------------------------ threshold forms


THRESHOLD_FORMS = {
    "float": 1.5,
    "np.float64": np.float64(1.5),
    "f32 array": jnp.asarray(1.5, jnp.float32),
    "bf16 array": jnp.asarray(1.5, jnp.bfloat16),
    "f16 array": jnp.asarray(1.5, jnp.float16),
    "f64 array (as f32)": jnp.asarray(np.float64(1.5)),
}


def test_threshold_as_python_float_or_array_of_any_float_dtype(name, mode):
    grads = G(w=[[3.0, -4.0], [0.0, 1.0]], h=[2.0, 6.0], c=[1 + 1j])
    want, _ = clip(name, 1.5, grads, "eager")
    for form, threshold in THRESHOLD_FORMS.items():
        tx = FACTORY[name](threshold)
        if mode == "eager":
            out, state = tx.update(grads, tx.init(grads))
        elif "array" in form:  # traced in its own dtype, as inject_hyperparams passes it
            out, state = jitted_update(name)(grads, tx.init(grads), threshold)
        else:  # Python numbers under jit: the closed-over form most tests use
            continue
        assert_bit_identical(out, want)
        assert state.stats.threshold.dtype == jnp.float32, form
        assert float(state.stats.threshold) == 1.5, form


def test_inject_hyperparams_with_bf16_grads_and_f32_array_threshold(name, mode):
    grads = {"w": jnp.array([3.0, -4.0], jnp.bfloat16), "b": jnp.array([12.0], jnp.bfloat16)}
    tx = optax.inject_hyperparams(FACTORY[name])(jnp.float32(1.0))
    state = tx.init(grads)
    out, state = run(tx, grads, mode, state)
    want, _ = clip(name, 1.0, grads, "eager")
    assert_bit_identical(out, want)
    assert float(oc.stats(state)[f"{name}/threshold"]) == 1.0
    # The injected hyperparameter can change between steps without recompiling.
    state.hyperparams[ARG_NAME[name]] = jnp.float32(0.5)
    out, state = run(tx, grads, mode, state)
    assert float(oc.stats(state)[f"{name}/threshold"]) == 0.5
    assert max(np_scope_norms(name, out)) <= 0.5


def test_optax_clip_by_global_norm_rejects_that_threshold_form():
    grads = {"w": jnp.array([3.0, -4.0], jnp.bfloat16)}
    tx = optax.inject_hyperparams(optax.clip_by_global_norm)(jnp.float32(1.0))
    with pytest.raises(TypeError):
        jax.jit(tx.update)(grads, tx.init(grads))
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(jnp.float32(1.0))
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    assert out["w"].dtype == jnp.bfloat16
    # bf16 products are rounded toward zero, so the output stays inside the ball.
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), [0.6, -0.8], rtol=2**-7)
    assert np.linalg.norm(np.asarray(out["w"], np.float64)) <= 1.0
    # optax's clip and clip_by_block_rms accept that form but return float32 updates;
    # optaxclip keeps the gradients' dtype.
    for optax_factory, own in [(optax.clip, oc.clip_by_value),
                               (optax.clip_by_block_rms, oc.clip_by_block_rms)]:
        theirs, ours = (optax.inject_hyperparams(f)(jnp.float32(1.0)) for f in (optax_factory, own))
        assert jax.jit(theirs.update)(grads, theirs.init(grads))[0]["w"].dtype == jnp.float32
        assert jax.jit(ours.update)(grads, ours.init(grads))[0]["w"].dtype == jnp.bfloat16


def test_schedule_follows_the_clippers_own_step_count(name, mode):
    schedule = optax.piecewise_constant_schedule(4.0, {1: 0.5, 3: 0.25})
    # No complex leaf: optax.MultiSteps casts complex accumulators to real.
    grads = {"w": jnp.array([[30.0, -40.0], [7.0, 0.0]]), "h": jnp.array([20.0, 0], jnp.bfloat16)}
    # Jitted, MultiSteps steps the clipper every second call: its schedule follows
    # the clipper's own count (real steps), not the number of calls. (Eagerly, a
    # plain chain: MultiSteps retraces its cond on every eager call.)
    every = 2 if mode == "jit" else 1
    tx = optax.chain(FACTORY[name](schedule), optax.scale(-1.0))
    tx = optax.MultiSteps(tx, every) if every > 1 else tx
    state = tx.init(grads)
    for call in range(3 * every):
        updates, state = run(tx, grads, mode, state)
        clip_state = state.inner_opt_state[0] if every > 1 else state[0]
        real_steps = (call + 1) // every
        assert int(clip_state.count) == real_steps
        if (call + 1) % every == 0:  # a real step: its output obeys that step's threshold
            bound = float(schedule(real_steps - 1))
            assert float(oc.stats(state)[f"{name}/threshold"]) == bound
            norms = np_scope_norms(name, jax.tree.map(jnp.negative, updates))
            # (the lower bound leaves room for the bf16 leaf's rounding toward zero)
            assert bound * (1 - 2**-7) <= max(norms) <= bound * (1 + 1e-6)


# ------------------------------------------------------------- torch and eps


def test_eps_gives_torchs_exact_coefficient(mode):
    clip = oc.clip_by_global_norm(1.0, eps=1e-6)
    update = clip.update if mode == "eager" else jax.jit(clip.update)
    base = np.array([0.6, -0.8, 0.0], np.float32)  # unit norm
    for factor in [0.5, 1 - 2e-6, 1 - 5e-7, 1.0, 1 + 5e-7, 1.5, 1e3, 1e25]:
        grads = [jnp.asarray(base * np.float32(factor))]
        out, state = update(grads, clip.init(grads))
        norm64 = np_leaf_norm(np.asarray(grads[0]))
        coefficient = min(1.0, 1.0 / (norm64 + 1e-6))  # torch.nn.utils.clip_grad_norm_
        np.testing.assert_allclose(float(state.stats.scale), coefficient, rtol=1e-6)
        np.testing.assert_allclose(float(state.stats.norm), norm64, rtol=1e-6)
        np.testing.assert_allclose(out[0], np.asarray(grads[0], np.float64) * coefficient,
                                   rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("bad", [-1e-6, math.inf, math.nan, "0", True])
def test_bad_eps_raises_value_error_naming_eps(bad):
    with pytest.raises(ValueError, match="eps"):
        oc.clip_by_global_norm(1.0, eps=bad)


@pytest.mark.parametrize("factory", [oc.clip_by_norm, oc.clip_by_global_norm])
@pytest.mark.parametrize("bad_ord", [0, -2, math.nan, "fro", True])
def test_bad_ord_raises_value_error_naming_ord(factory, bad_ord):
    with pytest.raises(ValueError, match="ord"):
        factory(1.0, ord=bad_ord)


@pytest.mark.parametrize("factory", [oc.clip_by_norm, oc.clip_by_global_norm])
@pytest.mark.parametrize("text", ["inf", "Infinity", "fro"])
def test_an_ord_given_as_torch_or_numpy_text_says_what_to_pass(factory, text):
    want = r"ord=math\.inf \(a float" if text != "fro" else r"ord=2 is the Frobenius norm"
    with pytest.raises(ValueError, match=want):
        factory(1.0, ord=text)


@pytest.mark.parametrize("factory", [oc.clip_by_norm, oc.clip_by_global_norm])
@pytest.mark.parametrize("bad", [3, ("data", 1), {"a": "b"}])
def test_bad_axis_name_raises_value_error_naming_it(factory, bad):
    with pytest.raises(ValueError, match="axis_name"):
        factory(1.0, axis_name=bad)


@pytest.mark.parametrize("ord", [1, 2, INF, 3.0])  # (0.5: test_norms)
def test_global_and_per_leaf_norm_orders_against_reference(mode, ord):
    grads = G(w=[[1e20, -3e19], [2.0, 0.0]], c=[3 + 4j])
    for factory in (oc.clip_by_norm, oc.clip_by_global_norm):
        out, state = run(factory(1.0, ord=ord), grads, mode)
        if factory is oc.clip_by_global_norm:
            flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in tree.values()])
            np.testing.assert_allclose(float(state.stats.norm),
                                       np_leaf_norm(flat(grads), ord), rtol=2e-6)
            np.testing.assert_allclose(np_leaf_norm(flat(out), ord), 1.0, rtol=2e-6)
        else:
            for key in ("w", "c"):
                np.testing.assert_allclose(float(state.stats.norm[key]),
                                           np_leaf_norm(grads[key], ord), rtol=2e-6)
                np.testing.assert_allclose(np_leaf_norm(out[key], ord), 1.0, rtol=2e-6)
            np.testing.assert_array_equal(out["h"], grads["h"])


# ------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_bound_holds_exactly(name, mode, dtype):
    rng = np.random.default_rng(3)
    # Eagerly one case; jitted (the same operations, compiled once) a few more.
    for trial in range(1 if mode == "eager" else 2):
        grads = {"a": jnp.asarray(rng.normal(size=(5,)) * 10 ** (2 * trial - 1), dtype),
                 "b": jnp.asarray(rng.normal(size=(2, 3)) * 30, dtype)}
        for threshold in (0.1,) if mode == "eager" else (0.1, 1.0, 7.0):
            out, _ = clip(name, threshold, grads, mode)
            chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
            # Checked in float64 against the float32 threshold; the only tolerance is
            # the float64 rounding of the reference norm itself.
            assert max(np_scope_norms(name, out)) <= float(np.float32(threshold)) * (1 + 1e-12)


def test_where_optax_clip_by_global_norm_differs():
    """The differences the README's comparison table states, checked on optax itself."""
    theirs, ours = optax.clip_by_global_norm(1.0), oc.clip_by_global_norm(1.0)

    def both(grads):
        return (theirs.update(grads, theirs.init(grads))[0],
                ours.update(grads, ours.init(grads))[0])

    # 1e20 entries: optax's squared norm overflows to inf and the update becomes zeros.
    optax_out, out = both({"a": jnp.array([1e20, 1e20])})
    np.testing.assert_array_equal(optax_out["a"], [0.0, 0.0])
    np.testing.assert_allclose(out["a"], [math.sqrt(0.5)] * 2, rtol=1e-6)
    # An inf entry: optax zeroes the finite entries; optaxclip makes every entry NaN.
    optax_out, out = both({"a": jnp.array([3.0, 4.0]), "b": jnp.array([INF, 1.0])})
    np.testing.assert_array_equal(optax_out["a"], [0.0, 0.0])
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(out))
    # jax.grad at zero gradients: NaN through optax, finite through optaxclip.
    zeros = {"a": jnp.zeros(2)}
    for tx, finite in ((theirs, False), (ours, True)):
        grad = jax.grad(lambda g, tx=tx: jnp.sum(tx.update(g, tx.init(g))[0]["a"]))(zeros)
        assert bool(jnp.all(jnp.isfinite(grad["a"]))) == finite
    # optax keeps no state, so there is nothing to log.
    assert theirs.init(zeros) == optax.EmptyState()


@pytest.mark.parametrize(
    "factory",
    [
        oc.clip_by_value,
        oc.clip_by_norm,
        oc.clip_by_global_norm,
        oc.clip_by_block_rms,
    ],
)
def test_nan_traced_threshold_poisons_output_and_stats(factory):
    # A NaN from a broken schedule must never let gradients through unclipped.
    grads = {"w": jnp.array([3.0, -4.0, 0.5]), "b": jnp.array([0.1])}
    tx = factory(lambda count: jnp.float32(jnp.nan))
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    for leaf in jax.tree.leaves(out):
        assert bool(jnp.all(jnp.isnan(leaf)))
    recorded = oc.stats(state)
    name = factory.__name__
    if name != "clip_by_value":  # element-wise clipping records no common scale
        assert bool(jnp.isnan(recorded[f"{name}/scale"]))
    assert bool(recorded[f"{name}/clipped"])
