"""skip_nonfinite and skip_on_spike against a numpy reference of the skip rule.

A skipped step must return exact zeros and leave the inner state untouched, so
the guarded Adam must equal a plain Adam that only ever saw the applied steps.
"""

from __future__ import annotations

import collections
import math
import types

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

PARAMS = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
NORMS = (
    [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]           # history builds up
    + [30.0, 1.0, math.nan, 1.1, 0.0, 0.9]    # spike, NaN, zeros
    + [math.inf, 1.2, 8.0, 0.85, 1.0, 7.5]    # inf, two moderate spikes
)
LOSSES = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.5, 1.4, 1.4, 1.3, math.nan, 1.2,
          1.2, 1.1, 1.1, 50.0, 1.0, 1.0]


def tree_with_norm(norm: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    leaves = {k: rng.normal(size=np.shape(v)) for k, v in PARAMS.items()}
    total = math.sqrt(sum(float(np.sum(v * v)) for v in leaves.values()))
    tree = {k: v / total * (norm if math.isfinite(norm) else 1.0) for k, v in leaves.items()}
    if not math.isfinite(norm):
        tree["a"][1] = norm
    return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


GRADS = [tree_with_norm(n, i) for i, n in enumerate(NORMS)]


def norm64(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64))))
                         for v in tree.values()))


def skip_ref(norms, losses, *, window, z, min_history, max_skips, spikes=True):
    """Which steps ``skip_on_spike`` skips, in float64.

    After ``max_skips`` skips in a row the windows are emptied (the level moved),
    so the next finite step is applied; non-finite steps are always skipped.
    """
    history = collections.deque(maxlen=window)
    loss_history = collections.deque(maxlen=window)
    consecutive, skipped = 0, []

    def is_spike(value, recent):
        if not spikes or len(recent) < min_history:
            return False
        return value > np.mean(recent) + z * np.std(recent)

    for step, norm in enumerate(norms):
        loss = None if losses is None else losses[step]
        if max_skips is not None and consecutive >= max_skips:
            history.clear()
            loss_history.clear()
        bad = not math.isfinite(norm) or is_spike(norm, history)
        if loss is not None:
            bad = bad or not math.isfinite(loss) or is_spike(loss, loss_history)
        skip = bad
        if not skip and math.isfinite(norm):
            history.append(norm)
        if not skip and loss is not None and math.isfinite(loss):
            loss_history.append(loss)
        consecutive = consecutive + 1 if skip else 0
        skipped.append(skip)
    return skipped


def run(tx, *, jit: bool, losses=None, grads_seq=GRADS):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(PARAMS)
    outs, states = [], []
    for step, grads in enumerate(grads_seq):
        extra = {} if losses is None else {"loss": jnp.float32(losses[step])}
        out, state = update(grads, state, PARAMS, **extra)
        outs.append(out)
        states.append(state)
    return outs, states


def check_against_plain_adam(outs, states, skipped):
    """Applied steps equal a plain Adam fed only the applied gradients."""
    adam = optax.adam(0.1)
    adam_state = adam.init(PARAMS)
    for step, (out, state, skip) in enumerate(zip(outs, states, skipped)):
        assert bool(state.guard.skipped) == skip, f"step {step}"
        if skip:
            assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))
            continue
        expected, adam_state = adam.update(GRADS[step], adam_state, PARAMS)
        for key in PARAMS:
            np.testing.assert_allclose(np.asarray(out[key]), np.asarray(expected[key]),
                                       rtol=1e-6, atol=1e-8, err_msg=f"step {step}")
    assert int(states[-1].guard.num_skipped) == sum(skipped)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def check_resume(tx, outs, states, split, losses=None):
    restored = flax.serialization.from_bytes(
        tx.init(PARAMS), flax.serialization.to_bytes(states[split - 1])
    )
    update = jax.jit(tx.update)
    for step in range(split, len(GRADS)):
        extra = {} if losses is None else {"loss": jnp.float32(losses[step])}
        out, restored = update(GRADS[step], restored, PARAMS, **extra)
        assert_trees_equal(out, outs[step])
    assert_trees_equal(restored, states[-1])


def test_skip_nonfinite_matches_reference_jit_eager_and_resume():
    tx = oc.skip_nonfinite(optax.adam(0.1))
    skipped = skip_ref([norm64(g) for g in GRADS], None, window=1, z=1.0, min_history=1,
                       max_skips=None, spikes=False)
    assert sum(skipped) == 2
    outs, states = run(tx, jit=True)
    check_against_plain_adam(outs, states, skipped)
    eager_outs, eager_states = run(tx, jit=False, grads_seq=GRADS[:10])
    for a, b in zip(jax.tree.leaves((eager_outs, eager_states)),
                    jax.tree.leaves((outs[:10], states[:10]))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    report = oc.stats(states[-1])
    assert int(report["skip_nonfinite/num_skipped"]) == 2
    assert math.isinf(float(oc.stats(states[NORMS.index(math.inf)])["skip_nonfinite/norm"]))
    check_resume(tx, outs, states, split=9)


def test_skip_nonfinite_skips_on_nan_loss_with_finite_grads():
    tx = oc.skip_nonfinite(optax.adam(0.1))
    state = tx.init(PARAMS)
    out, new_state = tx.update(GRADS[0], state, PARAMS, loss=jnp.float32(jnp.nan))
    assert bool(new_state.guard.skipped)
    assert_trees_equal(new_state.inner_state, state.inner_state)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("shape", [(4,), (2, 3), (0,)])
@pytest.mark.parametrize("guard", [oc.skip_nonfinite, oc.skip_on_spike])
def test_a_loss_that_is_not_a_scalar_is_refused_by_name(guard, shape):
    tx = guard(optax.sgd(1.0))
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"loss must be a scalar.*jnp\.mean"):
        tx.update(GRADS[0], state, PARAMS, loss=jnp.ones(shape))
    # A one-entry array is a scalar loss.
    tx.update(GRADS[0], state, PARAMS, loss=jnp.ones((1, 1)))


@pytest.mark.parametrize("max_skips", [None, 1])
def test_skip_nonfinite_never_lets_nan_through_unless_asked(max_skips):
    tx = oc.skip_nonfinite(optax.sgd(1.0), max_consecutive_skips=max_skips)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    nan_grads = tree_with_norm(math.nan, 0)
    leaked = []
    for _ in range(5):
        out, state = update(nan_grads, state, PARAMS)
        leaked.append(bool(np.any(np.isnan(np.asarray(out["a"])))))
    if max_skips is None:
        assert not any(leaked) and int(state.guard.num_skipped) == 5
    else:  # apply_if_finite semantics: every second step is forced through
        assert leaked == [False, True, False, True, False]


@pytest.mark.parametrize(
    "window,z,min_history,max_skips,with_loss",
    [(8, 3.0, 4, None, False), (4, 2.0, 3, 2, True)],
)
def test_skip_on_spike_matches_reference(window, z, min_history, max_skips, with_loss):
    tx = oc.skip_on_spike(optax.adam(0.1), window=window, z=z, min_history=min_history,
                          max_consecutive_skips=max_skips)
    losses = LOSSES if with_loss else None
    skipped = skip_ref([norm64(g) for g in GRADS], losses, window=window, z=z,
                       min_history=min_history, max_skips=max_skips)
    assert sum(skipped) >= 3
    outs, states = run(tx, jit=True, losses=losses)
    check_against_plain_adam(outs, states, skipped)
    eager_outs, eager_states = run(tx, jit=False, losses=losses, grads_seq=GRADS[:10])
    for a, b in zip(jax.tree.leaves((eager_outs, eager_states)),
                    jax.tree.leaves((outs[:10], states[:10]))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    report = oc.stats(states[-1])
    assert {"skip_on_spike/skipped", "skip_on_spike/num_skipped", "skip_on_spike/norm",
            "skip_on_spike/threshold"} <= set(report)
    check_resume(tx, outs, states, split=11, losses=losses)


def test_skip_on_spike_wraps_a_clipper_chain_and_stats_see_both():
    tx = oc.skip_on_spike(optax.chain(oc.clip_by_global_norm(1.0), optax.adam(0.1)),
                          window=4, z=3.0, min_history=4)
    outs, states = run(tx, jit=True)
    applied = [step for step, state in enumerate(states) if not bool(state.guard.skipped)]
    assert len(applied) < len(states)
    for out in outs:
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
    # Skipped steps leave the inner clipper untouched: it reports the last applied step.
    report = oc.stats(states[-1])
    assert bool(report["skip_on_spike/skipped"])
    np.testing.assert_allclose(float(report["clip_by_global_norm/norm"]),
                               norm64(GRADS[applied[-1]]), rtol=1e-5)
    assert int(report["skip_on_spike/num_skipped"]) == len(states) - len(applied)


def test_guards_under_shard_map_with_axis_name():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = {"w": jnp.zeros(16)}
    seq = [{"w": jnp.full(16, v, jnp.float32)} for v in (1.0, 1.1, 0.9, 1.0, 40.0, jnp.nan)]
    spec, rep = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
    for make in (
        lambda **k: oc.skip_on_spike(optax.sgd(1.0), window=4, z=3.0, min_history=4, **k),
        lambda **k: oc.skip_nonfinite(optax.sgd(1.0), **k),
    ):
        plain = make()
        sharded = make(axis_name="data")
        step = jax.jit(jax.shard_map(sharded.update, mesh=mesh, in_specs=(spec, rep, spec),
                                     out_specs=(spec, rep)))
        state, ref_state = sharded.init(params), plain.init(params)
        for grads in seq:
            out, state = step(grads, state, params)
            ref_out, ref_state = plain.update(grads, ref_state, params)
            assert bool(state.guard.skipped) == bool(ref_state.guard.skipped)
            np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(ref_out["w"]))
        assert bool(state.guard.skipped)  # the NaN step


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: oc.skip_on_spike(optax.sgd(1.0), window=0), "window"),
        (lambda: oc.skip_on_spike(optax.sgd(1.0), window=4, min_history=8), "min_history"),
        (lambda: oc.skip_on_spike(optax.sgd(1.0), z=-1.0), "z"),
        (lambda: oc.skip_on_spike(optax.sgd(1.0), max_consecutive_skips=-1),
         "max_consecutive_skips"),
        (lambda: oc.skip_nonfinite(optax.sgd(1.0), max_consecutive_skips=1.5),
         "max_consecutive_skips"),
    ],
)
def test_bad_arguments_raise_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_check_order_sees_through_the_guards():
    for guard in (oc.skip_on_spike, oc.skip_nonfinite):
        good = guard(optax.chain(oc.zclip(), optax.adam(1e-3)))
        assert "clipper" in [stage.kind for stage in oc.check_order(good, PARAMS)]
        with pytest.raises(oc.OrderingError):
            oc.check_order(guard(optax.chain(optax.adam(1e-3), oc.zclip())), PARAMS)


GUARDS = {
    "skip_nonfinite": lambda inner: oc.skip_nonfinite(inner),
    "skip_on_spike": lambda inner: oc.skip_on_spike(inner, window=4, min_history=2),
}


@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_a_guarded_donated_step_writes_the_moments_in_place(guard):
    # The inner update runs behind one lax.cond whose true branch applies it. XLA then
    # updates the donated moments in place and only the updates are a temporary. The
    # select form (always run the inner update, then where(skip, old, new)) copied
    # both moments first, and the cond with its branches swapped copied the whole
    # state out of the conditional: 2x and 3x the parameters' bytes of temporaries.
    params = {"w": jnp.zeros((512, 256)), "b": jnp.zeros(256)}
    tx = GUARDS[guard](optax.adam(1e-3))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), params).compile()
    parameter_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries <= 1.25 * parameter_bytes, (temporaries, parameter_bytes)


@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_a_skipped_step_returns_zeros_of_the_inner_updates_dtype(guard):
    # The skip branch does not run the inner update; its zeros take the dtypes the
    # inner update would have returned, here bf16 from float32 gradients.
    to_bf16 = optax.stateless(lambda u, p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), u))
    tx = GUARDS[guard](optax.chain(to_bf16, optax.sgd(1.0)))
    state = tx.init(PARAMS)
    bad = {"a": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.ones((2, 2))}
    for update in (tx.update, jax.jit(tx.update)):
        out, new_state = update(bad, state)
        assert {k: v.dtype for k, v in out.items()} == {"a": jnp.bfloat16, "b": jnp.bfloat16}
        assert all(not np.any(np.asarray(v, np.float32)) for v in out.values())
        assert bool(oc.stats(new_state)[f"{guard}/skipped"])
        good, _ = update({"a": jnp.ones(3), "b": jnp.ones((2, 2))}, state)
        assert good["a"].dtype == jnp.bfloat16 and float(good["a"][0]) == -1.0


@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_the_select_fallback_gives_the_conditional_s_values(guard, monkeypatch):
    # Where lax.cond cannot type the two branches alike (older jax under shard_map),
    # the guard selects between the old and the new state instead: same values.
    steps = [tree_with_norm(n, seed) for seed, n in enumerate([1.0, 1.2, math.nan, 0.9, 40.0])]

    def run():
        tx = GUARDS[guard](optax.adam(0.1))  # fresh functions: nothing from jit's cache
        state, outs = tx.init(PARAMS), []
        for grads in steps:
            out, state = jax.jit(tx.update)(grads, state)
            outs.append(out)
        return outs, state

    with_cond = run()

    def refuse(*args, **kwargs):
        raise TypeError("cond branches must have equal output types")

    # guards.py uses lax for the conditional alone; the norms keep the real one.
    monkeypatch.setattr(oc.guards, "lax", types.SimpleNamespace(cond=refuse))
    fallback = run()
    # Same decisions, and the same values up to how XLA fuses each form's arithmetic
    # (bit for bit on jax 0.10; the last bit can differ on older XLA).
    jax.tree.map(_close, with_cond, fallback)
    skipped = [not any(np.any(np.asarray(v)) for v in out.values()) for out in with_cond[0]]
    assert skipped == [not any(np.any(np.asarray(v)) for v in out.values())
                       for out in fallback[0]]
    assert int(oc.stats(fallback[1])[f"{guard}/num_skipped"]) >= 1


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_eager_updates_decide_in_python_and_match_the_jitted_ones(guard, monkeypatch):
    # Called eagerly, a conditional of fresh branch functions would be compiled on
    # every call (about 150 ms per step); the guard decides in Python instead.
    steps = [tree_with_norm(n, seed) for seed, n in enumerate([1.0, math.nan, 1.2, 50.0])]
    tx = GUARDS[guard](optax.adam(0.1))
    state, jitted = tx.init(PARAMS), []
    for grads in steps:
        out, state = jax.jit(tx.update)(grads, state)
        jitted.append((out, state))

    def refuse(*args, **kwargs):
        raise AssertionError("an eager update compiled a conditional")

    monkeypatch.setattr(oc.guards, "lax", types.SimpleNamespace(cond=refuse))
    state = GUARDS[guard](optax.adam(0.1)).init(PARAMS)
    for grads, (expected_out, expected_state) in zip(steps, jitted):
        out, state = tx.update(grads, state)
        # Eager and fused arithmetic can differ in the last bit; what was skipped
        # and what was counted cannot.
        jax.tree.map(_close, (out, state), (expected_out, expected_state))
    assert int(oc.stats(state)[f"{guard}/num_skipped"]) >= 1
