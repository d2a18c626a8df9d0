"""``clipped``: Keras clipnorm / clipvalue / global_clipnorm semantics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

GRADS = {"a": np.array([3.0, 4.0]), "b": np.array([[0.5, -12.0], [0.0, 5.0]])}


def _np_clipnorm(grads, c):
    out = {}
    for key, g in grads.items():
        norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        out[key] = g * min(1.0, c / norm) if norm > 0 else g
    return out


def _np_clipvalue(grads, c):
    return {key: np.clip(g.astype(np.float64), -c, c) for key, g in grads.items()}


def _np_global(grads, c):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    return {key: g * min(1.0, c / norm) for key, g in grads.items()}


REFERENCES = {
    "clipnorm": _np_clipnorm,
    "clipvalue": _np_clipvalue,
    "global_clipnorm": _np_global,
}
CLIPPER_NAMES = {
    "clipnorm": "clip_by_norm",
    "clipvalue": "clip_by_value",
    "global_clipnorm": "clip_by_global_norm",
}


def _run(tx, grads_seq, jit):
    params = jax.tree.map(jnp.zeros_like, grads_seq[0])
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for grads in grads_seq:
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
        outs.append(updates)
    return outs, state


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("option", sorted(REFERENCES))
def test_momentum_sees_clipped_gradients(option, jit):
    # SGD with momentum 0.9: trace = 0.9 trace + clip(g); update = -lr * trace.
    c, lr, decay = 1.0, 0.5, 0.9
    grads_seq = [GRADS, {k: -2.0 * v for k, v in GRADS.items()}, GRADS]
    tx = oc.clipped(optax.sgd(lr, momentum=decay), **{option: c})
    outs, state = _run(tx, grads_seq, jit)
    trace = {k: np.zeros_like(v) for k, v in GRADS.items()}
    for grads, out in zip(grads_seq, outs):
        clipped = REFERENCES[option](grads, c)
        trace = {k: decay * trace[k] + clipped[k] for k in trace}
        for key in trace:
            np.testing.assert_allclose(out[key], -lr * trace[key], rtol=1e-6, atol=1e-7)
    assert f"{CLIPPER_NAMES[option]}/clipped" in oc.stats(state)


@pytest.mark.parametrize("option", sorted(REFERENCES))
def test_result_passes_check_order_and_has_clipper_first(option):
    tx = oc.clipped(optax.adam(1e-3), **{option: 1.0})
    stages = oc.check_order(tx, jax.tree.map(jnp.asarray, GRADS))
    assert [s.kind for s in stages][:2] == ["clipper", "moment"]


def test_all_none_returns_tx_itself():
    base = optax.adam(1e-3)
    assert oc.clipped(base) is base
    assert oc.clipped(base, clipnorm=None, clipvalue=None, global_clipnorm=None) is base


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clipnorm": 1.0, "clipvalue": 0.5},
        {"clipnorm": 1.0, "global_clipnorm": 2.0},
        {"clipvalue": 0.0, "global_clipnorm": 2.0},  # Keras counts a 0 as set too
        {"clipnorm": 1.0, "clipvalue": 0.5, "global_clipnorm": 2.0},
    ],
)
def test_more_than_one_option_raises_naming_them(kwargs):
    with pytest.raises(ValueError, match="Only one of") as info:
        oc.clipped(optax.sgd(0.1), **kwargs)
    for name, value in kwargs.items():
        assert f"{name}={value!r}" in str(info.value)
    for name in {"clipnorm", "clipvalue", "global_clipnorm"} - set(kwargs):
        assert not re.search(rf"(?<!\w){name}=", str(info.value))


@pytest.mark.parametrize("option", sorted(REFERENCES))
@pytest.mark.parametrize("zero", [0, 0.0, np.float32(0.0)])
def test_zero_turns_clipping_off_like_keras(option, zero):
    base = optax.sgd(1.0)
    assert oc.clipped(base, **{option: zero}) is base
    # A message that keeps to that meaning of 0.
    with pytest.raises(ValueError, match=r"0 turns clipping off"):
        oc.clipped(base, **{option: -1.0})


@pytest.mark.parametrize("option", sorted(REFERENCES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_jax_array_or_injected_zero_turns_clipping_off_too(option, jit):
    """A jax array may be traced, so its 0 cannot return tx itself: the clipper is
    always built and reads 0 as "off". Before, under optax.inject_hyperparams an
    injected 0 crashed under jit (init had returned tx's own state), and a value
    moved from 1.0 to 0.0 zeroed every gradient under jit while eager clipped none.
    """
    grads = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([12.0])}
    raw, _ = optax.sgd(1.0).update(grads, optax.sgd(1.0).init(grads))
    tx = oc.clipped(optax.sgd(1.0), **{option: jnp.zeros([])})
    out, _ = tx.update(grads, tx.init(grads))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out, raw))
    injected = optax.inject_hyperparams(oc.clipped, static_args=())(
        optax.sgd(1.0), **{option: 1.0})
    update = jax.jit(injected.update) if jit else injected.update
    state = injected.init(grads)
    clipped_out, state = update(grads, state)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), clipped_out, raw))
    state.hyperparams[option] = jnp.zeros([])
    out, state = update(grads, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out, raw)), out
    start_at_zero = optax.inject_hyperparams(oc.clipped)(optax.sgd(1.0), **{option: 0.0})
    update = jax.jit(start_at_zero.update) if jit else start_at_zero.update
    out, _ = update(grads, start_at_zero.init(grads))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out, raw)), out


@pytest.mark.parametrize("option", sorted(REFERENCES))
@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan"), jnp.array(-2.0)])
def test_negative_or_nan_raises_naming_the_option(option, bad):
    with pytest.raises(ValueError, match=f"{option} must be >= 0"):
        oc.clipped(optax.sgd(0.1), **{option: bad})


@pytest.mark.parametrize("option", sorted(REFERENCES))
def test_inf_never_clips(option):
    tx = oc.clipped(optax.sgd(1.0), **{option: float("inf")})
    huge = {"a": jnp.array([3e30, -4e30]), "b": jnp.array([[1e30, 0.0], [2.0, -5e29]])}
    (out,), _ = _run(tx, [huge], jit=False)
    for key in huge:
        np.testing.assert_array_equal(out[key], -huge[key])


def test_traced_value_is_passed_to_the_clipper_and_clamped():
    params = {"a": jnp.zeros(2)}
    grads = {"a": jnp.array([3.0, 4.0])}

    @jax.jit
    def step(threshold):
        tx = oc.clipped(optax.sgd(1.0), global_clipnorm=threshold)
        return tx.update(grads, tx.init(params), params)[0]["a"]

    np.testing.assert_allclose(step(jnp.float32(1.0)), [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_array_equal(step(jnp.float32(-1.0)), [0.0, 0.0])


def test_schedule_is_passed_to_the_clipper():
    tx = oc.clipped(optax.sgd(1.0), clipvalue=optax.linear_schedule(1.0, 3.0, 2))
    big = {"a": np.array([10.0, -10.0])}
    outs, _ = _run(tx, [big, big, big], jit=False)
    assert [float(out["a"][1]) for out in outs] == [1.0, 2.0, 3.0]


def test_not_a_transformation_raises_type_error():
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        oc.clipped(1e-3, clipnorm=1.0)


@pytest.mark.parity
@pytest.mark.parametrize("option", sorted(REFERENCES))
def test_keras_treats_zero_and_negative_as_off(option):
    """What ``clipped`` follows (0 is off) and where it deviates (negative raises)."""
    keras = pytest.importorskip("keras")
    for value in (0.0, -1.0):
        variable = keras.Variable(np.zeros(2, np.float32))
        keras.optimizers.SGD(learning_rate=1.0, **{option: value}).apply(
            [np.array([3.0, 4.0], np.float32)], [variable])
        np.testing.assert_array_equal(np.asarray(variable), [-3.0, -4.0])  # not clipped
    base = optax.sgd(1.0)
    assert oc.clipped(base, **{option: 0.0}) is base
    with pytest.raises(ValueError, match=option):
        oc.clipped(base, **{option: -1.0})
