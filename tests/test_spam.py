"""spam: a whole SPAM + Adam run against float64 numpy, state handling, errors, ordering.

The per-step contracts (bound, identity, signs, non-finite policy, stats) over
dtypes, structures and execution modes are in the contract matrix
(tests/test_contracts.py, ``test_moment_clipper_contracts``).
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

LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8


def _numpy_spam_adam(grads, theta, reset_interval=None, warmup_steps=0):
    """SPAM around Adam in float64: updates and clipped counts per step."""
    m = np.zeros_like(grads[0], np.float64)
    v = np.zeros_like(m)
    since, resets, outs, counts = 0, 0, [], []
    for step, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        reset = reset_interval is not None and step % reset_interval == reset_interval - 1
        if reset:
            m, v = np.zeros_like(m), np.zeros_like(v)
            since, resets = 0, resets + 1
        elif step > 0:
            since += 1
        limit = np.sqrt(theta * v)
        over = (v > 0) & (np.abs(g) > limit)
        g = np.where(over, np.sign(g) * limit, g)
        counts.append(int(over.sum()))
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g**2
        t = step + 1
        update = -LR * (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
        if resets and since < warmup_steps:
            update *= 1 - 0.99 * (1 + math.cos(math.pi * since / (warmup_steps + 1))) / 2
        outs.append(update)
    return outs, counts


def _spiky_grads(steps=12, size=64, seed=0):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=size).astype(np.float32) * 0.1 for _ in range(steps)]
    for step in (3, 6, 10)[: steps // 4]:
        grads[step][rng.integers(0, size, 5)] *= 1e4  # a spike in a few coordinates
    return [jnp.asarray(g) for g in grads]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("reset_interval, warmup_steps", [(None, 0), (5, 3), (4, 0)])
def test_whole_run_matches_float64_reference(mode, reset_interval, warmup_steps):
    grads = _spiky_grads()
    tx = oc.spam(optax.adam(LR, b1=B1, b2=B2, eps=EPS), theta=50.0,
                 reset_interval=reset_interval, warmup_steps=warmup_steps)
    update = tx.update if mode == "eager" else jax.jit(tx.update)
    state = tx.init(jnp.zeros(64))
    want, counts = _numpy_spam_adam(grads, 50.0, reset_interval, warmup_steps)
    assert sum(counts) > 0  # the spikes are clipped
    for step, g in enumerate(grads):
        out, state = update(g, state)
        np.testing.assert_allclose(out, want[step], rtol=2e-4, atol=1e-7)
        assert int(oc.stats(state)["spam/num_clipped"]) == counts[step]


@pytest.mark.parametrize("mode", ["donated", "restored"])
def test_resume_from_checkpoint_is_bit_identical(mode):
    """Steps 1-8 straight equal steps 1-4, a restore (numpy arrays) or donation, steps 5-8."""
    grads = _spiky_grads(8, seed=1)
    tx = oc.spam(optax.adamw(LR, weight_decay=1e-2), theta=50.0, reset_interval=3,
                 warmup_steps=2)
    params = jnp.ones(64)
    step = jax.jit(tx.update)
    state = tx.init(params)
    straight = []
    for g in grads:
        out, state = step(g, state, params)
        straight.append(np.asarray(out))
    state = tx.init(params)
    for g in grads[:4]:
        _, state = step(g, state, params)
    if mode == "restored":
        state = jax.tree.map(np.asarray, jax.device_get(state))
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(state))
        resumed_step = step
    else:
        resumed_step = jax.jit(tx.update, donate_argnums=(1,))
    for i, g in enumerate(grads[4:]):
        out, state = resumed_step(g, state, params)
        np.testing.assert_array_equal(np.asarray(out), straight[4 + i])


def test_without_spikes_it_is_exactly_adam():
    rng = np.random.default_rng(3)
    grads = [jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(6)]
    adam, wrapped = optax.adam(LR), oc.spam(optax.adam(LR), theta=1e12)
    sa, sw = adam.init(jnp.zeros(16)), wrapped.init(jnp.zeros(16))
    for g in grads:  # eagerly: under jit XLA may fuse the two differently (an ulp)
        a, sa = adam.update(g, sa)
        w, sw = wrapped.update(g, sw)
        np.testing.assert_array_equal(a, w)
        assert int(oc.stats(sw)["spam/num_clipped"]) == 0


def test_inner_without_second_moment_is_named():
    for inner in (optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.lion(1e-3)):
        with pytest.raises(ValueError, match=r"spam\(inner\).*`nu`"):
            oc.spam(inner).init(jnp.zeros(3))
    with pytest.raises(TypeError, match="inner"):
        oc.spam(optax.adam)


@pytest.mark.parametrize("kwargs, name", [
    ({"theta": -1.0}, "theta"), ({"theta": np.nan}, "theta"),
    ({"reset_interval": 0}, "reset_interval"), ({"warmup_steps": -1}, "warmup_steps"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        oc.spam(optax.adam(1e-3), **kwargs)


def test_check_order_roles():
    """Update clippers are legal after the preconditioner, gradient clippers are not;
    spam clips inside the wrapper, ahead of the Adam it wraps."""
    params = {"w": jnp.zeros((3, 2))}
    oc.check_order(optax.chain(optax.scale_by_adam(), oc.clip_update_rms(1.0),
                               optax.scale(-1e-3)), params)
    oc.check_order(optax.chain(optax.scale_by_adam(), oc.clip_update_norm(2.0),
                               optax.scale(-1e-3)), params)
    with pytest.raises(oc.OrderingError):
        oc.check_order(optax.chain(optax.scale_by_adam(), oc.clip_by_global_norm(1.0),
                                   optax.scale(-1e-3)), params)
    oc.check_order(oc.spam(optax.adam(1e-3)), params)
    oc.check_order(optax.chain(oc.clip_by_global_norm(1.0), oc.spam(optax.adam(1e-3))), params)
    with pytest.raises(oc.OrderingError):
        oc.check_order(oc.spam(optax.chain(optax.scale_by_adam(), oc.clip_by_global_norm(1.0),
                                           optax.scale(-1e-3))), params)


@pytest.mark.slow
def test_contracts_hold_for_fp16_entries_scaled_below_the_smallest_subnormal_after_a_reset():
    """The step after a moment reset scales the update by the warmup factor: fp16
    gradients of a few subnormals times ~0.02 are below fp16's smallest subnormal and
    are stored as 0. The contract check compared them with the float64 products
    (1e-9) and allowed only 1e-30 of absolute error (a fuzz finding)."""
    import optaxclip.testing as contracts

    tiny = float(jnp.finfo(jnp.float16).smallest_subnormal)
    grads = jnp.asarray(np.array([[8.0, -16.0, -28.0]]) * tiny, jnp.float16)
    params = jnp.ones_like(grads)
    tx = oc.spam(contracts.moment_probe(), theta=1e30, reset_interval=4, warmup_steps=2)
    state = tx.init(params)
    for _ in range(3):
        _, state = jax.jit(tx.update)(grads * 0 + 0.01, state, params)
    out, new_state = contracts.assert_moment_clip_contracts(tx, grads, state, params,
                                                           mode="eager")
    assert int(new_state.spam.num_resets) == 1
    assert float(new_state.spam.warmup_scale) < 1
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("shape", [(5,), (2**24 + 3,), (4097, 4096), (3, 2**12, 2**12 + 1)])
def test_spike_counts_are_exact_beyond_float32_integers(shape):
    # Counts ride in a float32 reduction (one fused pass); float32 holds every
    # integer only up to 2^24, so larger leaves are counted by rows (or as int32).
    from optaxclip.spam import _counts

    size = math.prod(shape)
    mask = jnp.ones(shape, bool)
    every_other = (jnp.arange(size) % 2 == 0).reshape(shape)
    for count in (_counts, jax.jit(_counts)):
        got = count(mask, every_other, ~mask)
        assert [int(c) for c in got] == [size, (size + 1) // 2, 0]
        assert all(c.dtype == jnp.int32 for c in got)


@pytest.mark.parametrize("reset_interval", [4, 3])  # 4 divides 2^31, 3 does not
def test_resets_keep_their_period_after_the_step_count_saturates(reset_interval):
    # optax.safe_increment holds the int32 count at 2^31 - 1. The test count % T used
    # to freeze there: a reset on every step for T = 4, and never again for T = 3.
    params = jnp.zeros(3)
    tx = oc.spam(optax.adam(0.1), reset_interval=reset_interval, warmup_steps=2)
    start = 2**31 - 3
    state = tx.init(params)
    state = state._replace(count=jnp.asarray(start, jnp.int32),
                           spam=state.spam._replace(
                               steps_since_reset=jnp.asarray(start % reset_interval, jnp.int32)))
    update = jax.jit(tx.update)
    resets = []
    for _ in range(13):
        before = int(state.spam.num_resets)
        _, state = update(jnp.array([1.0, -2.0, 0.5]), state, params)
        resets.append(int(state.spam.num_resets) > before)
    want = [(start + k) % reset_interval == reset_interval - 1 for k in range(13)]
    assert resets == want
    assert int(state.count) == 2**31 - 1


def test_steps_since_reset_counts_alike_with_and_without_resets():
    # With reset_interval it read 1, 2, 3 on the first steps; without, 0, 1, 2.
    params = jnp.zeros(3)
    seen = {}
    for interval in (None, 4):
        tx = oc.spam(optax.adam(0.1), reset_interval=interval)
        state, since = tx.init(params), []
        for _ in range(6):
            _, state = tx.update(jnp.array([1.0, -2.0, 0.5]), state, params)
            since.append(int(state.spam.steps_since_reset))
        seen[interval] = since
    assert seen[None] == [0, 1, 2, 3, 4, 5]
    assert seen[4] == [0, 1, 2, 0, 1, 2]  # the moments reset before step 4


# Inner optimizers whose `nu` is a running mean of g^2 (or, Yogi, tracks it), and ones
# whose `nu` is something else: AdaBelief's mean of (g - m)^2, Adamax's maximum of |g|
# (in ScaleByAdamState, so only its behaviour tells), SM3's momentum. The second kind
# was accepted, and a steady gradient was then clipped as a spike.
SQUARED_MOMENTS = {
    "adam": lambda: optax.adam(1e-2), "adamw": lambda: optax.adamw(1e-2),
    "nadam": lambda: optax.nadam(1e-2), "amsgrad": lambda: optax.amsgrad(1e-2),
    "radam": lambda: optax.radam(1e-2),
    "rmsprop": lambda: optax.rmsprop(1e-2), "lamb": lambda: optax.lamb(1e-2),
    "clip_then_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                          optax.scale_by_adam(), optax.scale(-1e-2)),
    "injected_adam": lambda: optax.inject_hyperparams(optax.adam)(1e-2),
}
OTHER_MOMENTS = {
    "adabelief": lambda: optax.adabelief(1e-2),
    "adamax": lambda: optax.adamax(1e-2),
    "sm3": lambda: optax.sm3(1e-2),
}


@pytest.mark.parametrize("name", sorted(SQUARED_MOMENTS))
def test_inner_optimizers_with_a_mean_of_squared_gradients_are_accepted(name):
    tx = oc.spam(SQUARED_MOMENTS[name](), theta=5000.0)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    steady = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    for step in range(50):  # a steady gradient is never a spike
        _, state = jax.jit(tx.update)(steady, state, params)
        assert int(oc.stats(state)["spam/num_clipped"]) == 0, (name, step)


def test_yogi_is_accepted_and_its_first_gradients_are_spikes_against_its_initial_nu():
    # Yogi's nu tracks g^2 but starts at 1e-6 and grows additively, so a steady
    # gradient is clipped until nu catches up (the docstring says so).
    tx = oc.spam(optax.yogi(1e-2), theta=5000.0)
    params = {"w": jnp.zeros(3)}
    _, state = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)
    assert int(oc.stats(state)["spam/num_clipped"]) == 3


@pytest.mark.parametrize("name", sorted(OTHER_MOMENTS))
def test_inner_optimizers_whose_nu_is_something_else_are_refused(name):
    with pytest.raises(ValueError, match=r"spam\(inner\).*its `nu` (is|moved)"):
        # SM3 does not run on the scalar probe: init, on the real parameters, refuses it.
        oc.spam(OTHER_MOMENTS[name]()).init({"w": jnp.zeros(3)})
