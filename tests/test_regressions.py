"""Regression tests for the ways ordinary training corrupted data or crashed.

Each test reproduces one reported failure (donated state, restored checkpoints,
thresholds above a dtype's max, float64 norms beyond float32, non-finite steps
before an adaptive clipper has history, overflowing statistics, ...) and checks
the fixed behaviour. The contract matrix (``test_contracts.py``) covers the
same ground over generated cases; these pin the exact reports.
"""

from __future__ import annotations

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import optaxclip as oc
import optaxclip.testing

PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
GRADS = {"w": jnp.full((4, 3), 0.5), "b": jnp.array([1.0, -2.0, 0.5])}

STATEFUL = {
    "autoclip": lambda: oc.autoclip(history=8),
    "zclip": lambda: oc.zclip(warmup_steps=2),
    "adagc": lambda: oc.adagc(warmup_steps=2),
    "skip_nonfinite": lambda: oc.skip_nonfinite(optax.adam(1e-3)),
    "skip_on_spike": lambda: oc.skip_on_spike(optax.adam(1e-3), window=4, min_history=2),
    "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
    "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.1),
}


def _train_step(tx):
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


# 1. Donated optimizer state.
@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_donated_params_and_state_can_be_reused(name):
    tx = optax.chain(STATEFUL[name](), optax.sgd(0.1)) if "skip" not in name else STATEFUL[name]()
    step = jax.jit(_train_step(tx), donate_argnums=(0, 1))
    params = jax.tree.map(jnp.array, PARAMS)
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state, GRADS)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


# 2. State restored from a checkpoint holds numpy arrays.
@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.parametrize("restore", ["flax", "device_get"])
def test_restored_numpy_state_updates_eagerly_and_under_jit(name, restore):
    tx = STATEFUL[name]()
    state = tx.init(PARAMS)
    for _ in range(3):
        _, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    if restore == "flax":
        blob = flax.serialization.to_bytes(state)
        restored = flax.serialization.from_bytes(tx.init(PARAMS), blob)
    else:
        restored = jax.device_get(state)
    assert any(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
    want_out, want_state = jax.jit(tx.update)(GRADS, state, PARAMS)
    for update in (tx.update, jax.jit(tx.update)):
        out, new_state = update(GRADS, restored, PARAMS)
        for a, b in zip(jax.tree.leaves((out, new_state)), jax.tree.leaves((want_out, want_state))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_orbax_restore_continues_bit_identically(tmp_path):
    import orbax.checkpoint as ocp

    tx = optax.chain(oc.zclip(warmup_steps=2), oc.autoclip(history=4), optax.adam(1e-2))
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for _ in range(4):
        _, state = update(GRADS, state, PARAMS)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", tx.init(PARAMS))
    a = update(GRADS, state, PARAMS)
    b = update(GRADS, restored, PARAMS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # An untargeted restore is a plain dict; stats() still reads it, and says so.
    raw = checkpointer.restore(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="plain dicts"):
        report = oc.stats(raw)
    assert any(key.endswith("zclip/norm") for key in report)


# 3. clip_by_value above the dtype's largest value.
@pytest.mark.parametrize("dtype,max_delta", [
    (jnp.float16, 1e5), (jnp.bfloat16, float(jnp.finfo(jnp.float32).max)), (jnp.float16, 65504.0),
])
def test_clip_by_value_above_the_dtype_max_keeps_finite_gradients(dtype, max_delta):
    grads = {"g": jnp.array([1.0, -300.0, 60000.0], dtype),
             "h": jnp.array([jnp.inf, -jnp.inf], dtype)}
    out, state = oc.clip_by_value(max_delta).update(grads, oc.clip_by_value(max_delta).init(grads))
    np.testing.assert_array_equal(np.asarray(out["g"]), np.asarray(grads["g"]))
    largest = float(jnp.finfo(dtype).max)
    np.testing.assert_array_equal(np.asarray(out["h"], np.float64), [largest, -largest])
    assert bool(oc.stats(state)["clip_by_value/clipped"])  # the inf entries were changed
    tx = oc.clipped(optax.adam(1e-3), clipvalue=max_delta)
    params = jax.tree.map(jnp.zeros_like, grads)
    finite = {"g": grads["g"], "h": jnp.array([1.0, 2.0], dtype)}
    updates, _ = tx.update(finite, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# 4. float64 norms above float32's range.
@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_block_rms", "clip_by_rms", "autoclip",
                                  "zclip", "adagc", "adaptive_grad_clip", "clip_by_global_norm"])
def test_x64_norms_beyond_float32_stay_finite(name):
    with jax.enable_x64(True):
        grads = {"w": jnp.full((3,), 1e200, jnp.float64), "b": jnp.array([1.0, 2.0], jnp.float64)}
        params = jax.tree.map(lambda g: jnp.ones_like(g), grads)
        info = oc.registered_factories()[name]
        tx = info.build(1.0)
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out)), out
        assert all(bool(jnp.isfinite(x)) for x in jax.tree.leaves(state.stats.norm))
        norm = oc.stats(state)[f"{name}/norm"]
        assert norm.dtype == jnp.float64 and float(norm) > 1e199
    with jax.enable_x64(True):
        guard = oc.skip_nonfinite(optax.sgd(1.0))
        grads = {"w": jnp.full((3,), 1e200, jnp.float64)}
        _, state = guard.update(grads, guard.init(grads))
        assert not bool(state.guard.skipped)


# 5. Non-finite steps before an adaptive clipper has history.
@pytest.mark.parametrize("make", [oc.autoclip, lambda: oc.zclip(max_norm=None),
                                  lambda: oc.adagc(lambda_abs=math.inf)])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_adaptive_clippers_poison_a_first_non_finite_step(make, bad):
    tx = make()
    grads = {"w": jnp.array([1.0, bad]), "b": jnp.array([0.5])}
    out, state = tx.update(grads, tx.init(grads))
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(out))
    report = oc.stats(state)
    name = next(iter(report)).split("/")[0]
    assert math.isnan(float(report[f"{name}/scale"])) and bool(report[f"{name}/clipped"])
    # The state stays usable: the next finite step is clipped as usual.
    out, _ = tx.update({"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


# 6. One huge norm must not disable adaptive clipping.
def test_zclip_after_a_huge_recorded_norm_still_clips_later_spikes():
    tx = oc.zclip(warmup_steps=3, max_norm=None)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for norm in [1.0, 2.0e20, 1.5]:  # the huge norm enters the warmup statistics
        _, state = update([jnp.array([norm])], state)
    assert math.isfinite(float(state.ema_std)) and float(state.ema_std) > 0
    for _ in range(300):
        _, state = update([jnp.array([1.0])], state)
    out, state = update([jnp.array([1e30])], state)
    assert float(out[0][0]) < 1e29 and bool(oc.stats(state)["zclip/clipped"])


def test_skip_on_spike_after_a_huge_recorded_norm_still_skips_later_spikes():
    tx = oc.skip_on_spike(optax.sgd(1.0), window=8, min_history=4, z=3.0)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(1))
    for norm in [1.0, 1.1, 0.9, 1.0, 1.05]:
        _, state = update(jnp.array([norm]), state)
    _, state = update(jnp.array([3e19]), state)  # a spike: skipped, not recorded
    assert bool(state.guard.skipped)
    state = state._replace(guard=state.guard._replace(consecutive_skips=jnp.zeros([], jnp.int32)))
    # Record a huge value as if it had been applied: the window's variance overflowed before.
    norms = state.norms._replace(values=state.norms.values.at[0].set(3e19))
    state = state._replace(norms=norms)
    _, state = update(jnp.array([1.0]), state)
    assert math.isfinite(float(state.guard.threshold))
    _, state = update(jnp.array([1e38]), state)
    assert bool(state.guard.skipped)


# 7. zclip decides "spike" and the clip limit from one expression.
def test_zclip_with_eps_zero_and_constant_norms_never_clips_a_non_spike():
    tx = oc.zclip(warmup_steps=3, eps=0.0, max_norm=None)
    state = tx.init(None)
    for _ in range(3):
        _, state = tx.update([jnp.array([2.0])], state)
    out, state = tx.update([jnp.array([2.0])], state)  # equal to the mean: no spike
    assert float(out[0][0]) == 2.0 and not bool(oc.stats(state)["zclip/clipped"])
    assert float(state.ema_mean) == 2.0
    out, state = tx.update([jnp.array([2.5])], state)  # sigma = 0: any larger norm is a spike
    assert bool(oc.stats(state)["zclip/clipped"]) and float(out[0][0]) == 2.0


# 8. clip_by_value's stats mean what they say.
def test_clip_by_value_reports_no_scale_and_clipped_exactly_when_entries_changed():
    tx = oc.clip_by_value(1.0)
    _, state = tx.update({"w": jnp.array([0.5, -0.9])}, tx.init(None))
    assert set(oc.stats(state)) == {"clip_by_value/norm", "clip_by_value/threshold",
                                    "clip_by_value/clipped"}
    assert not bool(oc.stats(state)["clip_by_value/clipped"])
    _, state = tx.update({"w": jnp.array([0.5, jnp.nan])}, tx.init(None))
    assert not bool(oc.stats(state)["clip_by_value/clipped"])  # NaN stays NaN: nothing changed
    assert math.isnan(float(oc.stats(state)["clip_by_value/norm"]))
    _, state = tx.update({"w": jnp.array([3.0, jnp.nan])}, tx.init(None))
    assert bool(oc.stats(state)["clip_by_value/clipped"])


# 9. check_order and users' own stateless clippers.
@pytest.mark.parametrize("wrap", [optax.stateless, optax.stateless_with_tree_map])
def test_check_order_does_not_trust_users_stateless_functions(wrap):
    if wrap is optax.stateless:
        users_clip = wrap(
            lambda updates, params: jax.tree.map(lambda u: jnp.clip(u, -1, 1), updates)
        )
    else:
        users_clip = wrap(lambda u, p: jnp.clip(u, -1, 1))
    with pytest.raises(oc.OrderingError, match="cannot see into"):
        oc.check_order(optax.chain(optax.adam(1e-3), users_clip), PARAMS)
    oc.check_order(optax.chain(optax.adam(1e-3), users_clip), PARAMS, on_unknown="ignore")


def test_check_order_accumulation_and_well_known_wrappers():
    # apply_every sums gradients: a clipper after it is correct, not "after a moment".
    oc.check_order(optax.chain(optax.apply_every(2), oc.clip_by_global_norm(1.0),
                               optax.adam(1e-3)), PARAMS)
    kinds = [s.kind for s in oc.check_order(
        optax.chain(optax.apply_every(2), oc.clip_by_global_norm(1.0)), PARAMS)]
    assert kinds[0] == "accumulation"
    oc.check_order(optax.chain(oc.clip_by_global_norm(1.0),
                               optax.contrib.schedule_free_adamw(1e-3)), PARAMS)


# 10. skip_on_spike must not stop training for good.
def test_skip_on_spike_recovers_from_a_lasting_level_shift():
    tx = oc.skip_on_spike(optax.sgd(0.1), window=16, min_history=8)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for _ in range(40):
        _, state = update(jnp.array([1.0, 0.0]), state)
    applied, consecutive = 0, []
    for _ in range(200):  # deterministic: the same gradient, now 10x larger, every step
        out, state = update(jnp.array([10.0, 0.0]), state)
        applied += not bool(state.guard.skipped)
        consecutive.append(int(state.guard.consecutive_skips))
    assert max(consecutive) == 16 and applied > 150
    # Non-finite steps are still never applied, whatever the counter says.
    for _ in range(40):
        out, state = update(jnp.array([jnp.nan, 0.0]), state)
        assert bool(state.guard.skipped) and float(jnp.abs(out).sum()) == 0.0


# 11. Messages that name the argument, and numpy scalars.
def test_clipped_names_the_argument_it_was_given():
    with pytest.raises(ValueError, match="clipnorm"):
        oc.clipped(optax.sgd(1.0), clipnorm="1.0")


@pytest.mark.parametrize("wrap", [oc.skip_nonfinite, oc.skip_on_spike, oc.checked])
def test_wrappers_given_a_factory_say_to_call_it(wrap):
    with pytest.raises(TypeError, match="factory"):
        wrap(optax.adam)


def test_numpy_scalars_are_accepted_where_numbers_are():
    oc.zclip(alpha=np.float32(0.9), warmup_steps=np.int64(3))
    oc.autoclip(np.float64(10.0), history=np.int32(5))
    oc.checked(optax.sgd(1.0), rtol=np.float32(1e-6))
    tx = optax.chain(oc.clip_by_global_norm(np.float32(1.0)), optax.adam(1e-3))
    oc.assert_moments_bounded(tx, PARAMS, np.float32(1.0), steps=np.int64(2))


@pytest.mark.parametrize("bad", ["abc", [object()]])
def test_global_norm_and_stats_reject_what_is_not_a_tree_of_arrays(bad):
    with pytest.raises(TypeError, match="pytree of arrays"):
        oc.global_norm(bad)
    with pytest.raises(TypeError, match="optax state"):
        oc.stats(bad)


def test_static_hyperparameters_under_inject_hyperparams_name_static_args():
    injected = optax.inject_hyperparams(oc.autoclip)(percentile=10.0)
    with pytest.raises(ValueError, match="percentile must be static.*static_args"):
        jax.jit(injected.update)(GRADS, injected.init(PARAMS))
    tx = optax.inject_hyperparams(oc.autoclip, static_args=("percentile", "history"))(
        percentile=10.0, history=4, max_norm=2.0
    )
    tx.update(GRADS, tx.init(PARAMS))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_global_norm", "autoclip", "zclip",
                                  "adagc", "adaptive_grad_clip", "clip_by_value"])
def test_finite_gradients_whose_float32_norm_overflows_are_scaled_not_zeroed(name, jit):
    """Entries of 3e38: finite, but their norm is above float32's largest value.

    Under jit XLA rewrote the exact scale's two divisions, t / m / r, as t / (m * r),
    and m * r is the overflowed norm: the clippers returned zeros for finite input.
    """
    grads = {"w": jnp.array([3e38, -3e38], jnp.float32), "c": jnp.array([3e38 + 2e38j],
                                                                        jnp.complex64)}
    params = jax.tree.map(jnp.ones_like, grads)
    tx = oc.registered_factories()[name].build(1e3)
    update = jax.jit(tx.update) if jit else tx.update
    out, _ = update(grads, tx.init(params), params)
    for leaf in jax.tree.leaves(out):
        magnitude = np.abs(np.asarray(leaf, np.complex128))
        assert np.all(np.isfinite(magnitude)) and np.all(magnitude > 1.0), (name, out)
        assert np.all(magnitude <= 1e3 * (1 + 1e-6)), (name, out)


@pytest.mark.parametrize("name", ["adaptive_grad_clip", "clip_by_norm", "clip_by_global_norm"])
def test_checked_accepts_fp16_entries_scaled_below_the_smallest_subnormal(name):
    """fp16 gradients of a few subnormals, scaled by ~1e-25: the exact products are
    about 1e-30, below fp16's smallest subnormal (6e-8), so the clipper stores 0.
    checked's applied-scale check allowed only 1e-30 of absolute error and fired."""
    from jax.experimental import checkify

    tiny = float(jnp.finfo(jnp.float16).smallest_subnormal)
    grads = jnp.asarray(np.linspace(-8, 8, 12).reshape(4, 3) * tiny, jnp.float16)
    params = jnp.asarray(np.linspace(0.5, 1.5, 12).reshape(4, 3), jnp.float16)
    tx = oc.checked(oc.registered_factories()[name].build(1e-30))
    error, (out, state) = checkify.checkify(tx.update)(grads, tx.init(params), params)
    error.throw()
    assert np.all(np.asarray(out) == 0)
    assert all(bool(c) for c in jax.tree.leaves(state.stats.clipped))


def test_zclip_ema_agrees_eagerly_and_under_jit_when_a_spike_is_fed_back_at_the_mean():
    """After a constant-norm warmup (sigma = 0) a spike feeds the EMA mean itself back.
    alpha mu + (1 - alpha) mu rounded to mu + 1 ulp eagerly and to mu under jit, and
    x - mu' then made sigma 4e-8 in one mode and 0 in the other."""
    tx = oc.zclip(warmup_steps=3, max_norm=1.0)
    state = tx.init(None)
    warm = jnp.full((4, 3), 1.0, jnp.float16)  # norm sqrt(12), not exact in float32
    for _ in range(6):
        _, state = jax.jit(tx.update)(warm, state)
    spike = warm * 300
    _, eager = tx.update(spike, state)
    _, jitted = jax.jit(tx.update)(spike, state)
    for field in ("ema_mean", "ema_std"):
        assert np.asarray(getattr(eager, field)) == np.asarray(getattr(jitted, field)), field
    assert float(eager.ema_std) == 0.0 and float(eager.ema_mean) == float(state.ema_mean)


@pytest.mark.parametrize("jit", [False, True])
def test_complex_infinite_and_overflowing_entries_are_clipped_along_their_phase(jit):
    """inf + 0j, inf + 5j and 3e38 + 3e38j (finite, its modulus overflows float32):
    clip_by_value and spam's spike clip gave NaN for the infinite entries (inf / inf)
    and 0 for the overflowing one. Now each goes to the limit along its phase, as
    real inf goes to +limit; an entry with a NaN part stays NaN."""
    from optaxclip.spam import clip_spikes

    g = jnp.array([complex(np.inf, 0), complex(np.inf, 5), complex(-np.inf, -np.inf),
                   3e38 + 3e38j, complex(np.nan, np.inf), 0.5 + 0.1j], jnp.complex64)
    phases = np.array([1, 1, (-1 - 1j) / math.sqrt(2), (1 + 1j) / math.sqrt(2)])
    tx = oc.clip_by_value(1.0)
    update = jax.jit(tx.update) if jit else tx.update
    spikes = jax.jit(clip_spikes, static_argnums=2) if jit else clip_spikes
    clipped = np.asarray(update(g, tx.init(g))[0], np.complex128)
    spiked = np.asarray(spikes([g], [jnp.full(g.shape, 1e-4)], 100.0)[0][0], np.complex128)
    for out, limit in ((clipped, 1.0), (spiked, 0.1)):
        np.testing.assert_allclose(out[:4], phases * limit, rtol=1e-6)
        assert np.isnan(out[4])
    assert clipped[5] == complex(np.complex64(0.5 + 0.1j))  # under the limit: untouched


# 9. A scale below float32's normal range (threshold / norm < 1.2e-38) is subnormal,
# and XLA flushes it to zero: finite gradients came out as zeros although their
# clipped values (1e37 * 1e-38) are ordinary numbers.
TINY_SCALE_CASES = {
    # (entries, threshold): norm 1.6e38, scale 6e-39.
    "norm 1.6e38, threshold 1": (np.r_[np.full(17, 4e37), 1e30, -3e37], 1.0),
    # norm 1e10, scale 1e-40.
    "norm 1e10, threshold 1e-30": (np.r_[np.full(4, 5e9), -1.0], 1e-30),
    # norm 1.3e39 overflows float32: the scale (7.5e-60) comes from the norm's parts.
    "overflowed norm, threshold 1e-20": (np.full(20, 3e38), 1e-20),
}
TINY_SCALE_CLIPPERS = {
    "clip_by_global_norm": oc.clip_by_global_norm,
    "clip_by_norm": oc.clip_by_norm,
    "clip_by_block_rms": lambda t: oc.clip_by_block_rms(t / math.sqrt(20)),
}


def _tiny_scale_reference(tx, entries, threshold, dtype):
    g64 = np.asarray(np.asarray(entries, dtype), np.float64)
    norm = np.sqrt(np.sum(g64**2))
    if oc.testing.clipper_spec(tx).rms:
        norm /= math.sqrt(g64.size)
    return g64 * (threshold / norm)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(TINY_SCALE_CASES))
@pytest.mark.parametrize("name", sorted(TINY_SCALE_CLIPPERS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_scales_below_the_normal_range_are_applied_not_flushed(name, case, dtype, jit):
    entries, threshold = TINY_SCALE_CASES[case]
    tx = TINY_SCALE_CLIPPERS[name](threshold)
    grads = {"g": jnp.asarray(entries, dtype)}
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(grads, tx.init(grads))
    limit = oc.stats(state)[f"{name}/threshold"]
    want = _tiny_scale_reference(tx, entries, float(limit) if name != "clip_by_block_rms"
                                 else float(limit), dtype)
    got = np.asarray(out["g"], np.float64)
    # bf16 rounds toward zero (2^-8 relative); float32 to a few ulps.
    rtol = 2**-7 if dtype == "bfloat16" else 1e-6
    big = np.abs(want) > 1e-36  # entries whose clipped value is a normal number
    assert big.sum() >= 2
    np.testing.assert_allclose(got[big], want[big], rtol=rtol)
    assert np.all(np.abs(got) <= np.abs(want) * (1 + rtol) + 1e-37)
    assert bool(oc.stats(state)[f"{name}/clipped"])
    # The contract harness and `checked` hold it: the float64 reference scale.
    oc.testing.assert_clip_contracts(tx, grads, mode="jit" if jit else "eager")
    checked = oc.checked(tx)
    checked.update(grads, checked.init(grads))


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("case", sorted(TINY_SCALE_CASES))
def test_per_example_scales_below_the_normal_range_are_applied(case, per_layer):
    entries, threshold = TINY_SCALE_CASES[case]
    rows = np.stack([np.asarray(entries), np.asarray(entries)[::-1] * 0.5,
                     np.full(len(entries), 1e-3)])  # the last example is not clipped
    grads = {"g": jnp.asarray(rows, jnp.float32)}
    tx = oc.clip_per_example(threshold, reduce="sum", per_layer=per_layer)
    rows64 = np.asarray(grads["g"], np.float64)
    norms = np.sqrt(np.sum(rows64**2, axis=1))
    want = np.sum(rows64 * np.minimum(1, np.float32(threshold) / norms)[:, None], axis=0)
    for update in (tx.update, jax.jit(tx.update)):
        out, _ = update(grads, tx.init(None))
        np.testing.assert_allclose(np.asarray(out["g"], np.float64), want, rtol=1e-5)


def test_checked_and_the_harness_catch_a_scale_flushed_to_zero(monkeypatch):
    from optaxclip import _clipper

    scale = _clipper._scale

    def flushed(*args, **kwargs):  # what the clippers did before: the product, flushed
        high, low = scale(*args, **kwargs)
        return high * low, jnp.ones_like(low)

    monkeypatch.setattr(_clipper, "_scale", flushed)
    entries, threshold = TINY_SCALE_CASES["norm 1.6e38, threshold 1"]
    grads = {"g": jnp.asarray(entries, jnp.float32)}
    tx = oc.clip_by_global_norm(threshold)
    out, _ = tx.update(grads, tx.init(grads))
    assert not np.any(np.asarray(out["g"]))  # the defect, reproduced
    with pytest.raises(AssertionError, match="not input"):
        oc.testing.assert_clip_contracts(tx, grads, mode="eager")
    checked = oc.checked(tx)
    with pytest.raises(Exception, match="recorded a scale it did not apply"):
        checked.update(grads, checked.init(grads))


# 10. adagc under x64 with an integer leaf and zero gradients: its global total of the
# per-tensor norms was NaN under jit (0 eagerly), so the warmup step was not counted
# and jit and eager states differed. (XLA reassociated the norm rescue's
# (0 * 2^640)^2, the integer leaf's constant placeholder, into 0 * inf.)
@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_adagc_counts_warmup_alike_eagerly_and_under_jit_with_integer_leaves(scale):
    with jax.enable_x64(True):
        grads = {"w": jnp.full((3,), scale, jnp.float64), "i": jnp.zeros((2,), jnp.int32),
                 "n": None}
        tx = oc.adagc(lambda_abs=0.0)
        state = tx.init(grads)
        (_, eager), (_, jitted) = tx.update(grads, state), jax.jit(tx.update)(grads, state)
        assert int(eager.num_warmup) == int(jitted.num_warmup) == 1
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# 11. The contract harness's own float64 reference: finite float64 entries near
# float64's max have a norm beyond its range. The reference norm was inf, so the
# expected output (g / inf * threshold) was 0 and the harness rejected clippers that
# scaled correctly (clip_by_norm and zclip to threshold 1.2e-38: outputs 1e-39).
@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_global_norm", "zclip"])
def test_the_harness_accepts_correct_output_when_the_float64_norm_overflows(name):
    with jax.enable_x64(True):
        entries = np.array([4.4e307, -7.4e307, -1.48e308, 1.6e308])
        grads = jnp.asarray(entries, jnp.float64)
        threshold = float(np.finfo(np.float32).tiny)
        tx = oc.zclip(max_norm=threshold) if name == "zclip" else getattr(oc, name)(threshold)
        out, _ = oc.testing.assert_clip_contracts(tx, grads, mode="eager")
        scaled = entries / np.max(np.abs(entries))
        want = scaled / np.sqrt(np.sum(scaled**2)) * threshold
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12)
        assert np.all(np.asarray(out) != 0)


def test_the_harness_still_rejects_a_wrong_output_when_the_float64_norm_overflows(
        monkeypatch):
    from optaxclip import _clipper

    scale = _clipper._scale

    def halved(*args):  # a clipper that applies half the scale it should
        high, low = scale(*args)
        return high * 0.5, low

    monkeypatch.setattr(_clipper, "_scale", halved)
    with jax.enable_x64(True):
        grads = jnp.asarray([4.4e307, -7.4e307, -1.48e308, 1.6e308], jnp.float64)
        tx = oc.clip_by_norm(float(np.finfo(np.float32).tiny))
        with pytest.raises(AssertionError, match="not input"):
            oc.testing.assert_clip_contracts(tx, grads, mode="eager")


# 12. Scales below tiny**2 (2^-252 in float32): a threshold near 1e-38 against a norm
# near 1e38 needs a third factor, so the split scale's high part is subnormal and
# flushes. Only clipped values under 4 * tiny could have been normal there; the
# harness accepts those as flushed (documented in split_tiny and the README), and
# nothing larger.
def test_scales_below_tiny_squared_flush_only_values_under_four_tiny():
    tiny = float(np.finfo(np.float32).tiny)
    entries = np.array([3.3e38, 1e37, -1e37])
    threshold = 4e-38
    grads = jnp.asarray(entries, jnp.float32)
    tx = oc.clip_by_norm(threshold)
    out, _ = oc.testing.assert_clip_contracts(tx, grads, mode="jit")
    g64 = np.asarray(grads, np.float64)
    want = g64 / np.sqrt(np.sum(g64**2)) * float(np.float32(threshold))
    assert float(np.float32(threshold)) / np.sqrt(np.sum(g64**2)) < tiny**2
    assert np.all(np.abs(want) < 4 * tiny) and np.max(np.abs(want)) > 3 * tiny
    assert np.all(np.abs(np.asarray(out, np.float64) - want) <= 4 * tiny)


# 13. Mixed float64/float32 trees under x64: a float64 global norm of 1e40 clipped to 1
# gives the scale 1e-40, normal in float64 and subnormal in float32. It was flushed to
# zero when cast for the float32 leaves, so finite float32 entries (1e30: clipped
# 1e-10) came out 0, silently. The scale is now re-split in the leaf's dtype.
MIXED_X64_CLIPPERS = {
    "clip_by_global_norm": lambda t: oc.clip_by_global_norm(t),
    "clip_by_group_norms": lambda t: oc.clip_by_group_norms(
        {"all": t}, lambda tree: jax.tree.map(lambda _: "all", tree)),
    "clipped(global_clipnorm)": lambda t: oc.clipped(optax.identity(), global_clipnorm=t),
}


def _mixed_x64_grads():
    return {"wide": jnp.array([1e40, -2e39], jnp.float64),
            "f32": jnp.array([1e30, -3e25, 0.0], jnp.float32),
            "bf16": jnp.array([1e30, 2.0], jnp.bfloat16),
            "c64": jnp.array([1e30 + 1e29j], jnp.complex64)}


def _mixed_x64_reference(grads, threshold):
    leaves = {k: np.asarray(v.astype(jnp.complex128 if jnp.iscomplexobj(v) else jnp.float64))
              for k, v in grads.items()}
    norm = math.sqrt(sum(float(np.sum(np.abs(x) ** 2)) for x in leaves.values()))
    return {k: x * (threshold / norm) for k, x in leaves.items()}


@pytest.mark.parametrize("threshold", [1.0, 1e-20])
@pytest.mark.parametrize("name", sorted(MIXED_X64_CLIPPERS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_float64_scales_are_not_flushed_for_narrower_leaves(name, threshold, jit):
    with jax.enable_x64(True):
        grads = _mixed_x64_grads()
        tx = MIXED_X64_CLIPPERS[name](threshold)
        update = jax.jit(tx.update) if jit else tx.update
        out, _ = update(grads, tx.init(grads))
        want = _mixed_x64_reference(grads, threshold)
        rtol = {"wide": 1e-12, "f32": 1e-6, "bf16": 2**-7, "c64": 1e-6}
        for key, expected in want.items():
            got = np.asarray(out[key].astype(
                jnp.complex128 if jnp.iscomplexobj(out[key]) else jnp.float64))
            big = np.abs(expected) > 1e-36  # clipped values that are normal numbers
            assert big.sum() >= 1
            np.testing.assert_allclose(got[big], expected[big], rtol=rtol[key], err_msg=key)
        assert float(np.asarray(out["f32"][0])) > 0  # 1e-10 or 1e-30, not 0
        if oc.testing.clipper_spec(tx) is not None:  # the harness takes make_clipper's
            oc.testing.assert_clip_contracts(tx, grads, mode="jit" if jit else "eager")


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_global_norm", "clip_by_block_rms",
                                  "adaptive_grad_clip"])
def test_float32_trees_under_x64_get_their_tiny_scales(name):
    # The same cast hit float32-only trees under x64: a Python float threshold is a
    # float64 there, so the scale of a norm of 1e38 clipped to 1 (1e-38, subnormal in
    # float32 but normal in float64) was not split, and every entry came out 0.
    # (adaptive_grad_clip casts its limits to the leaf's dtype and was not hit; it is
    # here as the per-unit case.)
    with jax.enable_x64(True):
        grads = {"w": jnp.array([[1e38, 1e37], [-1e37, 1e30]], jnp.float32)}
        # AGC: unit weight norms sqrt(2), so limits of 0.71 against a norm of 1e38.
        params = {"w": jnp.ones((2, 2), jnp.float32)} if name == "adaptive_grad_clip" \
            else None
        tx = (oc.adaptive_grad_clip(0.5) if name == "adaptive_grad_clip"
              else getattr(oc, name)(1e-3 if name == "clip_by_block_rms" else 1.0))
        out, state = tx.update(grads, tx.init(params if params else grads), params)
        scale = np.asarray(oc.stats(state)[f"{name}/scale"], np.float64) \
            if name != "adaptive_grad_clip" else None
        got = np.asarray(out["w"], np.float64)
        assert np.all(got[np.asarray(grads["w"]) != 0] != 0), got  # nothing flushed to 0
        if scale is not None:  # the recorded scale is the one applied
            want = np.asarray(grads["w"], np.float64) * scale
            big = np.abs(want) > 1e-36
            np.testing.assert_allclose(got[big], want[big], rtol=1e-6)
        oc.testing.assert_clip_contracts(tx, grads, params=params, mode="jit")


@pytest.mark.parametrize("per_layer", [False, True])
def test_per_example_float64_scales_are_not_flushed_for_float32_leaves(per_layer):
    with jax.enable_x64(True):
        grads = {"wide": jnp.array([[1e40], [0.0], [2e40]], jnp.float64),
                 "f32": jnp.array([[1e30, 3e25], [0.0, 0.0], [1e30, 1e30]], jnp.float32)}
        tx = oc.clip_per_example(1.0, reduce="sum", per_layer=per_layer)
        rows = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        if per_layer:  # each of the L layers to C / sqrt(L)
            limit = 1 / math.sqrt(len(rows))
            norms = {k: np.sqrt(np.sum(x**2, axis=1, keepdims=True)) for k, x in rows.items()}
        else:
            limit = 1.0
            total = np.sqrt(sum(np.sum(x**2, axis=1, keepdims=True) for x in rows.values()))
            norms = {k: total for k in rows}
        want = {k: np.sum(x * np.minimum(1, limit / np.where(norms[k] > 0, norms[k], 1)),
                          axis=0) for k, x in rows.items()}
        for update in (tx.update, jax.jit(tx.update)):
            out, _ = update(grads, tx.init(None))
            for key in want:
                np.testing.assert_allclose(np.asarray(out[key], np.float64), want[key],
                                           rtol=1e-5, err_msg=key)


# 14. The same trees' norms: a float32 leaf's power sum was taken in float32 and only
# then added to the float64 total, so it overflowed from entries of 2^64 and flushed
# below 2^-63, and the rescue (scaled for float64's range: 2^-640 and 2^640) could
# not recover it. The norm of {float64 [1.0], float32 [1e30]} was 0, so nothing was
# clipped; with entries of 1e-20 it was inf, so every output was NaN. The contract
# matrix's "mixed64" trees found it.
MIXED_X64_NORM_CASES = {
    "float32 sum overflows": {"a": [1.0], "b": ([1e30], "float32")},
    "float32 sum flushes": {"a": [1e-300], "b": ([1e-20, -3e-20], "float32")},
    "complex64 sum flushes": {"a": [1e-300], "b": ([1e-20 + 1e-20j], "complex64")},
    "complex64 and bf16 overflow": {"a": [1.0], "b": ([1e30 + 1e30j], "complex64"),
                                    "c": ([1e30], "bfloat16")},
    "float32 entries of 2^-64": {"a": [0.0], "b": ([2.0**-64, 2.0**-64], "float32")},
}


def _mixed_tree(spec):
    return {k: jnp.asarray(v, jnp.float64) if isinstance(v, list)
            else jnp.asarray(v[0], v[1]) for k, v in spec.items()}


@pytest.mark.parametrize("ord", [2, 3])
@pytest.mark.parametrize("case", sorted(MIXED_X64_NORM_CASES))
def test_norms_of_mixed_float64_trees_keep_every_leaf(case, ord):
    with jax.enable_x64(True):
        tree = _mixed_tree(MIXED_X64_NORM_CASES[case])
        entries = np.concatenate([np.abs(np.asarray(x).astype(np.complex128)).ravel()
                                  for x in tree.values()])
        top = np.max(entries)
        want = top * np.sum((entries / top) ** ord) ** (1 / ord)
        for norm in (oc.global_norm, jax.jit(oc.global_norm, static_argnums=1)):
            np.testing.assert_allclose(float(norm(tree, ord)), want, rtol=1e-6)
        batched = oc._norms.batched_global_norm(jax.tree.map(lambda x: x[None], tree), ord)
        np.testing.assert_allclose(np.asarray(batched), [want], rtol=1e-6)
        if ord == 2:  # the clip sees the same norm: it halves every leaf
            tx = oc.clip_by_global_norm(want / 2)
            out, state = tx.update(tree, tx.init(tree))
            assert float(oc.stats(state)["clip_by_global_norm/scale"]) == pytest.approx(0.5)
            for key, x in tree.items():
                np.testing.assert_allclose(
                    np.asarray(out[key]).astype(np.complex128),
                    np.asarray(x).astype(np.complex128) / 2, rtol=2**-7, err_msg=key)


def test_the_harness_catches_a_float64_scale_flushed_for_float32_leaves(monkeypatch):
    from optaxclip import _scaling

    def cast(scale, low, dtype):  # what apply_scale did before: a plain cast
        return scale.astype(dtype), None if low is None else low.astype(dtype)

    monkeypatch.setattr(_scaling, "narrowed", cast)
    with jax.enable_x64(True):
        grads = _mixed_x64_grads()
        tx = oc.clip_by_global_norm(1.0)
        out, _ = tx.update(grads, tx.init(grads))
        assert float(np.asarray(out["f32"][0])) == 0  # the defect, reproduced
        with pytest.raises(AssertionError):
            oc.testing.assert_clip_contracts(tx, grads, mode="eager")


# 15. Dividing by a maximum past 2^126 (float32): XLA computes ``x / d``, with ``d`` a
# broadcast scalar, as ``x * (1 / d)``, and that reciprocal is subnormal and flushes to
# zero. The 3-norm of entries near 1e38 came out 0, so ``clip_by_norm(ord=3)`` let them
# through unclipped; the mean and std of a history holding a norm near 1e38 came out 0,
# so ``clip_update_norm``'s threshold was 0 and it zeroed every later update (eagerly;
# ``make fuzz``'s guard matrix found it). Such divisions now scale both sides by 2^-64
# first (``_norms.quotient``).
HUGE_TREE = {"a": np.array([1.4e38, 1.0e38, 3.0], np.float32),
             "b": np.full((4, 4), 1e38, np.float32)}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("ord", [3, 4.5])
def test_norms_by_their_maximum_past_2_to_the_126(ord, jit):
    tree = jax.tree.map(jnp.asarray, HUGE_TREE)
    leaf_norm = lambda x: float(np.sum(np.abs(x.astype(np.float64)) ** ord) ** (1 / ord))
    whole = float(np.sum([np.sum(np.abs(x.astype(np.float64)) ** ord)
                          for x in HUGE_TREE.values()]) ** (1 / ord))
    norm = jax.jit(oc.global_norm, static_argnums=1) if jit else oc.global_norm
    np.testing.assert_allclose(float(norm(tree, ord)), whole, rtol=1e-6)
    tx = oc.clip_by_norm(1.0, ord=ord)
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(tree, tx.init(tree))
    for key, x in HUGE_TREE.items():
        np.testing.assert_allclose(float(state.stats.norm[key]),
                                   leaf_norm(x), rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(leaf_norm(np.asarray(out[key])), 1.0, rtol=1e-5,
                                   err_msg=key)


@pytest.mark.parametrize("jit", [False, True])
def test_history_statistics_past_2_to_the_126(jit):
    from optaxclip import _history

    history = _history.empty(4, jnp.float32)
    for value in (1e38, 2.0):
        history = _history.record(history, jnp.float32(value), True)
    mean_std = jax.jit(_history.mean_std) if jit else _history.mean_std
    np.testing.assert_allclose(np.asarray(mean_std(history)), [5e37, 5e37], rtol=1e-6)

    tx = oc.clip_update_norm(window=8, min_history=2, z=2.0)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(GRADS)
    for scale in (1.0, 1.0, 1.0, 4e37):  # the last update's norm is near 1.2e38
        _, state = update({k: g * scale for k, g in GRADS.items()}, state)
    out, state = update(GRADS, state)
    stats = oc.stats(state)
    assert float(stats["clip_update_norm/threshold"]) > 1e37
    for key, g in GRADS.items():  # far under the threshold: returned as it came
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(g), err_msg=key)


# 16. p-norms with p <= 1 of finite entries past float32's range. The 1-norm was summed
# without the overflow rescue, and for p < 1 the power sum stays finite while its root
# (the norm) overflows, so the norm came out ``inf`` with no finite parts to take an
# exact scale from: ``clip_by_norm(ord=1)`` of twelve entries of 3e37 returned NaN, and
# so did ``ord=0.5`` and the global forms. The contract matrix's ``ord`` dimension
# found it. The 1-norm now takes the rescue like p <= 2, and for p < 1 an overflowing
# root sends the norm to the rescue by its maximum, whose parts hold the norm up to
# 2^256 (``_norms._wide_root_parts``); past that the scale is 0.
WIDE_ROOT_CASES = {  # (ord, entries, value, threshold)
    "l1_sum_overflows": (1.0, 12, 3e37, 1.0),
    "p0.5_root_overflows": (0.5, 1000, 3e38, 1.0),
    "p0.25_root_in_halves": (0.25, 100, 3e37, 1.0),
    "p0.1_huge_threshold": (0.1, 100, 3e37, 1e38),
    "p0.1_small_entries": (0.1, 10_000, 1e-3, 1e30),
    "p0.05_norm_past_2_to_the_256": (0.05, 1000, 2.0, 1e37),
    "p0.1_scale_below_2_to_the_minus_256": (0.1, 10_000, 1.0, 1.0),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_global_norm"])
@pytest.mark.parametrize("case", sorted(WIDE_ROOT_CASES))
def test_p_norms_up_to_1_past_the_float32_range(case, name, jit):
    ord, n, value, threshold = WIDE_ROOT_CASES[case]
    grads = {"a": jnp.full((n,), value, jnp.float32).at[0].set(value / 2),
             "b": jnp.full((3,), value / 4, jnp.float32)}
    tx = getattr(oc, name)(threshold, ord=ord)
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(grads, tx.init(grads))

    def log2_norm(leaves):  # float64, in logs: the norms here pass even float64's range
        x = np.concatenate([np.abs(np.asarray(v, np.float64)).ravel() for v in leaves])
        largest = x.max()
        return math.log2(largest) + math.log2(np.sum((x / largest) ** ord)) / ord

    for key, g in grads.items():
        group = list(grads.values()) if name == "clip_by_global_norm" else [g]
        log2_scale = min(0.0, math.log2(threshold) - log2_norm(group))
        x = np.asarray(g, np.float64)
        want = np.sign(x) * np.exp2(np.log2(np.abs(x)) + log2_scale)
        got = np.asarray(out[key], np.float64)
        assert np.all(np.isfinite(got)), (key, got[:3])
        assert np.all(np.abs(got) <= np.abs(x)), key
        normal = np.abs(want) >= float(jnp.finfo(jnp.float32).tiny)
        np.testing.assert_allclose(got[normal], want[normal], rtol=2e-5, err_msg=key)
        # Below the normal range: as exact as a float32 subnormal, or flushed where the
        # exact scale is below threshold * 2^-256 (every such output is below 2^-128 t).
        flushed = log2_scale < -256
        tolerance = threshold * 2.0**-128 if flushed else float(jnp.finfo(jnp.float32).tiny)
        np.testing.assert_array_less(np.abs(got[~normal] - want[~normal]), tolerance)
        recorded = state.stats.norm[key] if name == "clip_by_norm" else state.stats.norm
        if log2_norm(group) >= 128:
            assert float(recorded) == math.inf, key
        else:
            np.testing.assert_allclose(float(recorded), 2.0 ** log2_norm(group), rtol=2e-5)


# 17. Integer thresholds past int32: a threshold went through jnp.asarray, which makes
# a host integer jax's default int32, so np.int64(2**32) wrapped to 0 and zeroed
# every gradient (stats recording threshold 0), np.int64(2**31 + 5) wrapped negative
# (clamped to 0, the same), and a Python 10**10 raised OverflowError inside update().
# Host integers now go through float64. An integer no float holds (10**400) is
# refused at construction by name.
# The library's own factories (a test registers the README's example clipper, whose
# rule is user code).
THRESHOLD_FACTORIES = sorted(
    name for name, info in oc.registered_factories().items()
    if info.threshold is not None and info.kind in ("clipper", "preset")
    and info.factory.__module__.startswith("optaxclip."))


@pytest.mark.parametrize("name", THRESHOLD_FACTORIES)
def test_integer_thresholds_past_int32(name):
    # Jitted only: the threshold is read at trace time, in Python, either way.
    info = oc.registered_factories()[name]
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda g: g * 1e6, GRADS)
    # Python ints past 2^64 have no integer dtype at all (numpy makes them objects).
    for limits in ((float(2**32), np.int64(2**32), np.uint64(2**32), 2**32,
                    np.array(2**32, np.int64)),
                   (float(10**20), 10**20, 2**70)):
        outputs = []
        for limit in limits:
            tx = info.build(limit)
            update = jax.jit(tx.update)
            state = tx.init(params)
            for _ in range(3):  # past the adaptive clippers' warmup
                out, state = update(grads, state, params)
            outputs.append(out)
        for out in outputs[1:]:
            for key in grads:
                np.testing.assert_array_equal(np.asarray(out[key]),
                                              np.asarray(outputs[0][key]))
    with pytest.raises(ValueError, match=info.threshold):
        info.build(10**400)


@pytest.mark.parametrize("limit", [np.int64(2**32), np.uint64(2**32), 2**32, 10**20])
def test_integer_per_example_thresholds_past_int32(limit):
    examples = {"w": jnp.arange(12.0).reshape(4, 3) * 1e6, "b": jnp.ones((4, 2))}
    reference = oc.clip_per_example(float(limit))
    want, _ = reference.update(examples, reference.init(None))
    tx = oc.clip_per_example(limit)
    got, state = jax.jit(tx.update)(examples, tx.init(None))
    for key in examples:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    assert float(oc.stats(state)["clip_per_example/threshold"]) == float(np.float32(limit))
    clipped, _ = oc.clip(examples, limit)  # the functional form too
    np.testing.assert_array_equal(np.asarray(clipped["w"]), np.asarray(examples["w"]))


# 18. Finite complex entries whose modulus passes float32's largest value (3e38 + 3e38j
# has modulus 4.2e38). For p > 2, p < 1 and inf the norm divided by, or was, the
# largest modulus, which is inf for such entries, so clip_by_norm / clip_by_global_norm
# returned NaN everywhere for finite input (p <= 2 took the power-of-two rescue and
# was right). The maximum is now taken of |z / 2| where it divides
# (_norms._divisor_base), and the inf-norm of such entries is kept as the parts
# (2, max |z / 2|).
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_global_norm"])
@pytest.mark.parametrize("ord", [0.5, 1.0, 1.5, 2.0, 3.0, 7.5, math.inf])
def test_complex_moduli_past_the_float32_range(ord, name, jit):
    grads = {"z": jnp.array([3e38 + 3e38j, 1e38 - 2e38j, 1.0 + 0j], jnp.complex64),
             "r": jnp.array([2e38, -1.0], jnp.float32)}
    tx = getattr(oc, name)(1.0, ord=ord)
    update = jax.jit(tx.update) if jit else tx.update
    out, _ = update(grads, tx.init(grads))

    def norm(leaves):  # float64; the moduli fit, the p-norms are taken by the maximum
        m = np.concatenate([np.abs(np.asarray(v, np.complex128)).ravel() for v in leaves])
        if ord == math.inf:
            return m.max()
        return m.max() * np.sum((m / m.max()) ** ord) ** (1 / ord)

    for key, g in grads.items():
        group = list(grads.values()) if name == "clip_by_global_norm" else [g]
        want = np.asarray(g, np.complex128) / norm(group)
        got = np.asarray(out[key], np.complex128)
        assert np.all(np.isfinite(got)), (key, got)
        big = np.abs(want) > 1e-30
        np.testing.assert_allclose(got[big], want[big], rtol=2e-6, err_msg=key)
        np.testing.assert_array_less(np.abs(got[~big]), 1e-30)

    # A real inf entry beside them is non-finite input: NaN, as for any inf entry.
    with_inf = {**grads, "r": jnp.array([jnp.inf, -1.0], jnp.float32)}
    out, _ = update(with_inf, tx.init(with_inf))
    assert np.all(np.isnan(np.asarray(out["r"])))


# 19. Per-leaf and unit-wise stats counted the leaves that are not floats (an integer
# step counter, a float0 gradient from jax.grad(allow_int=True)): such a leaf was
# recorded as a norm of 0 that was not clipped, so clipped_fraction read 2/3 with
# every float leaf clipped, and AGC's and AdaGC's placeholder limits (inf,
# lambda_abs) showed as threshold_max. Such a leaf's record now holds no entries.
PER_LEAF_STATS = {
    "clip_by_norm": lambda: oc.clip_by_norm(1.0),
    "clip_by_block_rms": lambda: oc.clip_by_block_rms(0.5),
    "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.01),
    "adagc": lambda: oc.adagc(lambda_abs=1.0, warmup_steps=1),
    "clip_update_rms": lambda: oc.clip_update_rms(0.5),
    "monitor_norm": lambda: oc.monitor_norm(per_leaf=True),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(PER_LEAF_STATS))
def test_per_leaf_stats_leave_out_leaves_that_are_not_floats(name, jit):
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}

    def loss(p):
        return 10.0 * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)) + 0 * p["step"]

    grads = jax.grad(loss, allow_int=True)(params)  # "step" gets a float0 gradient
    floats_only = {k: v for k, v in grads.items() if k != "step"}
    tx = PER_LEAF_STATS[name]()
    update = jax.jit(tx.update) if jit else tx.update
    state, reference = tx.init(params), tx.init({k: params[k] for k in floats_only})
    for _ in range(3):
        out, state = update(grads, state, params)
        _, reference = update(floats_only, reference, {k: params[k] for k in floats_only})
    got, want = oc.stats(state), oc.stats(reference)
    assert got.keys() == want.keys()
    for key in want:  # every summary as if the leaf were not there
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    # The state keeps init's shapes (a scan carry or a donated buffer needs them).
    shapes = lambda s: [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(s)]
    assert shapes(state) == shapes(tx.init(params))
    per_leaf = oc.stats(state, per_leaf=True)
    step = [key for key in per_leaf if "/step/" in key]
    assert step and all(not bool(per_leaf[key]) for key in step if key.endswith("/clipped"))


# 20. AdaGC after a tensor's gamma decayed to 0 (zero gradients after warmup): with
# lambda_rel = inf its limit was inf * 0 = NaN, so its next finite gradients came out
# NaN (documented: the identity after warmup) and gamma turned NaN, sending the
# tensor back to the warmup rule for good. A lambda_rel schedule that was NaN for one
# step did the same. The limit of lambda_rel = inf is inf, and a step whose clipped
# norm is not finite leaves gamma as it was.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adagc_gamma_survives_zero_gradients_and_a_nan_limit(jit):
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    warm = {"a": jnp.array([1.0, 2.0, 2.0]), "b": jnp.array([0.5, 0.5])}
    idle = {"a": jnp.zeros(3), "b": jnp.array([0.5, 0.5])}
    tx = oc.adagc(lambda_rel=math.inf, beta=0.0, warmup_steps=1)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for grads in (warm, idle):
        _, state = update(grads, state)
    assert float(state.gamma["a"]) == 0.0
    out, state = update(warm, state)
    np.testing.assert_array_equal(np.asarray(out["a"]), [1.0, 2.0, 2.0])
    assert float(state.gamma["a"]) == 3.0

    # lambda_rel NaN on step 3 only: that step is NaN, gamma is kept, later steps clip
    # against it as before.
    tx = oc.adagc(lambda_rel=lambda count: jnp.where(count == 3, jnp.nan, 1.05), beta=0.9,
                  warmup_steps=1)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    gammas = []
    for step in range(6):
        out, state = update(warm, state)
        gammas.append(float(state.gamma["a"]))
        assert np.all(np.isnan(np.asarray(out["a"]))) == (step == 3), step
    assert gammas[3] == gammas[2] and math.isfinite(gammas[5]), gammas


# 21. Under x64, spam's spike counts widened from int32 to int64 after the first update
# (a plain jnp.sum of int32 gives int64 there), so a lax.scan over its state failed
# and a jitted step retraced. Every registered transformation's state keeps init's
# dtypes and shapes under x64, for float32 and float64 trees.
def _x64_build(info):
    if info.kind in ("guard", "moment_clipper"):
        return info.build(inner=optax.adam(1e-3))
    return info.build(*([1.0] if info.threshold else []))


X64_LAYOUT = sorted(name for name, info in oc.registered_factories().items()
                    if info.kind in ("clipper", "guard", "moment_clipper")
                    and info.factory.__module__.startswith("optaxclip."))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", X64_LAYOUT)
def test_state_layout_is_stable_under_x64(name, dtype):
    with jax.enable_x64(True):
        params = {"w": jnp.ones((4, 3), dtype), "b": jnp.ones(3, dtype)}
        grads = {"w": jnp.full((4, 3), 50.0, dtype), "b": jnp.array([1.0, -2.0, 3e3], dtype)}
        tx = _x64_build(oc.registered_factories()[name])
        state = tx.init(params)

        def step(state, g):
            _, state = tx.update(g, state, params)
            return state, None

        final, _ = jax.lax.scan(step, state, jax.tree.map(lambda g: jnp.stack([g, g * 3]), grads))
        layout = lambda s: [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(s)]
        assert layout(final) == layout(state)


# 22. AGC's limit for a unit whose weight norm passes float32's range (a kernel of
# finite weights near 2e38): the weight norm overflowed to inf, so the limit was inf
# and gradients far above clipping * ||W_u|| passed unclipped. The limit now comes
# from the weight norm's finite parts.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_agc_limits_from_weight_norms_past_float32(dtype, jit):
    params = {"k": jnp.full((4, 2), 2e38, dtype)}  # each column's norm is 4e38
    grads = {"k": jnp.full((4, 2), 1e37, dtype)}  # each column's norm is 2e37
    tx = oc.adaptive_grad_clip(0.01)
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(grads, tx.init(params), params)
    weight_norm = np.linalg.norm(np.asarray(params["k"], np.float64), axis=0)
    np.testing.assert_allclose(np.asarray(state.stats.threshold["k"], np.float64),
                               0.01 * weight_norm, rtol=1e-6)
    columns = np.linalg.norm(np.asarray(out["k"], np.float64), axis=0)
    assert np.all(columns <= 0.01 * weight_norm * (1 + 1e-6)), columns
    np.testing.assert_allclose(columns, 0.01 * weight_norm, rtol=1e-2)  # bf16 rounds down


# 23. Under x64, a state made by tx.init(None) (as the docstring examples write it) was
# float32, so a float64 gradient norm of 1.7e200 was recorded as inf (clip_by_global_norm
# also recorded scale 0 while applying the right one) and autoclip's and
# clip_update_norm's histories never recorded it. Without float parameters to go by,
# the state is float64 under x64.
INIT_NONE = {
    "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
    "autoclip": lambda: oc.autoclip(history=4),
    "zclip": lambda: oc.zclip(warmup_steps=1),
    "clip_update_norm": lambda: oc.clip_update_norm(window=4, min_history=2),
}


@pytest.mark.parametrize("name", sorted(INIT_NONE))
def test_float64_norms_in_a_state_initialised_without_params(name):
    with jax.enable_x64(True):
        tx = INIT_NONE[name]()
        grads = {"w": jnp.full((3,), 1e200, jnp.float64)}
        state = tx.init(None)
        for _ in range(2):
            _, state = jax.jit(tx.update)(grads, state)
        norm = float(oc.stats(state)[f"{name}/norm"])
        np.testing.assert_allclose(norm, math.sqrt(3) * 1e200, rtol=1e-12)
        float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert all(x.dtype == jnp.float64 for x in float_leaves), name
        # float32 gradients keep the state's float64 layout.
        _, again = jax.jit(tx.update)({"w": jnp.ones(3, jnp.float32)}, state)
        layout = lambda s: [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(s)]
        assert layout(again) == layout(state)


# 24. XLA:CPU's vectorised max and min reductions drop NaN past about 4,096 reduced
# entries (jnp.max of 4,096 ones and one NaN gives 1.0, or -inf with the NaN last).
# An inf-norm clipper then measured a finite norm for a NaN gradient and clipped the
# finite entries by it; clip_per_example's norm_max and the stats summaries of
# per-unit norms read finite. optaxclip._reductions carries a NaN flag through the
# reduction. Sizes and NaN positions are drawn, the last entry always among them.
def _nan_at(size: int, rng, last: bool) -> np.ndarray:
    values = rng.uniform(0.1, 1.0, size=size).astype(np.float32)
    values[size - 1 if last else rng.integers(0, size)] = np.nan
    return values


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("last", [False, True], ids=["random", "last"])
def test_inf_norms_and_maxima_keep_nan_past_4096_entries(seed, last):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(4096, 3 * 4096))
    grads = {"w": jnp.asarray(_nan_at(size, rng, last)), "b": jnp.ones(3)}
    assert math.isnan(float(jax.jit(lambda g: oc.global_norm(g, ord=math.inf))(grads)))
    for tx in (oc.clip_by_global_norm(0.05, ord=math.inf), oc.clip_by_norm(0.05, ord=math.inf),
               oc.monitor_norm(ord=math.inf)):
        out, state = jax.jit(tx.update)(grads, tx.init(grads))
        assert math.isnan(float(next(v for k, v in oc.stats(state).items()
                                     if k.endswith("/norm")))), tx
        if not isinstance(state, oc.MonitorNormState):  # a NaN norm: the scope is NaN
            assert bool(jnp.all(jnp.isnan(out["w"]))), tx
    for per_leaf in (False, True):
        out, norm = oc.clip_per_leaf(grads, 0.05, ord=math.inf) if per_leaf else \
            oc.clip(grads, 0.05, ord=math.inf)
        assert bool(jnp.all(jnp.isnan(out["w"])))
        assert math.isnan(float(norm["w"] if per_leaf else norm))
    # Per-example: B past 4,096 examples, one of them NaN.
    batch = {"w": jnp.asarray(_nan_at(size, rng, last)).reshape(size, 1)}
    tx = oc.clip_per_example(1.0)
    _, state = jax.jit(tx.update)(batch, tx.init({"w": jnp.zeros(1)}))
    assert math.isnan(float(oc.stats(state)["clip_per_example/norm_max"]))
    # The summary of more than 4,096 per-unit norms (AGC's rows of a [2, N] kernel).
    kernel = {"k": jnp.asarray(_nan_at(2 * size, rng, last)).reshape(size, 2).T}
    tx = oc.adaptive_grad_clip(0.01, axis=0)
    _, state = jax.jit(tx.update)(kernel, tx.init(kernel), jax.tree.map(jnp.ones_like, kernel))
    summary = oc.stats(state)
    assert math.isnan(float(summary["adaptive_grad_clip/norm"]))


# 25. stats() of a per-leaf clipper that measured no float entries (a tree of integer
# leaves, a stacked leaf with zero layers) raised numpy's "zero-size array to
# reduction operation" error: the summaries of nothing are norm 0, no limit, scale 1.
@pytest.mark.parametrize("make, tree", [
    (lambda: oc.clip_by_norm(1.0), {"i": jnp.arange(3)}),
    (lambda: oc.clip_by_norm(1.0, stacked=True), {"w": jnp.zeros((0, 3))}),
    (lambda: oc.clip_update_rms(1.0), {"i": jnp.arange(3)}),
    (lambda: oc.monitor_norm(per_leaf=True), {"i": jnp.arange(3)}),
])
def test_stats_of_a_per_leaf_clipper_that_measured_nothing(make, tree):
    tx = make()
    _, state = tx.update(tree, tx.init(tree))
    summary = oc.stats(state)
    norm = next(v for k, v in summary.items() if k.endswith("/norm"))
    assert float(norm) == 0.0
    assert not any(bool(v) for k, v in summary.items() if k.endswith("/clipped"))


# 26. A tree of Python floats (as a config or a hand-written test passes them): every
# clipper with a norm per leaf or unit raised AttributeError in init ("'float' object
# has no attribute 'dtype'"), where the global clippers and clip() accepted it. Every
# registered clipper now gives what the same tree of arrays gives.
CLIPPER_FACTORIES = sorted(
    name for name, info in oc.registered_factories().items()
    if info.kind == "clipper" and info.factory.__module__.startswith("optaxclip."))


@pytest.mark.parametrize("name", CLIPPER_FACTORIES)
def test_python_float_leaves(name):
    info = oc.registered_factories()[name]
    floats = [5.0, -12.0, 0.25]
    arrays = [jnp.float32(x) for x in floats]
    outs = []
    for tree in (floats, arrays):
        tx = info.build(1.0)
        params = [1.0, 2.0, 3.0] if info.needs_params else None
        state = tx.init(tree if params is None else params)
        for _ in range(3):
            out, state = tx.update(tree, state, params)
        outs.append(out)
    for got, want in zip(*outs):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    per_leaf, norms = oc.clip_per_leaf(floats, 1.0)
    np.testing.assert_array_equal(np.asarray(norms), [5.0, 12.0, 0.25])
    np.testing.assert_allclose(np.asarray(per_leaf), [1.0, -1.0, 0.25], rtol=1e-6)


# 27. Under x64 the RMS clippers divided a float64 norm by a float32 square root of the
# entry count: float64 ones (RMS exactly 1) read 1.0000000171 and were clipped at
# threshold 1, and every float64 RMS carried float32's rounding. The count's root is
# now taken in the norm's dtype.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["clip_by_rms", "clip_by_block_rms", "clip_update_rms"])
def test_float64_rms_is_float64_exact(name, jit):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        tx = oc.registered_factories()[name].build(1.0)
        ones = {"w": jnp.ones((3, 5), jnp.float64)}
        update = jax.jit(tx.update) if jit else tx.update
        out, state = update(ones, tx.init(ones))
        # Within float64's last bit of 1 (the 1-ulp rounding the docstrings state at
        # exactly the threshold), not float32's.
        np.testing.assert_allclose(float(oc.stats(state)[f"{name}/norm"]), 1.0, rtol=3e-16)
        np.testing.assert_allclose(np.asarray(out["w"]), np.ones((3, 5)), rtol=3e-16)
        values = rng.normal(size=(7, 11))
        _, state = update({"w": jnp.asarray(values * 1e200)}, tx.init(ones))
        np.testing.assert_allclose(float(oc.stats(state)[f"{name}/norm"]),
                                   np.sqrt(np.mean(values**2)) * 1e200, rtol=1e-14)


# 28. zclip(z_thresh=inf) was accepted, and once the EMA spread was 0 (constant
# norms, or eps=0 after a one-step warmup) its boundary was mu + inf * 0 = NaN, so
# finite gradients came out NaN. With z_thresh = inf nothing is a spike: only
# max_norm clips.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode, eps", [("zscore", 0.0), ("zscore", 1e-6), ("mean", 0.0),
                                       ("percentile", 1e-6)])
@pytest.mark.parametrize("max_norm", [None, 1.5])
def test_zclip_with_an_infinite_z_thresh_clips_by_max_norm_only(mode, eps, max_norm, jit):
    tx = oc.zclip(z_thresh=math.inf, mode=mode, eps=eps, warmup_steps=1, max_norm=max_norm)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(jnp.zeros(1))
    for g in (1.0, 1.0, 2.0, 50.0):
        out, state = update(jnp.array([g]), state)
        want = g if max_norm is None else min(g, max_norm)
        assert float(out[0]) == want, (g, float(out[0]))
        assert not math.isnan(float(oc.stats(state)["zclip/threshold"]))


# 29. adaptive_grad_clip's axis under optax.inject_hyperparams (which makes it an array)
# was refused as "must be None, an int or a non-empty tuple of ints ... got Array(0)"
# with no word of static_args; a concrete jnp.asarray(0) was refused while np.int64(0)
# was accepted. A params leaf that is None or not a float where the gradient is a
# float array left that gradient unclipped (limit inf) without a word.
def test_agc_axis_as_an_array_and_params_that_are_not_floats():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    grads = jax.tree.map(lambda p: p * 50.0, params)
    want, _ = oc.adaptive_grad_clip(0.01, axis=0).update(
        grads, oc.adaptive_grad_clip(0.01, axis=0).init(params), params)
    for axis in (jnp.asarray(0), np.int64(0), (jnp.asarray(0),), [np.int32(0)]):
        tx = oc.adaptive_grad_clip(0.01, axis=axis)
        got, _ = tx.update(grads, tx.init(params), params)
        chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), got, want)
        assert all(jax.tree.leaves(chex_equal)), axis
    injected = optax.inject_hyperparams(oc.adaptive_grad_clip)(0.01, axis=0)
    state = injected.init(params)
    with pytest.raises(ValueError, match=r"axis must be static.*static_args=\('axis',\)"):
        jax.jit(injected.update)(grads, state, params)
    tx = oc.adaptive_grad_clip(0.01)
    state = tx.init(params)
    for bad in (None, jnp.arange(2), 3):
        with pytest.raises(ValueError, match=r"params\['b'\] is .*float"):
            tx.update(grads, state, {"w": params["w"], "b": bad})
    # A Python float parameter is a float parameter.
    scalar = {"s": 2.0}
    tx.update({"s": jnp.float32(50.0)}, tx.init(scalar), scalar)


# 30. clip_by_group_norms compared labels by repr: np.str_("bias") (a label read from a
# numpy array of strings), which optax.partition finds under "bias", was refused as
# missing from max_norms.
def test_group_labels_are_looked_up_by_equality():
    params = {"w": jnp.full((2, 2), 3.0), "b": jnp.full(2, 4.0)}
    plain = oc.clip_by_group_norms({"weight": 1.0, "bias": None}, {"w": "weight", "b": "bias"})
    numpy_labels = oc.clip_by_group_norms(
        {"weight": 1.0, "bias": None}, {"w": np.str_("weight"), "b": np.str_("bias")})
    want, _ = plain.update(params, plain.init(params))
    got, _ = numpy_labels.update(params, numpy_labels.init(params))
    for key in params:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    with pytest.raises(ValueError, match="labelled 'other'"):
        oc.clip_by_group_norms({"weight": 1.0}, {"w": "weight", "b": "other"}).init(params)


# 31. Under x64 clip_per_example narrowed to float32: finite per-example norms of 5e200
# were recorded as inf (norm_max, norm_median), and with noise a finite max_norm of 1e40
# gave a noise std of inf, so every output entry was inf. The stats are held in the
# parameters' dtype (float64 for tx.init(None) under x64) and the noise std in the
# threshold's.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_clip_per_example_under_x64_keeps_float64(jit):
    with jax.enable_x64(True):
        batch = {"w": jnp.array([[3e200, 4e200], [1.5e200, 2e200]], jnp.float64)}
        tx = oc.clip_per_example(1.0)
        update = jax.jit(tx.update) if jit else tx.update
        out, state = update(batch, tx.init(None))
        np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8], rtol=1e-12)
        report = oc.stats(state)
        np.testing.assert_allclose(float(report["clip_per_example/norm_max"]), 5e200, rtol=1e-12)
        np.testing.assert_allclose(float(report["clip_per_example/norm_median"]), 3.75e200,
                                   rtol=1e-12)
        noisy = oc.clip_per_example(1e40, noise_multiplier=1.0, reduce="sum")
        out, state = (jax.jit(noisy.update) if jit else noisy.update)(batch, noisy.init(None))
        assert bool(jnp.all(jnp.isfinite(out["w"])))
        assert float(oc.stats(state)["clip_per_example/noise_std"]) == 1e40
        # The layout init gives is the layout update keeps (a lax.scan carry).
        layout = lambda s: [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(s)]
        assert layout(state) == layout(noisy.init(None))
