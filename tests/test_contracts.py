"""The contract matrix: every registered transformation, over generated cases.

Cases are drawn by hypothesis from the product of dtypes (fp16, bf16, f32,
complex64, mixed trees, f64 under x64, f64 next to narrower leaves under x64),
thresholds (0, the smallest normal, tiny, 1, huge, each dtype's max and above,
inf; static, scheduled, or traced through ``inject_hyperparams`` together with
every float hyperparameter that accepts a tracer, such as ``eps``), gradient
scales (0, subnormal, tiny, 1, large, near each dtype's max, a norm beyond it;
one NaN/+inf/-inf entry), the norm's order for the clippers that take
``ord`` (2, 1, 3, 4.5, 0.5, inf), structures (one bare leaf, many leaves, 36 leaves,
the empty tree, scalar and zero-size leaves, ``None`` / ``MaskedNode`` /
integer leaves),
execution (eager, jit, vmap, donated state, state restored as numpy arrays) and
history (fresh, after warmup, after a huge but finite norm). Each case is
checked against float64 numpy references by ``optaxclip.testing`` (see its
docstring for the contracts).

The transformations come from ``optaxclip.registered_factories()``: a clipper
added to the package is covered without editing this file, and
``test_every_public_transformation_is_registered`` fails if one is not
registered. ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) runs many more cases.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import optaxclip as oc
import optaxclip.testing as contracts
from optaxclip import _clipper, _norms, _packing

FACTORIES = oc.registered_factories()
CLIPPERS = sorted(name for name, info in FACTORIES.items() if info.kind == "clipper")
GUARDS = sorted(name for name, info in FACTORIES.items() if info.kind == "guard")

# "mixed64": float64 leaves next to narrower ones under x64 (the norm and scale in
# float64, applied to float32, bf16 and complex64 leaves).
DTYPES = ("float16", "bfloat16", "float32", "complex64", "mixed", "float64", "mixed64")
SCALES = ("zero", "subnormal", "tiny", "one", "large", "near_max", "norm_overflows")
NONFINITE = (None, "nan", "inf", "-inf")
STRUCTURES = ("one_leaf", "many_leaves", "wide", "empty", "scalar_and_zero_size",
              "special_leaves", "large_leaves")
THRESHOLDS = ("zero", "smallest_normal", "tiny", "one", "huge", "dtype_max", "above_dtype_max",
              "float32_max", "inf")
FORMS = ("static", "traced", "schedule")
HISTORIES = ("fresh", "warm", "after_huge")
# The norm's order, for the clippers that take ``ord`` (the rest ignore it): the
# default, 1, p > 2 (the maximum-scaled rescue), a fractional p and inf.
ORDS = (None, 1.0, 3.0, 4.5, 0.5, math.inf)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Some donated buffers were not usable", "ignore:.*stats found no optaxclip"
)


def test_every_public_transformation_is_registered():
    """A public factory returning a transformation must be enumerable by this matrix."""
    for name in oc.__all__:
        obj = getattr(oc, name)
        if not inspect.isfunction(obj) or name == "make_clipper":  # the builder itself
            continue
        returns = str(inspect.signature(obj).return_annotation)
        if "GradientTransformation" in returns:
            assert name in FACTORIES, f"{name} is public but not registered"
    assert {"clip_by_global_norm", "clip_by_rms", "autoclip", "adaptive_grad_clip"} <= set(
        CLIPPERS
    )
    assert GUARDS == ["skip_nonfinite", "skip_on_spike"]
    assert FACTORIES["clipped"].kind == "preset"


@pytest.mark.parametrize("name", CLIPPERS)
def test_every_float_hyperparameter_is_traced_or_refused_by_name(name):
    """Under ``optax.inject_hyperparams`` each float hyperparameter either works as a
    tracer (the traced form of the matrix then injects it) or is refused with a
    message naming it and ``static_args``; any other error fails here."""
    info = FACTORIES[name]
    for key in _float_hyperparameters(info):
        _refuses_a_tracer(info, key)  # raises on any error but the named refusal
    if name in ("clip_by_global_norm", "adaptive_grad_clip"):
        assert "eps" in traceable_floats(name)


# ---------------------------------------------------------------- cases


def _dtype(name: str):
    return jnp.dtype(name)


def _leaf_dtypes(policy: str, count: int) -> list:
    if policy in ("mixed", "mixed64"):
        cycle = (["float32", "bfloat16", "float16", "complex64"] if policy == "mixed"
                 else ["float64", "float32", "bfloat16", "complex64"])
        return [_dtype(cycle[i % len(cycle)]) for i in range(count)]
    return [_dtype(policy)] * count


SHAPES = {
    "one_leaf": None,  # a bare array of shape (4, 3)
    "many_leaves": {"a": (3, 4), "b": (4,), "c": {"d": (2, 2, 3), "e": ()}},
    "empty": {},
    "scalar_and_zero_size": {"s": (), "z": (0,), "zz": (2, 0)},
    "special_leaves": {"w": (3, 2), "n": None, "m": "masked", "i": "int"},
    # Enough float leaves for the global scale's shared form (_clipper._SHARED_FROM).
    "wide": {f"l{i:02d}": ((2, 3), (5,), ())[i % 3] for i in range(_clipper._SHARED_FROM + 4)},
    # Past 4,096 entries a reduction, and 4,096 units a leaf: XLA:CPU's vectorised
    # max and min reductions drop NaN there (see _reductions.py).
    "large_leaves": {"tall": (4100, 2), "long": (2, 4100)},
}


def _scale_value(scale: str, dtype) -> float:
    finfo = jnp.finfo(dtype)
    return {
        "zero": 0.0,
        "subnormal": float(finfo.smallest_subnormal) * 8,
        "tiny": float(finfo.tiny) * 16,
        "one": 1.0,
        "large": min(1e20, float(finfo.max) / 64),
        "near_max": float(finfo.max) / 4,
        # Finite entries whose norm is above the accumulation dtype's largest value
        # (float32, bf16 and complex64 leaves; fp16 accumulates in float32 and fits).
        "norm_overflows": float(finfo.max) * 0.9,
    }[scale]


def make_tree(structure: str, policy: str, scale: str, nonfinite, seed: int):
    rng = np.random.default_rng(seed)
    shapes = SHAPES[structure]
    if shapes is None:
        shapes = {"": (4, 3)}
    flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, (tuple, str)))
    dtypes = iter(_leaf_dtypes(policy, len(flat)))
    leaves, injected = [], nonfinite is None
    for shape in flat:
        if shape == "masked":
            leaves.append(optax.MaskedNode())
            continue
        if shape == "int":
            leaves.append(jnp.arange(3, dtype=jnp.int32))
            continue
        dtype = next(dtypes)
        magnitude = _scale_value(scale, dtype)
        values = rng.uniform(-1, 1, size=shape) * magnitude
        if jnp.issubdtype(dtype, jnp.complexfloating):
            values = values + 1j * rng.uniform(-1, 1, size=shape) * magnitude
        values = np.asarray(values)
        if not injected and values.size:
            values = values.astype(np.complex128 if values.dtype.kind == "c" else np.float64)
            values.flat[0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[nonfinite]
            injected = True
        leaves.append(jnp.asarray(values, dtype))
    tree = jax.tree.unflatten(treedef, leaves)
    if SHAPES[structure] is None:
        tree = tree[""]
    return tree


def weights_like(tree, seed: int):
    rng = np.random.default_rng(seed + 1)

    def weight(x):
        if not contracts._is_float(x):
            return x
        values = rng.normal(size=x.shape)
        return jnp.asarray(values, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else
                           jnp.float32).astype(x.dtype)

    return jax.tree.map(weight, tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _threshold_value(kind: str, tree) -> float:
    floats = [x for x in jax.tree.leaves(tree) if contracts._is_float(x)]
    dtype = floats[0].dtype if floats else jnp.dtype("float32")
    largest = float(jnp.finfo(dtype).max)
    return {
        "zero": 0.0,
        "smallest_normal": float(jnp.finfo(jnp.float32).tiny),
        "tiny": 1e-30,
        "one": 1.0,
        "huge": 1e30,
        "dtype_max": largest,
        "above_dtype_max": largest * 1.5 if largest < 1e300 else math.inf,
        "float32_max": float(jnp.finfo(jnp.float32).max),
        "inf": math.inf,
    }[kind]


def _float_hyperparameters(info) -> list[str]:
    """The arguments besides the threshold whose default is a float (eps, beta, z)."""
    return [k for k, p in inspect.signature(info.factory).parameters.items()
            if k != info.threshold and isinstance(p.default, float)]


def _refuses_a_tracer(info, name: str) -> bool:
    """Whether ``name`` traced by ``optax.inject_hyperparams`` is refused with the
    message that names it and ``static_args``; any other error fails the caller."""
    static = tuple(k for k in inspect.signature(info.factory).parameters if k != name)
    limit = {info.threshold: 1.0} if info.threshold else {}
    tx = optax.inject_hyperparams(info.factory, static_args=static)(**info.test_kwargs, **limit)
    grads = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    try:
        jax.jit(tx.update)(grads, tx.init(grads), grads)
    except ValueError as error:
        if f"{name} must be static" in str(error) and "static_args" in str(error):
            return True
        raise
    return False


@functools.cache
def traceable_floats(name: str) -> tuple[str, ...]:
    info = FACTORIES[name]
    return tuple(k for k in _float_hyperparameters(info) if not _refuses_a_tracer(info, k))


def build(info, limit: float, form: str, **options):
    """The factory with its threshold given statically, traced or as a schedule;
    ``options``: further static arguments (``stacked=True``)."""
    if limit is None or info.threshold is None:
        return info.build(**options)
    if form == "schedule":
        return info.build(lambda count: jnp.asarray(limit, jnp.float32) + 0 * count, **options)
    if form == "traced":
        # The threshold and every float hyperparameter that accepts a tracer (eps,
        # lambda_rel) are injected; the rest stays static.
        traced = {info.threshold, *traceable_floats(info.name)}
        static = tuple(k for k in inspect.signature(info.factory).parameters
                       if k not in traced)
        injected = optax.inject_hyperparams(
            info.factory, static_args=static, hyperparam_dtype=jnp.float32
        )
        return injected(**info.test_kwargs, **options, **{info.threshold: limit})
    return info.build(limit, **options)


def _checkified(update):
    checked_update = jax.jit(checkify.checkify(update))

    def run(*args):
        error, out = checked_update(*args)
        error.throw()
        return out

    return run


def _history(tx, tree, params, history: str, seed: int, checked: bool = False):
    """A state after no update, after warmup, or after a huge but finite norm."""
    state = tx.init(params if params is not None else tree)
    if history == "fresh":
        return state
    update = _checkified(tx.update) if checked else jax.jit(tx.update)
    normal = jax.tree.map(
        lambda x: (x * 0 + 1).astype(x.dtype) if contracts._is_float(x) else x, tree,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    for _ in range(6):
        _, state = update(normal, state, params)
    if history == "after_huge":
        huge = jax.tree.map(
            lambda x: (x * 0 + jnp.finfo(x.dtype).max / 8).astype(x.dtype)
            if contracts._is_float(x) else x, tree,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        _, state = update(huge, state, params)
    return state


case_strategy = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "structure": st.sampled_from(STRUCTURES),
    "scale": st.sampled_from(SCALES),
    "nonfinite": st.sampled_from(NONFINITE),
    "threshold": st.sampled_from(THRESHOLDS),
    "form": st.sampled_from(FORMS),
    "mode": st.sampled_from(contracts.MODES),
    "history": st.sampled_from(HISTORIES),
    "ord": st.sampled_from(ORDS),
    "seed": st.integers(0, 2**16),
})


def _x64(case):
    return jax.enable_x64(case["dtype"] in ("float64", "mixed64"))


def _ord_option(info, case: dict) -> dict:
    """``{"ord": p}`` when the case names an order and the factory takes one."""
    takes_ord = "ord" in inspect.signature(info.factory).parameters
    return {"ord": case["ord"]} if takes_ord and case.get("ord") is not None else {}


def _run_clipper_case(name: str, case: dict, **options) -> None:
    info = FACTORIES[name]
    options = {**_ord_option(info, case), **options}
    with _x64(case), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = make_tree(case["structure"], case["dtype"], case["scale"], case["nonfinite"],
                         case["seed"])
        params = weights_like(tree, case["seed"]) if info.needs_params else None
        limit = _threshold_value(case["threshold"], tree)
        tx = build(info, limit, case["form"], **options)
        state = _history(tx, tree, params, case["history"], case["seed"])
        exact = limit if info.limit_is_threshold and case["form"] == "static" else None
        contracts.assert_clip_contracts(tx, tree, state, params, mode=case["mode"],
                                        limit=exact)


# Always run besides the drawn cases: every injectable hyperparameter traced, on
# the tree wide enough for the global scale's shared form.
TRACED_WIDE_CASE = {"dtype": "float32", "structure": "wide", "scale": "large",
                    "nonfinite": None, "threshold": "one", "form": "traced", "mode": "jit",
                    "history": "warm", "seed": 0}


# Always run as well: entries near float32's max under a p-norm with p > 2, whose
# rescue divides by the largest magnitude (its reciprocal is subnormal past 2^126).
NEAR_MAX_P_NORM_CASE = {**TRACED_WIDE_CASE, "structure": "many_leaves", "scale": "near_max",
                        "form": "static", "history": "fresh", "ord": 3.0}


# Always run as well: a NaN in leaves past 4,096 entries, under the inf-norm, whose
# maxima XLA:CPU's vectorised reductions computed without the NaN.
NAN_LARGE_LEAVES_CASE = {**TRACED_WIDE_CASE, "structure": "large_leaves", "nonfinite": "nan",
                         "form": "static", "history": "fresh", "ord": math.inf}


@pytest.mark.parametrize("name", CLIPPERS)
@settings(deadline=None)
@given(case=case_strategy)
@example(case=TRACED_WIDE_CASE)
@example(case=NEAR_MAX_P_NORM_CASE)
@example(case=NAN_LARGE_LEAVES_CASE)
def test_clipper_contracts(name, case):
    _run_clipper_case(name, case)


# The clippers whose norm packs small leaves (global scope): with the packing cap at 4
# entries and chunks of 2 leaves, almost every leaf of every structure is past the cap,
# in chained chunks, so each contract runs on that path too (a real tree reaches it
# only past 2^20 entries in small leaves).
def _scope(name: str) -> str | None:
    info = FACTORIES[name]
    return getattr(contracts.clipper_spec(info.build(*[1.0][:bool(info.threshold)])),
                   "scope", None)


GLOBAL_SCOPE = sorted(name for name in CLIPPERS if _scope(name) == "global")


@pytest.mark.parametrize("name", GLOBAL_SCOPE)
@settings(deadline=None, max_examples=max(settings().max_examples // 3, 1))
@given(case=case_strategy)
def test_clipper_contracts_past_the_packing_cap(name, case):
    # The norms' cond branches are cached functions, and lax.cond caches their traces
    # by identity: fresh ones before and after keep the small cap's traces to this test.
    saved = _packing._PACK_TOTAL, _packing._PACK_LEAVES
    _norms._global_guarded.cache_clear()
    _packing._PACK_TOTAL, _packing._PACK_LEAVES = 4, 2
    try:
        _run_clipper_case(name, case)
    finally:
        _packing._PACK_TOTAL, _packing._PACK_LEAVES = saved
        _norms._global_guarded.cache_clear()


# The clippers with a norm per leaf, per unit or per layer, stacked where they can
# be: AGC (a kernel's output columns), the per-leaf clippers, and with ``stacked``
# a leaf's leading axis. Two paths a real tree takes only with large leaves run
# here on every leaf: with ``_clipper._UNIT_SCALES_FROM`` at 0, per-unit scales
# come from the tree's one conditional (4,096 entries a leaf and up), and with
# ``_norms._RESCUE_EACH_FROM`` at 0, every array in a norm's rescue is re-read
# only behind its group's own conditional (2^16 entries and up).
PER_LEAF = [(name, stacked) for name in CLIPPERS if _scope(name) in ("leaf", "unit")
            for stacked in ((False, True)
                            if "stacked" in inspect.signature(FACTORIES[name].factory).parameters
                            else (False,))]
# Always run besides the drawn cases: one that clips after a history, and one whose
# finite norms overflow float32 (the conditional's rescue branch), vmapped (the
# batched predicate makes it a select).
CLIPPING_CASE = {"dtype": "float32", "structure": "many_leaves", "scale": "large",
                 "nonfinite": None, "threshold": "one", "form": "static", "mode": "jit",
                 "history": "warm", "seed": 0}
OVERFLOW_CASE = {**CLIPPING_CASE, "scale": "norm_overflows", "mode": "vmap",
                 "history": "fresh"}


@pytest.mark.parametrize("name,stacked", PER_LEAF)
@settings(deadline=None, max_examples=max(settings().max_examples // 4, 1))
@given(case=case_strategy)
@example(case=CLIPPING_CASE)
@example(case=OVERFLOW_CASE)
def test_clipper_contracts_with_the_large_leaf_paths(name, stacked, case):
    saved = _clipper._UNIT_SCALES_FROM, _norms._RESCUE_EACH_FROM
    assert min(saved) > 0  # the real thresholds, restored below
    # lax.cond caches the norms' branches by identity: fresh ones keep these traces here.
    _norms._unit_guarded.cache_clear()
    _clipper._UNIT_SCALES_FROM, _norms._RESCUE_EACH_FROM = 0, 0
    try:
        _run_clipper_case(name, case, **({"stacked": True} if stacked else {}))
    finally:
        _clipper._UNIT_SCALES_FROM, _norms._RESCUE_EACH_FROM = saved
        _norms._unit_guarded.cache_clear()


@settings(deadline=None)
@given(case=case_strategy, option=st.sampled_from(["clipnorm", "clipvalue", "global_clipnorm"]))
def test_clipped_preset_contracts(case, option):
    with _x64(case), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = make_tree(case["structure"], case["dtype"], case["scale"], case["nonfinite"],
                         case["seed"])
        limit = _threshold_value(case["threshold"], tree)
        base = optax.identity()
        tx = oc.clipped(base, **{option: limit})
        if limit == 0:
            assert tx is base  # Keras semantics: 0 turns clipping off
            return
        assert oc.check_order(oc.clipped(optax.adam(1e-3), **{option: limit}), tree)
        state = _history(tx, tree, None, case["history"], case["seed"])
        contracts.assert_clip_contracts(tx, tree, state, mode=case["mode"], limit=limit)


@pytest.mark.parametrize("guard", GUARDS)
@settings(deadline=None)
@given(case=case_strategy, clipper=st.sampled_from(CLIPPERS))
def test_guard_contracts(guard, case, clipper):
    info = FACTORIES[clipper]
    with _x64(case), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = make_tree(case["structure"], case["dtype"], case["scale"], case["nonfinite"],
                         case["seed"])
        params = weights_like(tree, case["seed"])
        limit = _threshold_value(case["threshold"], tree)
        inner = optax.chain(build(info, limit, case["form"], **_ord_option(info, case)),
                            optax.sgd(0.1))
        tx = FACTORIES[guard].build(inner=inner)
        state = _history(tx, tree, params, case["history"], case["seed"])
        contracts.assert_guard_contracts(tx, tree, state, params, mode=case["mode"])


@settings(deadline=None)
@given(case=case_strategy, clipper=st.sampled_from(CLIPPERS))
def test_checked_passes_every_clipper_on_finite_input(case, clipper):
    """checked(tx) asserts the contracts at run time: on finite input it must not fire,
    and what it returns is tx's own update."""
    info = FACTORIES[clipper]
    with _x64(case), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = make_tree(case["structure"], case["dtype"], case["scale"], None, case["seed"])
        params = weights_like(tree, case["seed"]) if info.needs_params else None
        limit = _threshold_value(case["threshold"], tree)
        tx = oc.checked(build(info, limit, case["form"], **_ord_option(info, case)))
        state = _history(tx, tree, params, case["history"], case["seed"], checked=True)
        contracts.assert_clip_contracts(tx, tree, state, params, mode="eager")


# ---------------------------------------------------------------- moment clippers

MOMENT_CLIPPERS = sorted(name for name, info in FACTORIES.items() if info.kind == "moment_clipper")
THETAS = {"zero": 0.0, "small": 1e-3, "one": 1.0, "paper": 5000.0, "huge": 1e30,
          "inf": math.inf}


def _warm_tree(tree, seed: int, scale: float):
    rng = np.random.default_rng(seed + 7)

    def leaf(x):
        if not contracts._is_float(x):
            return x
        values = rng.normal(size=x.shape) * scale
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            values = values + 1j * rng.normal(size=x.shape) * scale
        return jnp.asarray(values, x.dtype)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


@pytest.mark.parametrize("name", MOMENT_CLIPPERS)
@settings(deadline=None)
@given(case=case_strategy, theta=st.sampled_from(sorted(THETAS)),
       inner=st.sampled_from(["probe", "adam"]), warm_steps=st.integers(0, 9))
def test_moment_clipper_contracts(name, case, theta, inner, warm_steps):
    """Bound, identity, signs, non-finite policy, stats, resets and warmup against numpy,
    in every execution mode (donated and numpy-restored state included)."""
    info = FACTORIES[name]
    with _x64(case), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = make_tree(case["structure"], case["dtype"], case["scale"], case["nonfinite"],
                         case["seed"])
        params = weights_like(tree, case["seed"])
        inner_tx = contracts.moment_probe() if inner == "probe" else optax.adam(0.1)
        tx = info.build(THETAS[theta], inner=inner_tx)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step in range(warm_steps):  # reset_interval 4: steps 4 and 8 reset the moments
            _, state = update(_warm_tree(tree, case["seed"] + step, 1e-2), state, params)
        if case["history"] == "after_huge" and warm_steps:
            _, state = update(_warm_tree(tree, case["seed"], 1e15), state, params)
        contracts.assert_moment_clip_contracts(tx, tree, state, params, mode=case["mode"])
