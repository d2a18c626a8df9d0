"""Validation of static hyperparameters, with messages that name the argument.

Every check here runs once, when a transformation is built. A message says which
argument was wrong, what it was, and what to pass instead. Numbers may be Python
numbers, numpy scalars (``np.float32(1.0)``, ``np.int64(3)``) or 0-d arrays;
bools are refused wherever a number is expected.

Hyperparameters read in Python when a transformation is built (``ord``,
``history``, ``window``, ``percentile``, ``beta``, ``z`` ...) must be static: they
pick a code path, a buffer size, or a constant of the update. ``optax.inject_hyperparams``
turns every numeric argument into a traced array unless it is listed in
``static_args``, so a traced value gets a message that says exactly that.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Union

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

AxisName = Union[str, tuple[str, ...], None]

__all__ = [
    "is_traced",
    "validate_axis_name",
    "validate_eps",
    "validate_int",
    "validate_ord",
    "validate_real",
    "validate_threshold",
]


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _static_hint(name: str) -> str:
    return (
        f"{name} must be static: it is read once, in Python, when the "
        f"transformation is built, so it cannot be a traced array. With "
        f"optax.inject_hyperparams, list it in static_args, e.g. "
        f"optax.inject_hyperparams(factory, static_args=('{name}',))(...)."
    )


def _as_python_number(value: Any) -> Any:
    """Unwraps numpy scalars and concrete 0-d arrays; returns anything else as it is."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and not is_traced(value):
        if np.shape(value) == ():
            return np.asarray(value).item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _refuse_traced(value: Any, name: str) -> None:
    if is_traced(value):
        raise ValueError(f"{_static_hint(name)} Got a traced value of shape {value.shape}.")


def validate_ord(ord: Any, *, name: str = "ord") -> float:
    """Returns ``ord`` as a float (``None`` means 2), or raises ``ValueError``.

    ``None`` is the default rather than 2 so that ``optax.inject_hyperparams``,
    which injects every numeric default as a traced array, leaves it alone.
    """
    if ord is None:
        return 2.0
    _refuse_traced(ord, name)
    ord = _as_python_number(ord)
    if not _is_number(ord):
        text = ord.strip().lower() if isinstance(ord, str) else ""
        hints = {"inf": f" and {name}=math.inf (a float, as torch's float('inf')) for the "
                        f"max norm",
                 "fro": f"; {name}=2 is the Frobenius norm of each leaf"}
        hint = hints.get("inf" if text in ("inf", "+inf", "infinity") else text, "")
        raise ValueError(
            f"{name} must be a number: 1, 2, inf or any float p > 0; got {ord!r} "
            f"of type {type(ord).__name__}. Pass e.g. {name}=2 for the Euclidean norm"
            f"{hint}."
        )
    p = float(ord)
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"{name} must be 1, 2, inf or any float p > 0; got {ord!r}. "
            f"Use {name}=2 for the Euclidean norm or {name}=float('inf') for the max norm."
        )
    return p


def validate_axis_name(axis_name: Any, *, name: str = "axis_name") -> AxisName:
    """Checks that ``axis_name`` is None, a string, or a tuple of strings."""
    if axis_name is None or isinstance(axis_name, str):
        return axis_name
    if isinstance(axis_name, (tuple, list)) and axis_name and all(
        isinstance(a, str) for a in axis_name
    ):
        return tuple(axis_name)
    raise ValueError(
        f"{name} must be None, a mesh axis name (str) or a non-empty tuple of names; "
        f"got {axis_name!r}. Pass the name used in shard_map/pmap, e.g. {name}='data'."
    )


def _as_any(value: Any) -> Any:
    return value


def validate_threshold(value: Any, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` for a static threshold that is invalid.

    Schedules (callables of the step count) and traced values are accepted as
    they are: their values are only known at update time, where a negative value
    is clamped to 0 and a NaN poisons the output.
    """
    if (callable(value) and not hasattr(value, "dtype")) or is_traced(value):
        return
    value = _as_any(value)  # callable() narrowed the type; it is a number or an array here
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a non-negative number, not a bool ({value!r}).")
    if _is_number(value):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(
                f"{name} must be a number a float can hold; got an integer of "
                f"{len(str(value))} digits. Pass {name}=math.inf to never clip."
            ) from None
    elif hasattr(value, "dtype") and hasattr(value, "shape"):
        if np.shape(value) != ():
            raise ValueError(
                f"{name} must be a scalar; got an array of shape {np.shape(value)}. "
                f"Pass one threshold, e.g. {name}=1.0."
            )
        if not (jnp.issubdtype(value.dtype, jnp.floating)
                or jnp.issubdtype(value.dtype, jnp.integer)):
            raise ValueError(
                f"{name} must be a real number; got an array of dtype {value.dtype}. "
                f"Pass e.g. {name}=1.0."
            )
        number = float(np.asarray(value, dtype=np.float64))
    else:
        raise ValueError(
            f"{name} must be a non-negative float, a scalar array or a schedule "
            f"(a callable of the step count); got {value!r} of type {type(value).__name__}."
        )
    if math.isnan(number) or number < 0:
        raise ValueError(
            f"{name} must be >= 0 (0 zeroes the gradients, inf disables clipping); "
            f"got {number!r}."
        )


def validate_eps(eps: Any, name: str = "eps") -> Any:
    """A concrete ``eps`` must be finite and >= 0; a traced one is used as given."""
    if is_traced(eps):
        return eps
    eps = _as_python_number(eps)
    if not _is_number(eps):
        raise ValueError(f"{name} must be a non-negative float; got {eps!r}. Use {name}=0.0.")
    if not math.isfinite(float(eps)) or eps < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {eps!r}. Use {name}=0.0.")
    return float(eps)


def validate_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """A static integer hyperparameter ``>= minimum`` (bools refused), as ``int``."""
    _refuse_traced(value, name)
    value = _as_python_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def validate_real(
    value: Any,
    name: str,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A static real hyperparameter inside ``[low, high]`` (ends open as asked), as ``float``."""
    _refuse_traced(value, name)
    value = _as_python_number(value)
    number = None
    if _is_number(value):
        number = float(value)
        above = low < number if low_open else low <= number
        below = number < high if high_open else number <= high
        if not (above and below):
            number = None
    if number is None:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        suffix = f" {hint}" if hint else ""
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}.{suffix}")
    return number
