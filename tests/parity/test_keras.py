"""Parity with the real Keras 3 optimizers' ``clipnorm``, ``clipvalue`` and ``global_clipnorm``.

Keras runs on its JAX backend (set by the repository ``conftest.py``) next to
optaxclip, on identical initial weights of a small Dense model and an identical
gradient sequence. The gradients are scaled step by step so that each clipper
clips on some steps and not on others (asserted from ``optaxclip.stats``).
Keras is driven with ``optimizer.stateless_apply``, the path its own JAX
trainer takes, and the parameter trajectories are compared after every step.

Keras ``Adam`` adds epsilon to ``sqrt(v)`` before bias correction ("epsilon
hat"); ``optax.adam`` adds it after. The two agree exactly once optax's eps is
the schedule ``eps / sqrt(1 - beta_2**t)``; the tests show that and that the
gap to plain ``optax.adam`` is the epsilon alone.
"""

from __future__ import annotations

import functools
import math

import pytest
from _parity import clip_once, require  # noqa: E402

keras = require("keras")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optaxclip as oc  # noqa: E402

if keras.backend.backend() != "jax":
    raise RuntimeError(
        f"Keras runs on the {keras.backend.backend()!r} backend; the parity tests need "
        "KERAS_BACKEND=jax set before keras is first imported (the repository conftest.py "
        "does this)."
    )

pytestmark = pytest.mark.parity

STEPS = 24
THRESHOLDS = {"clipnorm": 1.0, "clipvalue": 0.5, "global_clipnorm": 2.0}
CLIPPERS = {
    "clipnorm": oc.clip_by_norm,
    "clipvalue": oc.clip_by_value,
    "global_clipnorm": oc.clip_by_global_norm,
}
STATS_KEY = {
    "clipnorm": "clip_by_norm",
    "clipvalue": "clip_by_value",
    "global_clipnorm": "clip_by_global_norm",
}
LEARNING_RATE = {"sgd": 0.05, "momentum": 0.05, "adam": 0.01}
KERAS_ADAM_EPSILON = 1e-7  # the Keras default
# float32 trajectories of 24 steps. Plain SGD with clipnorm/clipvalue is bit-identical to
# Keras; the largest gap seen (Adam, rounding in the moment updates) is 1/5 of this.
RTOL, ATOL = 2e-5, 2e-6


# ----------------------------------------------------------------------------- fixtures


@functools.cache
def _model_and_weights():
    """A two-layer Dense model: kernels (6, 5) and (5, 3), biases (5,) and (3,)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, bias_initializer="random_normal"),
            keras.layers.Dense(3, bias_initializer="random_normal"),
        ]
    )
    weights = tuple(np.asarray(v.value) for v in model.trainable_variables)
    assert [w.shape for w in weights] == [(6, 5), (5,), (5, 3), (3,)]
    return model, weights


def _names():
    return ["dense0/kernel", "dense0/bias", "dense1/kernel", "dense1/bias"]


@functools.cache
def _gradient_sequence():
    """Per-leaf norms spread over [~0.05, ~15] so thresholds are crossed both ways."""
    _, weights = _model_and_weights()
    rng = np.random.default_rng(1)
    step_scales = rng.permutation(np.geomspace(0.05, 8.0, STEPS))
    sequence = []
    for scale in step_scales:
        grads = []
        for w in weights:
            leaf_factor = rng.uniform(0.4, 2.0)
            direction = rng.normal(size=w.shape) / math.sqrt(w.size)
            grads.append((direction * scale * leaf_factor).astype(np.float32))
        sequence.append(tuple(grads))
    return tuple(sequence)


def _keras_optimizer(kind: str, clip: dict, epsilon: float = KERAS_ADAM_EPSILON):
    lr = LEARNING_RATE[kind]
    if kind == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, **clip)
    if kind == "momentum":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, **clip)
    return keras.optimizers.Adam(learning_rate=lr, epsilon=epsilon, **clip)


def keras_adam_in_optax(learning_rate: float, b1=0.9, b2=0.999, eps=KERAS_ADAM_EPSILON):
    """optax Adam with Keras's epsilon placement.

    Keras: ``p -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``, which is
    ``lr * m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2**t))``: optax.adam with its eps
    replaced by ``eps / sqrt(1 - b2**t)`` (``t = count + 1``).
    """
    eps_schedule = lambda count: eps / jnp.sqrt(1.0 - b2 ** (count + 1.0))
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps_schedule
    )


def _optax_optimizer(kind: str, epsilon: float = KERAS_ADAM_EPSILON):
    lr = LEARNING_RATE[kind]
    if kind == "sgd":
        return optax.sgd(lr)
    if kind == "momentum":
        return optax.sgd(lr, momentum=0.9)
    return keras_adam_in_optax(lr, eps=epsilon)


@functools.cache
def _keras_trajectory(kind: str, clip_name: str | None, epsilon: float = KERAS_ADAM_EPSILON):
    """Parameters after each step, from Keras's own optimizer."""
    model, weights = _model_and_weights()
    clip = {} if clip_name is None else {clip_name: THRESHOLDS[clip_name]}
    optimizer = _keras_optimizer(kind, clip, epsilon)
    optimizer.build(model.trainable_variables)
    step = jax.jit(optimizer.stateless_apply)
    optimizer_values = [v.value for v in optimizer.variables]
    params = [jnp.asarray(w) for w in weights]
    trajectory = []
    for grads in _gradient_sequence():
        params, optimizer_values = step(
            optimizer_values, [jnp.asarray(g) for g in grads], params
        )
        trajectory.append([np.asarray(p) for p in params])
    return trajectory


def _optax_trajectory(tx: optax.GradientTransformation, *, jit: bool = True, steps=STEPS):
    """Parameters and ``optaxclip.stats`` after each of the first ``steps`` steps of ``tx``."""
    _, weights = _model_and_weights()
    params = dict(zip(_names(), map(jnp.asarray, weights)))
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, oc.stats(state)

    step = jax.jit(step) if jit else step
    trajectory, stats = [], []
    for grads in _gradient_sequence()[:steps]:
        params, state, step_stats = step(params, state, dict(zip(_names(), grads)))
        trajectory.append([np.asarray(params[name]) for name in _names()])
        stats.append({k: np.asarray(v) for k, v in step_stats.items()})
    return trajectory, stats


def _max_gap(a, b) -> float:
    return max(
        float(np.max(np.abs(x - y) / (ATOL + RTOL * np.abs(y))))
        for step_a, step_b in zip(a, b)
        for x, y in zip(step_a, step_b)
    )


def _assert_trajectories_close(ours, theirs, what: str):
    for t, (step_ours, step_theirs) in enumerate(zip(ours, theirs)):
        for name, x, y in zip(_names(), step_ours, step_theirs):
            np.testing.assert_allclose(
                x, y, rtol=RTOL, atol=ATOL, err_msg=f"{what}: step {t + 1}, {name}"
            )


def _numpy_pre_clip_norms(clip_name: str):
    """float64 reference of what each clipper measures, per step."""
    out = []
    for grads in _gradient_sequence():
        g64 = [g.astype(np.float64) for g in grads]
        if clip_name == "clipnorm":
            out.append([np.sqrt(np.sum(g**2)) for g in g64])
        elif clip_name == "clipvalue":
            out.append([max(np.max(np.abs(g)) for g in g64)])
        else:
            out.append([np.sqrt(sum(np.sum(g**2) for g in g64))])
    return out


# ------------------------------------------------------------------ trajectory parity


@pytest.mark.parametrize("clip_name", list(THRESHOLDS))
@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("construction", ["chain", "clipped"])
def test_trajectory_matches_keras(kind, clip_name, construction):
    threshold = THRESHOLDS[clip_name]
    if construction == "chain":
        tx = optax.chain(CLIPPERS[clip_name](threshold), _optax_optimizer(kind))
    else:
        tx = oc.clipped(_optax_optimizer(kind), **{clip_name: threshold})
    ours, stats = _optax_trajectory(tx)
    theirs = _keras_trajectory(kind, clip_name)

    # Clipping fires on some steps and not on others, and the stats measured the
    # same pre-clip norms as a float64 reference.
    prefix = STATS_KEY[clip_name]
    clipped = np.array([bool(s[f"{prefix}/clipped"]) for s in stats])
    assert 3 <= clipped.sum() <= STEPS - 3, clipped
    reference = _numpy_pre_clip_norms(clip_name)
    for step_stats, ref in zip(stats, reference):
        np.testing.assert_allclose(step_stats[f"{prefix}/norm"], max(ref), rtol=1e-6)
        assert bool(step_stats[f"{prefix}/clipped"]) == (max(ref) > threshold)
    if clip_name == "clipnorm":
        # Per variable: some steps clip some kernels/biases and leave the others.
        fractions = np.array([float(s[f"{prefix}/clipped_fraction"]) for s in stats])
        assert np.any((fractions > 0) & (fractions < 1)), fractions

    _assert_trajectories_close(ours, theirs, f"{construction} vs Keras {kind} {clip_name}")
    # The comparison is sharp: the unclipped Keras run is far outside the tolerance.
    assert _max_gap(ours, _keras_trajectory(kind, None)) > 100


def test_trajectory_matches_keras_eagerly():
    """The same parity without jit (first 8 steps), for momentum and the global clipper."""
    tx = optax.chain(
        oc.clip_by_global_norm(THRESHOLDS["global_clipnorm"]),
        optax.sgd(LEARNING_RATE["momentum"], momentum=0.9),
    )
    ours, stats = _optax_trajectory(tx, jit=False, steps=8)
    assert len({bool(s["clip_by_global_norm/clipped"]) for s in stats}) == 2
    theirs = _keras_trajectory("momentum", "global_clipnorm")[:8]
    _assert_trajectories_close(ours, theirs, "eager")


def test_keras_clipnorm_is_per_variable_not_global():
    """Keras clipnorm is optaxclip.clip_by_norm; clip_by_global_norm would not match."""
    tx = optax.chain(oc.clip_by_global_norm(THRESHOLDS["clipnorm"]), optax.sgd(0.05))
    ours, _ = _optax_trajectory(tx)
    assert _max_gap(ours, _keras_trajectory("sgd", "clipnorm")) > 100


def test_keras_momentum_rule_is_optax_trace():
    """Keras ``m = mu*m - lr*g; p += m`` equals optax ``trace = g + mu*trace; p -= lr*trace``."""
    ours, _ = _optax_trajectory(optax.sgd(LEARNING_RATE["momentum"], momentum=0.9))
    _assert_trajectories_close(ours, _keras_trajectory("momentum", None), "momentum, no clip")


# ------------------------------------------------------------------------ Adam epsilon


def test_adam_epsilon_gap_is_only_the_epsilon():
    """Keras Adam == optax.adam with eps / sqrt(1 - b2**t); plain optax.adam differs by eps."""
    lr = LEARNING_RATE["adam"]
    clip = oc.clip_by_global_norm(THRESHOLDS["global_clipnorm"])
    large_eps = 1e-3  # large enough that the placement matters visibly
    keras_large = _keras_trajectory("adam", "global_clipnorm", large_eps)

    matched, _ = _optax_trajectory(optax.chain(clip, keras_adam_in_optax(lr, eps=large_eps)))
    _assert_trajectories_close(matched, keras_large, "Keras-placed epsilon")

    plain, _ = _optax_trajectory(optax.chain(clip, optax.adam(lr, eps=large_eps)))
    assert _max_gap(plain, keras_large) > 10
    # Even Keras's default epsilon (1e-7) moves plain optax.adam outside float32 parity.
    plain_default, _ = _optax_trajectory(optax.chain(clip, optax.adam(lr, eps=KERAS_ADAM_EPSILON)))
    assert _max_gap(plain_default, _keras_trajectory("adam", "global_clipnorm")) > 5

    # With a negligible epsilon the placement no longer matters: plain optax.adam
    # reproduces Keras Adam, so the epsilon was the whole difference.
    tiny_eps = 1e-12
    plain_tiny, _ = _optax_trajectory(optax.chain(clip, optax.adam(lr, eps=tiny_eps)))
    _assert_trajectories_close(
        plain_tiny, _keras_trajectory("adam", "global_clipnorm", tiny_eps), "tiny epsilon"
    )


# ------------------------------------------------------- one step: edge cases, non-finite


_KERAS_CLIP_CACHE: dict = {}


def keras_clip(grads, **clip):
    """Keras's clipped gradients, read back exactly through SGD(lr=1) from zero weights."""
    key = (tuple((g.shape, g.tobytes()) for g in grads), tuple(sorted(clip.items())))
    if key not in _KERAS_CLIP_CACHE:
        optimizer = keras.optimizers.SGD(learning_rate=1.0, **clip)
        variables = [keras.Variable(np.zeros_like(g)) for g in grads]
        optimizer.build(variables)
        new_params, _ = optimizer.stateless_apply(
            [v.value for v in optimizer.variables],
            [jnp.asarray(g) for g in grads],
            [v.value for v in variables],
        )
        _KERAS_CLIP_CACHE[key] = [-np.asarray(p) for p in new_params]
    return [x.copy() for x in _KERAS_CLIP_CACHE[key]]


@functools.cache
def _jitted_clipper(clip_name: str):
    """One compiled clipper per kind; the threshold is a traced argument."""

    def apply(grads, threshold):
        tx = CLIPPERS[clip_name](threshold)
        out, state = tx.update(grads, tx.init(grads))
        return out, oc.stats(state)

    return jax.jit(apply)


def optaxclip_keras_clip(clip_name: str, threshold: float, grads, *, jit: bool):
    """The optaxclip clipper matching Keras ``clip_name``: jitted with a traced
    threshold, or eagerly with a static one."""
    if not jit:
        return clip_once(CLIPPERS[clip_name](threshold), grads, jit=False)
    out, stats = _jitted_clipper(clip_name)(
        [jnp.asarray(g) for g in grads], jnp.float32(threshold)
    )
    return [np.asarray(g) for g in out], {k: np.asarray(v) for k, v in stats.items()}


def _special_grads(bad: float):
    return [
        np.array([[1.0, bad], [2.0, -3.0]], np.float32),
        np.array([3.0, 4.0], np.float32),
        np.array([0.1, -0.2, 0.3], np.float32),
    ]


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_global_clipnorm_matches_keras(bad, jit):
    """Both turn every entry NaN: a non-finite global norm signals an error."""
    grads = _special_grads(bad)
    theirs = keras_clip(grads, global_clipnorm=1.0)
    ours, stats = optaxclip_keras_clip("global_clipnorm", 1.0, grads, jit=jit)
    for x, y in zip(ours, theirs):
        assert np.all(np.isnan(x)) and np.all(np.isnan(y))
    norm = stats["clip_by_global_norm/norm"]
    assert np.isnan(norm) if math.isnan(bad) else norm == math.inf
    assert np.isnan(stats["clip_by_global_norm/scale"])


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_clipvalue_matches_keras(bad, jit):
    """inf -> +-clipvalue, NaN stays NaN, everything else clipped: identical."""
    grads = _special_grads(bad)
    theirs = keras_clip(grads, clipvalue=1.5)
    ours, stats = optaxclip_keras_clip("clipvalue", 1.5, grads, jit=jit)
    for x, y in zip(ours, theirs):
        np.testing.assert_array_equal(x, y)
    assert np.isnan(stats["clip_by_value/norm"]) == math.isnan(bad)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_clipnorm_against_keras(bad, jit):
    """Per variable; only the non-finite variable differs, and only for +-inf.

    Keras computes ``g * c / max(||g||, c)``: for an inf entry the finite entries of
    that variable become 0 and the inf entries NaN. optaxclip makes the whole
    variable NaN (its documented policy: finite entries are never silently zeroed).
    For NaN both give an all-NaN variable. Other variables are clipped as usual.
    """
    grads = _special_grads(bad)
    theirs = keras_clip(grads, clipnorm=1.0)
    ours, stats = optaxclip_keras_clip("clipnorm", 1.0, grads, jit=jit)
    assert np.all(np.isnan(ours[0]))
    if math.isnan(bad):
        assert np.all(np.isnan(theirs[0]))
    else:
        expected_keras = np.array([[0.0, math.nan], [0.0, 0.0]], np.float32)
        np.testing.assert_array_equal(theirs[0], expected_keras)
    for x, y in zip(ours[1:], theirs[1:]):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    np.testing.assert_allclose(ours[1], [0.6, 0.8], rtol=1e-6)
    assert not np.isfinite(stats["clip_by_norm/norm"])


@pytest.mark.parametrize("clip_name", list(THRESHOLDS))
def test_zero_threshold_turns_clipping_off_as_in_keras(clip_name):
    """Keras treats 0 (like None) as "no clipping", and so does ``optaxclip.clipped``;
    the clippers themselves read a threshold 0 literally and give zeros."""
    grads = _special_grads(5.0)
    theirs = keras_clip(grads, **{clip_name: 0.0})
    tx = oc.clipped(optax.sgd(1.0), **{clip_name: 0.0})
    ours, _ = clip_once(tx, grads, jit=True)
    for x, y, g in zip(ours, theirs, grads):
        np.testing.assert_array_equal(y, g)
        np.testing.assert_array_equal(-x, g)
    zeroed, _ = optaxclip_keras_clip(clip_name, 0.0, grads, jit=True)
    for x in zeroed:
        np.testing.assert_array_equal(x, np.zeros_like(x))


@pytest.mark.parametrize("clip_name", list(THRESHOLDS))
def test_negative_threshold_keras_ignores_optaxclip_rejects(clip_name):
    """Keras silently turns clipping off for a negative value; ``clipped`` raises."""
    grads = _special_grads(5.0)
    for x, g in zip(keras_clip(grads, **{clip_name: -1.0}), grads):
        np.testing.assert_array_equal(x, g)
    with pytest.raises(ValueError, match=clip_name):
        oc.clipped(optax.sgd(1.0), **{clip_name: -1.0})


@pytest.mark.parametrize("clip_name", ["clipnorm", "global_clipnorm"])
def test_below_threshold_optaxclip_is_bit_identical_keras_within_an_ulp(clip_name):
    """Below the threshold Keras still multiplies (``g * c / c``, ``g * (c * (1/c))``),
    which moves entries by an ulp for some ``c``; optaxclip returns them untouched."""
    grads = [np.linspace(-0.01, 0.02, 50, dtype=np.float32)]  # norm ~0.08
    threshold = float(np.float32(0.11485743))  # a c whose c * (1/c) rounds below 1
    theirs = keras_clip(grads, **{clip_name: threshold})
    ours, stats = optaxclip_keras_clip(clip_name, threshold, grads, jit=True)
    np.testing.assert_array_equal(ours[0], grads[0])
    assert not stats[f"{STATS_KEY[clip_name]}/clipped"]
    assert np.any(theirs[0] != grads[0])
    ulp = np.spacing(np.abs(grads[0]))
    assert np.all(np.abs(theirs[0] - grads[0]) <= ulp)


def test_one_clip_argument_only_in_both():
    """Keras rejects combinations, and ``clipped`` does too (chain clippers instead)."""
    with pytest.raises(ValueError, match="Only one of"):
        keras.optimizers.SGD(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="Only one of"):
        oc.clipped(optax.sgd(1.0), clipnorm=1.0, clipvalue=1.0)
