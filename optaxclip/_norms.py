"""The one place optaxclip computes norms.

Every clipper gets its norms from here: global p-norms of a whole tree, per-leaf
norms, and unit-wise norms over chosen axes. The rules are the same everywhere:

* Magnitudes are accumulated in at least float32 whatever the leaf dtype, so an
  fp16 tree ``[300., 1.]`` has norm ~300.0017 rather than ``inf``.
* The fast path is a single read of each leaf: a sum of p-th powers. When that
  sum overflowed or underflowed (``1e20 ** 2`` is ``inf`` in float32), a
  ``lax.cond`` recomputes it scaled by the largest magnitude. That second pass
  only runs on such input, so ordinary steps pay for one read. Order ``inf``
  never takes it. For ``p < 1`` the root, not the sum, can overflow, and the
  norm is then kept as two finite parts (see ``_wide_root_parts``).
* Complex entries count by their modulus. ``None`` and ``optax.MaskedNode``
  leaves are skipped, and so are integer, boolean and ``float0`` leaves: they
  carry no gradient signal.
* The derivative is finite at zero: every square root, power and division is
  guarded so that ``jax.grad`` through a clipper at zero gradients is finite.
* With ``axis_name``, the p-th power sums (or maxima, for ``inf``) are reduced
  across shards, so the norm covers the whole sharded tree. Under
  ``shard_map`` with replication checking each leaf is reduced only over the
  axes it is split along, so a leaf replicated over some of them is counted
  once (see ``optaxclip._shards``). Small leaves are packed into chunks for the
  global and per-example norms (``optaxclip._packing``).
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

from optaxclip._packing import _joined_rows, _reduced_packed
from optaxclip._reductions import max_keeping_nan
from optaxclip._shards import _pmax, _psum, _psum_total
from optaxclip._validate import AxisName, validate_axis_name, validate_ord

Array = jax.Array

__all__ = [
    "batched_global_norm", "global_norm", "global_norm_parts", "leaf_norms", "unit_norm_parts",
    "unit_norms", "is_float_leaf", "quotient",
]


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


def _widened(x: Array, acc: Any) -> Array:
    """``x`` in ``acc``'s precision where its own accumulation dtype is narrower.

    In a tree with float64 leaves (x64) a float32 leaf's power sum is taken in
    float64 with the rest: in float32 it overflows from entries of 2^64 and flushes
    below 2^-63, and the tree's rescue, scaled for float64's range, cannot recover
    either (entries of 2^-64 times 2^640, squared, overflow float64). No extra read:
    the cast fuses into the reduction. Complex leaves keep their imaginary part.
    """
    if accumulation_dtype(x.dtype) == acc:
        return x
    return x.astype(jnp.result_type(acc, jnp.complex64) if jnp.iscomplexobj(x) else acc)


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
        return max_keeping_nan(magnitude, axes, initial=0)
    if p == 1:
        return jnp.sum(magnitude, axis=axes)
    return jnp.sum(_safe_pow(magnitude, p), axis=axes)


def quotient(x: Array, divisor: Array) -> Array:
    """``x / divisor`` for a positive ``divisor`` of any normal size, also past 2^126.

    XLA turns a division by a broadcast scalar into a product with its reciprocal,
    and past 2^126 (float32) that reciprocal is subnormal and flushes to zero: every
    quotient of a vector by a maximum near 1e38 came out 0, under jit and eagerly.
    Where the divisor is 2^64 or more, both are scaled by 2^-64 first, so the
    reciprocal stays normal. A power of two is exact; an entry of ``x`` it flushes
    has a quotient below the normal range anyway (``x / divisor <= x * 2^-64``).
    Below 2^64 the plain division is selected, so its bits are those of ``x / d``
    (a constant history's mean and std, for one, stay exact).
    """
    big = divisor >= 2.0**64
    # A factor computed from the data: a constant one XLA would cancel from both sides.
    factor = jnp.where(big, jnp.asarray(2.0**-64, divisor.dtype), jnp.ones([], divisor.dtype))
    scaled = (x * factor.astype(jnp.real(x).dtype)) / (divisor * factor)
    return jnp.where(big, scaled, x / divisor)


def _divided(x: Array, divisor: Array, acc: Any) -> Array:
    """``x / divisor`` in ``acc`` precision, keeping the imaginary part of complex ``x``."""
    if jnp.iscomplexobj(x):
        return quotient(x.astype(jnp.result_type(acc, jnp.complex64)), divisor)
    return quotient(x.astype(acc), divisor)


def _multiplied(x: Array, factor: Array, acc: Any) -> Array:
    """``x * factor`` in ``acc`` precision, keeping the imaginary part of complex ``x``."""
    if jnp.iscomplexobj(x):
        # Part by part: a complex product would turn inf * factor into inf + NaN j.
        return lax.complex(jnp.real(x).astype(acc) * factor, jnp.imag(x).astype(acc) * factor)
    return x.astype(acc) * factor


def _max_magnitude(x: Array, axes: Any = None) -> Array:
    return max_keeping_nan(_magnitude(x, accumulation_dtype(x.dtype)), axes, initial=0)


def _divisor_base(x: Array, axes: Any = None) -> Array:
    """The largest magnitude, or for complex ``x`` the largest of ``|x / 2|``.

    The modulus of finite complex entries can pass the largest float (3e38 + 3e38j
    has modulus 4.2e38); half of it cannot. Used where a norm divides by its
    maximum, which only has to be finite and near the largest entry.
    """
    if jnp.iscomplexobj(x):
        return _max_magnitude(_multiplied(x, jnp.asarray(0.5, accumulation_dtype(x.dtype)),
                                          accumulation_dtype(x.dtype)), axes)
    return _max_magnitude(x, axes)


def _max_parts(x: Array, axes: Any, axis_name: AxisName) -> tuple[Array, Array]:
    """The inf-norm ``max |x|`` over ``axes`` as ``(root, multiplier)`` parts.

    ``(max |x|, 1)``; for finite complex entries whose modulus passes the largest
    float, ``(2, max |x / 2|)``, so the parts stay finite (see ``_norm``).
    """
    largest = _pmax(_power_sum(x, math.inf, axes), axis_name)
    if not jnp.iscomplexobj(x):
        return largest, jnp.ones_like(largest)
    return _overflowed_max_parts(largest, _pmax(_divisor_base(x, axes), axis_name))


def _overflowed_max_parts(largest: Array, half: Array) -> tuple[Array, Array]:
    """``(largest, 1)``, or ``(2, half)`` where ``largest`` overflowed and ``half`` did not."""
    over = jnp.isposinf(largest) & jnp.isfinite(half)
    return jnp.where(over, 2, largest).astype(largest.dtype), jnp.where(
        over, half, 1).astype(largest.dtype)


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


@jax.custom_batching.custom_vmap
def _all_trusted(sums: Any) -> Array:
    """Whether every power sum in ``sums`` is trusted: one boolean, also under vmap."""
    return jnp.all(jnp.stack([jnp.all(_trusted(s)) for s in jax.tree.leaves(sums)]))


@_all_trusted.def_vmap
def _all_trusted_vmap(axis_size: int, in_batched: Any, sums: Any) -> tuple[Array, bool]:
    # Under jax.vmap the decision covers the whole batch, so it stays unbatched and
    # the lax.cond that uses it stays a conditional: a batched predicate would turn
    # it into a select that runs the rescue on every call.
    del axis_size, in_batched
    return _all_trusted(sums), False


# --- Deciding the rescue once --------------------------------------------------
#
# Every norm here is ``finish(fast(xs), xs)`` when the fast power sums are trusted
# and ``rescue(xs)`` when not, chosen by one ``lax.cond``. Under ``jax.vmap`` a
# cond whose predicate is batched becomes a select that runs both branches, so a
# vmapped clip would read the gradients three times. The predicate above is kept
# unbatched instead ("every example trusted"), so a vmapped norm reads the batch
# once; when one example is untrusted, the whole batch takes the rescue.


def _decide_once(fast: Callable, finish: Callable, rescue: Callable) -> Callable:
    """``xs -> finish(fast(xs), xs)`` if every fast sum is trusted, else ``rescue(...)``.

    ``finish`` and ``rescue`` take ``(sums, xs)``. They must be the same objects on
    every call (the factories below are cached), so that eager calls find the
    compiled cond in lax.cond's cache instead of compiling it again.
    """

    def guarded(xs: list[Array]) -> Any:
        sums = fast(xs)
        trusted = _all_trusted(lax.stop_gradient(sums))
        return lax.cond(trusted, finish, rescue, sums, xs)

    return guarded


# After an overflow of sum |x|^p (1 <= p <= 2) every entry is below 2^128, so scaled
# by 2^-80 its p-th power is below 2^96; after an underflow every entry is below
# 2^(-63/p), so scaled by 2^80 its p-th power stays normal and below 2^97. Entries
# lost to the scaling are below 2^-126 relative to what is kept. Power-of-two
# scaling is exact. For p > 2 no fixed factor covers both ends, and each part is
# divided by its own maximum instead (a second read). So it is for p < 1, where
# the root, not the sum, overflows: ``sum^(1/p)`` grows past the sum, and with
# ``n`` entries near the largest float, past 2^-80's reach (see ``_checked_sum``).
def _by_maximum(p: float) -> bool:
    """Whether the rescue of a p-norm divides by the maximum (else a power of two)."""
    return p > 2 or p < 1


def _checked_sum(power_sum: Array, p: float) -> Array:
    """``power_sum``, or ``inf`` where its root overflows (``p < 1``), so untrusted.

    For ``p >= 1`` the root is at most the sum, so a finite sum has a finite root;
    for ``p < 1`` finite entries near the largest float have a finite sum of p-th
    powers whose root (the norm) does not fit. NaN stays NaN.
    """
    if p >= 1:
        return power_sum
    return jnp.where(jnp.isposinf(_root(power_sum, p)), jnp.inf, power_sum).astype(
        power_sum.dtype)


# The same argument holds for float64 (x64) with exponents scaled by its range:
# 2^-640 and 2^640 (entries below 2^1024; 2^(-511/p) after an underflow).
def _rescue_exponent(dtype: Any) -> int:
    """80 for float32, 640 for float64: 5/8 of the dtype's largest binary exponent."""
    return round(0.625 * jnp.finfo(dtype).maxexp)


def _rescue_factor(power_sum: Array) -> Array:
    """2^-80 after an overflow of ``power_sum``, else 2^80 (underflow, or NaN).

    Scaled to the dtype's range: 2^-640 and 2^640 for float64.
    """
    exponent = _rescue_exponent(power_sum.dtype)
    down, up = 2.0**-exponent, 2.0**exponent
    return jnp.where(power_sum >= math.inf, down, up).astype(power_sum.dtype)


# A norm is also returned as two parts, ``norm = root * multiplier``: the
# multiplier is 1 on the fast path, the rescue's power of two, or the largest
# magnitude. Both parts stay finite for finite input even where their product
# overflows (a float32 norm beyond 3.4e38), so a clipper can still compute an
# exact scale, ``threshold / multiplier / root``.


def _norm(root: Array, multiplier: Array) -> Array:
    return root * multiplier


def _unscaled_parts(scaled_power_sum: Array, factor: Array, p: float) -> tuple[Array, Array]:
    """Parts of the norm from ``sum |x * factor|^p``; NaN stays NaN."""
    root = jnp.where(jnp.isnan(scaled_power_sum), scaled_power_sum, _root(scaled_power_sum, p))
    return root, (1 / factor).astype(scaled_power_sum.dtype)


def _unscaled(scaled_power_sum: Array, factor: Array, p: float) -> Array:
    """The norm from ``sum |x * factor|^p``; NaN stays NaN."""
    return jnp.where(
        jnp.isnan(scaled_power_sum), scaled_power_sum, _root(scaled_power_sum, p) / factor
    )


# --- Global norm ---------------------------------------------------------------


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
        names; the norm then covers the whole tree across shards. Under
        ``shard_map(..., check_vma=True)`` (the default) leaves may be split
        over different subsets of the axes, or replicated: each entry counts
        once. With ``check_vma=False`` and under ``pmap`` every leaf is taken
        to be split over all of ``axis_name``.

    Returns:
      A float32 scalar (float64 if a leaf is float64 under ``jax_enable_x64``).
      The empty tree has norm 0; any NaN entry gives NaN; otherwise any inf entry
      gives inf. Under ``jax.vmap`` the overflow check is decided once for the
      whole batch, so the fast path reads the batch once.

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


def _global_norm(leaves: Sequence[Array], p: float, axis_name: AxisName) -> Array:
    return _norm(*global_norm_parts(leaves, p, axis_name))


def global_norm_parts(
    leaves: Sequence[Array], p: float, axis_name: AxisName = None
) -> tuple[Array, Array]:
    """The global norm of float ``leaves`` as ``(root, multiplier)``, ``norm = root * m``.

    Both parts are finite for finite input, also when the norm itself is beyond
    the accumulation dtype's range (see ``_norm``).
    """
    leaves = list(leaves)
    acc = _widest(leaves)
    one = jnp.ones([], acc)
    if not leaves:
        return jnp.zeros([], acc), one
    if p == math.inf:
        complex_ = [x for x in leaves if jnp.iscomplexobj(x)]
        if not complex_:
            return _pmax(max_keeping_nan(jnp.stack(_global_sums(leaves, p))), axis_name), one
        # Finite complex entries can have a modulus past the largest float: then the
        # parts are (2, max |x / 2|), unless a real entry is inf. The real and complex
        # maxima are taken apart (each leaf read once) and combined.
        real = [x for x in leaves if not jnp.iscomplexobj(x)]
        real_max = _pmax(max_keeping_nan(jnp.stack(
            _global_sums(real, p) if real else [jnp.zeros([], acc)])), axis_name)
        complex_max = _pmax(max_keeping_nan(jnp.stack(_global_sums(complex_, p))), axis_name)
        half = _pmax(max_keeping_nan(jnp.stack([_divisor_base(x).astype(acc) for x in complex_])),
                     axis_name)
        half = jnp.where(jnp.isfinite(real_max), half, jnp.inf).astype(acc)
        return _overflowed_max_parts(jnp.maximum(real_max.astype(acc), complex_max.astype(acc)),
                                     half)
    return _global_guarded(p, axis_name)(leaves)


def _global_sums(leaves: list[Array], p: float) -> list[Array]:
    """One power sum per packed chunk (a list: chunks may vary differently across shards)."""
    acc = _widest(leaves)
    return _reduced_packed(leaves, lambda x: _power_sum(_widened(x, acc), p))


def _combine_rescued(
    maxima: list[Array], scaled_sums: list[Array], p: float, axis_name: AxisName
) -> Array:
    """Combines parts ``i`` with ``m_i = max|x_i|`` and ``s_i = sum (|x_i|/m_i)^p``.

    With ``M = max_i m_i``, ``||x||_p = M * (sum_i (m_i/M)^p s_i)^(1/p)``: every
    term is at most the part's entry count, so nothing overflows. Each part is
    scaled by its own maximum, not by ``M``: many reductions sharing one divisor
    make XLA's sibling fusion quadratic in their number (minutes to compile at
    1,000 leaves).
    """
    return _norm(*_combine_rescued_parts(maxima, scaled_sums, p, axis_name))


def _combine_rescued_parts(
    maxima: list[Array], scaled_sums: list[Array], p: float, axis_name: AxisName
) -> tuple[Array, Array]:
    """``_combine_rescued`` as ``(root, multiplier)`` parts (see ``_norm``).

    Each part is a scalar, or a ``[B]`` vector of per-example values.
    """
    largest = _pmax(max_keeping_nan(jnp.stack(maxima), 0), axis_name)
    divisor = _safe_divisor(largest)
    terms = [_safe_pow(quotient(m, divisor), p) * s for m, s in zip(maxima, scaled_sums)]
    return _scaled_parts(largest, _psum_total(terms, axis_name), p)


def _scaled_parts(largest: Array, scaled_power_sum: Array, p: float) -> tuple[Array, Array]:
    """``M * (sum (|x|/M)^p)^(1/p)`` as parts; NaN, inf and 0 ride in the root.

    The root is at most ``n^(1/p)`` for ``n`` entries, which for ``p < 1`` can pass
    the largest float (p = 0.25 and 2^32 equal entries, or p = 0.1 and 7,000). See
    ``_wide_root_parts``.
    """
    finite_positive = (largest > 0) & (largest < math.inf)
    multiplier = jnp.where(finite_positive, largest, 1).astype(scaled_power_sum.dtype)
    if p < 1:
        root, multiplier = _wide_root_parts(scaled_power_sum, multiplier, p)
    else:
        root = _root(scaled_power_sum, p)
    return jnp.where(finite_positive, root, largest), multiplier


def _wide_root_parts(power_sum: Array, multiplier: Array, p: float) -> tuple[Array, Array]:
    """Parts ``(root, m)`` of ``multiplier * power_sum^(1/p)`` for ``p < 1``, finite
    wherever the norm is below ``2^256`` (float32), so the scale from them is exact.

    The root if it fits; else its square root ``r``, with ``r`` moved into the
    multiplier; else, for a norm past what two finite parts can hold, ``(largest
    float, inf)``: the scale is then 0 (``_scaling.rescale_overflowed``), where the
    exact one is below ``threshold * 2^-256`` and every output entry below
    ``threshold * 2^-128``. NaN stays NaN.
    """
    root = _root(power_sum, p)
    half = _safe_pow(power_sum, 0.5 / p)
    moved = multiplier * half
    fits = jnp.isfinite(root) | jnp.isnan(power_sum)
    halves = ~fits & jnp.isfinite(moved)
    largest = jnp.asarray(jnp.finfo(power_sum.dtype).max, power_sum.dtype)
    root = jnp.where(fits, root, jnp.where(halves, half, largest))
    return root, jnp.where(fits, multiplier, jnp.where(halves, moved, jnp.inf)).astype(root.dtype)


def _rescued_part(x: Array, p: float, axes: Any, acc: Any) -> tuple[Array, Array]:
    """``(m, sum (|x| / m)^p)`` over ``axes``, both in ``acc``: ``m`` is ``max|x|``
    (``max|x / 2|`` for complex ``x``, see ``_divisor_base``)."""
    largest = _divisor_base(x, axes).astype(acc)
    divisor = _safe_divisor(largest)
    if axes is not None:
        divisor = jnp.expand_dims(divisor, axes)
    return largest, _power_sum(_divided(x, divisor, acc), p, axes).astype(acc)


@functools.cache
def _global_guarded(p: float, axis_name: AxisName) -> Callable:
    def fast(leaves: list[Array]) -> Array:
        return _checked_sum(_psum_total(_global_sums(leaves, p), axis_name), p)

    def finish(total: Array, leaves: list[Array]) -> tuple[Array, Array]:
        del leaves
        return _root(total, p), jnp.ones_like(total)

    def rescue(total: Array, leaves: list[Array]) -> tuple[Array, Array]:
        acc = _widest(leaves)
        if _by_maximum(p):
            parts = _reduced_packed(leaves, lambda x: _rescued_part(x, p, None, acc))
            maxima, sums = (list(column) for column in zip(*parts))
            return _combine_rescued_parts(maxima, sums, p, axis_name)
        # Under jax.vmap the rescue runs for the whole batch: examples whose own
        # total is trusted keep it (factor 1 re-reads them as they are).
        trusted = _trusted(total)
        factor = jnp.where(trusted, 1, _rescue_factor(total)).astype(total.dtype)
        scaled = _reduced_packed(
            leaves, lambda x: _power_sum(_multiplied(x, factor, acc), p).astype(acc)
        )
        root, multiplier = _unscaled_parts(_psum_total(scaled, axis_name), factor, p)
        return jnp.where(trusted, _root(total, p), root), jnp.where(trusted, 1, multiplier)

    return _decide_once(fast, finish, rescue)


# --- Per-example global norms ----------------------------------------------------


def batched_global_norm(
    tree: Any, ord: float | None = 2, *, axis: int = 0, axis_name: AxisName = None
) -> Array:
    """Per-example global p-norms of a tree whose leaves carry an example axis.

    ``out[b] = ||{x[b] for every float leaf x}||_p``: the global norm of example
    ``b``'s gradients, where ``x[b]`` indexes ``axis`` of each leaf. It equals
    ``jax.vmap(global_norm, in_axes=axis)(tree)`` and is what per-example (DP-SGD,
    micro-batch) clipping needs. The overflow/underflow rescue is decided once for
    the batch, by one ``lax.cond`` on "some example's sum is untrusted", so the
    usual call reads the per-example gradients once.

    Args:
      tree: a pytree of arrays that all have the example axis ``axis``, of one
        size ``B``. ``None``, ``optax.MaskedNode`` and non-float leaves are
        skipped (non-float leaves still fix ``B``).
      ord: 1, 2, ``inf``, or any float p > 0.
      axis: the example axis of every leaf (negative values count from the end).
      axis_name: under ``shard_map``/``pmap``, the axis name (or names) each
        example's entries are sharded over; the example axis itself must not be
        split over those devices.

    Returns:
      A float32 (float64 under x64 with a float64 leaf) array of shape ``[B]``,
      each entry with the semantics of ``global_norm``: 0 for an example without
      float entries, NaN if one of its entries is NaN, else inf if one is inf.

    Raises:
      ValueError: a leaf lacks the axis, the leaves disagree on ``B``, or the tree
        has no array leaf to take ``B`` from.

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip._norms import batched_global_norm
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 1e20]]), "b": jnp.array([4.0, 0.0])}
      >>> batched_global_norm(grads).tolist()
      [5.0, 1.0000000200408773e+20]
    """
    p = validate_ord(ord)
    axis_name = validate_axis_name(axis_name)
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"axis must be an int, the example axis of every leaf; got {axis!r}.")
    sizes = set()
    moved = []
    for x in leaves:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(
                f"axis={axis} is out of range for a leaf of shape {x.shape}: every leaf "
                f"needs the example axis. Pass axis= the axis that indexes examples."
            )
        sizes.add(x.shape[axis])
        if is_float_leaf(x):
            moved.append(jnp.moveaxis(x, axis, 0))
    if len(sizes) > 1:
        raise ValueError(
            f"the leaves disagree on the number of examples along axis {axis}: "
            f"{sorted(sizes)}. Every leaf must hold the same examples."
        )
    if not sizes:
        raise ValueError(
            "batched_global_norm needs at least one array leaf to take the number of "
            "examples from; the tree has none."
        )
    (batch,) = sizes
    acc = _widest(moved)
    if not moved or batch == 0:
        return jnp.zeros([batch], acc)
    if p == math.inf:
        return _pmax(max_keeping_nan(jnp.stack(_batched_sums(moved, p)), 0), axis_name)
    return _batched_guarded(p, axis_name)(moved)


def _example_axes(x: Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _batched_sums(leaves: list[Array], p: float) -> list[Array]:
    """One ``[B]`` power sum per packed chunk."""
    acc = _widest(leaves)
    return _reduced_packed(
        leaves, lambda x: _power_sum(_widened(x, acc), p, _example_axes(x)), _joined_rows
    )


@functools.cache
def _batched_guarded(p: float, axis_name: AxisName) -> Callable:
    def fast(leaves: list[Array]) -> Array:
        return _checked_sum(_psum_total(_batched_sums(leaves, p), axis_name), p)

    def finish(totals: Array, leaves: list[Array]) -> Array:
        del leaves
        return _root(totals, p)

    def rescue(totals: Array, leaves: list[Array]) -> Array:
        acc = _widest(leaves)
        if _by_maximum(p):
            rescued = _reduced_packed(
                leaves, lambda x: _rescued_part(x, p, _example_axes(x), acc), _joined_rows
            )
            maxima, sums = (list(column) for column in zip(*rescued))
            return _combine_rescued(maxima, sums, p, axis_name)
        # Examples whose own sum is trusted keep it (factor 1 re-reads them as is).
        trusted = _trusted(totals)
        factor = jnp.where(trusted, 1, _rescue_factor(totals)).astype(totals.dtype)
        scaled = _reduced_packed(
            leaves,
            lambda x: _power_sum(
                _multiplied(x, _per_example(factor, x), acc), p, _example_axes(x)
            ).astype(acc),
            _joined_rows,
        )
        rescued = _unscaled(_psum_total(scaled, axis_name), factor, p)
        return jnp.where(trusted, _root(totals, p), rescued)

    return _decide_once(fast, finish, rescue)


def _per_example(values: Array, x: Array) -> Array:
    """``[B]`` values shaped to broadcast against a ``[B, ...]`` array."""
    return values.reshape(values.shape + (1,) * (x.ndim - 1))


# --- Per-leaf and unit-wise norms ----------------------------------------------------


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
    return [_norm(*parts) for parts in unit_norm_parts(xs, p, axes, axis_name)]


def unit_norm_parts(
    xs: Sequence[Array], p: float, axes: Sequence[Any], axis_name: AxisName = None
) -> list[tuple[Array, Array]]:
    """``unit_norms`` as ``(root, multiplier)`` parts per array (see ``_norm``)."""
    xs = [jnp.asarray(x) for x in xs]
    if not xs:
        return []
    axes = tuple(_normal_axes(a, x.ndim) for a, x in zip(axes, xs))
    if p == math.inf:
        return [_max_parts(x, a, axis_name) for x, a in zip(xs, axes)]
    return _unit_guarded(p, axis_name, axes)(xs)


def _normal_axes(a: Any, ndim: int) -> tuple[int, ...] | None:
    """``axes`` as a sorted tuple of non-negative ints; None stays None (all axes)."""
    if a is None:
        return None
    a = (a,) if isinstance(a, int) else tuple(a)
    return tuple(sorted(ax % ndim if ndim else ax for ax in a))




@functools.cache
def _unit_guarded(p: float, axis_name: AxisName, axes: tuple[Any, ...]) -> Callable:
    # Per-array results stay per array: joining arrays would hand each consumer a
    # slice of one shared vector, which XLA compiles in time quadratic in their
    # number (30 s for 500 slices on CPU). For p <= 2 the rescue re-reads an
    # array once, scaled by a power of two chosen from its own fast sum; for p > 2
    # it divides each unit by its own maximum (two reads). The arrays of
    # _RESCUE_EACH_FROM entries or more are re-read only when one of their own sums
    # is untrusted. No divisor is shared between arrays either (see _combine_rescued).
    def fast(xs: list[Array]) -> list[Array]:
        return [_checked_sum(_psum(_power_sum(x, p, a), axis_name), p)
                for x, a in zip(xs, axes)]

    def finish(sums: list[Array], xs: list[Array]) -> list[tuple[Array, Array]]:
        del xs
        return [(_root(s, p), jnp.ones_like(s)) for s in sums]

    def by_power_of_two(s: Array, x: Array, a: Any) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.dtype)
        trusted = _trusted(s)
        factor = jnp.where(trusted, 1, _rescue_factor(s)).astype(acc)
        spread = factor if a is None else jnp.expand_dims(factor, a)
        scaled = _psum(_power_sum(_multiplied(x, spread, acc), p, a), axis_name)
        root, multiplier = _unscaled_parts(scaled, factor, p)
        return jnp.where(trusted, _root(s, p), root), jnp.where(trusted, 1, multiplier)

    def by_maximum(s: Array, x: Array, a: Any) -> tuple[Array, Array]:
        del s
        acc = accumulation_dtype(x.dtype)
        largest = _pmax(_divisor_base(x, a).astype(acc), axis_name)
        divisor = _safe_divisor(largest)
        if a is not None:
            divisor = jnp.expand_dims(divisor, a)
        scaled = _psum(_power_sum(_divided(x, divisor, acc), p, a), axis_name)
        return _scaled_parts(largest, scaled, p)

    one = by_maximum if _by_maximum(p) else by_power_of_two

    def rescue(sums: list[Array], xs: list[Array]) -> list[tuple[Array, Array]]:
        # One untrusted sum sends every array here, and a common one sits in a small
        # array (an attention key bias, whose gradient is about 1e-10): the large
        # arrays, when all their sums are trusted, keep them, behind one conditional
        # of their own, rather than being read again.
        large = [i for i, x in enumerate(xs) if x.size >= _RESCUE_EACH_FROM]
        kept: dict[int, tuple[Array, Array]] = {}
        if large:
            large_axes = [axes[i] for i in large]

            def again(sums: list[Array], xs: list[Array]) -> list[tuple[Array, Array]]:
                return [one(s, x, a) for s, x, a in zip(sums, xs, large_axes)]

            large_sums = [sums[i] for i in large]
            kept = dict(zip(large, lax.cond(_all_trusted(lax.stop_gradient(large_sums)),
                                            finish, again, large_sums,
                                            [xs[i] for i in large])))
        return [kept[i] if i in kept else one(s, x, a)
                for i, (s, x, a) in enumerate(zip(sums, xs, axes))]

    return _decide_once(fast, finish, rescue)


# In the rescue branch of ``_unit_guarded``, the arrays of this many entries or more
# are not read again when all their own sums are trusted.
_RESCUE_EACH_FROM = 2**16


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
