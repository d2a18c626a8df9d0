"""AutoClip: the threshold is a percentile of the recorded gradient norms."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _history, _scaling
from optaxclip._clipper import ThresholdRule, make_clipper
from optaxclip._history import History
from optaxclip._registry import register_factory
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import (
    AxisName,
    validate_axis_name,
    validate_int,
    validate_real,
    validate_threshold,
)

Array = jax.Array

__all__ = ["AutoClipState", "autoclip"]


class AutoClipState(NamedTuple):
    """State of ``autoclip``.

    Attributes:
      count: number of updates so far (int32).
      stats: ``ClipStats`` of the last update (global norm, threshold, scale).
      history: the last ``history`` finite, non-zero pre-clip global norms
        (``History``: the buffer, how many were recorded, the next slot).
    """

    count: Array
    stats: ClipStats
    history: History


def _percentile(sorted_values: Array, count: Array, percentile: float) -> Array:
    """numpy's default (linear) percentile of the first ``count`` sorted values."""
    rank = (percentile / 100.0) * (count - 1).astype(jnp.float32)
    below = jnp.clip(jnp.floor(rank).astype(jnp.int32), 0, sorted_values.shape[0] - 1)
    above = jnp.clip(below + 1, 0, jnp.maximum(count - 1, 0))
    weight = rank - below.astype(jnp.float32)
    low, high = sorted_values[below], sorted_values[above]
    # numpy's _lerp: exact at both ends of the interval.
    return jnp.where(
        weight >= 0.5, high - (high - low) * (1 - weight), low + (high - low) * weight
    )



@register_factory(threshold="max_norm", test_kwargs={"history": 8})
def autoclip(
    percentile: float = 10.0,
    *,
    history: int = 1000,
    max_norm: float | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """AutoClip: clips the global norm to a percentile of the recorded norms.

    ``threshold_t = min(percentile_p(h_{t-k+1}, ..., h_t), max_norm)`` where
    ``h_t = ||g_t||`` and ``k <= history``; then ``out = g * min(1, threshold_t / h_t)``.

    Which history a step sees: as in the paper, the current step's pre-clip norm
    is recorded *first* and the percentile is taken over the last ``history``
    recorded norms including it (the paper keeps every norm; a ring buffer
    keeps memory fixed). The percentile is numpy's default linear interpolation.
    On the first step the history is that single norm, so the threshold equals
    it and nothing is clipped; the threshold is meaningful after a few dozen
    steps. ``max_norm`` is an absolute cap: the threshold is never above it, from
    the first step on, which also protects those first steps.

    Non-finite norms are *not* recorded, so one NaN/inf step cannot poison the
    history; that step's output is NaN (the library policy) and the stats show
    the non-finite norm. Zero norms (a fully masked batch, a frozen phase) are
    not recorded either: they say nothing about the gradient scale, and enough
    of them would pull a low percentile to 0 and zero every later update.

    Equivalents: the authors' PyTorch snippet (``np.percentile`` of all past
    norms, then ``clip_grad_norm_``). No Keras, PyTorch or optax built-in.

    Formal guarantees:
      * for finite input, ``||out|| <= threshold * (1 + 1e-6)`` with ``threshold``
        in the stats; at or under it the input comes back bit-identical;
      * the threshold is a percentile of real past norms, so it is >= 0, finite
        once one finite norm is recorded, and at most ``max_norm``;
      * fixed memory: ``history`` values (float32, float64 for float64
        parameters); one sort of them per step;
      * with ``axis_name`` the norm (hence the whole history) is global across
        shards.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      first step                   unclipped (threshold = its own norm),
                                   unless above ``max_norm``
      zero gradients               zeros; not recorded
      NaN / inf norm               every entry NaN, also before any history
                                   (``scale`` NaN, ``clipped`` true); not
                                   recorded
      nothing recorded yet         threshold ``max_norm`` (``inf`` if None)
      ``percentile`` 0 / 100       the smallest / largest recorded norm
      invalid static argument      ``ValueError`` naming it
      ===========================  ===========================================

    Args:
      percentile: p in [0, 100]; the paper finds 10 a good default.
      history: how many recent finite norms are kept (>= 1).
      max_norm: optional absolute cap on the threshold.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

    Returns:
      The clipper; its state is ``AutoClipState(count, stats, history)``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.autoclip(50.0, history=4)
      >>> state = tx.init(None)
      >>> for norm in [1.0, 3.0, 2.0, 10.0]:
      ...     out, state = tx.update([jnp.array([norm])], state)
      >>> float(oc.stats(state)["autoclip/threshold"]), out[0].tolist()
      (2.5, [2.5])

    References:
      Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
      Clipping for Source Separation Networks", MLSP 2020.
    """
    percentile = validate_real(percentile, "percentile", low=0.0, high=100.0)
    size = validate_int(history, "history")
    if max_norm is not None:
        validate_threshold(max_norm, "max_norm")
    cap = math.inf if max_norm is None else max_norm
    spec = ClipSpec(
        "autoclip",
        scope="global",
        axis_name=validate_axis_name(axis_name),
        stat_fields=("history.num_recorded",),
        strict_nonfinite=True,
    )

    def init(params: Any) -> dict[str, Any]:
        return {"history": _history.empty(size, _history.dtype_for(params))}

    def threshold(norm: Array, state: AutoClipState, params: Any) -> tuple[Array, dict]:
        del params
        stored = norm.astype(state.history.values.dtype)
        # Zero norms say nothing about the scale; non-finite ones would poison it.
        history = _history.record(
            state.history, stored, jnp.isfinite(stored) & (stored > 0)
        )
        filled = _history.filled(history)
        ordered = jnp.sort(jnp.where(_history.valid(history), history.values, jnp.inf))
        adaptive = jnp.where(filled > 0, _percentile(ordered, filled, percentile), jnp.inf)
        limit = _scaling.threshold_at(cap, state.count)
        return jnp.minimum(adaptive.astype(limit.dtype), limit), {"history": history}

    rule = ThresholdRule(threshold=threshold, init=init, fields=("history",))
    return make_clipper(spec, rule, state_cls=AutoClipState)
