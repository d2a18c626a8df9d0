"""Ordering and norm-bound invariants: check_order, assert_moments_bounded, checked."""

import math
import re
import warnings
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import optaxclip as oc
from optaxclip import _spec

PARAMS = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}

# Every optimizer family whose moments must only see clipped gradients.
FAMILIES = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "nadam": lambda: optax.nadam(1e-3),
    "lion": lambda: optax.lion(1e-4),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "rmsprop_centered_momentum": lambda: optax.rmsprop(1e-3, centered=True, momentum=0.9),
    "amsgrad": lambda: optax.amsgrad(1e-3),
    "adabelief": lambda: optax.adabelief(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "adafactor_factored": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=2),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "trace": lambda: optax.trace(0.5),
    "ema": lambda: optax.ema(0.9),
    "adagrad": lambda: optax.adagrad(0.1),
}
MOMENT_NAMES = {
    "adam": "scale_by_adam", "adamw": "scale_by_adam", "nadam": "scale_by_adam",
    "lion": "scale_by_lion", "rmsprop": "scale_by_rms",
    "rmsprop_centered_momentum": "scale_by_stddev", "amsgrad": "scale_by_amsgrad",
    "adabelief": "scale_by_belief", "adafactor": "scale_by_factored_rms",
    "adafactor_factored": "scale_by_factored_rms",
    "sgd_momentum": "trace", "sgd_nesterov": "trace", "trace": "trace", "ema": "ema",
    "adagrad": "scale_by_rss",
}
CLIPPERS = {
    "oc.clip_by_global_norm": (lambda: oc.clip_by_global_norm(1.0), "clip_by_global_norm"),
    "optax.clip_by_global_norm": (lambda: optax.clip_by_global_norm(1.0), "clip_by_global_norm"),
}


# ------------------------------------------------------------------ check_order


@pytest.mark.parametrize("clipper", sorted(CLIPPERS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_check_order_every_family_right_and_wrong(family, clipper):
    make_clip, clip_name = CLIPPERS[clipper]
    stages = oc.check_order(optax.chain(make_clip(), FAMILIES[family]()), PARAMS)
    kinds = [s.kind for s in stages]
    assert kinds[0] == "clipper" and "moment" in kinds
    with pytest.raises(oc.OrderingError) as info:
        oc.check_order(optax.chain(FAMILIES[family](), make_clip()), PARAMS)
    message = str(info.value)
    assert message.startswith(f"{clip_name} (chain[1]) runs after {MOMENT_NAMES[family]}")
    assert f"Fix: put {clip_name} before {MOMENT_NAMES[family]}" in message


def test_ordering_error_is_a_value_error():
    assert issubclass(oc.OrderingError, ValueError)


@pytest.mark.parametrize(
    "clip",
    [lambda: optax.clip(1.0), lambda: optax.clip_by_block_rms(1.0),
     lambda: optax.adaptive_grad_clip(0.1), lambda: oc.clip_by_value(1.0),
     lambda: oc.clip_by_norm(1.0), lambda: oc.clip_by_block_rms(1.0),
     lambda: oc.autoclip(), lambda: oc.zclip(), lambda: oc.adaptive_grad_clip(0.1)],
)
def test_check_order_knows_every_clipper(clip):
    oc.check_order(optax.chain(clip(), optax.adam(1e-3)), PARAMS)
    with pytest.raises(oc.OrderingError, match="runs after scale_by_adam"):
        oc.check_order(optax.chain(optax.adam(1e-3), clip()), PARAMS)


def _wrong():
    return optax.chain(optax.sgd(0.1, momentum=0.9), oc.clip_by_global_norm(1.0))


def _right():
    return optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


WRAPPERS = {
    "nested chain": (
        lambda t: optax.chain(optax.identity(), optax.chain(t)), "chain[1] > chain[0]"),
    "named_chain": (lambda t: optax.named_chain(("opt", t)), "named_chain['opt']"),
    "masked": (lambda t: optax.masked(t, {"w": True, "b": True}), "masked"),
    "multi_transform": (
        lambda t: optax.multi_transform({"x": t, "y": optax.sgd(0.1)}, {"w": "x", "b": "y"}),
        "partition['x']",
    ),
    "MultiSteps": (lambda t: optax.MultiSteps(t, 2), "MultiSteps"),
    "MultiSteps.gradient_transformation": (
        lambda t: optax.MultiSteps(t, 2).gradient_transformation(), "MultiSteps"),
    "apply_if_finite": (lambda t: optax.apply_if_finite(t, 3), "apply_if_finite"),
    "skip_nonfinite": (lambda t: oc.skip_nonfinite(t), "skip_nonfinite"),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_check_order_looks_inside_wrappers(wrapper):
    wrap, where = WRAPPERS[wrapper]
    stages = oc.check_order(wrap(_right()), PARAMS)
    assert any(s.kind == "clipper" and where in s.location for s in stages)
    with pytest.raises(oc.OrderingError, match=f"clip_by_global_norm \\(.*{re.escape(where)}"):
        oc.check_order(wrap(_wrong()), PARAMS)


def test_check_order_looks_inside_inject_hyperparams():
    factory = lambda learning_rate, max_norm: optax.chain(
        optax.adam(learning_rate), oc.clip_by_global_norm(max_norm))
    with pytest.raises(oc.OrderingError, match="inject_hyperparams > chain\\[1\\]"):
        oc.check_order(optax.inject_hyperparams(factory)(1e-3, 1.0), PARAMS)
    good = optax.inject_hyperparams(lambda learning_rate: oc.clipped(
        optax.adam(learning_rate), global_clipnorm=1.0))(optax.linear_schedule(1e-3, 0.0, 10))
    kinds = [s.kind for s in oc.check_order(good, PARAMS)]
    assert kinds[:2] == ["clipper", "moment"]


def test_masks_decide_whether_clip_and_moment_meet():
    adam_on_w = optax.masked(optax.adam(1e-3), {"w": True, "b": False})
    clip_on_b = optax.masked(oc.clip_by_global_norm(1.0), {"w": False, "b": True})
    oc.check_order(optax.chain(adam_on_w, clip_on_b), PARAMS)  # disjoint: no conflict
    with pytest.raises(oc.OrderingError):
        oc.check_order(optax.chain(adam_on_w, oc.clip_by_global_norm(1.0)), PARAMS)
    per_label = optax.multi_transform(
        {"x": optax.adam(1e-3), "y": oc.clip_by_value(1.0)}, {"w": "x", "b": "y"})
    oc.check_order(per_label, PARAMS)
    with pytest.raises(oc.OrderingError, match="partition\\['y'\\]"):
        oc.check_order(optax.multi_transform(
            {"x": optax.sgd(1.0), "y": optax.chain(optax.adam(1.0), oc.clip_by_value(1.0))},
            {"w": "x", "b": "y"}), PARAMS)


def test_adafactor_update_clipping_is_by_design():
    stages = oc.check_order(optax.adafactor(1e-2, momentum=0.9), PARAMS)
    exempt = [s for s in stages if s.name == "clip_by_block_rms"]
    assert exempt and exempt[0].kind == "update_clipper" and "adafactor" in exempt[0].note
    # ... but a block-RMS clip of the gradient after Adam is still flagged.
    with pytest.raises(oc.OrderingError):
        oc.check_order(optax.chain(optax.adam(1e-3), optax.clip_by_block_rms(1.0)), PARAMS)


def test_no_clipper_passes():
    stages = oc.check_order(optax.adam(1e-3), PARAMS)
    assert [s.kind for s in stages] == ["moment", "other"]


def test_check_order_never_runs_the_update():
    adam = optax.adam(1e-3)

    def update(updates, state, params=None):
        raise AssertionError("update must not run")

    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.GradientTransformation(adam.init, update))
    assert [s.kind for s in oc.check_order(tx, PARAMS)] == ["clipper", "moment"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    assert len(oc.check_order(tx, abstract)) == 2


def _custom(init):
    return optax.GradientTransformation(init, lambda u, s, params=None: (u, s))


def test_unknown_transformations_are_reported_not_passed():
    counter = _custom(lambda params: (jnp.zeros([]),))  # opaque state
    pattern = "(?s)cannot see into.*_custom .*may accumulate moments"
    with pytest.raises(oc.OrderingError, match=pattern):
        oc.check_order(optax.chain(counter, oc.clip_by_global_norm(1.0)), PARAMS)
    with pytest.raises(oc.OrderingError, match="may be a clipper running after scale_by_adam"):
        oc.check_order(optax.chain(optax.adam(1e-3), counter), PARAMS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        oc.check_order(optax.chain(optax.adam(1e-3), counter), PARAMS, on_unknown="warn")
    assert any("cannot see into" in str(w.message) for w in caught)
    oc.check_order(optax.chain(optax.adam(1e-3), counter), PARAMS, on_unknown="ignore")
    # Where an unknown part cannot hide a wrong order, there is nothing to report.
    oc.check_order(optax.chain(oc.clip_by_global_norm(1.0), counter, optax.sgd(0.1)), PARAMS)


def test_param_shaped_custom_state_counts_as_a_moment():
    momentum = _custom(lambda params: {"m": jax.tree.map(jnp.zeros_like, params)})
    with pytest.raises(oc.OrderingError, match="runs after _custom"):
        oc.check_order(optax.chain(momentum, oc.clip_by_norm(1.0)), PARAMS)


def test_opaque_combinator_is_reported():
    def opaque(inner):  # a user's own combinator: check_order cannot know what it does
        def update(updates, state, params=None):
            return inner.update(updates, state, params)

        return optax.GradientTransformation(inner.init, update)

    inner = optax.chain(optax.adam(1e-3), oc.clip_by_value(1.0))
    with pytest.raises(oc.OrderingError, match="(?s)it wraps 1 inner transformation.*hidden"):
        oc.check_order(optax.chain(oc.clip_by_global_norm(1.0), opaque(inner)), PARAMS)


def test_lookahead_and_schedule_free_are_read():
    inner = optax.chain(optax.adam(1e-3), oc.clip_by_value(1.0))
    with pytest.raises(oc.OrderingError, match="runs after scale_by_adam \\(lookahead"):
        oc.check_order(optax.lookahead(inner, 5, 0.5), PARAMS)
    good = optax.chain(oc.clip_by_global_norm(1.0), optax.contrib.schedule_free_adamw(1e-3))
    kinds = [s.kind for s in oc.check_order(good, PARAMS)]
    assert kinds[0] == "clipper" and "moment" in kinds and "unknown" not in kinds
    with pytest.raises(oc.OrderingError):
        oc.check_order(optax.chain(optax.contrib.schedule_free_adamw(1e-3),
                                   oc.clip_by_global_norm(1.0)), PARAMS)


def test_mask_function_that_needs_values_is_still_read():
    def concrete_mask(params):
        return {"w": bool(np.all(np.asarray(params["w"]) == 0)), "b": False}  # needs values

    tx = optax.chain(optax.masked(optax.adam(1e-3), concrete_mask), oc.clip_by_value(1.0))
    with pytest.raises(oc.OrderingError, match="runs after scale_by_adam \\(chain\\[0\\] > masked"):
        oc.check_order(tx, PARAMS)


def test_combinator_with_unexpected_layout_is_reported():
    def update_fn(updates, state, params=None):
        return updates, state

    update_fn.__qualname__ = "chain.<locals>.update_fn"  # looks like chain, is not
    update_fn.__module__ = "optax.transforms._combining"
    odd = optax.GradientTransformation(lambda params: (), update_fn)
    with pytest.raises(oc.OrderingError, match="(?s)chain.*could not be read.*KeyError"):
        oc.check_order(optax.chain(optax.adam(1e-3), odd), PARAMS)


def test_check_order_bad_arguments():
    with pytest.raises(ValueError, match="on_unknown"):
        oc.check_order(optax.adam(1e-3), PARAMS, on_unknown="skip")
    with pytest.raises(TypeError, match="GradientTransformation"):
        oc.check_order(optax.adam, PARAMS)


# ------------------------------------------------------- assert_moments_bounded


@pytest.mark.parametrize(
    "family, clipper",
    [(family, "oc.clip_by_global_norm") for family in sorted(FAMILIES)]
    + [(family, "optax.clip_by_global_norm") for family in ("adam", "sgd_momentum", "rmsprop")],
)
def test_moments_bounded_every_family_right_and_wrong(family, clipper):
    make_clip, _ = CLIPPERS[clipper]
    right = optax.chain(make_clip(), FAMILIES[family]())
    ratios = oc.assert_moments_bounded(right, PARAMS, 1.0, steps=3, jit=False)
    assert ratios and max(ratios.values()) <= 1 + 1e-4
    assert any(MOMENT_NAMES[family] in key for key in ratios)
    wrong = optax.chain(FAMILIES[family](), make_clip())
    with pytest.raises(AssertionError, match="after step 1 of 3, above its bound"):
        oc.assert_moments_bounded(wrong, PARAMS, 1.0, steps=3, jit=False)


@pytest.mark.parametrize("jit", [False, True])
def test_moments_bounded_message_and_jit(jit):
    wrong = optax.chain(optax.adam(1e-3), oc.clip_by_global_norm(2.0))
    with pytest.raises(AssertionError) as info:
        oc.assert_moments_bounded(wrong, PARAMS, 2.0, steps=2, jit=jit)
    message = str(info.value)
    assert "ScaleByAdamState.mu at chain[0] > chain[0] > scale_by_adam has norm" in message
    assert "its bound 2 (max_norm=2.0" in message and "put the clipper before it" in message
    right = oc.clipped(optax.adam(1e-3), global_clipnorm=2.0)
    assert oc.assert_moments_bounded(right, PARAMS, 2.0, steps=2, jit=jit)


def test_momentum_bound_is_tight():
    # Repeated directions drive ||trace|| to c (1 + d): the derived bound, not a loose one.
    decay = 0.9
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.trace(decay))
    ratios = oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=2, jit=False)
    assert list(ratios.values()) == [pytest.approx(1.0, rel=1e-5)]
    # A clip ball 1% too small is caught.
    with pytest.raises(AssertionError, match="trace"):
        oc.assert_moments_bounded(tx, PARAMS, 0.99, steps=2, jit=False)


def test_downstream_accumulators_are_not_gradient_moments():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adafactor(1.0, momentum=0.9))
    ratios = oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=2, jit=False)
    assert list(ratios) == ["chain[1] > chain[0] > scale_by_factored_rms/v_row"]


def test_moments_bounded_inside_multisteps_and_masks():
    steps = optax.MultiSteps(oc.clipped(optax.adam(1e-3), global_clipnorm=1.0), 2)
    assert oc.assert_moments_bounded(steps, PARAMS, 1.0, steps=4, jit=True)
    masked = optax.chain(optax.masked(optax.adam(1e-3), {"w": True, "b": False}),
                         oc.clip_by_global_norm(1.0))
    with pytest.raises(AssertionError, match="masked"):
        oc.assert_moments_bounded(masked, PARAMS, 1.0, steps=2, jit=False)


def test_accumulators_without_a_known_bound_are_reported():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.novograd(1e-3))
    with pytest.warns(UserWarning, match="no bound for scale_by_novograd"):
        assert oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=1, jit=False) == {}


def test_moments_bounded_seed_and_bad_arguments():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.lion(1e-3))
    first = oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=2, seed=3, jit=False)
    assert first == oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=2, seed=3, jit=False)
    assert first != oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=2, seed=4, jit=False)
    for bad in (0.0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="max_norm"):
            oc.assert_moments_bounded(tx, PARAMS, bad)
    with pytest.raises(ValueError, match="steps"):
        oc.assert_moments_bounded(tx, PARAMS, 1.0, steps=0)


# ---------------------------------------------------------------------- checked


class BrokenState(NamedTuple):
    count: jax.Array
    stats: oc.ClipStats


# A clipper with a bug that make_clipper cannot have: it records what a global-norm
# clip would do but returns the gradients unchanged. Only private hooks can build
# one, which is the point: checked must still catch it.
BROKEN_SPEC = oc.ClipSpec("broken_clip", scope="global")
_spec.register_spec(BrokenState, BROKEN_SPEC)


BROKEN_MESSAGE = "broken_clip (output at all leaves has norm|recorded a scale it did not apply)"


def broken_clip(max_norm, *, record_scale=True):
    def init(params):
        return BrokenState(jnp.zeros([], jnp.int32),
                           oc.ClipStats(jnp.zeros([]), jnp.float32(max_norm), jnp.ones([])))

    def update(updates, state, params=None):
        norm = oc.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / norm) if record_scale else jnp.ones([])
        return updates, BrokenState(state.count + 1,
                                    oc.ClipStats(norm, jnp.float32(max_norm), scale))

    return optax.GradientTransformation(init, _spec.attach(update, BROKEN_SPEC))


BIG = {"w": jnp.full((3, 4), 5.0), "b": jnp.arange(4.0) * 10}
ALL_CLIPPERS = {
    "clip_by_value": lambda: oc.clip_by_value(1.0),
    "clip_by_norm": lambda: oc.clip_by_norm(1.0),
    "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
    "clip_by_global_norm_l1": lambda: oc.clip_by_global_norm(1.0, ord=1),
    "clip_by_block_rms": lambda: oc.clip_by_block_rms(1.0),
    "zclip": lambda: oc.zclip(),
    "adagc": lambda: oc.adagc(),
    "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.01),
}


@pytest.mark.parametrize("name", sorted(ALL_CLIPPERS))
def test_checked_passes_real_clippers_eager(name):
    tx = optax.chain(ALL_CLIPPERS[name](), optax.adam(1e-3))
    guarded = oc.checked(tx)
    params = jax.tree.map(jnp.ones_like, PARAMS)
    state, plain_state = guarded.init(params), tx.init(params)
    for scale in (100.0, 1e-3):  # clipped, then not
        grads = jax.tree.map(lambda g, s=scale: g * s, BIG)
        out, state = guarded.update(grads, state, params)
        expected, plain_state = tx.update(grads, plain_state, params)
        chex.assert_trees_all_equal(out, expected)  # the guard changes nothing
    chex.assert_trees_all_equal_structs(state, plain_state)


def test_checked_under_jit_with_chexify():
    tx = oc.checked(optax.chain(oc.clip_by_norm(1.0), optax.sgd(0.1, momentum=0.9)))
    update = chex.chexify(jax.jit(tx.update))
    state = tx.init(PARAMS)
    for _ in range(2):
        _, state = update(BIG, state, PARAMS)
    chex.block_until_chexify_assertions_complete()
    broken = oc.checked(optax.chain(broken_clip(1.0), optax.adam(1e-3)))
    update = chex.chexify(jax.jit(broken.update))
    with pytest.raises(Exception, match=BROKEN_MESSAGE):
        update(BIG, broken.init(PARAMS), PARAMS)
        chex.block_until_chexify_assertions_complete()


def test_checked_catches_a_clipper_that_does_not_clip():
    broken = oc.checked(optax.chain(broken_clip(1.0), optax.adam(1e-3)))
    with pytest.raises(Exception, match=BROKEN_MESSAGE):
        broken.update(BIG, broken.init(PARAMS), PARAMS)
    error, _ = checkify.checkify(jax.jit(broken.update))(BIG, broken.init(PARAMS), PARAMS)
    assert "did not clip" in error.get()
    # Below the threshold nothing needs clipping, so the broken clipper is not caught.
    small = jax.tree.map(lambda g: g * 1e-4, BIG)
    error, _ = checkify.checkify(jax.jit(broken.update))(small, broken.init(PARAMS), PARAMS)
    assert error.get() is None


@pytest.mark.parametrize("wrapper", ["MultiSteps", "apply_if_finite"])
def test_checked_eager_reaches_into_wrappers_that_trace_their_inner_update(wrapper):
    """MultiSteps and apply_if_finite run the inner update inside a lax.cond.

    Called eagerly, ``checked`` failed on every update of such a chain, finite or
    not, with JAX's "checkify.check which was not functionalized" error.
    """
    wrap = {"MultiSteps": lambda t: optax.MultiSteps(t, 2),
            "apply_if_finite": lambda t: optax.apply_if_finite(t, 2)}[wrapper]
    inner = wrap(optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3)))
    guarded = oc.checked(inner)
    state, plain_state = guarded.init(PARAMS), inner.init(PARAMS)
    for scale in (100.0, 1e-3, 100.0):
        grads = jax.tree.map(lambda g, s=scale: g * s, BIG)
        out, state = guarded.update(grads, state, PARAMS)
        expected, plain_state = inner.update(grads, plain_state, PARAMS)
        # Under checkify, XLA may fuse the inner update differently: last-bit rounding.
        chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=0)
        chex.assert_trees_all_close(state, plain_state, rtol=1e-6, atol=0)
    if tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 7):
        # jax 0.6 (the declared minimum) drops a check staged inside the wrapper's
        # lax.cond when called eagerly, without the error the fallback reacts to.
        return
    broken = oc.checked(wrap(optax.chain(broken_clip(1.0), optax.adam(1e-3))))
    state = broken.init(PARAMS)
    with pytest.raises(Exception, match=BROKEN_MESSAGE):
        for _ in range(2):  # MultiSteps applies the inner update on the second step
            _, state = broken.update(BIG, state, PARAMS)


def test_checked_reaches_clippers_inside_masked_and_partition():
    for tx in (
        optax.masked(optax.chain(broken_clip(1.0), optax.sgd(1.0)), {"w": True, "b": False}),
        optax.multi_transform({"x": broken_clip(1.0), "y": optax.sgd(1.0)}, {"w": "x", "b": "y"}),
        optax.named_chain(("clip", broken_clip(1.0)), ("opt", optax.sgd(1.0))),
    ):
        guarded = oc.checked(tx)
        error, _ = jax.jit(checkify.checkify(guarded.update))(BIG, guarded.init(PARAMS), PARAMS)
        assert "did not clip" in error.get()


def test_checked_measures_fixed_clippers_in_their_own_norm():
    # A clip_by_global_norm whose state is real but whose output is the raw input.
    real = oc.clip_by_global_norm(1.0)

    def update(updates, state, params=None):
        return updates, real.update(updates, state, params)[1]

    guarded = oc.checked(optax.GradientTransformation(real.init, update))
    with pytest.raises(Exception, match="clip_by_global_norm recorded a scale it did not apply"):
        guarded.update(BIG, guarded.init(PARAMS), PARAMS)


def test_checked_stats_check_reaches_unreachable_clippers():
    # inject_hyperparams rebuilds its inner transformation each step, so no tap; the
    # recorded stats (scale 1 with norm 41 > threshold 1) still give the lie away.
    factory = lambda max_norm: broken_clip(max_norm, record_scale=False)
    guarded = oc.checked(optax.inject_hyperparams(factory)(1.0))
    with pytest.raises(Exception, match="recorded norm \\* scale above its threshold"):
        guarded.update(BIG, guarded.init(PARAMS), PARAMS)


def test_checked_flags_non_finite_updates_and_needs_checkify_under_jit():
    guarded = oc.checked(oc.clipped(optax.adam(1e-3), global_clipnorm=1.0))
    nan = {"w": jnp.full((3, 4), jnp.nan), "b": jnp.ones(4)}
    with pytest.raises(Exception, match="the update is not finite"):
        guarded.update(nan, guarded.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="chex.chexify"):
        jax.jit(guarded.update)(BIG, guarded.init(PARAMS), PARAMS)


def test_check_order_and_moment_bounds_read_through_checked():
    right, wrong = oc.checked(_right()), oc.checked(_wrong())
    assert [s.kind for s in oc.check_order(right, PARAMS)] == ["clipper", "moment", "other"]
    with pytest.raises(oc.OrderingError, match="runs after trace"):
        oc.check_order(wrong, PARAMS)
    with pytest.raises(AssertionError, match="TraceState.trace at chain\\[0\\] > chain\\[0\\]"):
        oc.assert_moments_bounded(wrong, PARAMS, 1.0, steps=1, jit=False)
    assert oc.assert_moments_bounded(right, PARAMS, 1.0, steps=1, jit=True)


def test_checked_bad_rtol():
    for bad in (-1e-6, float("nan"), "0"):
        with pytest.raises(ValueError, match="rtol"):
            oc.checked(optax.adam(1e-3), rtol=bad)


# ------------------------------------------------ MultiSteps, masks, partitions


def _np_adam(grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    mu = nu = 0.0
    out = []
    for t, g in enumerate(grads_seq, 1):
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        out.append(-lr * (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("jit, real_steps", [(False, 1), (True, 2)])
def test_multisteps_clips_the_accumulated_gradient_once_per_real_step(jit, real_steps):
    k, c, lr = 2, 1.0, 0.1
    rng = np.random.default_rng(0)
    minibatches = [rng.normal(size=5) * 10 for _ in range(real_steps * k)]
    tx = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(c), optax.adam(lr)), k)
    params = jnp.zeros(5)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in minibatches:
        out, state = update(jnp.asarray(g, jnp.float32), state, params)
        outs.append(np.asarray(out))
    means = [np.mean(minibatches[i:i + k], axis=0) for i in range(0, real_steps * k, k)]
    clipped = [m * min(1.0, c / np.linalg.norm(m)) for m in means]
    expected = _np_adam(clipped, lr)
    for step, out in enumerate(outs, 1):
        if step % k:
            np.testing.assert_array_equal(out, 0.0)
        else:
            np.testing.assert_allclose(out, expected[step // k - 1], rtol=2e-5, atol=1e-7)
    clip_state = state.inner_opt_state[0]
    assert int(clip_state.count) == real_steps  # one clip per real step, not per minibatch
    np.testing.assert_allclose(clip_state.stats.norm, np.linalg.norm(means[-1]), rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_global_clip_inside_masked_or_partition_clips_only_its_subset(jit):
    grads = {"w": np.full((3, 4), 2.0), "b": np.array([30.0, 40.0, 0.0, 0.0])}
    w_norm = np.linalg.norm(grads["w"])
    expected = {"w": grads["w"] / w_norm, "b": grads["b"]}  # b's norm 50 is never seen
    masked = optax.chain(
        optax.masked(oc.clip_by_global_norm(1.0), {"w": True, "b": False}), optax.sgd(-1.0))
    partition = optax.multi_transform(
        {"clip": optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(-1.0)),
         "raw": optax.sgd(-1.0)},
        {"w": "clip", "b": "raw"})
    for tx in (masked, partition):
        update = jax.jit(tx.update) if jit else tx.update
        out, state = update(jax.tree.map(jnp.asarray, grads), tx.init(PARAMS), PARAMS)
        for key in grads:
            np.testing.assert_allclose(out[key], expected[key], rtol=1e-6)
        norms = [v for key, v in oc.stats(state).items() if key.endswith("/norm")]
        np.testing.assert_allclose(norms, [w_norm], rtol=1e-6)


# --------------------------------------------------- property tests of the bound


def _tree(values, shape=(2, 3)):
    flat = np.asarray(values, np.float32)
    return {"a": jnp.asarray(flat[:6].reshape(shape)), "b": jnp.asarray(flat[6:])}


def _np_bound_holds(name, out, threshold):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(out)]
    slack = threshold * (1 + 1e-6) + 1e-30
    if name == "clip_by_value":
        return all(np.max(np.abs(x)) <= slack for x in leaves)
    if name == "clip_by_norm":
        return all(np.linalg.norm(x) <= slack for x in leaves)
    if name == "clip_by_block_rms":
        return all(np.sqrt(np.mean(x * x)) <= slack for x in leaves)
    return np.sqrt(sum(np.sum(x * x) for x in leaves)) <= slack


FIXED = {
    "clip_by_value": oc.clip_by_value,
    "clip_by_norm": oc.clip_by_norm,
    "clip_by_global_norm": oc.clip_by_global_norm,
    "clip_by_block_rms": oc.clip_by_block_rms,
}
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@pytest.mark.parametrize("name", sorted(FIXED))
@settings(max_examples=10, deadline=None)
@given(values=st.lists(finite, min_size=9, max_size=9), threshold=st.floats(0.0, 50.0))
def test_property_bound_holds_and_checked_agrees_eager(name, values, threshold):
    guarded = oc.checked(FIXED[name](threshold))
    grads = _tree(values)
    out, _ = guarded.update(grads, guarded.init(grads))  # raises if a check fails
    assert _np_bound_holds(name, out, threshold)


@pytest.mark.parametrize("name", sorted(FIXED))
@settings(max_examples=10, deadline=None)
@given(values=st.lists(finite, min_size=9, max_size=9))
def test_property_bound_holds_and_checked_agrees_jit(name, values):
    threshold = 0.5
    guarded = oc.checked(FIXED[name](threshold))
    update = _jitted_checked_update(name, threshold, guarded)
    grads = _tree(values)
    error, (out, _) = update(grads, guarded.init(grads))
    assert error.get() is None
    assert _np_bound_holds(name, out, threshold)


_JITTED = {}


def _jitted_checked_update(name, threshold, guarded):
    if (name, threshold) not in _JITTED:
        _JITTED[name, threshold] = jax.jit(checkify.checkify(guarded.update))
    return _JITTED[name, threshold]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_moments_bounded_in_narrow_parameter_dtypes(dtype):
    """fp16 parameters: the adversarial gradients (1e3..1e6 x max_norm) were cast to
    inf, the clipper turned them into its documented NaN, and the check blamed the
    order of a chain whose clipper was first."""
    params = {"w": jnp.zeros((4, 3), dtype), "b": jnp.zeros(3, dtype)}
    right = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
    wrong = optax.chain(optax.adam(1e-3), oc.clip_by_global_norm(1.0))
    ratios = oc.assert_moments_bounded(right, params, 1.0, steps=3)
    assert ratios and all(0 < r <= 1.0 for r in ratios.values())
    with pytest.raises(AssertionError, match="put the clipper before it"):
        oc.assert_moments_bounded(wrong, params, 1.0, steps=3)
    if dtype == "float16":
        with pytest.raises(ValueError, match=r"max_norm=100000\.0 leaves no room"):
            oc.assert_moments_bounded(right, params, 1e5, steps=3)


def test_check_order_reads_a_value_dependent_mask_on_the_parameters_given():
    """A mask that needs concrete values (here: which leaves are nonzero) was evaluated
    on zeros, so Adam seemed to cover nothing and a clipper after it passed."""
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    mask = lambda p: jax.tree.map(lambda x: bool(jnp.all(x != 0)), p)  # noqa: E731
    wrong = optax.chain(optax.masked(optax.adam(1e-3), mask), oc.clip_by_global_norm(1.0))
    right = optax.chain(oc.clip_by_global_norm(1.0), optax.masked(optax.adam(1e-3), mask))
    with pytest.raises(oc.OrderingError, match="runs after scale_by_adam"):
        oc.check_order(wrong, params)
    oc.check_order(right, params)
    # The clipper covers only what the mask leaves to Adam's complement: no overlap.
    apart = optax.chain(optax.masked(optax.adam(1e-3), mask),
                        optax.masked(oc.clip_by_global_norm(1.0), lambda p: jax.tree.map(
                            lambda m: not m, mask(p))))
    oc.check_order(apart, params, allow_group_norms=True)
