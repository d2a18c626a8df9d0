"""A fixed-size history of recent values, and overflow-safe statistics of it.

AutoClip's norms, ZClip's warmup and ``skip_on_spike``'s windows are each a
``History``: a ring buffer of the last ``size`` recorded values. Its mean and
standard deviation are computed scaled by the largest magnitude, so one huge
but finite value (1e20 in float32, whose square is ``inf``) gives a large,
finite spread instead of an infinite threshold that disables the clipper.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip._norms import accumulation_dtype, is_float_leaf, quotient

Array = jax.Array

__all__ = [
    "History", "clear", "dtype_for", "empty", "filled", "mean_std", "record", "scaled_rms"
]


def dtype_for(params: Any) -> Any:
    """The dtype statistics of these parameters' norms are kept in.

    float32, or float64 when a parameter is float64 (x64), so a finite float64
    norm above float32's range stays finite in the clipper's state. Without
    float parameters to go by (``tx.init(None)``, as the examples write it),
    float64 under x64: the gradients may be float64 there, and a float32 state
    would record their norm of 1e200 as inf.
    """
    floats = [x for x in jax.tree.leaves(params) if is_float_leaf(x)]
    if not floats:
        return jnp.promote_types(jnp.float32, jnp.result_type(float))
    dtype = jnp.float32
    for x in floats:
        leaf_dtype = getattr(x, "dtype", None) or jnp.result_type(x)
        dtype = jnp.promote_types(dtype, accumulation_dtype(leaf_dtype))
    return dtype


class History(NamedTuple):
    """The last ``len(values)`` recorded values.

    Attributes:
      values: the buffer; slots not written yet hold 0 and are ignored.
      num_recorded: how many values were ever recorded (int32, saturating).
      position: the slot the next value is written to.
    """

    values: Array
    num_recorded: Array
    position: Array


def empty(size: int, dtype: jnp.dtype = jnp.float32) -> History:
    return History(
        values=jnp.zeros([size], dtype),
        num_recorded=jnp.zeros([], jnp.int32),
        position=jnp.zeros([], jnp.int32),
    )


def record(history: History, value: Array, keep: Array) -> History:
    """``history`` with ``value`` appended where ``keep`` is true, unchanged elsewhere."""
    size = history.values.shape[0]
    written = history.values.at[history.position].set(value.astype(history.values.dtype))
    return History(
        values=jnp.where(keep, written, history.values),
        num_recorded=jnp.where(
            keep, optax.safe_increment(history.num_recorded), history.num_recorded
        ),
        position=jnp.where(keep, (history.position + 1) % size, history.position),
    )


def clear(history: History, now: Array) -> History:
    """``history`` emptied where ``now`` is true."""
    return History(
        values=jnp.where(now, jnp.zeros_like(history.values), history.values),
        num_recorded=jnp.where(now, 0, history.num_recorded),
        position=jnp.where(now, 0, history.position),
    )


def filled(history: History) -> Array:
    """How many slots hold recorded values."""
    return jnp.minimum(history.num_recorded, history.values.shape[0])


def valid(history: History) -> Array:
    return jnp.arange(history.values.shape[0]) < filled(history)


def mean_std(history: History) -> tuple[Array, Array]:
    """Mean and population standard deviation of the recorded values (0, 0 when empty).

    Both are computed on values divided by their largest magnitude, so neither
    the sum nor the squares can overflow while the result is representable.
    """
    mask = valid(history)
    values = jnp.where(mask, history.values, 0)
    count = jnp.maximum(filled(history), 1).astype(values.dtype)
    largest = jnp.max(jnp.abs(values), initial=0)
    divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
    unit = quotient(values, divisor)
    mean_unit = jnp.sum(unit) / count
    var_unit = jnp.sum(jnp.where(mask, jnp.square(unit - mean_unit), 0)) / count
    return mean_unit * divisor, jnp.sqrt(var_unit) * divisor


def scaled_rms(weight_a: float | Array, a: Array, weight_b: float | Array, b: Array) -> Array:
    """``sqrt(weight_a a^2 + weight_b b^2)`` for weights in [0, 1], without overflow."""
    largest = jnp.maximum(jnp.abs(a), jnp.abs(b))
    divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
    return jnp.sqrt(weight_a * jnp.square(quotient(a, divisor))
                    + weight_b * jnp.square(quotient(b, divisor))) * divisor
