"""Thresholds, and turning ``(norm, threshold)`` into a safe scale factor.

A threshold is a Python number, a jax/numpy array of any float dtype (also a
tracer, as ``optax.inject_hyperparams`` passes it), or an optax schedule: a
callable of the clipper's own step count.

* Static values are validated at construction: negative, NaN or non-scalar
  values raise ``ValueError`` naming the argument.
* Traced values cannot be checked there. A negative traced threshold is clamped
  to 0 (the output is zeros); a NaN traced threshold makes the output NaN, so a
  broken schedule is loud rather than silently ignored.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Union, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optaxclip._norms import accumulation_dtype, is_float_leaf

Array = jax.Array
Threshold = Union[float, Array, Callable[[Array], Any]]


def threshold_at(value: Threshold, count: Array) -> Array:
    """The threshold for step ``count`` as a float32 (or wider) scalar, clamped at 0."""
    if callable(value) and not hasattr(value, "dtype"):
        value = value(count)
    if isinstance(value, int) or (isinstance(value, (np.integer, np.ndarray)) and np.issubdtype(
            np.asarray(value).dtype, np.integer)):
        # A host integer goes through float64: as jax's default int32, 2^32 wraps to
        # 0, and a Python int past 2^63 does not convert to any integer dtype.
        threshold = jnp.asarray(np.asarray(float(value) if isinstance(value, int) else value,
                                           np.float64))
    else:
        threshold = jnp.asarray(value)
    dtype = jnp.promote_types(
        threshold.dtype if jnp.issubdtype(threshold.dtype, jnp.floating) else jnp.float32,
        jnp.float32,
    )
    threshold = threshold.astype(dtype)
    if threshold.shape != ():
        raise ValueError(
            f"a threshold must be a scalar; the schedule or hyperparameter gave shape "
            f"{threshold.shape}."
        )
    return jnp.maximum(threshold, 0)


def scale_factor(
    norm: Array, threshold: Array, eps: Any = 0.0, *, strict_nonfinite: bool = False
) -> tuple[Array, Array]:
    """Returns ``(scale, clipped)`` with ``scale = min(1, threshold / (norm + eps))``.

    * at or below the threshold the scale is exactly 1 (with ``eps > 0``, as in
      torch, exactly when ``norm + eps <= threshold``);
    * threshold ``inf`` always gives 1, whatever the norm; threshold 0 gives 0
      for every finite norm, 0 included;
    * a non-finite norm (with a finite threshold) gives NaN: the caller's output
      then signals the error in every entry, instead of zeroing finite entries
      (which is what ``threshold / inf = 0`` would silently do);
    * the derivative is finite everywhere the norm is finite, zero included;
    * a NaN threshold gives NaN, so it never passes gradients through unclipped;
    * with ``strict_nonfinite`` a non-finite norm gives NaN even when the
      threshold is ``inf`` (adaptive clippers, whose ``inf`` means "no history
      yet" rather than "never clip");
    * ``clipped`` is ``scale != 1``: whether the update is changed, so it is also
      true when a non-finite norm turns the output NaN.
    """
    threshold = threshold.astype(jnp.promote_types(threshold.dtype, norm.dtype))
    norm = norm.astype(threshold.dtype)
    over = norm + eps > threshold
    safe_denominator = jnp.where(over, norm + eps, 1)
    scale = jnp.where(over, threshold / safe_denominator, 1)
    # Threshold 0 zeroes everything, also entries so small (subnormal, flushed to
    # zero in the norm) that the norm came out 0.
    scale = jnp.where(threshold == 0, 0, scale)
    scale = jnp.where(jnp.isfinite(norm), scale, jnp.nan)
    scale = jnp.where(threshold == math.inf, 1, scale)
    # A NaN threshold (a broken schedule or injected value) must not pass the
    # gradients through unclipped: it poisons the output like a NaN norm does.
    scale = jnp.where(jnp.isnan(threshold), jnp.nan, scale)
    if strict_nonfinite:
        scale = jnp.where(jnp.isfinite(norm), scale, jnp.nan)
    return scale, scale != 1


def split_tiny(scale: Array, numerator: Array, denominator: Array) -> tuple[Array, Array]:
    """``scale = numerator / denominator`` as ``(high, low)``, exact below the normal range.

    A scale below the dtype's smallest normal number (float32: 2^-126, 1.2e-38) is
    subnormal, and XLA flushes subnormal results to zero on CPU (and GPUs and
    TPUs): clipping a gradient of norm 1e38 to 1 would zero entries whose clipped
    values (1e37 times 1e-38) are ordinary numbers. Where the scale is that small,
    ``high = numerator * 2^k / denominator`` with ``k = -minexp`` (126 for
    float32) is a normal number below 1 and ``low = 2^-k``; elsewhere ``high`` is
    ``scale`` and ``low`` is 1, which leaves ``g * high * low`` bit-identical to
    ``g * scale``. ``numerator * 2^k`` cannot overflow there: ``numerator <
    denominator * 2^-k`` and the denominator is finite.

    Two normal factors reach scales down to ``tiny**2`` (2^-252 for float32). Below
    that (a threshold near 1e-38 against a norm near 1e38) ``high`` is itself
    subnormal and flushes; the only clipped values that would have been normal
    there are below ``4 * tiny`` (4.7e-38), since no entry exceeds 2^128.
    """
    finfo = jnp.finfo(scale.dtype)
    k = -int(finfo.minexp)
    tiny = (scale < finfo.tiny) & (numerator > 0) & jnp.isfinite(numerator) & (
        jnp.isfinite(denominator) & (denominator > 0))
    raised = numerator.astype(scale.dtype) * jnp.asarray(2.0**k, scale.dtype)
    high = jnp.where(tiny, raised / jnp.where(tiny, denominator, 1).astype(scale.dtype), scale)
    low = jnp.where(tiny, jnp.asarray(2.0**-k, scale.dtype), jnp.ones([], scale.dtype))
    return high, low


def split_tiny_parts(exact: Array, threshold: Array, multiplier: Array,
                     root: Array) -> tuple[Array, Array]:
    """``split_tiny`` for ``exact = threshold / multiplier / root``: a scale from a
    norm kept as parts because ``multiplier * root`` overflowed.

    Where ``exact`` is below the normal range, ``high = threshold 2^k / multiplier
    / root`` with ``2^k`` applied in two halves (``2^63`` each for float32):
    ``threshold * 2^k`` alone can overflow and ``threshold / multiplier`` can
    underflow. Exact for every threshold above ``multiplier * 2^-189`` (float32).
    """
    finfo = jnp.finfo(exact.dtype)
    half = 2.0 ** (-int(finfo.minexp) // 2)
    # Barriers keep XLA from folding the two halves into one overflowing 2^k.
    raised = lax.optimization_barrier(threshold * half / multiplier)
    raised = lax.optimization_barrier(raised * half)
    tiny = (exact < finfo.tiny) & (threshold > 0) & (threshold < math.inf)
    high = jnp.where(tiny, raised / root, exact)
    low = jnp.where(tiny, jnp.asarray(1 / half / half, exact.dtype), jnp.ones([], exact.dtype))
    return high, low


@overload
def narrowed(scale: Array, low: Array, dtype: Any) -> tuple[Array, Array]: ...


@overload
def narrowed(scale: Array, low: None, dtype: Any) -> tuple[Array, Array | None]: ...


def narrowed(scale: Array, low: Array | None, dtype: Any) -> tuple[Array, Array | None]:
    """``(scale, low)`` in ``dtype``, re-split where the narrowing would flush the scale.

    A scale computed in a wider dtype than a leaf's (a float64 global norm over a tree
    that also has float32 leaves, under x64) can be a normal number there and
    subnormal in the leaf's dtype, where XLA flushes it to zero: clipping a norm of
    1e40 to 1 would zero a float32 entry of 1e30 instead of giving 1e-10. There the
    scale becomes ``high = scale * 2^k`` and ``low = 2^-k`` in ``dtype`` (``k = 126``
    for float32), as ``split_tiny`` does; elsewhere the pair is only cast (``low``
    stays None where it was None). A scale no wider than ``dtype`` is only cast.
    """
    dtype = jnp.dtype(dtype)
    if jnp.finfo(scale.dtype).bits <= jnp.finfo(dtype).bits:
        return scale.astype(dtype), None if low is None else low.astype(dtype)
    # A wide low below 1 means a scale below the wide dtype's normal range, far
    # below anything a narrow entry times it can reach: the product's zero is right.
    total = scale if low is None else scale * low
    finfo = jnp.finfo(dtype)
    k = -int(finfo.minexp)
    tiny = (total > 0) & (total < finfo.tiny)
    high = jnp.where(tiny, total * jnp.asarray(2.0**k, total.dtype), total).astype(dtype)
    return high, jnp.where(tiny, jnp.asarray(2.0**-k, dtype), jnp.ones([], dtype))


def rescale_overflowed(scale: Array, low: Array, overflowed: Array, threshold: Array,
                       multiplier: Array, root: Array) -> tuple[Array, Array]:
    """Replaces ``(scale, low)`` where a norm overflowed by the exact scale from its
    parts, ``norm = multiplier * root``: ``min(1, threshold / root / multiplier)``,
    split by ``split_tiny_parts``.

    ``overflowed`` is narrowed to finite parts with ``root > 0`` (a NaN or infinite
    entry keeps its NaN scale). A finite root with an infinite multiplier is a
    norm of finite entries past ``2^256`` (``_norms._wide_root_parts``, p < 1): its
    scale is 0, where the exact one is below ``threshold * 2^-256``. The two
    divisions are kept apart by a barrier: XLA's simplifier would rewrite
    ``(t / r) / m`` as ``t / (r * m)``, and ``r * m`` is the norm that overflowed
    (scale 0 under jit). ``threshold / root`` first: ``root`` is at least 1
    wherever a norm overflowed, so neither quotient overflows, and one that
    underflows is recomputed by ``split_tiny_parts``. A threshold of ``inf`` gives
    1 and a NaN threshold NaN, as in ``scale_factor``.
    """
    beyond = overflowed & jnp.isfinite(root) & jnp.isposinf(multiplier) & (threshold < math.inf)
    overflowed = overflowed & jnp.isfinite(root) & jnp.isfinite(multiplier) & (root > 0)
    multiplier = jnp.where(overflowed, multiplier, 1)
    root = jnp.where(overflowed, root, 1)
    exact = jnp.minimum(lax.optimization_barrier(threshold / root) / multiplier, 1)
    exact, exact_low = split_tiny_parts(exact, threshold, multiplier, root)
    scale = jnp.where(beyond, jnp.zeros([], scale.dtype), scale)
    low = jnp.where(beyond, jnp.ones([], low.dtype), low)
    return (jnp.where(overflowed, exact.astype(scale.dtype), scale),
            jnp.where(overflowed, exact_low.astype(low.dtype), low))


def apply_scale(update: Any, scale: Array, low: Array | None = None) -> Any:
    """Multiplies one leaf by ``scale`` (times ``low``, the power of two
    ``split_tiny`` splits off a scale below the normal range), in at least
    float32, back in its own dtype.

    Entries come back bit-identical where ``scale == 1``; non-float leaves pass
    through untouched. For dtypes narrower than float32 the product is rounded
    toward zero, so no entry grows past ``|g * scale|``: bf16/fp16 rounding never
    pushes an output past the clip bound (which then holds to float32 precision).
    The rounding costs no extra pass: for bf16 it drops the low 16 bits of the
    float32 product, for the other narrow dtypes it rounds to nearest and steps
    the result's bit pattern down by one where that rounding grew the magnitude.
    To ``jax.grad`` it is the plain cast (the derivative of ``g * scale`` in the
    leaf's dtype). Complex leaves are scaled in their own (at least complex64)
    precision. A scale wider than the leaf (float64 over a float32 leaf, under
    x64) is narrowed by ``narrowed``, so it is not flushed to zero on the way.
    """
    if update is None or not is_float_leaf(update):
        return update
    update = jnp.asarray(update)
    compute = jnp.promote_types(update.dtype, accumulation_dtype(update.dtype))
    factor, factor_low = narrowed(scale, low, accumulation_dtype(compute))
    product = update.astype(compute) * factor
    if factor_low is not None:
        product = product * factor_low
    if compute != update.dtype and not jnp.iscomplexobj(update):
        scaled = _toward_zero(product, update.dtype)
    else:
        scaled = product.astype(update.dtype)
    return jnp.where(scale == 1, update, scaled)


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _toward_zero(product: Array, dtype: Any) -> Array:
    """``product`` (float32) converted to the narrower ``dtype``, rounded toward zero.

    Both forms are exact, for every finite, infinite and NaN product:

    * bfloat16 is float32 with the low 16 bits dropped, so clearing those bits
      is round-toward-zero (sign and magnitude are kept; inf keeps its bits; a
      NaN product is a quiet NaN, whose quiet bit sits in the kept half).
    * other dtypes: round to nearest; where that grew the magnitude, the
      result is non-zero and one step toward zero is its bit pattern minus one
      (sign-magnitude encoding). ``|g * scale| <= |g|`` keeps the product in
      range, and NaN compares false, so it is left as it is.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and product.dtype == jnp.float32:
        bits = lax.bitcast_convert_type(product, jnp.uint32) & jnp.uint32(0xFFFF0000)
        return lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)
    nearest = product.astype(dtype)
    grew = jnp.abs(nearest.astype(product.dtype)) > jnp.abs(product)
    unsigned = _UNSIGNED[dtype.itemsize]
    bits = lax.bitcast_convert_type(nearest, unsigned) - grew.astype(unsigned)
    return lax.bitcast_convert_type(bits, dtype)


@_toward_zero.defjvp
def _toward_zero_jvp(dtype: Any, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # The rounding mode moves the value by less than one unit in the last place:
    # to jax.grad the conversion is the plain cast, as before the rounding fix.
    (product,), (tangent,) = primals, tangents
    return _toward_zero(product, dtype), tangent.astype(dtype)


def unit_phase(g: Array, modulus: Array, where: Array) -> Array:
    """``g / |g|`` for complex ``g`` where ``where`` holds (elsewhere not a phase:
    callers select ``g`` there).

    ``modulus`` is ``|g|`` in the accumulation dtype. Two cases need care, since
    ``g / modulus`` would give 0 or NaN there:

    * a finite entry whose modulus overflows (3e38 + 2e38j in complex64): the
      phase comes from the entry halved, whose modulus fits;
    * an entry with an infinite component (inf + 5j, -inf + inf j): the phase is
      that of its infinite components (1, (-1 + 1j) / sqrt(2)), as the real
      clippers send inf to +limit.

    An entry with a NaN component keeps it (NaN phase). Returns the widened
    complex dtype (at least complex64).
    """
    wide = g.astype(jnp.promote_types(g.dtype, jnp.complex64))
    re, im = jnp.real(wide), jnp.imag(wide)
    has_nan = jnp.isnan(re) | jnp.isnan(im)
    big = jnp.isposinf(modulus) & ~has_nan
    infinite = jnp.isinf(re) | jnp.isinf(im)
    direction = lax.complex(jnp.where(jnp.isinf(re), jnp.sign(re), 0).astype(re.dtype),
                            jnp.where(jnp.isinf(im), jnp.sign(im), 0).astype(im.dtype))
    half = wide * 0.5
    numerator = jnp.where(big, jnp.where(infinite, direction, half), wide)
    bounded = jnp.where(big, numerator, 1)  # every modulus below fits
    denominator = jnp.where(big, jnp.abs(bounded).astype(modulus.dtype), modulus)
    return numerator / jnp.where(where, denominator, 1).astype(wide.dtype)
