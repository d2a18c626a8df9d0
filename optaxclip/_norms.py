"""The one place optaxclip computes norms.

Every clipper gets its norms from here: global p-norms of a whole tree, per-leaf
norms, and unit-wise norms over chosen axes. The rules are the same everywhere:

* Magnitudes are accumulated in at least float32 whatever the leaf dtype, so an
  fp16 tree ``[300., 1.]`` has norm ~300.0017 rather than ``inf``.
* The fast path is a single read of each leaf: a sum of p-th powers. When that
  sum overflowed or underflowed (``1e20 ** 2`` is ``inf`` in float32), a
  ``lax.cond`` recomputes it scaled by the largest magnitude. That second pass
  only runs on such input, so ordinary steps pay for one read. Orders 1 and
  ``inf`` cannot overflow before the true norm does and never take it.
* Complex entries count by their modulus. ``None`` and ``optax.MaskedNode``
  leaves are skipped, and so are integer, boolean and ``float0`` leaves: they
  carry no gradient signal.
* The derivative is finite at zero: every square root, power and division is
  guarded so that ``jax.grad`` through a clipper at zero gradients is finite.
* With ``axis_name``, the p-th power sums (or maxima, for ``inf``) are reduced
  across shards, so the norm covers the whole sharded tree.
* Subnormal entries (below ``1.2e-38`` in float32) count as 0: XLA flushes them
  to zero on CPU and GPU before any rescaling can rescue them. Every normal
  float, however small or large, is handled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optaxclip._validate import AxisName, validate_axis_name, validate_ord

Array = jax.Array

__all__ = ["global_norm", "leaf_norms", "unit_norms", "is_float_leaf"]


def is_float_leaf(x: Any) -> bool:
    """True for leaves that carry a gradient: real or complex floating point."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, (float, complex))
    return jnp.issubdtype(dtype, jnp.inexact)


def accumulation_dtype(dtype: Any) -> Any:
    """The real dtype magnitudes of ``dtype`` are accumulated in: at least float32."""
    real = jnp.finfo(dtype).dtype  # complex64 -> float32, bfloat16 -> bfloat16
    return jnp.promote_types(real, jnp.float32)


def _float_leaves(tree: Any) -> list[Array]:
    # None and optax.MaskedNode are empty pytrees, so tree.leaves already drops them.
    leaves = jax.tree.leaves(tree)
    bad = sorted({type(x).__name__ for x in leaves if not _is_array_like(x)})
    if bad:
        raise TypeError(
            f"expected a pytree of arrays (gradients, updates or parameters); it has "
            f"leaves of type {bad}. Pass e.g. {{'w': jnp.ones(3)}}."
        )
    return [jnp.asarray(x) for x in leaves if is_float_leaf(x)]


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "dtype") or isinstance(x, (bool, int, float, complex))


def _widest(leaves: Sequence[Array]) -> Any:
    dtype = jnp.float32
    for x in leaves:
        dtype = jnp.promote_types(dtype, accumulation_dtype(x.dtype))
    return dtype


def _safe_pow(magnitude: Array, power: float) -> Array:
    """``magnitude ** power`` with a finite derivative at zero; NaN and inf propagate."""
    zero = magnitude == 0
    return jnp.where(zero, 0, jnp.where(zero, 1, magnitude) ** power)


def _magnitude(x: Array, acc: Any) -> Array:
    """``|x|`` in ``acc`` with a finite derivative at zero, for real and complex ``x``."""
    if jnp.iscomplexobj(x):
        nonzero = x != 0
        # jnp.abs on complex is hypot-based (no overflow of re**2 + im**2), but its
        # derivative at 0 is NaN; the double where keeps it finite.
        return jnp.where(nonzero, jnp.abs(jnp.where(nonzero, x, 1)), 0).astype(acc)
    return jnp.abs(x.astype(acc))


def _power_sum(x: Array, p: float, axes: Any = None) -> Array:
    """Sum of ``|x| ** p`` (max of ``|x|`` for ``p = inf``) over ``axes``, in acc dtype."""
    acc = accumulation_dtype(x.dtype)
    if p == 2 and not jnp.iscomplexobj(x):
        xa = x.astype(acc)
        return jnp.sum(xa * xa, axis=axes)
    if p == 2:
        re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
        return jnp.sum(re * re + im * im, axis=axes)
    magnitude = _magnitude(x, acc)
    if p == math.inf:
        return jnp.max(magnitude, axis=axes, initial=0)
    if p == 1:
        return jnp.sum(magnitude, axis=axes)
    return jnp.sum(_safe_pow(magnitude, p), axis=axes)


def _divided(x: Array, divisor: Array, acc: Any) -> Array:
    """``x / divisor`` in ``acc`` precision, keeping the imaginary part of complex ``x``."""
    if jnp.iscomplexobj(x):
        return x.astype(jnp.result_type(acc, jnp.complex64)) / divisor
    return x.astype(acc) / divisor


def _max_magnitude(x: Array, axes: Any = None) -> Array:
    return jnp.max(_magnitude(x, accumulation_dtype(x.dtype)), axis=axes, initial=0)


def _root(power_sum: Array, p: float) -> Array:
    """``power_sum ** (1/p)`` with a finite derivative at zero."""
    if p in (1, math.inf):
        return power_sum
    if p == 2:
        positive = power_sum > 0
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, power_sum, 1)), 0)
    return _safe_pow(power_sum, 1.0 / p)


def _trusted(power_sum: Array) -> Array:
    """Whether a power sum is free of overflow and of underflow-level precision loss.

    Below ``sqrt(tiny)`` the terms that flushed to denormals or zero could matter;
    at ``inf`` some term overflowed. NaN is untrusted too, and the rescaled path
    then reports NaN.
    """
    finfo = jnp.finfo(power_sum.dtype)
    return (power_sum >= math.sqrt(float(finfo.tiny))) & (power_sum < math.inf)


def _scaled_norm(max_magnitude: Array, scaled_power_sum: Array, p: float) -> Array:
    """Combines ``M * (sum (|x|/M)^p)^(1/p)``; NaN stays NaN, inf stays inf, 0 stays 0."""
    finite_positive = (max_magnitude > 0) & (max_magnitude < math.inf)
    # A NaN entry shows in the sum, not always in the maximum: XLA's max across devices
    # drops NaN. (At an inf maximum the sum can be NaN from complex inf / 1: keep inf.)
    dropped_nan = jnp.isnan(scaled_power_sum) & (max_magnitude < math.inf)
    return jnp.where(dropped_nan, scaled_power_sum, jnp.where(
        finite_positive, max_magnitude * _root(scaled_power_sum, p), max_magnitude
    ))


def _safe_divisor(max_magnitude: Array) -> Array:
    usable = (max_magnitude > 0) & (max_magnitude < math.inf)
    return jnp.where(usable, max_magnitude, 1)


def _psum(x: Any, axis_name: AxisName) -> Any:
    return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: Any, axis_name: AxisName) -> Any:
    return x if axis_name is None else lax.pmax(x, axis_name)


def global_norm(tree: Any, ord: float | None = 2, *, axis_name: AxisName = None) -> Array:
    """The p-norm of all floating-point entries of ``tree``, taken together.

    ``||tree||_p = (sum_leaves sum_i |x_i|^p) ** (1/p)``, or ``max_i |x_i|`` for
    ``ord=inf``. This is ``torch.nn.utils.get_total_norm`` and ``optax.global_norm``
    generalised to any order, made overflow-safe and sharding-aware.

    Args:
      tree: a pytree of arrays. ``None``, ``optax.MaskedNode`` and non-float
        (integer, bool, ``float0``) leaves are skipped. Complex leaves count by
        their modulus.
      ord: 1, 2, ``inf``, or any float p > 0.
      axis_name: under ``shard_map``/``pmap``, a mesh axis name or a tuple of
        names; the norm then covers the whole tree across shards.

    Returns:
      A float32 scalar (float64 if a leaf is float64 under ``jax_enable_x64``).
      The empty tree has norm 0; any NaN entry gives NaN; otherwise any inf entry
      gives inf.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> float(oc.global_norm({"w": jnp.array([3.0, 4.0]), "b": None}))
      5.0
      >>> float(oc.global_norm([jnp.array([300.0, 1.0], jnp.float16)]))
      300.0016...
      >>> float(oc.global_norm([jnp.array([1e20, 1.0])]))
      1e+20
    """
    p = validate_ord(ord)
    axis_name = validate_axis_name(axis_name)
    return _global_norm(_float_leaves(tree), p, axis_name)


# Leaves smaller than this are raveled and packed into one array per dtype before
# the reduction: a tree of many small leaves (biases, norms, 2000 64x64 blocks)
# then costs a few large reductions instead of one small kernel per leaf, which
# is faster to run and to compile. The copy this makes is at most the size of the
# small leaves. Measurements: benchmarks/RESULTS.md ("hybrid" design).
_PACK_BELOW = 2**16


def _unsharded(x: Array) -> bool:
    """False for leaves whose type carries a sharding (Explicit mesh axes).

    Concatenating leaves sharded in different ways would force a reshard, so
    those are reduced one by one, as large leaves are.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return spec is None or all(axis is None for axis in spec)


def _packed(leaves: Sequence[Array]) -> list[Array]:
    """Small leaves concatenated per dtype, then the large leaves as they are."""
    groups: dict[Any, list[Array]] = {}
    large = []
    for x in leaves:
        if x.size < _PACK_BELOW and _unsharded(x):
            groups.setdefault(x.dtype, []).append(jnp.ravel(x))
        else:
            large.append(x)
    packed = [group[0] if len(group) == 1 else jnp.concatenate(group) for group in groups.values()]
    return packed + large


def _global_norm(leaves: Sequence[Array], p: float, axis_name: AxisName) -> Array:
    acc = _widest(leaves)
    if not leaves:
        return jnp.zeros([], acc)
    leaves = _packed(leaves)
    sums = jnp.stack([_power_sum(x, p).astype(acc) for x in leaves])
    if p == math.inf:
        return _pmax(jnp.max(sums), axis_name)
    total = _psum(jnp.sum(sums), axis_name)
    if p == 1:
        return total
    fast, rescaled = _global_branches(p, axis_name)
    return lax.cond(_trusted(total), fast, rescaled, total, list(leaves))


# The branches of the overflow check are built once per (order, axis_name), so
# lax.cond finds them in its cache: eager calls then reuse the compiled cond
# instead of tracing and compiling new closures on every call.
@functools.cache
def _global_branches(p: float, axis_name: AxisName) -> tuple[Callable, Callable]:
    def fast(total: Array, leaves: list[Array]) -> Array:
        del leaves
        return _root(total, p)

    def rescaled(total: Array, leaves: list[Array]) -> Array:
        del total
        acc = _widest(leaves)
        largest = _pmax(
            jnp.max(jnp.stack([_max_magnitude(x).astype(acc) for x in leaves])), axis_name
        )
        divisor = _safe_divisor(largest)
        scaled = sum(_power_sum(_divided(x, divisor, acc), p) for x in leaves)
        return _scaled_norm(largest, _psum(scaled, axis_name), p)

    return fast, rescaled


def unit_norms(
    xs: Sequence[Array], ord: float = 2, *, axes: Sequence[Any] | None = None,
    axis_name: AxisName = None,
) -> list[Array]:
    """Norms of each array in ``xs`` over its ``axes`` (all axes when None).

    Per-leaf norms are ``axes=None``; unit-wise norms (AGC) reduce over the input
    axes of a kernel and keep the output axis. All arrays share one overflow check,
    so the fast path stays a single read of each array.
    """
    p = validate_ord(ord)
    axis_name = validate_axis_name(axis_name)
    xs = [jnp.asarray(x) for x in xs]
    if axes is None:
        axes = [None] * len(xs)
    if len(axes) != len(xs):
        raise ValueError(f"axes has {len(axes)} entries but there are {len(xs)} arrays.")
    if not xs:
        return []
    sums = _psum([_power_sum(x, p, a) for x, a in zip(xs, axes)], axis_name)
    if p == math.inf:
        return _pmax(sums, axis_name)
    if p == 1:
        return sums
    all_trusted = jnp.all(jnp.stack([jnp.all(_trusted(s)) for s in sums]))
    fast, rescaled = _unit_branches(p, axis_name, _hashable_axes(axes))
    return lax.cond(all_trusted, fast, rescaled, sums, xs)


def _hashable_axes(axes: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in axes)


@functools.cache
def _unit_branches(
    p: float, axis_name: AxisName, axes: tuple[Any, ...]
) -> tuple[Callable, Callable]:
    def fast(sums: list[Array], xs: list[Array]) -> list[Array]:
        del xs
        return [_root(s, p) for s in sums]

    def rescaled(sums: list[Array], xs: list[Array]) -> list[Array]:
        del sums
        largest = _pmax([_max_magnitude(x, a) for x, a in zip(xs, axes)], axis_name)
        scaled = []
        for x, a, m in zip(xs, axes, largest):
            divisor = _safe_divisor(m)
            if a is not None:
                divisor = jnp.expand_dims(divisor, a)
            acc = accumulation_dtype(x.dtype)
            scaled.append(_power_sum(_divided(x, divisor, acc), p, a))
        scaled = _psum(scaled, axis_name)
        return [_scaled_norm(m, s, p) for m, s in zip(largest, scaled)]

    return fast, rescaled


def leaf_norms(tree: Any, ord: float = 2, *, axis_name: AxisName = None) -> Any:
    """The p-norm of each leaf, as a tree of float32 scalars shaped like ``tree``.

    Non-float leaves get norm 0; ``None`` and ``optax.MaskedNode`` stay as they are.
    """
    leaves, treedef = jax.tree.flatten(tree)
    float_positions = [i for i, x in enumerate(leaves) if is_float_leaf(x)]
    norms = unit_norms([leaves[i] for i in float_positions], ord, axis_name=axis_name)
    out = [jnp.zeros([], jnp.float32) for _ in leaves]
    for i, norm in zip(float_positions, norms):
        out[i] = norm.astype(jnp.float32)
    return jax.tree.unflatten(treedef, out)
