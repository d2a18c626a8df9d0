"""Alternative designs of ``clip_by_global_norm``, measured against the library's own.

Each design keeps the library's contract for finite float32 trees (same norm up
to rounding, same scale, same stats) and changes one thing:

* ``nostats``: the library's math with an empty state, to price the stats.
* ``concat_rescue``: the library's fast path (one sum of squares per leaf), but
  the rare overflow/underflow branch works on one concatenated vector: two
  reductions instead of two per leaf, so a much smaller program to compile.
* ``scaled_rescue``: the library's fast path; the rare branch re-reads each
  leaf once, scaled by a fixed power of two (``2**-80`` after overflow,
  ``2**80`` after underflow) instead of by the largest magnitude, which needs
  no max pass: one reduction per leaf instead of two, and no extra memory.
* ``hybrid``: leaves under 65,536 entries are raveled and concatenated into
  one reduction (XLA fuses the concatenation into it, so nothing is copied),
  large leaves keep one reduction each; the rare branch is ``scaled_rescue``'s
  over the same groups. Fewer kernels for trees of many small leaves, the
  library's bandwidth for large ones.
* ``fused_concat``: one sum of squares over the concatenation of all raveled
  leaves, which XLA can fuse into a single reduction kernel reading every leaf.
* ``grouped``: leaves of one shape and dtype are stacked and reduced together.
* ``no_select``: the library's norm, then ``g * scale`` without the
  ``where(scale == 1, g, g * scale)`` select that keeps unclipped input
  bit-identical.

The floors are not clippers: ``floor_read`` is one read pass (a sum of squares)
and ``floor_read_write`` adds the minimal scale pass (read and write each entry).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

import optaxclip
from optaxclip import _norms, _scaling, _shards, _state
from optaxclip.fixed import ClipByGlobalNormState

Array = jax.Array
NormFn = Callable[[list[Array]], Array]


def floor_read(tree: Any) -> Array:
    """One read of every entry: the global sum of squares, nothing else."""
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def floor_read_write(tree: Any, max_norm: float = 1.0) -> Any:
    """One read for the norm plus one read and write to scale: the clip's memory floor."""
    norm = jnp.sqrt(floor_read(tree))
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda x: x * scale, tree)


def _rescue_concat(leaves: list[Array]) -> Array:
    """Overflow-safe L2 norm over one concatenated vector: ``M * ||x / M||``."""
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    largest = jnp.max(jnp.abs(flat), initial=0)
    divisor = _norms._safe_divisor(largest)
    scaled = jnp.sum(jnp.square(flat / divisor))
    return _norms._scaled_norm(largest, scaled, 2.0)


def _guarded(total: Array, leaves: list[Array]) -> Array:
    return lax.cond(_norms._trusted(total), lambda: _norms._root(total, 2.0),
                    lambda: _rescue_concat(leaves))


_DOWN, _UP = 2.0**-80, 2.0**80


def norm_scaled_rescue(leaves: list[Array]) -> Array:
    """Rare branch: ``sum((x * c)**2) / c**2`` with ``c`` a power of two, exact scaling.

    After overflow the total was >= 3.4e38, so with ``c = 2**-80`` every entry
    that matters stays a normal float and 4e9 entries of 3.4e38 cannot overflow.
    After underflow every ``|x| < 3.3e-10``, and ``c = 2**80`` lifts all but
    denormal-range entries (which XLA on CPU flushes anyway) into normal range.
    """
    total = jnp.sum(jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]))

    def rescaled() -> Array:
        c = jnp.where(total >= math.inf, jnp.float32(_DOWN), jnp.float32(_UP))
        scaled = sum(jnp.sum(jnp.square(x.astype(jnp.float32) * c)) for x in leaves)
        return jnp.where(jnp.isnan(scaled), scaled, _norms._root(scaled, 2.0) / c)

    return lax.cond(_norms._trusted(total), lambda: _norms._root(total, 2.0), rescaled)


SMALL = 2**16


def _hybrid_sum(leaves: list[Array], c: Any = None) -> Array:
    """Sum of squares (of ``x * c``): one reduction for all small leaves, one per large."""
    small = [x for x in leaves if x.size < SMALL]
    large = [x for x in leaves if x.size >= SMALL]
    parts = [jnp.concatenate([jnp.ravel(x) for x in small])] if small else []
    parts += large
    scale = (lambda x: x) if c is None else (lambda x: x * c)
    sums = [jnp.sum(jnp.square(scale(x.astype(jnp.float32)))) for x in parts]
    return jnp.sum(jnp.stack(sums)) if sums else jnp.zeros([], jnp.float32)


def norm_hybrid(leaves: list[Array]) -> Array:
    total = _hybrid_sum(leaves)

    def rescaled() -> Array:
        c = jnp.where(total >= math.inf, jnp.float32(_DOWN), jnp.float32(_UP))
        scaled = _hybrid_sum(leaves, c)
        return jnp.where(jnp.isnan(scaled), scaled, _norms._root(scaled, 2.0) / c)

    return lax.cond(_norms._trusted(total), lambda: _norms._root(total, 2.0), rescaled)


def norm_concat_rescue(leaves: list[Array]) -> Array:
    total = jnp.sum(jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]))
    return _guarded(total, leaves)


def norm_fused_concat(leaves: list[Array]) -> Array:
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    return _guarded(jnp.sum(jnp.square(flat)), leaves)


def norm_grouped(leaves: list[Array]) -> Array:
    groups: dict[tuple, list[Array]] = {}
    for x in leaves:
        groups.setdefault((x.shape, x.dtype), []).append(x)
    sums = [jnp.sum(jnp.square(jnp.stack(g).astype(jnp.float32))) for g in groups.values()]
    return _guarded(jnp.sum(jnp.stack(sums)), leaves)


def norm_library(leaves: list[Array]) -> Array:
    return _norms.global_norm(leaves)


def norm_unguarded(leaves: list[Array]) -> Array:
    """The library's fast path alone: its sums, with no conditional and no rescue.

    Not overflow-safe (an overflowed or underflowed total is kept as it is), so it
    is no design to adopt: next to ``norm_library`` it measures what the rescue's
    conditional costs, which on a GPU includes reading its predicate on the host.
    """
    total = _shards._psum_total(_norms._global_sums(leaves, 2.0), None)
    return _norms._root(total, 2.0)


def apply_scale_nextafter(update: Array, scale: Array) -> Array:
    """The previous ``apply_scale``: round to nearest, then ``nextafter`` toward zero.

    Kept to measure the rounding against (issue: bf16 standalone 1.33x optax).
    Per entry: a float32 product, a cast, a cast back, a compare, ``nextafter``
    and a select.
    """
    if not _norms.is_float_leaf(update):
        return update
    update = jnp.asarray(update)
    compute = jnp.promote_types(update.dtype, _norms.accumulation_dtype(update.dtype))
    product = update.astype(compute) * scale.astype(_norms.accumulation_dtype(compute))
    scaled = product.astype(update.dtype)
    if compute != update.dtype and not jnp.iscomplexobj(update):
        grew = jnp.abs(scaled.astype(compute)) > jnp.abs(product)
        constant = lax.stop_gradient(scaled)
        step = constant - jnp.nextafter(constant, jnp.zeros_like(constant))
        scaled = jnp.where(grew, scaled - step, scaled)
    return jnp.where(scale == 1, update, scaled)


def apply_scale_shift(update: Array, scale: Array) -> Array:
    """bf16 only: the float32 product's high 16 bits reinterpreted as bf16 (no float cast)."""
    update = jnp.asarray(update)
    if update.dtype != jnp.bfloat16:
        return _scaling.apply_scale(update, scale)
    product = update.astype(jnp.float32) * scale.astype(jnp.float32)
    high = (lax.bitcast_convert_type(product, jnp.uint32) >> 16).astype(jnp.uint16)
    return jnp.where(scale == 1, update, lax.bitcast_convert_type(high, jnp.bfloat16))


def _plain_scale(g: Array, scale: Array) -> Array:
    return (g.astype(jnp.float32) * scale).astype(g.dtype)


def make_clip(
    max_norm: float, norm_fn: NormFn = norm_library,
    apply_fn: Callable[[Array, Array], Array] = _scaling.apply_scale,
) -> optax.GradientTransformationExtraArgs:
    """A global-norm clipper with the library's state and stats, built from parts."""

    threshold = jnp.float32(max_norm)

    def init_fn(params: Any) -> ClipByGlobalNormState:
        del params
        return ClipByGlobalNormState(
            jnp.zeros([], jnp.int32), _state.ClipStats(jnp.zeros([]), threshold, jnp.ones([]))
        )

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(updates)]
        norm = norm_fn(leaves)
        scale, _ = _scaling.scale_factor(norm, threshold)
        out = jax.tree.map(lambda g: apply_fn(g, scale), updates)
        stats = _state.ClipStats(norm, threshold, scale)
        return out, ClipByGlobalNormState(optax.safe_increment(state.count), stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_global_norm_nostats(max_norm: float) -> optax.GradientTransformation:
    """``optaxclip.clip_by_global_norm``'s math with an empty state (no stats)."""

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = _norms.global_norm(updates)
        scale, _ = _scaling.scale_factor(norm, jnp.float32(max_norm))
        return jax.tree.map(lambda g: _scaling.apply_scale(g, scale), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


DESIGNS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "library": optaxclip.clip_by_global_norm,
    "concat_rescue": lambda t: make_clip(t, norm_concat_rescue),
    "scaled_rescue": lambda t: make_clip(t, norm_scaled_rescue),
    "hybrid": lambda t: make_clip(t, norm_hybrid),
    "fused_concat": lambda t: make_clip(t, norm_fused_concat),
    "grouped": lambda t: make_clip(t, norm_grouped),
    "no_select": lambda t: make_clip(t, norm_library, _plain_scale),
}


def check_designs(tree: Any, max_norm: float = 1.0) -> dict[str, float]:
    """Largest relative difference of each design's output from the library's.

    Also raises ``AssertionError`` when a design's norm overflows on ``1e20``
    entries or loses a NaN (the library's rescaled path handles both).
    """
    big = {"x": jnp.full((4,), 1e20), "y": jnp.full((3,), 1e-25), "z": jnp.array([jnp.nan])}
    outputs = {}
    for name, make in DESIGNS.items():
        tx = make(max_norm)
        run = jax.jit(lambda a, b, tx=tx: (tx.update(a, tx.init(a))[0],
                                            tx.update(b, tx.init(b))[1].stats.norm))
        outputs[name], big_norm = run(tree, big)
        if not math.isnan(float(big_norm)):
            raise AssertionError(f"design {name} loses a NaN: norm {float(big_norm)}")
        big_norm = run(tree, {k: v for k, v in big.items() if k != "z"})[1]
        if not math.isclose(float(big_norm), 2e20, rel_tol=1e-6):
            raise AssertionError(f"design {name} overflows: norm {float(big_norm)}")
    worst = {}
    for name, out in outputs.items():
        diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30),
                             out, outputs["library"])
        worst[name] = float(max(jax.tree.leaves(diffs)))
    return worst


# --- Guard designs: select over the inner state vs lax.cond -------------------------


class GuardState(NamedTuple):
    """State of the guard prototypes: the inner state and what the guard did."""

    inner_state: Any
    skipped: Array
    num_skipped: Array
    norm: Array


def _guard_init(inner: optax.GradientTransformation) -> Callable[[Any], GuardState]:
    def init_fn(params: Any) -> GuardState:
        return GuardState(inner.init(params), jnp.zeros([], bool), jnp.zeros([], jnp.int32),
                          jnp.zeros([], jnp.float32))

    return init_fn


def _float_zeros(tree: Any) -> Any:
    return jax.tree.map(lambda u: jnp.zeros_like(u) if _norms.is_float_leaf(u) else u, tree)


def skip_nonfinite_select(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The select form (``optaxclip.skip_nonfinite`` until 2026-12-07): the inner update
    always runs, then ``where(skip, old, new)`` over the updates and the whole inner state."""

    def update_fn(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        norm = _norms.global_norm(updates).astype(jnp.float32)
        skip = ~jnp.isfinite(norm)
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        pick = lambda old, new: jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)
        return pick(_float_zeros(new_updates), new_updates), GuardState(
            pick(state.inner_state, new_inner), skip,
            state.num_skipped + skip.astype(jnp.int32), norm)

    return optax.GradientTransformation(_guard_init(inner), update_fn)


def skip_nonfinite_barrier(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The select form with the inner update's outputs materialised once
    (``lax.optimization_barrier``): the selects read the new state instead of each
    fusing the moment update again, so the old moments have one reader before the
    selected state overwrites them in place."""

    def update_fn(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        norm = _norms.global_norm(updates).astype(jnp.float32)
        skip = ~jnp.isfinite(norm)
        new_updates, new_inner = lax.optimization_barrier(
            inner.update(updates, state.inner_state, params))
        pick = lambda old, new: jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)
        return pick(_float_zeros(new_updates), new_updates), GuardState(
            pick(state.inner_state, new_inner), skip,
            state.num_skipped + skip.astype(jnp.int32), norm)

    return optax.GradientTransformation(_guard_init(inner), update_fn)


def skip_nonfinite_cond(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The ``lax.cond`` form with the skip branch as the true branch: it returns zeros and
    the old state, the false branch runs the inner update. XLA:CPU copies every state
    buffer out of such a conditional; ``optaxclip.skip_nonfinite`` is the same
    conditional with the branches the other way round, which updates the donated
    moments in place. Under ``jax.vmap`` with a batched predicate the cond becomes a
    select of both branches (the select form again)."""

    def update_fn(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        norm = _norms.global_norm(updates).astype(jnp.float32)
        skip = ~jnp.isfinite(norm)

        def skipped(updates: Any, inner_state: Any, params: Any) -> tuple[Any, Any]:
            shapes = jax.eval_shape(inner.update, updates, inner_state, params)[0]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return zeros, inner_state

        def applied(updates: Any, inner_state: Any, params: Any) -> tuple[Any, Any]:
            return inner.update(updates, inner_state, params)

        new_updates, new_inner = lax.cond(skip, skipped, applied, updates,
                                          state.inner_state, params)
        return new_updates, GuardState(new_inner, skip,
                                       state.num_skipped + skip.astype(jnp.int32), norm)

    return optax.GradientTransformation(_guard_init(inner), update_fn)


# --- clip_by_value: its max-norm statistic, optional ---------------------------------


def clip_by_value_nostats(max_delta: float) -> optax.GradientTransformation:
    """``optaxclip.clip_by_value``'s clamp (threshold rounded down to each leaf's dtype,
    input bits kept where not clipped) without the max-reduction that fills its stats."""
    threshold = jnp.float32(max_delta)

    def clamp(g: Any) -> Any:
        if not _norms.is_float_leaf(g) or jnp.iscomplexobj(g):
            return g
        limit = threshold.astype(g.dtype)
        limit = jnp.where(limit.astype(jnp.float32) > threshold,
                          jnp.nextafter(limit, jnp.zeros_like(limit)), limit)
        inside = (jnp.abs(g) <= limit) & (limit > 0)
        return jnp.where(inside, g, jnp.clip(g, -limit, limit))

    return optax.stateless(lambda updates, params: jax.tree.map(clamp, updates))


def clip_by_value_one_reduction(max_delta: float) -> optax.GradientTransformation:
    """The same clamp with one statistic reduction: ``max|g|`` per leaf (NaN-propagating),
    ``clipped = max|g| > limit``. It gives up the library's "clipped ignores NaN entries"
    (a NaN makes the max NaN) in exchange for one reduction over ``|g|`` instead of two."""
    threshold = jnp.float32(max_delta)
    clamp = clip_by_value_nostats(max_delta)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        out, _ = clamp.update(updates, optax.EmptyState())
        floats = [g for g in jax.tree.leaves(updates) if _norms.is_float_leaf(g)]
        norm = jnp.max(jnp.stack([jnp.max(jnp.abs(g)).astype(jnp.float32) for g in floats]))
        return out, (norm, norm > threshold)

    return optax.GradientTransformation(
        lambda params: (jnp.zeros([], jnp.float32), jnp.zeros([], bool)), update_fn)
