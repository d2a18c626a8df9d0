"""clip_by_group_norms: several global norms at once, one per group of parameters.

References are float64 numpy norms of each group, computed here.
"""

from __future__ import annotations

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

LABELS = {"dense": {"w": "matrices", "b": "vectors"}, "embed": "matrices",
          "norm": "vectors", "muon": "muon"}


def grads(scale: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tree = {"dense": {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))},
            "embed": rng.normal(size=(5, 2)), "norm": rng.normal(size=(2,)),
            "muon": rng.normal(size=(3, 3)) * 100}
    return jax.tree.map(lambda x: jnp.asarray(x * scale, jnp.float32), tree)


def group_of(tree, labels, group):
    return [np.asarray(x, np.float64) for x, label in
            zip(jax.tree.leaves(tree), jax.tree.leaves(labels)) if label == group]


def np_norm(leaves, ord=2) -> float:
    flat = np.abs(np.concatenate([x.ravel() for x in leaves]))
    return float(np.max(flat)) if ord == math.inf else float(np.sum(flat**ord) ** (1 / ord))


MAX_NORMS = {"matrices": 1.0, "vectors": 0.5, "muon": None}


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("ord", [2, 1, math.inf])
def test_each_group_is_clipped_by_its_own_norm(mode, ord):
    g = grads(2.0)
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS, ord=ord)
    update = jax.jit(tx.update) if mode == "jit" else tx.update
    out, state = update(g, tx.init(g))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, g)
    stats = oc.stats(state)
    for group in ("matrices", "vectors"):
        before = np_norm(group_of(g, LABELS, group), ord)
        after = np_norm(group_of(out, LABELS, group), ord)
        limit = MAX_NORMS[group]
        assert before > limit  # the case clips both groups
        assert after == pytest.approx(limit, rel=1e-5)
        assert float(stats[f"{group}/clip_by_group_norms/norm"]) == pytest.approx(before, rel=1e-5)
        assert float(stats[f"{group}/clip_by_group_norms/threshold"]) == limit
        scale = float(stats[f"{group}/clip_by_group_norms/scale"])
        assert scale == pytest.approx(limit / before, rel=1e-5)
        assert bool(stats[f"{group}/clip_by_group_norms/clipped"])
        # Only rescaled: each leaf of the group is its input times the group's scale.
        for a, b in zip(group_of(g, LABELS, group), group_of(out, LABELS, group)):
            np.testing.assert_allclose(b, a * scale, rtol=1e-6, atol=1e-9)
    # The excluded group is untouched (its entries are huge) and has no stats.
    np.testing.assert_array_equal(out["muon"], g["muon"])
    assert not any(key.startswith("muon/") for key in stats), sorted(stats)


def test_excluded_group_counts_in_no_norm():
    """Making the excluded group larger changes nothing in the other groups."""
    g = grads(2.0)
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS)
    out, state = tx.update(g, tx.init(g))
    louder = {**g, "muon": g["muon"] * 1e6}
    out2, state2 = tx.update(louder, tx.init(louder))
    for key in ("dense", "embed", "norm"):
        chex.assert_trees_all_equal(out[key], out2[key])
    chex.assert_trees_all_equal(oc.stats(state), oc.stats(state2))
    # Not even NaN there reaches the other groups.
    nan = {**g, "muon": g["muon"].at[0, 0].set(jnp.nan)}
    out3, _ = tx.update(nan, tx.init(nan))
    chex.assert_trees_all_equal(out3["dense"], out["dense"])
    assert bool(jnp.isnan(out3["muon"][0, 0]))


def test_groups_under_their_thresholds_are_bit_identical():
    g = grads(1e-3)
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    chex.assert_trees_all_equal(out, g)
    stats = oc.stats(state)
    assert not bool(stats["matrices/clip_by_group_norms/clipped"])
    assert float(stats["vectors/clip_by_group_norms/scale"]) == 1.0


def test_nonfinite_group_poisons_only_itself():
    g = grads(2.0)
    g["norm"] = g["norm"].at[0].set(jnp.inf)
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS)
    out, state = tx.update(g, tx.init(g))
    assert all(bool(jnp.all(jnp.isnan(x))) for x in (out["norm"], out["dense"]["b"]))
    assert float(oc.stats(state)["vectors/clip_by_group_norms/norm"]) == math.inf
    after = np_norm(group_of(out, LABELS, "matrices"))
    assert after == pytest.approx(1.0, rel=1e-5)


def test_callable_labels_and_a_schedule():
    def by_rank(params):
        return jax.tree.map(lambda x: "matrices" if x.ndim == 2 else "vectors", params)

    g = {"w": jnp.full((2, 2), 3.0), "b": jnp.array([3.0, 4.0])}
    schedule = optax.linear_schedule(1.0, 2.0, transition_steps=1)
    tx = oc.clip_by_group_norms({"matrices": schedule, "vectors": 10.0}, by_rank)
    state = tx.init(g)
    out, state = tx.update(g, state)
    assert np_norm([np.asarray(out["w"])]) == pytest.approx(1.0, rel=1e-6)
    chex.assert_trees_all_equal(out["b"], g["b"])
    out, state = tx.update(g, state)  # step 1: the schedule gives 2.0
    assert np_norm([np.asarray(out["w"])]) == pytest.approx(2.0, rel=1e-6)


def test_zero_gradients_have_a_finite_derivative():
    tx = oc.clip_by_group_norms({"a": 1.0, "b": 0.0}, {"x": "a", "y": "b"})

    def loss(g):
        out, _ = tx.update(g, tx.init(g))
        return sum(jnp.sum(v) for v in jax.tree.leaves(out))

    zeros = {"x": jnp.zeros(3), "y": jnp.zeros(2)}
    derivative = jax.grad(loss)(zeros)
    assert all(bool(jnp.all(jnp.isfinite(d))) for d in jax.tree.leaves(derivative))
    out, _ = tx.update({"x": jnp.ones(3), "y": jnp.ones(2)}, tx.init(zeros))
    chex.assert_trees_all_equal(out["y"], jnp.zeros(2))  # threshold 0: zeros


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"max_norms\['vectors'\]"):
        oc.clip_by_group_norms({"matrices": 1.0, "vectors": -1.0}, LABELS)
    with pytest.raises(ValueError, match="non-empty mapping"):
        oc.clip_by_group_norms({}, LABELS)
    with pytest.raises(ValueError, match="non-empty mapping"):
        oc.clip_by_group_norms(1.0, LABELS)
    tx = oc.clip_by_group_norms({"matrices": 1.0, "vectors": 1.0}, LABELS)
    with pytest.raises(ValueError, match="'muon'.*no entry"):
        tx.init(grads())


def test_state_is_arrays_and_restores_from_numpy():
    g = grads(2.0)
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS)
    _, state = tx.update(g, tx.init(g))
    restored = jax.tree.map(np.asarray, state)
    out_a, state_a = tx.update(g, state)
    out_b, state_b = tx.update(g, restored)
    chex.assert_trees_all_equal(out_a, out_b)
    chex.assert_trees_all_equal(state_a, state_b)
    assert all(hasattr(x, "dtype") for x in jax.tree.leaves(state))


def test_axis_name_makes_each_group_norm_global_across_shards():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest.py sets 8 virtual CPUs)")
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(1)
    g = {"w": jnp.asarray(rng.normal(size=(8, 3)) * 5, jnp.float32),
         "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
         "r": jnp.asarray(rng.normal(size=(4,)) * 9, jnp.float32)}
    labels = {"w": "a", "b": "b", "r": "a"}
    specs = {"w": P("data"), "b": P("data"), "r": P()}
    plain = oc.clip_by_group_norms({"a": 1.0, "b": 0.5}, labels)
    want, want_state = plain.update(g, plain.init(g))
    tx = oc.clip_by_group_norms({"a": 1.0, "b": 0.5}, labels, axis_name="data")

    def step(x):
        out, state = tx.update(x, tx.init(x))
        return out, state

    got, state = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs,),
                                       out_specs=(specs, P()), check_vma=True))(g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for key, value in oc.stats(want_state).items():
        np.testing.assert_allclose(np.asarray(oc.stats(state)[key]), np.asarray(value),
                                   rtol=1e-6)


# ---------------------------------------------------------------- ordering and checks

PARAMS = {"dense": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, "embed": jnp.zeros((5, 2)),
          "norm": jnp.zeros(2), "muon": jnp.zeros((3, 3))}


def test_check_order_warns_for_global_clippers_in_a_partition_and_names_the_fix():
    partitioned = optax.partition(
        {"matrices": oc.clip_by_global_norm(1.0), "vectors": oc.clip_by_global_norm(0.5),
         "muon": optax.identity()}, LABELS)
    tx = optax.chain(partitioned, optax.adam(1e-3))
    with pytest.warns(UserWarning, match=r"optaxclip\.clip_by_group_norms") as record:
        oc.check_order(tx, PARAMS)
    assert "sits inside optax.partition" in str(record[0].message)
    # What the message recommends exists, does what the message says, and passes.
    assert callable(getattr(oc, "clip_by_group_norms", None))
    fixed = optax.chain(oc.clip_by_group_norms(MAX_NORMS, LABELS), optax.adam(1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stages = oc.check_order(fixed, PARAMS)
    clippers = [s for s in stages if s.kind == "clipper"]
    assert [s.name for s in clippers] == ["clip_by_group_norms"] * 2
    assert {s.scope for s in clippers} == {"global"}
    # Its clipped updates equal the partition's (same per-group norms).
    g = grads(3.0)
    want, _ = partitioned.update(g, partitioned.init(g))
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS)
    got, _ = tx.update(g, tx.init(g))
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_check_order_still_warns_when_group_norms_sit_inside_another_partition():
    inner = oc.clip_by_group_norms({"matrices": 1.0, "vectors": 1.0, "muon": None}, LABELS)
    outer = optax.masked(inner, jax.tree.map(lambda _: True, PARAMS))
    with pytest.warns(UserWarning, match="sits inside optax.masked"):
        oc.check_order(optax.chain(outer, optax.adam(1e-3)), PARAMS)


def test_check_order_raises_when_group_norms_follow_the_moments():
    tx = optax.chain(optax.adam(1e-3), oc.clip_by_group_norms(MAX_NORMS, LABELS))
    with pytest.raises(oc.OrderingError, match="clip_by_group_norms"):
        oc.check_order(tx, PARAMS)


def test_checked_taps_every_group():
    tx = oc.checked(optax.chain(oc.clip_by_group_norms(MAX_NORMS, LABELS), optax.sgd(0.1)))
    g = grads(5.0)
    out, state = tx.update(g, tx.init(PARAMS), PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert set(k.split("/")[0] for k in oc.stats(state)) == {"matrices", "vectors"}


def test_registered():
    info = oc.registered_factories()["clip_by_group_norms"]
    assert info.factory is oc.clip_by_group_norms


# ---------------------------------------------------------------- the Muon example


def test_muon_example_clips_the_adamw_group_only(capsys):
    import pathlib
    import sys

    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        import muon_groups
    finally:
        sys.path.remove(str(examples))
    assert hasattr(optax.contrib, "muon")
    results = muon_groups.main(["--tiny"])
    assert "final val loss" in capsys.readouterr().out
    clipped, free = results["AdamW group clipped at 1"], results["not clipped (inf)"]
    for run in (clipped, free):
        # Stats for the AdamW group only: Muon's matrices are in no norm.
        assert run["stats_keys"] == [f"adamw/clip_by_group_norms/{field}"
                                     for field in ("clipped", "norm", "scale", "threshold")]
        assert math.isfinite(run["val_loss"])
    # Every corrupt batch was clipped, and nothing is clipped at threshold inf.
    assert set(clipped["spiked_steps"]) <= set(clipped["clipped_steps"])
    assert clipped["spiked_steps"] and free["clipped_steps"] == []
    # The clip keeps the corrupt batches from wrecking the AdamW parameters.
    assert clipped["val_loss"] < free["val_loss"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 300.0])
def test_per_group_contracts_across_dtypes(dtype, scale):
    """Bound, identity below the threshold and direction, per group, in each dtype."""
    g = jax.tree.map(lambda x: x.astype(dtype), grads(scale, seed=4))
    tx = oc.clip_by_group_norms(MAX_NORMS, LABELS)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, g)
    stats = oc.stats(state)
    for group, limit in MAX_NORMS.items():
        before = group_of(g, LABELS, group)
        after = group_of(out, LABELS, group)
        if limit is None:  # excluded: bit-identical whatever the dtype
            chex.assert_trees_all_equal(after, before)
            continue
        norm = np_norm(before)
        assert float(stats[f"{group}/clip_by_group_norms/norm"]) == pytest.approx(norm, rel=1e-5)
        if norm <= limit:
            chex.assert_trees_all_equal(after, before)
            continue
        assert np_norm(after) <= limit * (1 + 1e-6)
        factor = float(stats[f"{group}/clip_by_group_norms/scale"])
        eps = float(jnp.finfo(dtype).eps)
        for a, b in zip(before, after):
            assert np.all(np.sign(b) * np.sign(a) >= 0)  # no sign flips
            np.testing.assert_allclose(b, a * factor, rtol=2 * eps, atol=1e-30)
