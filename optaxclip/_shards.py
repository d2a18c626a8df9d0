"""Reducing partial norms across shards (``axis_name`` under ``shard_map``/``pmap``).

Under ``shard_map`` with replication checking (``check_vma=True``, the
default) every value's type says which mesh axes it varies along. A leaf
sharded over ``model`` and replicated over ``data`` holds the same partial
sum on every ``data`` shard: summing it over ``("data", "model")`` would count
each of its entries once per ``data`` shard. So each partial sum is reduced
over the axes of ``axis_name`` it varies along only, and partial sums that
vary differently are reduced separately and then added. Without replication
checking (``check_vma=False``, ``pmap``, ``vmap`` axis names) types carry no
such information and every value is reduced over all of ``axis_name``: the
caller says the gradients are split over all of those axes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optaxclip._validate import AxisName

Array = jax.Array


def _varying(x: Any) -> frozenset | None:
    """The manual mesh axes ``x`` varies along, from its type; None if not recorded."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # jax 0.6 to 0.9
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)  # jax 0.10
    return None if vma is None else frozenset(vma)


def _names(axis_name: AxisName) -> tuple[Any, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _replication_checked(axis_name: AxisName) -> bool:
    """Whether values' types record how they vary along ``axis_name`` (check_vma=True).

    The axis index varies along its own axis exactly when replication checking
    is on; it is traced only to read its type, and unused, so it compiles to nothing.
    """
    try:
        varying = _varying(lax.axis_index(_names(axis_name)))
    except (NameError, TypeError, ValueError):
        return False
    return varying is not None and set(_names(axis_name)) <= varying


def reduction_axes(x: Any, axis_name: AxisName) -> AxisName:
    """The axes of ``axis_name`` a partial reduction ``x`` is summed over (None: none).

    All of ``axis_name`` unless replication checking shows ``x`` is the same on
    some of them (see above).
    """
    if axis_name is None or not _replication_checked(axis_name):
        return axis_name
    varying = _varying(x) or frozenset()
    kept = tuple(name for name in _names(axis_name) if name in varying)
    return kept or None


def _psum(x: Any, axis_name: AxisName) -> Any:
    """``lax.psum`` of each array in ``x`` over the axes it varies along."""
    if axis_name is None:
        return x
    return jax.tree.map(lambda v: _reduce_over(lax.psum, v, reduction_axes(v, axis_name)), x)


def _pmax(x: Any, axis_name: AxisName) -> Any:
    """``lax.pmax`` of each array in ``x`` over the axes it varies along.

    A maximum counts nothing twice, so a value that mixes leaves of different
    variation needs no grouping; reducing over axes it does not vary along is
    only refused by replication checking.
    """
    if axis_name is None:
        return x
    return jax.tree.map(
        lambda v: _reduce_over(_pmax_keeping_nan, v, reduction_axes(v, axis_name)), x)


def _pmax_keeping_nan(x: Array, axes: Any) -> Array:
    """``lax.pmax`` that returns NaN where any shard's value is NaN.

    XLA's maximum across devices drops NaN (the CPU backend returned another
    shard's finite value), so a NaN entry on one shard would vanish from a
    sharded maximum norm.
    """
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return lax.pmax(x, axes)
    # One collective: the values and their NaN flags side by side.
    largest, nan = lax.pmax(jnp.stack([x, jnp.isnan(x).astype(x.dtype)]), axes)
    return jnp.where(nan > 0, jnp.asarray(jnp.nan, largest.dtype), largest)


def _reduce_over(collective: Callable, x: Array, axes: AxisName) -> Array:
    return x if axes is None else collective(x, axes)


def _psum_total(partial_sums: Sequence[Array], axis_name: AxisName) -> Array:
    """``sum_i partial_sums[i]`` summed across shards, each over the axes it varies along.

    Partial sums that vary along the same axes are added first and reduced by
    one collective, so a tree whose leaves are all sharded alike (or the
    unchecked case) costs one ``psum``, as a single sum would.
    """
    groups: dict[Any, list[Array]] = {}
    for x in partial_sums:
        key = None if axis_name is None else reduction_axes(x, axis_name)
        groups.setdefault(key, []).append(x)
    totals = [_reduce_over(lax.psum, jnp.sum(jnp.stack(group), axis=0), axes)
              for axes, group in groups.items()]
    return functools.reduce(jnp.add, totals)
