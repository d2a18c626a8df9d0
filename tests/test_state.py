"""Clipper state and ``optaxclip.stats``: what is recorded, where it is found, and
that checkpoints round-trip it."""

import math
import re

import chex
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

NAMES = ["clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms"]
FACTORY = {name: getattr(oc, name) for name in NAMES}

GRADS = {"w": jnp.array([[3.0, -4.0], [12.0, 0.0]]), "b": jnp.array([0.5, -0.25], jnp.bfloat16)}
W_NORM = 13.0
TOTAL_NORM = math.sqrt(13.0**2 + 0.5**2 + 0.25**2)  # 13.012...


def np_norm(x, ord=2):
    x = np.abs(np.asarray(x, np.float64)).ravel()
    return float(np.max(x)) if ord == math.inf else float(np.sum(x**ord) ** (1 / ord))


def np_stats(name, grads, threshold):
    """Per-clipper reference: the pre-clip norm(s) each clipper must record, in float64."""
    leaves = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    if name == "clip_by_value":
        norms = {"": np_norm(np.concatenate([x.ravel() for x in leaves.values()]), math.inf)}
    elif name == "clip_by_global_norm":
        norms = {"": np_norm(np.concatenate([x.ravel() for x in leaves.values()]))}
    elif name == "clip_by_norm":
        norms = {k: np_norm(x) for k, x in leaves.items()}
    else:
        norms = {k: np_norm(x) / math.sqrt(x.size) for k, x in leaves.items()}
    scales = {k: min(1.0, threshold / n) for k, n in norms.items()}
    return norms, scales


# ------------------------------------------------------------ what is recorded


@pytest.mark.parametrize("name", NAMES)
def test_every_clipper_records_norm_threshold_scale_clipped(name):
    tx = FACTORY[name](2.0)
    state = tx.init(GRADS)
    _, state = jax.jit(tx.update)(GRADS, state)
    norms, scales = np_stats(name, GRADS, 2.0)
    recorded = state.stats
    assert isinstance(recorded, oc.ClipStats)
    chex.assert_type(jax.tree.leaves(recorded.norm), jnp.float32)
    chex.assert_type(recorded.threshold, jnp.float32)
    flags = recorded.was_clipped()
    chex.assert_type(jax.tree.leaves(flags), jnp.bool_)
    assert float(recorded.threshold) == 2.0
    if name == "clip_by_value":
        # Entries are clipped one by one: no common factor is recorded, the flag is.
        assert recorded.scale is None
        np.testing.assert_allclose(float(recorded.norm), norms[""], rtol=1e-6)
        assert bool(flags) and bool(recorded.clipped)
        assert f"{name}/scale" not in oc.stats(state)
        return
    if set(norms) == {""}:
        leaves = {"": (recorded.norm, recorded.scale, flags)}
    else:
        leaves = {k: (recorded.norm[k], recorded.scale[k], flags[k]) for k in norms}
    for key, (norm, scale, clipped) in leaves.items():
        np.testing.assert_allclose(float(norm), norms[key], rtol=1e-6)
        np.testing.assert_allclose(float(scale), scales[key], rtol=1e-6)
        assert bool(clipped) == (scales[key] < 1)
    # stats() reports the same values under the clipper's name.
    summary = oc.stats(state)
    np.testing.assert_allclose(float(summary[f"{name}/norm"]), max(norms.values()), rtol=1e-6)
    np.testing.assert_allclose(float(summary[f"{name}/scale"]), min(scales.values()), rtol=1e-6)
    assert float(summary[f"{name}/threshold"]) == 2.0
    assert bool(summary[f"{name}/clipped"])


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_block_rms"])
def test_per_leaf_stats_and_keys(name):
    tx = FACTORY[name](2.0)
    _, state = tx.update(GRADS, tx.init(GRADS))
    norms, _ = np_stats(name, GRADS, 2.0)
    summary = oc.stats(state)
    assert set(summary) == {f"{name}/{f}" for f in
                            ("norm", "threshold", "scale", "clipped", "clipped_fraction")}
    clipped_fraction = np.mean([n > 2.0 for n in norms.values()])
    assert float(summary[f"{name}/clipped_fraction"]) == clipped_fraction
    detailed = oc.stats(state, per_leaf=True)
    per_leaf_fields = ("norm", "scale", "clipped")
    for key, norm in norms.items():
        np.testing.assert_allclose(float(detailed[f"{name}/leaves/{key}/norm"]), norm, rtol=1e-6)
        assert bool(detailed[f"{name}/leaves/{key}/clipped"]) == (norm > 2.0)
    assert set(detailed) - set(summary) == {
        f"{name}/leaves/{key}/{field}" for key in norms for field in per_leaf_fields
    }
    # No key is both a value and a prefix, so the dict unflattens into a tree.
    flax.traverse_util.unflatten_dict(detailed, sep="/")
    # One leaf or many, a per-leaf clipper reports the same kinds of keys.
    _, state = tx.update({"w": GRADS["w"]}, tx.init({"w": GRADS["w"]}))
    assert set(oc.stats(state, per_leaf=True)) == set(summary) | {
        f"{name}/leaves/w/{field}" for field in per_leaf_fields
    }


def test_stats_works_under_jit_and_returns_arrays():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))

    @jax.jit
    def step(grads, state):
        updates, state = tx.update(grads, state)
        return updates, state, oc.stats(state)

    _, _, summary = step(GRADS, tx.init(GRADS))
    assert set(summary) == {f"clip_by_global_norm/{f}" for f in
                            ("norm", "threshold", "scale", "clipped")}
    assert all(isinstance(v, jax.Array) and v.shape == () for v in summary.values())
    np.testing.assert_allclose(float(summary["clip_by_global_norm/norm"]),
                               np_norm(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                                       for x in GRADS.values()])), rtol=1e-6)


# ------------------------------------------------------ where stats are found


def _norm_of(keys, summary):
    return {k: float(summary[k]) for k in keys}


def test_stats_in_nested_chains_and_two_clippers_have_unique_keys():
    tx = optax.chain(
        oc.clip_by_global_norm(100.0),
        optax.chain(optax.scale(0.5), oc.clip_by_global_norm(1.0)),
        oc.clip_by_value(0.1),
    )
    _, state = jax.jit(tx.update)(GRADS, tx.init(GRADS))
    summary = oc.stats(state)
    norm_keys = sorted(k for k in summary if k.endswith("clip_by_global_norm/norm"))
    assert len(norm_keys) == 2 and len(set(norm_keys)) == 2
    assert all(re.fullmatch(r"[\w/]+", k) for k in summary)
    norms = sorted(float(summary[k]) for k in norm_keys)
    total = np_norm(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in GRADS.values()]))
    # The outer clipper saw the raw gradients; the inner one saw them halved.
    np.testing.assert_allclose(norms, [total / 2, total], rtol=1e-6)
    assert "clip_by_value/norm" in summary  # a single clipper keeps its short key
    # ... and saw the output of the inner one: largest entry 12 / total.
    np.testing.assert_allclose(float(summary["clip_by_value/norm"]), 12 / total, rtol=1e-6)


def test_stats_in_named_chain_use_the_names():
    tx = optax.named_chain(("clip", oc.clip_by_global_norm(1.0)), ("opt", optax.sgd(0.1)))
    _, state = tx.update(GRADS, tx.init(GRADS))
    summary = oc.stats(state)
    assert "clip/clip_by_global_norm/norm" in summary
    assert float(summary["clip/clip_by_global_norm/norm"]) == pytest.approx(TOTAL_NORM, 1e-6)


def test_stats_through_inject_hyperparams_and_masked():
    tx = optax.chain(
        optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=jnp.float32(2.0)),
        optax.masked(oc.clip_by_norm(1.0), {"w": True, "b": False}),
    )
    _, state = jax.jit(tx.update)(GRADS, tx.init(GRADS))
    summary = oc.stats(state, per_leaf=True)
    assert float(summary["clip_by_global_norm/threshold"]) == 2.0
    assert float(summary["clip_by_global_norm/norm"]) == pytest.approx(TOTAL_NORM, 1e-6)
    # The masked clipper saw only "w", after the global clip to norm 2.
    want = 2.0 * W_NORM / TOTAL_NORM
    assert float(summary["clip_by_norm/leaves/w/norm"]) == pytest.approx(want, rel=1e-6)
    assert "clip_by_norm/leaves/b/norm" not in summary


def test_stats_in_multi_transform_use_the_labels():
    tx = optax.multi_transform(
        {"big": oc.clip_by_global_norm(1.0), "small": oc.clip_by_global_norm(0.1)},
        {"w": "big", "b": "small"},
    )
    _, state = jax.jit(tx.update)(GRADS, tx.init(GRADS))
    summary = oc.stats(state)
    np.testing.assert_allclose(float(summary["big/clip_by_global_norm/norm"]), W_NORM, rtol=1e-6)
    np.testing.assert_allclose(float(summary["small/clip_by_global_norm/norm"]),
                               np_norm([0.5, -0.25]), rtol=1e-6)
    assert float(summary["small/clip_by_global_norm/threshold"]) == pytest.approx(0.1)


def test_stats_in_multisteps_reflect_the_real_step():
    tx = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)), 2)
    state = tx.init(GRADS)
    update = jax.jit(tx.update)
    first = {"w": jnp.array([[6.0, 0.0], [0.0, 0.0]]), "b": jnp.zeros(2, jnp.bfloat16)}
    second = {"w": jnp.array([[0.0, 8.0], [0.0, 0.0]]), "b": jnp.zeros(2, jnp.bfloat16)}
    _, state = update(first, state)
    # No real step yet: the inner clipper has not run, and its stats say so.
    assert float(oc.stats(state)["clip_by_global_norm/norm"]) == 0.0
    assert int(state.inner_opt_state[0].count) == 0
    _, state = update(second, state)
    # The real step clipped the mean of both gradients: [[3, 4], [0, 0]], norm 5.
    assert float(oc.stats(state)["clip_by_global_norm/norm"]) == pytest.approx(5.0, rel=1e-6)
    assert float(oc.stats(state)["clip_by_global_norm/scale"]) == pytest.approx(0.2, rel=1e-6)
    assert int(state.inner_opt_state[0].count) == 1


def test_stats_of_a_state_without_clippers_is_empty_and_says_why():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    with pytest.warns(UserWarning, match="optax's own clipper"):
        assert oc.stats(tx.init(GRADS)) == {}


@pytest.mark.parametrize("bad", ["abc", object(), {"w": "x"}])
def test_stats_of_something_that_is_not_a_state_raises(bad):
    with pytest.raises(TypeError, match="opt_state must be an optax state"):
        oc.stats(bad)


# ------------------------------------------------- recording costs no pass


def _reductions(compiled_hlo):
    """The reduce instructions of an optimised HLO module, fused or not (not
    all-reduce or reduce-window)."""
    return re.findall(r"(?<![\w-])reduce\(", compiled_hlo)


def test_recording_stats_costs_no_extra_reduction():
    grads = {"w": jnp.ones((64, 32)), "b": jnp.ones((32,)), "h": jnp.ones((16,), jnp.bfloat16)}
    tx = oc.clip_by_global_norm(1.0)
    state = tx.init(grads)

    def plain(grads):  # a global norm and a scale, with nothing recorded
        norm = oc.global_norm(grads)
        scale = jnp.minimum(1.0, 1.0 / norm)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)

    with_stats = jax.jit(tx.update).lower(grads, state).compile().as_text()
    without = jax.jit(plain).lower(grads).compile().as_text()
    assert len(_reductions(without)) > 0
    # The same reductions: recording the norm, scale and flag adds no pass.
    assert len(_reductions(with_stats)) == len(_reductions(without))
    # And the clipper's stats are outputs of the compiled update, not dropped.
    _, new_state = jax.jit(tx.update)(grads, state)
    assert float(new_state.stats.norm) == pytest.approx(math.sqrt(64 * 32 + 32 + 16))


# ------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("name", NAMES)
def test_state_is_a_namedtuple_of_arrays(name):
    state = FACTORY[name](optax.linear_schedule(1.0, 2.0, 4)).init(GRADS)
    assert isinstance(state, tuple) and hasattr(state, "_fields")
    assert state._fields == ("count", "stats")
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array), type(leaf)
    chex.assert_type(state.count, jnp.int32)


def test_flax_serialization_round_trip_continues_bit_identically():
    schedule = optax.linear_schedule(2.0, 0.5, 3)
    tx = optax.chain(
        oc.clip_by_value(5.0),
        oc.clip_by_norm(schedule),
        oc.clip_by_global_norm(schedule),
        oc.clip_by_block_rms(3.0),
        optax.adam(1e-2),
    )
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    steps = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 9, x.dtype), GRADS)
             for _ in range(4)]
    state = tx.init(GRADS)
    for grads in steps[:2]:
        _, state = update(grads, state)
    as_dict = flax.serialization.to_state_dict(state)
    restored = flax.serialization.from_state_dict(tx.init(GRADS), as_dict)
    as_bytes = flax.serialization.to_bytes(state)
    from_bytes = flax.serialization.from_bytes(tx.init(GRADS), as_bytes)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b, c in zip(jax.tree.leaves(state), jax.tree.leaves(restored),
                       jax.tree.leaves(from_bytes)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    originals = []
    for grads in steps[2:]:
        updates, state = update(grads, state)
        originals.append((updates, oc.stats(state)))
    for candidate in (restored, from_bytes):
        for (want_updates, want_stats), grads in zip(originals, steps[2:]):
            updates, candidate = update(grads, candidate)
            for a, b in zip(jax.tree.leaves((want_updates, want_stats)),
                            jax.tree.leaves((updates, oc.stats(candidate)))):
                np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                              np.atleast_1d(b).view(np.uint8))


def test_stats_unwraps_nnx_optimizer_state():
    # nnx.Optimizer keeps its optax state in variables; every stats value must still
    # come out as a plain array, the threshold included.
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)), wrt=nnx.Param
    )
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.full((1, 3), 10.0)) ** 2))(model)
    optimizer.update(model, grads)
    recorded = oc.stats(optimizer.opt_state)
    assert set(recorded) == {
        f"clip_by_global_norm/{field}" for field in ("norm", "threshold", "scale", "clipped")
    }
    for value in recorded.values():
        assert isinstance(value, jax.Array), type(value)
    assert float(recorded["clip_by_global_norm/threshold"]) == 1.0
    assert float(recorded["clip_by_global_norm/norm"]) > 1.0


# Every registered transformation, as a user would chain it, whose state is then
# turned into the plain dicts an untargeted restore (orbax without a target,
# flax.serialization.to_state_dict, nnx.state) gives.
def _chained(name: str, info) -> optax.GradientTransformation:
    if info.kind == "guard":
        return info.build(inner=optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-2)))
    if info.kind == "moment_clipper":
        return info.build(inner=optax.adam(1e-2))
    if name == "clipped":
        return oc.clipped(optax.adam(1e-2), global_clipnorm=1.0)
    if name == "clip_by_group_norms":
        return optax.chain(oc.clip_by_group_norms({"a": 1.0, "b": 0.5}, lambda p: jax.tree.map(
            lambda _: "a", p) | {"b": "b"}), optax.adam(1e-2))
    if name == "checked":
        return optax.chain(oc.zclip(warmup_steps=2), optax.adam(1e-2))
    return optax.chain(info.build(1.0), optax.adam(1e-2))


RAW_NOT_COVERED = {"clip_per_example": "its input is a batch, not parameter-shaped: "
                                       "test_per_example covers its records"}


@pytest.mark.parametrize("name", sorted(
    n for n, i in oc.registered_factories().items()
    if i.factory.__module__.startswith("optaxclip.") and n not in RAW_NOT_COVERED))
def test_stats_of_an_untargeted_restore_equal_the_live_ones(name):
    """Keys and values, the guards' and spam's records and the declared extra fields
    (zclip's EMAs, autoclip's count) included. Before, a guard's record and spam's
    were dropped without a word, the extra fields were lost, and the names carried
    the state's layout ("guard/skip_nonfinite", "0/zclip").
    """
    info = oc.registered_factories()[name]
    tx = _chained(name, info)
    params = {"a": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    for scale in (1.0, 30.0, 2.0, jnp.nan, 1.0):
        grads = jax.tree.map(lambda p, s=scale: p * s, params)
        _, state = jax.jit(tx.update)(grads, state, params)
    live = oc.stats(state)
    assert live, name
    with pytest.warns(UserWarning, match="plain dicts"):
        restored = oc.stats(flax.serialization.to_state_dict(state))

    def records(report):
        grouped: dict[str, dict] = {}
        for key, value in report.items():
            prefix, field = key.rsplit("/", 1)
            grouped.setdefault(prefix, {})[field] = np.asarray(value)
        return grouped

    live, restored = records(live), records(restored)
    assert len(restored) == len(live), (name, sorted(live), sorted(restored))
    for prefix, values in restored.items():
        # A plain dict has no types: clippers that share a state layout (a count and
        # the stats) are named "clipper"; every other name is the live one.
        matches = [p for p, v in live.items() if (p == prefix or prefix.endswith("clipper"))
                   and v.keys() == values.keys()
                   and all(np.array_equal(v[f], values[f], equal_nan=True) for f in v)]
        assert matches, (name, prefix, values, live)


@pytest.mark.parametrize("seed", range(6))
def test_stats_keys_stay_unique_in_generated_nestings(seed):
    """Chains, named_chains with labels like "0" (which equal a chain index's text)
    and multi_transform labels, nested at random: every clipper gets its own keys.
    Before, a short key equal to another clipper's full path overwrote it."""
    rng = np.random.default_rng(seed)
    thresholds = iter(np.arange(1.0, 100.0))
    count = 0

    def build(depth: int):
        nonlocal count
        if depth == 0 or rng.random() < 0.3:
            count += 1
            return oc.clip_by_global_norm(float(next(thresholds)))
        children = [build(depth - 1) for _ in range(int(rng.integers(1, 4)))]
        kind = rng.integers(0, 2)
        if kind == 0:
            return optax.chain(*children)
        labels = rng.choice(["0", "1", "2", "clip_by_global_norm", "a"], len(children),
                            replace=False)
        return optax.named_chain(*zip(map(str, labels), children))

    if seed == 0:  # the reported nesting: a named_chain entry "0" beside two clippers
        count = 3
        tx = optax.chain(oc.clip_by_global_norm(1.0), optax.chain(oc.clip_by_global_norm(2.0)),
                         optax.named_chain(("0", oc.clip_by_global_norm(3.0))))
    else:
        tx = build(3)
    params = {"w": jnp.ones(2)}
    _, state = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    report = oc.stats(state)
    thresholds_seen = sorted(float(v) for k, v in report.items() if k.endswith("/threshold"))
    assert thresholds_seen == [float(t) for t in range(1, count + 1)], (sorted(report), count)
    assert len(report) == 4 * count


@pytest.mark.parametrize("name", sorted(
    n for n, i in oc.registered_factories().items()
    if i.factory.__module__.startswith("optaxclip.") and n not in RAW_NOT_COVERED))
def test_stats_read_eagerly_outlive_a_donated_step(name):
    """Read outside jit, stats() handed back the state's own buffers: a metrics dict
    kept for later logging raised "Array has been deleted" after the next step
    donated the state."""
    tx = _chained(name, oc.registered_factories()[name])
    params = {"a": jnp.ones((3, 2)), "b": jnp.ones(2)}
    step = jax.jit(tx.update, donate_argnums=1)
    state = tx.init(params)
    _, state = step(jax.tree.map(lambda p: p * 30.0, params), state, params)
    metrics = oc.stats(state)
    want = {k: np.asarray(v).copy() for k, v in metrics.items()}
    _, state = step(jax.tree.map(lambda p: p * 2.0, params), state, params)
    for key, value in metrics.items():
        np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=key)
