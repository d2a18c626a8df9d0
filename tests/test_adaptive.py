"""AGC, AutoClip, ZClip and AdaGC against float64 numpy references written here.

Each method runs over one sequence of gradients that covers warmup, spikes,
NaN/inf norms and zero gradients, jitted and eagerly. The checks: outputs and
thresholds match the reference, jit equals eager, the output is inside the
recorded threshold, and a checkpoint taken mid-run resumes bit-identically.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

RTOL = 2e-5
SHAPES = {"a": (3,), "b": (2, 2)}
# A base level with noise, a spike, a NaN, an inf, zeros, and a level shift.
NORMS = (
    [1.0, 1.2, 0.8, 1.1, 0.9, 1.05]
    + [0.95, 40.0, 1.0, math.nan, 1.1, 0.0, 0.9, 300.0, 1.0, math.inf, 1.2, 0.85]
    + [1.0, 0.0, 1.1, 25.0, 0.9, 1.0, 1.15, 0.95, 5.0, 1.0]
)


def tree_with_norm(norm: float, seed: int) -> dict:
    """A float32 tree whose global 2-norm is ``norm`` (NaN/inf put in one entry)."""
    rng = np.random.default_rng(seed)
    leaves = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    total = math.sqrt(sum(float(np.sum(v * v)) for v in leaves.values()))
    tree = {k: v / total * (norm if math.isfinite(norm) else 1.0) for k, v in leaves.items()}
    if not math.isfinite(norm):
        tree["b"][0, 1] = norm
    return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def f64(tree: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def norm64(tree: dict) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in f64(tree).values()))


GRADS = [tree_with_norm(n, i) for i, n in enumerate(NORMS)]
PARAMS = {k: jnp.ones(s, jnp.float32) for k, s in SHAPES.items()}


def run(tx, grads_seq, params, *, jit: bool):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    outs, states = [], []
    for grads in grads_seq:
        out, state = update(grads, state, params)
        outs.append(out)
        states.append(state)
    return outs, states


def scale_ref(norm: float, threshold: float) -> float:
    if threshold == math.inf:
        return 1.0
    if not math.isfinite(norm):
        return math.nan
    return 1.0 if norm <= threshold else threshold / norm


def check_global(outs, states, thresholds, grads_seq):
    """Outputs are g * scale_ref; thresholds match; finite outputs are in the ball."""
    for step, (out, state, threshold, grads) in enumerate(
        zip(outs, states, thresholds, grads_seq)
    ):
        recorded = float(state.stats.threshold)
        np.testing.assert_allclose(recorded, threshold, rtol=RTOL, err_msg=f"step {step}")
        scale = scale_ref(norm64(grads), threshold)
        if scale == 1.0 and norm64(grads) < threshold * (1 - 1e-5):
            assert_trees_equal(out, grads)  # identity below the threshold, bit for bit
        for key, g in f64(grads).items():
            np.testing.assert_allclose(
                np.asarray(out[key], np.float64), g * scale, rtol=RTOL, atol=1e-7,
                err_msg=f"step {step} leaf {key}",
            )
        if math.isfinite(norm64(grads)):
            assert float(oc.global_norm(out)) <= recorded * (1 + 1e-6)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


EAGER_STEPS = 10  # eager covers warmup, a spike and a NaN; jit covers the whole sequence


def assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=1e-6, atol=1e-7)


def check_resume(tx, grads_seq, params, split: int, full_run=None):
    """A msgpack checkpoint after ``split`` steps resumes bit-identically."""
    full_outs, full_states = full_run or run(tx, grads_seq, params, jit=True)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for grads in grads_seq[:split]:
        _, state = update(grads, state, params)
    restored = flax.serialization.from_bytes(
        tx.init(params), flax.serialization.to_bytes(state)
    )
    for step, grads in enumerate(grads_seq[split:], start=split):
        out, restored = update(grads, restored, params)
        assert_trees_equal(out, full_outs[step])
    assert_trees_equal(restored, full_states[-1])


# ---------------------------------------------------------------- AutoClip


def autoclip_ref(norms, percentile, history, cap):
    recorded = collections.deque(maxlen=history)
    thresholds = []
    for norm in norms:
        if math.isfinite(norm) and norm > 0:
            recorded.append(norm)
        adaptive = float(np.percentile(list(recorded), percentile)) if recorded else math.inf
        thresholds.append(min(adaptive, cap))
    return thresholds


@pytest.mark.parametrize("percentile,history,max_norm", [(10.0, 8, None), (50.0, 100, 5.0)])
def test_autoclip_matches_numpy_reference(percentile, history, max_norm):
    tx = oc.autoclip(percentile, history=history, max_norm=max_norm)
    cap = math.inf if max_norm is None else max_norm
    expected = autoclip_ref([norm64(g) for g in GRADS], percentile, history, cap)
    jit_outs, jit_states = run(tx, GRADS, None, jit=True)
    check_global(jit_outs, jit_states, expected, GRADS)
    eager_outs, eager_states = run(tx, GRADS[:EAGER_STEPS], None, jit=False)
    assert_trees_close(eager_outs, jit_outs[:EAGER_STEPS])
    assert_trees_close(eager_states, jit_states[:EAGER_STEPS])
    report = oc.stats(jit_states[-1])
    assert int(report["autoclip/num_recorded"]) == int(jit_states[-1].history.num_recorded)
    # NaN/inf and zero norms are not recorded.
    assert np.all(np.isfinite(np.asarray(jit_states[-1].history.values)))
    recorded = sum(math.isfinite(n) and n > 0 for n in NORMS)
    assert int(jit_states[-1].history.num_recorded) == recorded


def test_autoclip_first_step_is_unclipped_and_max_norm_caps_it():
    grads = [jnp.array([7.0])]
    out, state = oc.autoclip().update(grads, oc.autoclip().init(None))
    assert float(out[0][0]) == 7.0 and float(state.stats.threshold) == 7.0
    capped = oc.autoclip(max_norm=2.0)
    out, state = capped.update(grads, capped.init(None))
    np.testing.assert_allclose(float(out[0][0]), 2.0, rtol=1e-6)


def test_autoclip_checkpoint_resume_is_bit_identical():
    check_resume(oc.autoclip(25.0, history=6, max_norm=30.0), GRADS, None, split=13)


# ---------------------------------------------------------------- ZClip


def zclip_ref(norms, *, alpha, z_thresh, warmup_steps, mode, cap, eps=1e-6):
    warm, mean, var, live = [], 0.0, 0.0, False
    thresholds, means = [], []
    for norm in norms:
        finite = math.isfinite(norm)
        if not live:
            threshold = cap
            if finite:
                warm.append(norm)
                if len(warm) == warmup_steps:
                    mean, var, live = float(np.mean(warm)), float(np.var(warm)), True
        else:
            std = math.sqrt(var)
            if mode == "percentile":
                boundary = mean + z_thresh * std
                spike = norm > boundary
                adaptive = boundary
            else:
                zscore = (norm - mean) / (std + eps)
                boundary = mean + z_thresh * (std + eps)
                spike = zscore > z_thresh
                adaptive = mean + z_thresh**2 * std / zscore if mode == "zscore" else mean
            threshold = min(adaptive if spike else boundary, cap)
            if finite:
                fed = adaptive if spike else norm
                mean = alpha * mean + (1 - alpha) * fed
                var = alpha * var + (1 - alpha) * (fed - mean) ** 2
        thresholds.append(threshold)
        means.append(mean)
    return thresholds, means


@pytest.mark.parametrize(
    "mode,max_norm", [("zscore", None), ("mean", 3.0), ("percentile", 50.0)]
)
def test_zclip_matches_numpy_reference(mode, max_norm):
    kwargs = dict(alpha=0.9, z_thresh=2.5, warmup_steps=5)
    tx = oc.zclip(mode=mode, max_norm=max_norm, **kwargs)
    cap = math.inf if max_norm is None else max_norm
    thresholds, means = zclip_ref(
        [norm64(g) for g in GRADS], mode=mode, cap=cap, **kwargs
    )
    jit_outs, jit_states = run(tx, GRADS, None, jit=True)
    check_global(jit_outs, jit_states, thresholds, GRADS)
    np.testing.assert_allclose([float(s.ema_mean) for s in jit_states], means, rtol=RTOL)
    eager_outs, eager_states = run(tx, GRADS[:EAGER_STEPS], None, jit=False)
    assert_trees_close(eager_outs, jit_outs[:EAGER_STEPS])
    assert_trees_close(eager_states, jit_states[:EAGER_STEPS])
    # The 300x spike after warmup is clipped far below its norm.
    spike = NORMS.index(300.0)
    assert bool(jit_states[spike].stats.was_clipped())
    assert float(jit_states[spike].stats.threshold) < 10.0


def test_zclip_stats_report_ema_and_checkpoint_resumes():
    tx = optax.chain(oc.zclip(warmup_steps=4, max_norm=None), optax.adam(1e-2))
    _, states = run(tx, GRADS[:8], PARAMS, jit=True)
    report = oc.stats(states[-1])
    assert {"zclip/ema_mean", "zclip/ema_std", "zclip/threshold", "zclip/norm"} <= set(report)
    assert float(report["zclip/ema_mean"]) > 0
    check_resume(tx, GRADS, PARAMS, split=7)


# ---------------------------------------------------------------- AdaGC

LEAF_NORMS = [  # per-step norms of leaves (a, b); covers the cases in the docstring
    (0.6, 0.8), (0.3, 0.0), (1.5, 2.0), (math.nan, 1.0), (0.5, 0.5),   # warmup (4 finite)
    (0.7, 0.6), (9.0, 0.7), (0.0, 0.8), (0.6, math.inf), (0.6, 30.0),
    (0.65, 0.7), (0.0, 0.0), (0.7, 0.75), (50.0, 0.7), (0.6, 0.7),
]


def leaf_tree(norms, seed):
    rng = np.random.default_rng(seed)
    tree = {}
    for (key, shape), norm in zip(SHAPES.items(), norms):
        v = rng.normal(size=shape)
        v = v / np.linalg.norm(v) * (norm if math.isfinite(norm) else 1.0)
        if not math.isfinite(norm):
            v.flat[0] = norm
        tree[key] = jnp.asarray(v, jnp.float32)
    return tree


ADAGC_GRADS = [leaf_tree(n, 100 + i) for i, n in enumerate(LEAF_NORMS)]


def adagc_ref(seq, *, lambda_rel, lambda_abs, beta, warmup_steps):
    gamma = {k: math.inf for k in SHAPES}
    num_warmup, outs, thresholds = 0, [], []
    for grads in seq:
        grads = f64(grads)
        norms = {k: float(np.linalg.norm(v)) for k, v in grads.items()}
        total = math.sqrt(sum(n * n for n in norms.values()))
        in_warmup = num_warmup < warmup_steps
        global_scale = scale_ref(total, lambda_abs)
        out, limits = {}, []
        for k, g in grads.items():
            use_relative = not in_warmup and math.isfinite(gamma[k])
            if use_relative:
                limit = math.inf if lambda_rel == math.inf else lambda_rel * gamma[k]
                scale = scale_ref(norms[k], limit)
                if math.isfinite(norms[k] * scale):
                    gamma[k] = beta * gamma[k] + (1 - beta) * norms[k] * scale
                limits.append(limit)
            else:
                # The global clip, recorded as each tensor's share of the budget.
                if not math.isfinite(total):
                    limit = math.nan
                elif total > lambda_abs and norms[k] > 0:
                    limit = lambda_abs * norms[k] / total
                else:
                    limit = lambda_abs
                scale = global_scale
                clipped = norms[k] * scale
                if math.isfinite(clipped) and clipped > 0:
                    gamma[k] = min(gamma[k], clipped)
                limits.append(limit)
            out[k] = g * scale
        num_warmup += in_warmup and math.isfinite(total)
        outs.append(out)
        thresholds.append(limits)
    return outs, thresholds, gamma


def test_adagc_matches_numpy_reference():
    kwargs = dict(lambda_rel=1.05, lambda_abs=2.0, beta=0.9, warmup_steps=4)
    tx = oc.adagc(**kwargs)
    ref_outs, ref_thresholds, ref_gamma = adagc_ref(ADAGC_GRADS, **kwargs)
    jit_outs, jit_states = run(tx, ADAGC_GRADS, PARAMS, jit=True)
    for step, (out, ref, state) in enumerate(zip(jit_outs, ref_outs, jit_states)):
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=RTOL,
                                       atol=1e-7, err_msg=f"step {step} leaf {k}")
        recorded = [float(state.stats.threshold[k]) for k in SHAPES]
        np.testing.assert_allclose(recorded, ref_thresholds[step], rtol=RTOL)
        for k in SHAPES:  # every finite leaf is inside its recorded threshold
            leaf = np.asarray(out[k], np.float64)
            if np.all(np.isfinite(leaf)):
                assert np.linalg.norm(leaf) <= float(state.stats.threshold[k]) * (1 + 1e-6)
    for k in SHAPES:
        np.testing.assert_allclose(float(jit_states[-1].gamma[k]), ref_gamma[k], rtol=RTOL)
    eager_outs, eager_states = run(tx, ADAGC_GRADS[:EAGER_STEPS], PARAMS, jit=False)
    assert_trees_close(eager_outs, jit_outs[:EAGER_STEPS])
    assert_trees_close(eager_states, jit_states[:EAGER_STEPS])
    assert int(jit_states[-1].num_warmup) == 4
    report = oc.stats(jit_states[-1])
    np.testing.assert_allclose(float(report["adagc/threshold_max"]), max(ref_thresholds[-1]),
                               rtol=RTOL)
    np.testing.assert_allclose(float(report["adagc/threshold_min"]), min(ref_thresholds[-1]),
                               rtol=RTOL)
    assert int(report["adagc/num_warmup"]) == 4
    check_resume(tx, ADAGC_GRADS, PARAMS, split=6, full_run=(jit_outs, jit_states))


# ---------------------------------------------------------------- AGC

AGC_PARAMS = {
    "kernel": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32),
    "conv": jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 3, 4)) * 0.1, jnp.float32),
    "bias": jnp.zeros(3, jnp.float32),
    "scale": jnp.float32(2.0),
}


def agc_grads(seed: int, factor: float) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=np.shape(v)) * factor, jnp.float32)
            for k, v in AGC_PARAMS.items()}


def unit_axes(ndim, kept):
    if ndim <= 1:
        return tuple(range(ndim))
    keep = {a % ndim for a in kept}
    return tuple(i for i in range(ndim) if i not in keep)


def agc_ref(grads, params, clipping, eps, kept):
    out = {}
    for k, g in f64(grads).items():
        w = np.asarray(params[k], np.float64)
        axes = unit_axes(g.ndim, kept)
        g_norm = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
        w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
        limit = clipping * np.maximum(w_norm, eps)
        scale = np.where(g_norm > limit, limit / np.where(g_norm > 0, g_norm, 1), 1.0)
        out[k] = g * scale
    return out


@pytest.mark.parametrize("axis,kept", [(None, (-1,)), (0, (0,))])
def test_agc_matches_numpy_reference(axis, kept):
    tx = oc.adaptive_grad_clip(0.05, axis=axis)
    grads_seq = [agc_grads(s, f) for s, f in [(0, 0.01), (1, 1.0), (2, 0.0), (3, 10.0)]]
    jit_outs, jit_states = run(tx, grads_seq, AGC_PARAMS, jit=True)
    for grads, out, state in zip(grads_seq, jit_outs, jit_states):
        ref = agc_ref(grads, AGC_PARAMS, 0.05, 1e-3, kept)
        for k in ref:
            np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=RTOL,
                                       atol=1e-8, err_msg=k)
        # Bound: every unit is inside its recorded limit.
        for k, g in f64(out).items():
            norms = np.sqrt(np.sum(g * g, axis=unit_axes(g.ndim, kept)))
            assert np.all(norms <= np.asarray(state.stats.threshold[k]) * (1 + 1e-6))
    assert np.shape(jit_states[0].stats.norm["conv"]) == ((4,) if axis is None else (2,))
    eager_outs, eager_states = run(tx, grads_seq, AGC_PARAMS, jit=False)
    assert_trees_close(eager_outs, jit_outs)
    assert_trees_close(eager_states, jit_states)
    report = oc.stats(jit_states[-1])
    assert bool(report["adaptive_grad_clip/clipped"])
    assert 0 < float(report["adaptive_grad_clip/clipped_fraction"]) <= 1
    check_resume(tx, grads_seq, AGC_PARAMS, split=2, full_run=(jit_outs, jit_states))


def test_agc_nan_unit_is_nan_and_others_are_clipped():
    grads = agc_grads(5, 1.0)
    grads["kernel"] = grads["kernel"].at[0, 1].set(jnp.nan)
    tx = oc.adaptive_grad_clip(0.05)
    out, _ = tx.update(grads, tx.init(AGC_PARAMS), AGC_PARAMS)
    kernel = np.asarray(out["kernel"])
    assert np.all(np.isnan(kernel[:, 1])) and np.all(np.isfinite(kernel[:, [0, 2]]))
    assert np.all(np.isfinite(np.asarray(out["conv"])))


def test_agc_requires_params_and_checks_axis():
    tx = oc.adaptive_grad_clip(0.01)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(agc_grads(0, 1.0), tx.init(AGC_PARAMS))
    with pytest.raises(ValueError, match="out of range"):
        bad = oc.adaptive_grad_clip(0.01, axis=5)
        bad.init(AGC_PARAMS)
    with pytest.raises(ValueError, match="axis"):
        oc.adaptive_grad_clip(0.01, axis="out")


@pytest.mark.parametrize("jit", [False, True])
def test_agc_names_params_that_do_not_match_the_gradients(jit):
    tx = oc.adaptive_grad_clip(0.01)
    grads = agc_grads(0, 1.0)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(AGC_PARAMS)
    missing = {k: v for k, v in AGC_PARAMS.items() if k != "kernel"}
    with pytest.raises(ValueError, match=r"params must have the same tree structure"):
        update(grads, state, missing)
    transposed = dict(AGC_PARAMS, kernel=AGC_PARAMS["kernel"].T)
    with pytest.raises(ValueError, match=r"params\['kernel'\] has shape \(3, 4\) but its gradient"):
        update(grads, state, transposed)


def test_adagc_names_a_state_made_for_another_tree():
    tx = oc.adagc()
    grads = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"adagc: state.gamma does not match.*tx.init"):
        tx.update(grads, tx.init({"w": grads["w"]}))


def test_agc_threshold_zero_and_inf_even_for_zero_weights():
    params = {"w": jnp.zeros((2, 3))}
    grads = {"w": jnp.arange(6.0).reshape(2, 3)}
    for clipping, expected in ((0.0, np.zeros((2, 3))), (math.inf, np.asarray(grads["w"]))):
        tx = oc.adaptive_grad_clip(clipping, eps=0.0)
        out, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_array_equal(np.asarray(out["w"]), expected)
    tx = oc.adaptive_grad_clip(0.5)  # zero weights: the limit is clipping * eps
    out, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(state.stats.threshold["w"]), [5e-4] * 3, rtol=1e-6)


def test_agc_excludes_a_layer_through_optax_masked():
    mask = {k: k != "kernel" for k in AGC_PARAMS}
    tx = optax.masked(oc.adaptive_grad_clip(0.01), mask)
    grads = agc_grads(7, 10.0)
    out, state = tx.update(grads, tx.init(AGC_PARAMS), AGC_PARAMS)
    np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(grads["kernel"]))
    assert np.linalg.norm(np.asarray(out["conv"])) < np.linalg.norm(np.asarray(grads["conv"]))
    assert bool(oc.stats(state)["adaptive_grad_clip/clipped"])


# ---------------------------------------------------------------- shared contracts

ALL = {
    "autoclip": lambda axis_name=None: oc.autoclip(20.0, history=5, axis_name=axis_name),
    "zclip": lambda axis_name=None: oc.zclip(warmup_steps=2, max_norm=None,
                                             axis_name=axis_name),
    "adagc": lambda axis_name=None: oc.adagc(warmup_steps=2, axis_name=axis_name),
    "agc": lambda axis_name=None: oc.adaptive_grad_clip(0.05, axis_name=axis_name),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_jax_grad_through_the_clipper_is_finite_at_zero_gradients(name):
    # Zero gradients giving zero output is covered by the reference sequences.
    tx = ALL[name]()
    params = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)

    def total(grads):
        out, _ = tx.update(grads, tx.init(params), params)
        return sum(jnp.sum(x) for x in jax.tree.leaves(out))

    gradient = jax.jit(jax.grad(total))(zeros)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(gradient))


@pytest.mark.parametrize("name", sorted(ALL))
def test_sharded_jit_and_shard_map_match_unsharded(name):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
    seq = [jax.tree.map(lambda p, s=s: p * s, params) for s in (0.1, 0.2, 5.0)]
    ref_outs, ref_states = run(ALL[name](), seq, params, jit=True)

    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    put = lambda t: jax.device_put(t, sharding)
    sharded_outs, _ = run(ALL[name](), [put(g) for g in seq], put(params), jit=True)
    assert_trees_close(sharded_outs, ref_outs)

    tx = ALL[name](axis_name="data")
    spec, rep = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
    step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(spec, rep, spec),
                                 out_specs=(spec, rep)))
    state = tx.init(params)
    for grads, ref_out, ref_state in zip(seq, ref_outs, ref_states):
        out, state = step(grads, state, params)
        assert_trees_close(out, ref_out)
        for got, want in zip(jax.tree.leaves(state.stats.threshold),
                             jax.tree.leaves(ref_state.stats.threshold)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: oc.autoclip(101.0), "percentile"),
        (lambda: oc.autoclip(history=0), "history"),
        (lambda: oc.autoclip(max_norm=-1.0), "max_norm"),
        (lambda: oc.zclip(alpha=1.0), "alpha"),
        (lambda: oc.zclip(z_thresh=0.0), "z_thresh"),
        (lambda: oc.zclip(warmup_steps=0), "warmup_steps"),
        (lambda: oc.zclip(mode="median"), "mode"),
        (lambda: oc.adagc(beta=1.0), "beta"),
        (lambda: oc.adagc(lambda_rel=-1.0), "lambda_rel"),
        (lambda: oc.adagc(warmup_steps=0), "warmup_steps"),
        (lambda: oc.adaptive_grad_clip(-0.1), "clipping"),
        (lambda: oc.adaptive_grad_clip(0.1, eps=-1.0), "eps"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_check_order_accepts_clipper_first_and_rejects_it_after_adam():
    for clipper in (oc.autoclip(), oc.zclip(), oc.adagc(), oc.adaptive_grad_clip(0.01)):
        stages = oc.check_order(optax.chain(clipper, optax.adam(1e-3)), PARAMS)
        assert [stage.kind for stage in stages][0] == "clipper"
        with pytest.raises(oc.OrderingError):
            oc.check_order(optax.chain(optax.adam(1e-3), clipper), PARAMS)


@pytest.mark.parametrize("name", sorted(ALL))
def test_checked_bound_invariants_accept_every_step(name):
    """``optaxclip.checked`` re-verifies scale and bound on each (finite) step, in jit."""
    from jax.experimental import checkify

    tx = oc.checked(optax.chain(ALL[name](), optax.adam(1e-2)))
    params = {k: jnp.ones(s, jnp.float32) for k, s in SHAPES.items()}
    update = jax.jit(checkify.checkify(tx.update))
    state = tx.init(params)
    finite = [g for g, n in zip(GRADS, NORMS) if math.isfinite(n)][:16]
    for grads in finite:
        error, (_, state) = update(grads, state, params)
        error.throw()
    assert int(state[0].count) == len(finite)


@pytest.mark.slow
def test_spike_study_runs_at_tiny_size():
    path = pathlib.Path(__file__).parents[1] / "examples" / "spikes.py"
    spec = importlib.util.spec_from_file_location("spikes_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--tiny"])
    methods = {"no clipping", "autoclip(10)", "zclip(max_norm=None)", "adagc()",
               "skip_on_spike(adam)"}
    assert methods <= set(results)
    for name in methods:
        row = results[name]
        assert math.isfinite(row["median_final_val_loss"]) and row["worst_excursion"] >= 1.0
    # Clipping tames the injected spikes that plain Adam suffers from.
    for name in ("autoclip(10)", "zclip(max_norm=None)", "adagc()"):
        assert results[name]["worst_excursion"] < results["no clipping"]["worst_excursion"]
    # Part 3: every method trains the tiny transformer on the Markov text to finite
    # losses, none diverges, and each ends below a uniform guess's loss plus one.
    text = module.markov_text(500)
    assert text.min() >= 0 and text.max() < module.LM_VOCAB
    language_model = results["language_model"]
    assert {"no clipping", "spam(adam)", "clip_update_rms(1.0)"} <= set(language_model)
    for name, row in language_model.items():
        assert math.isfinite(row["median_final_loss"]) and row["worst_grad_spike"] > 0, name
        assert math.isfinite(row["worst_excursion"]) and row["diverged"] == 0, name
        assert row["median_final_loss"] < math.log(module.LM_VOCAB) + 1, name
    exploding = results["exploding"]
    assert exploding["no clipping"]["diverged"]
    assert not exploding["zclip() (max_norm=1.0)"]["diverged"]
