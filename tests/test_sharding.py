"""Sharding: optimizer-state layouts, 2-D meshes under jit, shard_map and pmap.

Runs on the 8 virtual CPU devices conftest.py sets up.

1. **State layouts** (as optax's own sharding tests check them): ``init`` works on
   ``jax.ShapeDtypeStruct`` parameters, and under an Explicit mesh the sharding
   type of every leaf of the optimizer state is the same after ``init``,
   ``jit(init)``, ``update`` and ``jit(update)``; scalar stats are replicated.
   Every registered clipper, guard (around Adam) and preset is covered.
2. **2-D meshes under jit**: parameters sharded FSDP-plus-tensor-parallel style on a
   ``data`` x ``model`` mesh (Auto and Explicit axes); every registered clipper, and
   each guard around Adam, gives the unsharded result, updates and state, to float32
   rounding, and keeps the gradients' sharding.
3. **shard_map with replication checking, and pmap**: the norm's overflow
   ``lax.cond`` and the guards' skip decision, with ``axis_name``, under
   ``jax.shard_map(..., check_vma=True)`` and ``jax.pmap``: the rescue path (one
   entry of 1e20 on one shard) and a NaN on one shard only (every shard skips).

Several processes are tested in ``test_multiprocess.py``.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _in_a_child import check_in_a_child
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest.py sets 8 virtual CPUs)"
)

# The library's own factories: a test module elsewhere in the session may register a
# user-style clipper (examples/custom_clipper.py), which has no axis_name to test.
FACTORIES = {name: info for name, info in oc.registered_factories().items()
             if info.factory.__module__.startswith("optaxclip")}
CLIPPERS = sorted(name for name, info in FACTORIES.items() if info.kind == "clipper")
GUARDS = sorted(name for name, info in FACTORIES.items() if info.kind == "guard")
MOMENT_CLIPPERS = sorted(
    name for name, info in FACTORIES.items() if info.kind == "moment_clipper")
# Registered transformations this module leaves out, and why.
NOT_COVERED = {
    "checked": "a wrapper: under jit it needs checkify, and its state is the wrapped one's",
    "clip_per_example": "takes [B, ...] per-example gradients and returns them reduced "
                        "over B: its inputs are not parameter-shaped",
}
PRESET_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm")


def _clipper(name: str, **kwargs):
    info = FACTORIES[name]
    return info.build(1.0, **kwargs) if info.threshold is not None else info.build(**kwargs)


def _guarded(name: str):
    return FACTORIES[name].build(inner=optax.adam(1e-2))


def _moment_clipper(name: str):
    return FACTORIES[name].build(inner=optax.adam(1e-2))


def _preset(option: str):
    return FACTORIES["clipped"].build(tx=optax.adam(1e-2), **{option: 1.0})


# clip_by_group_norms over the parameters below: two clipped groups, one left out.
GROUP_LABELS = {"kernel": "matrices", "embed": "matrices", "stacked": "muon",
                "bias": "vectors", "norm_scale": "vectors"}
GROUP_NORMS = {"matrices": 1.0, "vectors": 0.5, "muon": None}


def _groups(labels=GROUP_LABELS, axis_name=None):
    return FACTORIES["clip_by_group_norms"].build(
        max_norms=GROUP_NORMS, param_labels=labels, axis_name=axis_name)


# Every registered stateful transformation, by a readable id. Presets are built with
# each of their options; the wrapper `checked` is left out (under jit it needs
# checkify, and its state is the wrapped one's).
TRANSFORMATIONS = {
    **{name: functools.partial(_clipper, name) for name in CLIPPERS},
    **{f"{name}(adam)": functools.partial(_guarded, name) for name in GUARDS},
    **{f"clipped(adam, {opt}=1)": functools.partial(_preset, opt) for opt in PRESET_OPTIONS},
    "clip_by_group_norms": _groups,
    **{f"{name}(adam)": functools.partial(_moment_clipper, name) for name in MOMENT_CLIPPERS},
    # Stacked layers: every leaf's leading axis (a kernel's `data` axis too).
    **{f"{name}(stacked)": functools.partial(_clipper, name, stacked=True)
       for name in ("adagc", "adaptive_grad_clip", "clip_by_block_rms", "clip_by_norm")},
}


def test_every_registered_transformation_is_covered():
    covered = {name.split("(")[0] for name in TRANSFORMATIONS}
    assert covered == set(FACTORIES) - set(NOT_COVERED), set(FACTORIES) ^ covered


# ---------------------------------------------------------------- parameters

# FSDP plus tensor parallelism: kernels split over both axes, biases over `model`,
# embeddings the other way round, a bf16 stacked kernel, small leaves replicated.
SHAPES = {
    "kernel": ((8, 16), jnp.float32, P("data", "model")),
    "bias": ((16,), jnp.float32, P("model")),
    "embed": ((16, 8), jnp.float32, P("model", "data")),
    "stacked": ((2, 8, 4), jnp.bfloat16, P(None, "data", None)),
    "norm_scale": ((4,), jnp.float32, P()),
}


def _host_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: np.asarray(rng.normal(size=shape), jnp.dtype(dtype))
        for name, (shape, dtype, _) in SHAPES.items()
    }


def _host_grads(scale: float, seed: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v * scale, v.dtype) for k, v in _host_params(seed).items()}


def _shardings(mesh) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, spec) for name, (_, _, spec) in SHAPES.items()}


def _abstract(mesh=None) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        name: jax.ShapeDtypeStruct(
            shape, dtype, sharding=None if mesh is None else NamedSharding(mesh, spec)
        )
        for name, (shape, dtype, spec) in SHAPES.items()
    }


@functools.cache
def explicit_mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


# ---------------------------------------------------------------- 1. state layouts


def _layout(tree):
    """(shape, dtype) of every leaf of a concrete or abstract tree."""
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def _spec(x) -> P:
    """The PartitionSpec of an array's type or of a ShapeDtypeStruct.

    ``eval_shape`` leaves ``sharding`` unset on 0-d results: a scalar is replicated.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            assert x.shape == (), f"an abstract {x.shape} leaf has no sharding"
            return P()
        return x.sharding.spec
    return jax.typeof(x).sharding.spec


def _differences(a, b) -> list[str]:
    paths = jax.tree_util.tree_leaves_with_path(a)
    return [
        f"{jax.tree_util.keystr(path)}: {_spec(x)} != {_spec(y)}"
        for (path, x), y in zip(paths, jax.tree.leaves(b))
        if _spec(x) != _spec(y)
    ]


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_init_on_shape_dtype_structs(name):
    tx = TRANSFORMATIONS[name]()
    concrete = tx.init(jax.tree.map(jnp.asarray, _host_params()))
    abstract = jax.eval_shape(tx.init, _abstract())
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    assert _layout(abstract) == _layout(concrete)
    # Called directly on ShapeDtypeStructs (no tracing): init reads only shapes and
    # dtypes, so it builds the same state, as optax's own optimizers do.
    direct = tx.init(_abstract())
    assert _layout(direct) == _layout(concrete)


def _check_state_sharding(name: str) -> None:
    """The state-layout contract of one transformation under an Explicit mesh."""
    tx = TRANSFORMATIONS[name]()
    mesh = explicit_mesh()
    with jax.set_mesh(mesh):
        put = lambda tree: jax.tree.map(jax.device_put, tree, _shardings(mesh))
        params = put(_host_params())
        grads = [put(_host_grads(s, seed)) for seed, s in enumerate((0.5, 40.0))]

        state0 = tx.init(params)
        abstract = jax.eval_shape(tx.init, _abstract(mesh))
        jit_state0 = jax.jit(tx.init)(params)
        update = jax.jit(tx.update)
        _, eager1 = tx.update(grads[0], state0, params)
        updates, state1 = update(grads[0], state0, params)
        _, state2 = update(grads[1], state1, params)

    want = jax.tree.map(jax.typeof, state0)
    assert _differences(abstract, state0) == [], "eval_shape(init) on sharded structs"
    for label, state in [("jit(init)", jit_state0), ("update", eager1),
                         ("jit(update)", state1), ("jit(update) twice", state2)]:
        assert _differences(state0, state) == [], label
        assert jax.tree.map(jax.typeof, state) == want, label
    # Every scalar in the state (counts, norms, thresholds, flags) is replicated.
    scalars = [x for x in jax.tree.leaves(state2) if jnp.ndim(x) == 0]
    assert scalars and all(_spec(x) == P() for x in scalars)
    assert all(_spec(x) == P() for x in jax.tree.leaves(oc.stats(state2)) if jnp.ndim(x) == 0)
    # The updates keep the gradients' sharding types.
    assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof, grads[0])



# Two halves, so that two pytest workers can share them (the whole is about a minute).
@pytest.mark.parametrize("half", [0, 1])
def test_state_sharding_types_are_stable_under_an_explicit_mesh(half):
    """Every registered transformation, checked in a child process.

    Eager runs on Explicit-sharded arrays aborted a pytest worker inside XLA:CPU
    twice (see tests/_in_a_child.py).
    """
    check_in_a_child("test_sharding", "_check_state_sharding",
                     sorted(TRANSFORMATIONS)[half::2])


# ---------------------------------------------------------------- 2. 2-D meshes under jit

MULTI_AXIS = {
    **{name: functools.partial(_clipper, name) for name in CLIPPERS},
    **{f"{name}(adam)": functools.partial(_guarded, name) for name in GUARDS},
    "clip_by_group_norms": _groups,
    **{f"{name}(adam)": functools.partial(_moment_clipper, name) for name in MOMENT_CLIPPERS},
    **{f"{name}(stacked)": functools.partial(_clipper, name, stacked=True)
       for name in ("adaptive_grad_clip", "clip_by_norm")},
}
# Small, at the threshold's scale, a spike: every clipper clips some steps and not
# others, and the adaptive ones leave their warmup (test_kwargs keep it short).
STEP_SCALES = (0.05, 0.2, 0.1, 0.15, 0.3, 40.0)


def _run(tx, params, grads_seq):
    update = jax.jit(tx.update)
    state = tx.init(params)
    steps = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        steps.append((updates, state))
    return steps


@functools.cache
def _unsharded(name):
    """The transformation's jitted result on unsharded (single-device) inputs."""
    params = jax.tree.map(jnp.asarray, _host_params())
    grads = [jax.tree.map(jnp.asarray, _host_grads(s, i + 1)) for i, s in enumerate(STEP_SCALES)]
    return jax.device_get(_run(MULTI_AXIS[name](), params, grads))


def _assert_close(got, want, where):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want), where
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, where
        if not jnp.issubdtype(w.dtype, jnp.inexact):  # (bfloat16 is inexact to jnp only)
            np.testing.assert_array_equal(g, w, err_msg=where)
            continue
        # A sharded reduction may add in another order: equal up to float rounding.
        tight = jnp.finfo(w.dtype).eps * 8
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64),
                                   rtol=tight, atol=tight, err_msg=where)


def _check_jit_on_a_mesh(name: str, axis_type=AxisType.Explicit, mesh_shape=(2, 4)) -> None:
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(axis_type,) * 2)
    shardings = _shardings(mesh)
    put = lambda tree: jax.tree.map(jax.device_put, tree, shardings)
    params = put(_host_params())
    assert len(params["kernel"].sharding.device_set) == 8
    grads = [put(_host_grads(s, i + 1)) for i, s in enumerate(STEP_SCALES)]
    with jax.set_mesh(mesh):
        steps = _run(MULTI_AXIS[name](), params, grads)
    want = _unsharded(name)
    for step, ((updates, state), (want_updates, want_state)) in enumerate(zip(steps, want)):
        _assert_close(updates, want_updates, f"{name} updates, step {step}")
        _assert_close(state, want_state, f"{name} state, step {step}")
        _assert_close(oc.stats(state), oc.stats(want_state), f"{name} stats, step {step}")
        for key, leaf in updates.items():
            assert leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim), (name, key)
    # The steps made the transformation act (clip or skip) at least once, so
    # both of its branches ran sharded. monitor_norm never acts; skip_nonfinite
    # acts on NaN only (tested sharded in sections 3 and 4).
    if not name.startswith(("monitor_norm", "skip_nonfinite")):
        assert any(_acted(oc.stats(state)) for _, state in want), sorted(oc.stats(want[-1][1]))


@pytest.mark.parametrize("name", sorted(MULTI_AXIS))
def test_jit_on_an_auto_data_model_mesh_equals_unsharded(name):
    _check_jit_on_a_mesh(name, AxisType.Auto, (4, 2))


# Two halves, so that two pytest workers can share them.
@pytest.mark.parametrize("half", [0, 1])
def test_jit_on_an_explicit_data_model_mesh_equals_unsharded(half):
    """Every MULTI_AXIS entry on an Explicit 2x4 mesh, in a child process.

    Such a run aborted a pytest worker once inside XLA:CPU (see tests/_in_a_child.py).
    """
    check_in_a_child("test_sharding", "_check_jit_on_a_mesh", sorted(MULTI_AXIS)[half::2])


def _acted(stats) -> bool:
    flags = [bool(np.any(v)) for k, v in stats.items() if k.endswith(("/clipped", "/skipped"))]
    counts = [float(v) > 0 for k, v in stats.items() if k.endswith("/clipped_fraction")]
    return any(flags + counts)


# ---------------------------------------------------------------- 3. shard_map and pmap


@functools.cache
def data_mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def _grads_8(case: str) -> dict[str, jax.Array]:
    rng = np.random.default_rng(7)
    grads = {"w": np.asarray(rng.normal(size=(8, 4)), np.float32),
             "b": np.asarray(rng.normal(size=(8,)), np.float32)}
    if case == "rescue":  # squared, 1e20 overflows float32: the rescaled branch runs
        grads["w"][5, 2] = 1e20
    elif case == "nan":  # on shard 3 of 8 only
        grads["b"][3] = np.nan
    return jax.tree.map(jnp.asarray, grads)


CASES = ("finite", "rescue", "nan")


def _np_global_norm(tree) -> float:
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
    return float(np.sqrt(np.sum(flat**2)))


def _shard_mapped(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=data_mesh(), in_specs=in_specs, out_specs=out_specs,
                                 check_vma=True))


def _pmapped(fn):
    """``fn`` under pmap over axis "data": each leaf's leading 8 split over devices.

    Inputs are reshaped to (8, ...) blocks and the results back, so they compare to
    the shard_map and unsharded results directly.
    """
    def to_blocks(tree):
        return jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), tree)

    def from_blocks(tree):
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)

    mapped = jax.pmap(fn, axis_name="data")
    return mapped, to_blocks, from_blocks


@pytest.mark.parametrize("case", CASES)
def test_global_norm_with_axis_name(case):
    grads = _grads_8(case)
    want = _np_global_norm(grads)
    norm = functools.partial(oc.global_norm, axis_name="data")
    got = _shard_mapped(norm, P("data"), P())(grads)
    mapped, to_blocks, _ = _pmapped(norm)
    per_device = mapped(to_blocks(grads))
    for value in [float(got), *map(float, per_device)]:
        if math.isnan(want):
            assert math.isnan(value), value
        else:
            assert value == pytest.approx(want, rel=1e-6)


# ord=inf reduces by a maximum across shards, which in XLA drops NaN: a NaN on one
# shard left the others clipped by a finite norm until _shards._pmax kept it.
@pytest.mark.parametrize("ord", [None, math.inf, 3.0])
@pytest.mark.parametrize("case", CASES)
def test_clip_by_global_norm_with_axis_name(case, ord):
    grads = _grads_8(case)
    plain = oc.clip_by_global_norm(1.0, ord=ord)
    want, want_state = plain.update(grads, plain.init(grads))
    tx = oc.clip_by_global_norm(1.0, ord=ord, axis_name="data")

    def step(g):
        updates, state = tx.update(g, tx.init(g))
        return updates, state

    # Out spec P() for the state: check_vma proves statically that every shard
    # holds the same norm, threshold and scale.
    got, state = _shard_mapped(step, P("data"), (P("data"), P()))(grads)
    mapped, to_blocks, from_blocks = _pmapped(step)
    pm_updates, pm_state = mapped(to_blocks(grads))
    for updates, norm in [(got, state.stats.norm), (from_blocks(pm_updates),
                                                   pm_state.stats.norm)]:
        for g, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(norm), float(want_state.stats.norm), rtol=1e-6)
    if case == "rescue" and ord is None:
        assert float(state.stats.norm) == pytest.approx(1e20, rel=1e-6)
        assert _np_global_norm(got) == pytest.approx(1.0, rel=1e-6)
    if case == "nan":  # the library policy: every entry NaN, on every shard
        assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(got))


def _inner_specs(state):
    """Adam's moments are sharded like the gradients; everything else replicated."""
    def spec(path, _):
        names = {getattr(key, "name", None) for key in path}
        return P("data") if names & {"mu", "nu"} else P()
    return jax.tree_util.tree_map_with_path(spec, state)


GUARD_BUILDERS = {
    "skip_nonfinite": lambda axis_name: oc.skip_nonfinite(optax.adam(0.1), axis_name=axis_name),
    "skip_on_spike": lambda axis_name: oc.skip_on_spike(
        optax.adam(0.1), window=8, min_history=2, axis_name=axis_name
    ),
}


def _guard_steps(update, grads_seq, state):
    out = []
    for grads in grads_seq:
        updates, state = update(grads, state)
        out.append((updates, state))
    return out


@pytest.mark.parametrize("bad", ["rescue", "nan"])
@pytest.mark.parametrize("guard", sorted(GUARD_BUILDERS))
def test_guard_decision_is_the_same_on_every_shard(guard, bad):
    finite = _grads_8("finite")
    seq = [finite, jax.tree.map(lambda x: x * 1.1, finite), _grads_8(bad), finite]
    plain = GUARD_BUILDERS[guard](None)
    want = _guard_steps(jax.jit(plain.update), seq, plain.init(finite))

    tx = GUARD_BUILDERS[guard]("data")
    state0 = tx.init(finite)
    specs = _inner_specs(state0)
    sharded = _shard_mapped(tx.update, (P("data"), specs), (P("data"), specs))
    got = _guard_steps(sharded, seq, state0)

    mapped, to_blocks, from_blocks = _pmapped(tx.update)
    pm_state = jax.tree.map(lambda x, s: to_blocks(x) if s == P("data") else
                            jnp.broadcast_to(x, (8, *x.shape)), state0, specs)
    pm = []
    for grads in seq:
        updates, pm_state = mapped(to_blocks(grads), pm_state)
        # Back to one copy: sharded leaves reassembled, replicated ones must agree.
        state = jax.tree.map(lambda x, s: from_blocks(x) if s == P("data") else x, pm_state,
                             specs)
        for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(specs)):
            if s == P():
                assert bool(jnp.all(leaf == leaf[0]) | jnp.all(jnp.isnan(leaf))), guard
        pm.append((from_blocks(updates), jax.tree.map(
            lambda x, s: x if s == P("data") else x[0], state, specs)))

    # Step 3 holds the bad gradients: skipped by skip_nonfinite when NaN, and by
    # skip_on_spike in both cases (1e20 is far above mean + 6 std of two norms).
    skipped = bad == "nan" or guard == "skip_on_spike"
    for label, steps in [("shard_map", got), ("pmap", pm)]:
        for step, ((updates, state), (want_updates, want_state)) in enumerate(zip(steps, want)):
            where = f"{guard} {label} step {step}"
            stats, want_stats = oc.stats(state), oc.stats(want_state)
            assert {k: bool(stats[k]) for k in stats if k.endswith("skipped")} == {
                k: bool(want_stats[k]) for k in want_stats if k.endswith("skipped")}, where
            for g, w in zip(jax.tree.leaves((updates, state)),
                            jax.tree.leaves((want_updates, want_state))):
                np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                           rtol=1e-5, atol=1e-7, err_msg=where)
        updates, state = steps[2]
        prev_state = steps[1][1]
        assert bool(oc.stats(state)[f"{guard}/skipped"]) == skipped, label
        if skipped:  # zero updates on every shard, the moments untouched on every shard
            assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(updates)), label
            for a, b in zip(jax.tree.leaves(state.inner_state),
                            jax.tree.leaves(prev_state.inner_state)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("guard", sorted(GUARD_BUILDERS))
def test_guard_averages_each_shards_loss(guard, seed):
    """Each shard passes its own local loss: the decision is the mean loss's, everywhere.

    Before, the loss was not reduced over ``axis_name``: a NaN on one shard's loss
    skipped that shard's step while the others applied theirs, and the replicas'
    optimizer states drifted apart.
    """
    rng = np.random.default_rng(seed)
    finite = _grads_8("finite")
    steps = 5
    losses = rng.uniform(0.5, 2.0, size=(steps, 8)).astype(np.float32)
    bad_step = int(rng.integers(2, steps))
    losses[bad_step, rng.integers(0, 8)] = rng.choice([np.nan, np.inf, 1e30])
    seq = [jax.tree.map(lambda x, k=k: x * (1 + 0.1 * k), finite) for k in range(steps)]

    plain = GUARD_BUILDERS[guard](None)
    want, state = [], plain.init(finite)
    for grads, local in zip(seq, losses):
        updates, state = jax.jit(plain.update)(grads, state, loss=jnp.mean(local))
        want.append((updates, state))

    tx = GUARD_BUILDERS[guard]("data")
    state = tx.init(finite)
    specs = _inner_specs(state)
    sharded = _shard_mapped(lambda g, s, loss: tx.update(g, s, loss=loss[0]),
                            (P("data"), specs, P("data")), (P("data"), specs))
    for step, (grads, local) in enumerate(zip(seq, losses)):
        updates, state = sharded(grads, state, jnp.asarray(local))
        want_updates, want_state = want[step]
        where = f"{guard} step {step} losses {local.tolist()}"
        assert bool(oc.stats(state)[f"{guard}/skipped"]) == bool(
            oc.stats(want_state)[f"{guard}/skipped"]), where
        for g, w in zip(jax.tree.leaves((updates, state)),
                        jax.tree.leaves((want_updates, want_state))):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                       rtol=1e-5, atol=1e-7, err_msg=where)
    # A non-finite or enormous loss on one shard skipped the step on every shard.
    assert bool(oc.stats(want[bad_step][1])[f"{guard}/skipped"]) or (
        guard == "skip_nonfinite" and np.isfinite(losses[bad_step]).all())


# ---------------------------------------------------------------- 4. shard_map over two axes
#
# Leaves sharded over `model` only, over `data` only, over both, and replicated.
# Under replication checking a leaf replicated over an axis holds the same partial
# sum on every shard of it, so the global norm must reduce each leaf over the
# axes it is split along only: a replicated leaf counts once, not once per shard.

MIXED = {
    "kernel": ((8, 3), P("model", None)),
    "bias": ((5,), P()),
    "embed": ((16, 2), P(("data", "model"), None)),
    "scale": ((6,), P("data")),
}
BOTH_AXES = ("data", "model")


@functools.cache
def mesh_2x4():
    return jax.make_mesh((2, 4), BOTH_AXES, axis_types=(AxisType.Auto,) * 2)


def _mixed_specs():
    return {name: spec for name, (_, spec) in MIXED.items()}


def _mixed_grads(scale: float = 1.0, seed: int = 3, big: str | None = None):
    rng = np.random.default_rng(seed)
    grads = {name: np.asarray(rng.normal(size=shape) * scale, np.float32)
             for name, (shape, _) in MIXED.items()}
    if big is not None:  # squared, 1e20 overflows float32: the rescaled branch runs
        grads[big].flat[1] = 1e20
    return jax.tree.map(jnp.asarray, grads)


def _on_2x4(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh_2x4(), in_specs=in_specs, out_specs=out_specs,
                                 check_vma=True))


def _np_norm(tree, ord) -> float:
    flat = np.abs(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                  for x in jax.tree.leaves(tree)]))
    if ord == math.inf:
        return float(np.max(flat))
    top = float(np.max(flat))  # scaled: 1e20 ** 3 overflows float64 too
    return top * float(np.sum((flat / top) ** ord) ** (1 / ord)) if top else 0.0


@pytest.mark.parametrize("big", [None, "bias", "kernel"], ids=["finite", "rescue-replicated",
                                                                "rescue-sharded"])
@pytest.mark.parametrize("ord", [2, 1, math.inf, 3])
def test_global_norm_counts_each_entry_once_over_two_axes(ord, big):
    grads = _mixed_grads(big=big)
    want = _np_norm(grads, ord)
    norm = functools.partial(oc.global_norm, ord=ord, axis_name=BOTH_AXES)
    got = float(_on_2x4(norm, (_mixed_specs(),), P())(grads))
    assert got == pytest.approx(want, rel=2e-6)
    # The unsharded norm agrees (the test's reference is not the only witness).
    assert got == pytest.approx(float(oc.global_norm(grads, ord)), rel=2e-6)


def test_replicated_leaf_alone_is_not_reduced():
    grads = {"bias": _mixed_grads()["bias"]}
    norm = functools.partial(oc.global_norm, axis_name=BOTH_AXES)
    got = _on_2x4(norm, ({"bias": P()},), P())(grads)
    assert float(got) == pytest.approx(_np_norm(grads, 2), rel=1e-6)


def _axis_clipper(name: str, axis_name):
    info = FACTORIES[name]
    kwargs = {"axis_name": axis_name}
    return info.build(1.0, **kwargs) if info.threshold is not None else info.build(**kwargs)


def _axis_guard(name: str, axis_name):
    return FACTORIES[name].build(inner=optax.adam(1e-2), axis_name=axis_name)


AXIS_CLIPPERS = sorted(
    name for name in CLIPPERS
    if "axis_name" in inspect.signature(FACTORIES[name].factory).parameters
)
MIXED_LABELS = {"kernel": "matrices", "bias": "vectors", "embed": "muon", "scale": "vectors"}
SHARD_MAPPED = {
    **{name: functools.partial(_axis_clipper, name) for name in AXIS_CLIPPERS},
    **{f"{name}(adam)": functools.partial(_axis_guard, name) for name in GUARDS},
    "clip_by_group_norms": lambda axis_name: _groups(MIXED_LABELS, axis_name),
}


def test_every_clipper_takes_an_axis_name():
    # clip_by_value clips entry by entry, and its axis_name makes its stats global.
    assert set(CLIPPERS) - set(AXIS_CLIPPERS) == set()


def _state_specs(state, grad_specs):
    """Moments (trees keyed like the gradients) sharded like them; the rest replicated.

    Every clipper statistic is replicated: norms reduced across shards are the same
    on every device, which check_vma proves for the out spec P().
    """
    def spec(path, _):
        names = [getattr(key, "name", None) for key in path]
        if "mu" in names or "nu" in names:
            return grad_specs[path[-1].key]
        return P()
    return jax.tree_util.tree_map_with_path(spec, state)


MIXED_SCALES = (0.05, 0.3, 0.1, 0.2, 40.0)


@pytest.mark.parametrize("name", sorted(SHARD_MAPPED))
def test_shard_map_over_two_axes_equals_unsharded(name):
    grad_specs = _mixed_specs()
    params = _mixed_grads(seed=11)
    grads_seq = [_mixed_grads(s, seed=20 + i) for i, s in enumerate(MIXED_SCALES)]
    # Last, a NaN on one `data` shard of a leaf replicated over `model`.
    nan_step = _mixed_grads(0.1, seed=30)
    grads_seq.append({**nan_step, "scale": nan_step["scale"].at[4].set(jnp.nan)})
    plain = SHARD_MAPPED[name](None)
    tx = SHARD_MAPPED[name](BOTH_AXES)
    want = _run(plain, params, grads_seq)

    state = tx.init(params)
    state_specs = _state_specs(state, grad_specs)
    update = _on_2x4(tx.update, (grad_specs, state_specs, grad_specs),
                     (grad_specs, state_specs))
    for step, (grads, (want_updates, want_state)) in enumerate(zip(grads_seq, want)):
        updates, state = update(grads, state, params)
        where = f"{name} step {step}"
        _assert_close(updates, want_updates, f"{where} updates")
        _assert_close(state, want_state, f"{where} state")
    # The spike (or, for skip_nonfinite, the NaN) was clipped or skipped, and
    # the first step was not: both sides of the decision ran sharded.
    def flags(step):
        stats = oc.stats(want[step][1])
        return [bool(jnp.any(v)) for k, v in stats.items() if k.endswith(("/clipped", "/skipped"))]
    if name == "monitor_norm":  # measures only: never clips, and passes NaN on
        unchanged = [jnp.array_equal(u, g, equal_nan=True)
                     for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads_seq[-1]))]
        assert all(bool(x) for x in unchanged), name
        return
    assert any(flags(-2) + flags(-1)), name
    if name.startswith("skip_"):
        assert flags(-1) == [True], name  # the NaN step is skipped
    assert not any(flags(0)), name


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_clip_per_example_with_an_axis_name_clips_by_the_whole_example(per_layer, seed):
    """Each example's leaves split over "data" (tensor parallelism): with axis_name the
    per-example norms cover every shard, as the sensitivity bound needs. Without one,
    each shard clipped by its own slice and an example's contribution reached
    C * sqrt(shards). The rescue path (an entry near float32's max) is drawn too."""
    rng = np.random.default_rng(seed)
    grads = {"w": np.asarray(rng.normal(size=(5, 3, 16)) * 10, np.float32),
             "b": np.asarray(rng.normal(size=(5, 8)), np.float32)}
    if seed == 1:
        grads["w"][2, 1, 7] = 3e38  # the example's norm overflows: the rescue path
    grads = jax.tree.map(jnp.asarray, grads)
    plain = oc.clip_per_example(1.0, reduce="sum", per_layer=per_layer)
    want, want_state = plain.update(grads, plain.init(None))

    tx = oc.clip_per_example(1.0, reduce="sum", per_layer=per_layer, axis_name="data")
    specs = {"w": P(None, None, "data"), "b": P(None, "data")}

    def step(g):
        out, state = tx.update(g, tx.init(None))
        return out, state.stats

    out_specs = ({"w": P(None, "data"), "b": P("data")}, P())
    got, stats = _shard_mapped(step, (specs,), out_specs)(grads)
    for key in grads:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]),
                                   rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(stats.norm_max), float(want_state.stats.norm_max),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="noise_multiplier > 0 with axis_name"):
        oc.clip_per_example(1.0, noise_multiplier=1.0, axis_name="data")
