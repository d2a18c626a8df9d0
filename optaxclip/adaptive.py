"""Adaptive clippers whose threshold comes from the weights or from past norms.

* ``adaptive_grad_clip`` (AGC): each unit's gradient is bounded relative to the
  norm of its own weights.
* ``autoclip``: the threshold is a percentile of the recorded gradient norms.

``zclip`` (EMA z-score) and ``adagc`` (per-tensor EMA) live in their own modules
and are re-exported here. Like every optaxclip clipper they chain *ahead of* the
optimizer, keep a ``NamedTuple`` state of arrays (checkpoints round-trip it and a
resumed run continues bit-identically), and report ``ClipStats`` through
``optaxclip.stats``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _scaling, _state, _validate
from optaxclip._norms import AxisName, is_float_leaf
from optaxclip._scaling import Threshold
from optaxclip._state import ClipStats
from optaxclip.adagc import AdaGCState, adagc
from optaxclip.zclip import ZClipState, zclip

Array = jax.Array

__all__ = [
    "AdaptiveGradClipState",
    "AutoClipState",
    "AdaGCState",
    "ZClipState",
    "adaptive_grad_clip",
    "autoclip",
    "adagc",
    "zclip",
]


class AdaptiveGradClipState(NamedTuple):
    """State of ``adaptive_grad_clip``.

    Attributes:
      count: number of updates so far (int32).
      stats: per-unit ``ClipStats`` of the last update: ``norm``, ``scale`` and
        ``clipped`` are trees of per-unit arrays; ``threshold`` is the ratio
        ``clipping``.
      unit_threshold: the per-unit limits ``clipping * max(||W_unit||, eps)``
        used on the last update, shaped like ``stats.norm``.
    """

    count: Array
    stats: ClipStats
    unit_threshold: Any


class AutoClipState(NamedTuple):
    """State of ``autoclip``.

    Attributes:
      count: number of updates so far (int32).
      stats: ``ClipStats`` of the last update (global norm, threshold, scale).
      norms: ring buffer of the last ``history`` finite, non-zero pre-clip global
        norms (float32); slots not yet written hold 0 and are ignored.
      num_recorded: how many norms were ever recorded (int32, saturating).
      position: the slot the next recorded norm is written to.
    """

    count: Array
    stats: ClipStats
    norms: Array
    num_recorded: Array
    position: Array


_state.register_state(AdaptiveGradClipState, "adaptive_grad_clip")
_state.register_state(AutoClipState, "autoclip", extra_fields=("num_recorded",))


def _validate_axis(axis: Any) -> tuple[int, ...] | None:
    if axis is None:
        return None
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        return (int(axis),)
    if isinstance(axis, (tuple, list)) and axis and all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis
    ):
        return tuple(int(a) for a in axis)
    raise ValueError(
        f"axis must be None, an int or a non-empty tuple of ints (the output axis or "
        f"axes kept as separate units); got {axis!r}. Use axis=-1 for flax/haiku "
        f"kernels (in, out) and axis=0 for PyTorch-layout weights (out, in, ...)."
    )


def _reduced_axes(shape: tuple[int, ...], kept: tuple[int, ...] | None) -> tuple[int, ...]:
    """The axes a unit spans: all of a scalar/vector, all but the output axes otherwise."""
    ndim = len(shape)
    if ndim <= 1:
        return tuple(range(ndim))
    kept = (-1,) if kept is None else kept
    normalised = set()
    for a in kept:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"adaptive_grad_clip: axis {a} is out of range for a weight of shape "
                f"{shape}. Pass an output axis that every >1-D weight has, e.g. axis=-1."
            )
        normalised.add(a % ndim)
    return tuple(i for i in range(ndim) if i not in normalised)


def _unit_shape(leaf: Any, kept: tuple[int, ...] | None) -> Any:
    if not is_float_leaf(leaf):
        return jnp.zeros([], jnp.float32)
    shape = tuple(jnp.shape(leaf))
    reduced = set(_reduced_axes(shape, kept))
    return jnp.zeros([d for i, d in enumerate(shape) if i not in reduced], jnp.float32)


def adaptive_grad_clip(
    clipping: Threshold,
    *,
    eps: float = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive gradient clipping (AGC): bounds each unit's gradient by its weight norm.

    ``G_u <- G_u * min(1, clipping * max(||W_u||, eps) / ||G_u||)`` for every unit
    ``u``, Frobenius norms. A unit is a whole scalar or vector (biases, norm
    scales), and one output unit of a >1-D weight: the norm runs over every axis
    except the output axis, the last one by default (flax/haiku kernels
    ``(in, out)`` and ``(h, w, in, out)``, as in the NFNet code). For 3-D weights
    this reduces over the first two axes, where ``optax.adaptive_grad_clip``
    reduces over the first only. ``axis`` names the output axis (or axes) to keep
    instead, e.g. ``axis=0`` for PyTorch-layout weights ``(out, in, kh, kw)``.

    Equivalents: ``optax.adaptive_grad_clip`` (no stats, fixed layout rules),
    ``timm.utils.adaptive_clip_grad``. No Keras or PyTorch built-in.

    Excluding layers: the paper does not clip the final classifier. Wrap the
    clipper in ``optax.masked`` so only the masked-in leaves are clipped::

        mask = lambda p: {k: k != "head" for k in p}
        tx = optax.chain(optax.masked(oc.adaptive_grad_clip(0.01), mask), optax.sgd(0.1))

    Formal guarantees:
      * for finite input, ``||out_u|| <= clipping * max(||W_u||, eps) * (1 + 1e-6)``
        for every unit (the limits are stored in ``state.unit_threshold``);
      * a unit at or under its limit comes back bit-identical; clipping only
        rescales a unit, never rotates it;
      * gradient and weight norms accumulate in float32 or wider, overflow-safe;
      * with ``axis_name`` both norms cover all ``shard_map``/``pmap`` shards;
      * stats: per-unit pre-clip gradient norms, scales and clipped flags; the
        ``threshold`` stat is the ratio ``clipping``.

    Edge cases:

      ==========================  ============================================
      input                       output
      ==========================  ============================================
      ``params`` is None          ``ValueError`` naming the fix
      zero gradient unit          zeros; finite ``jax.grad``
      zero weights                limit ``clipping * eps``
      ``clipping = 0``            zeros
      ``clipping = inf``          identity
      NaN / inf in a unit         that unit all NaN (also for NaN weights);
                                  its ``norm`` stat NaN / inf
      bf16 / fp16 leaves          scaled in float32, rounded toward zero
      integer / ``float0`` leaf   passed through, stats hold a 0 placeholder
      ==========================  ============================================

    Args:
      clipping: the largest gradient-to-weight norm ratio ``lambda``: a float, a
        scalar array or a schedule of the step count. The paper uses 0.01 to 0.16,
        smaller for larger batches.
      eps: the smallest weight norm used, so zero-initialised weights can move.
      axis: the output axis (int) or axes (tuple) of >1-D weights, each index
        along them a separate unit; None means the last axis.
      axis_name: under ``shard_map``/``pmap``, the axis the leaves are sharded
        over, so unit norms cover every shard.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.adaptive_grad_clip(0.1)
      >>> params = {"w": jnp.array([[1.0, 10.0], [0.0, 0.0]])}   # (in, out)
      >>> grads = {"w": jnp.array([[3.0, 0.5], [4.0, 0.0]])}
      >>> out, state = tx.update(grads, tx.init(params), params)
      >>> out["w"].round(4).tolist()   # column 0: 5.0 > 0.1 * 1.0; column 1: 0.5 <= 1.0
      [[0.06, 0.5], [0.08, 0.0]]

    References:
      Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
      Recognition Without Normalization", ICML 2021.
    """
    _validate.validate_threshold(clipping, "clipping")
    eps = _validate.validate_eps(eps)
    kept = _validate_axis(axis)
    axis_name = _validate.validate_axis_name(axis_name)

    def init_fn(params: Any) -> AdaptiveGradClipState:
        count = jnp.zeros([], jnp.int32)
        units = jax.tree.map(lambda p: _unit_shape(p, kept), params)
        return AdaptiveGradClipState(
            count=count,
            stats=_state.initial_stats(units, _scaling.threshold_at(clipping, count)),
            unit_threshold=units,
        )

    def update_fn(updates: Any, state: AdaptiveGradClipState, params: Any = None, **extra):
        del extra
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the parameters: its limit is relative to "
                "each unit's weight norm. Call tx.update(grads, state, params)."
            )
        ratio = _scaling.threshold_at(clipping, state.count)
        grad_leaves, treedef = jax.tree.flatten(updates)
        param_leaves = treedef.flatten_up_to(params)
        positions = [i for i, g in enumerate(grad_leaves) if is_float_leaf(g)]
        axes = [_reduced_axes(tuple(jnp.shape(grad_leaves[i])), kept) for i in positions]
        grad_norms = _norms.unit_norms(
            [grad_leaves[i] for i in positions], 2, axes=axes, axis_name=axis_name
        )
        weight_norms = _norms.unit_norms(
            [param_leaves[i] for i in positions], 2, axes=axes, axis_name=axis_name
        )
        placeholder = jnp.zeros([], jnp.float32)
        out = list(grad_leaves)
        norms, limits = [placeholder] * len(out), [placeholder] * len(out)
        scales = [jnp.ones([], jnp.float32)] * len(out)
        for i, reduced, grad_norm, weight_norm in zip(positions, axes, grad_norms, weight_norms):
            # ratio inf means no limit, also for zero weights with eps = 0 (inf * 0).
            limit = jnp.where(ratio == jnp.inf, jnp.inf, ratio * jnp.maximum(weight_norm, eps))
            scale, _ = _scaling.scale_factor(grad_norm, limit)
            # NaN weights give no limit at all; signal it rather than pass the unit.
            scale = jnp.where(jnp.isnan(limit), jnp.nan, scale)
            out[i] = _scaling.apply_scale(grad_leaves[i], jnp.expand_dims(scale, reduced))
            norms[i], limits[i], scales[i] = grad_norm, limit, scale
        rebuild = lambda xs: jax.tree.unflatten(treedef, xs)
        clipped = jax.tree.map(lambda s: s != 1, rebuild(scales))
        stats = _state.make_stats(rebuild(norms), ratio, rebuild(scales), clipped)
        new_state = AdaptiveGradClipState(
            count=optax.safe_increment(state.count),
            stats=stats,
            unit_threshold=jax.tree.map(lambda x: x.astype(jnp.float32), rebuild(limits)),
        )
        return rebuild(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
      * fixed memory: ``history`` float32 values; one sort of them per step;
      * with ``axis_name`` the norm (hence the whole history) is global across
        shards.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      first step                   unclipped (threshold = its own norm),
                                   unless above ``max_norm``
      zero gradients               zeros; not recorded
      NaN / inf norm               every entry NaN; not recorded
      nothing recorded yet         threshold ``max_norm`` (``inf`` if None)
      ``percentile = 0`` / ``100``   the smallest / largest recorded norm
      invalid static argument      ``ValueError`` naming it
      ===========================  ===========================================

    Args:
      percentile: p in [0, 100]; the paper finds 10 a good default.
      history: how many recent finite norms are kept (>= 1).
      max_norm: optional absolute cap on the threshold.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

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
    percentile = _validate.validate_real(percentile, "percentile", low=0.0, high=100.0)
    history = _validate.validate_int(history, "history")
    if max_norm is not None:
        _validate.validate_threshold(max_norm, "max_norm")
    axis_name = _validate.validate_axis_name(axis_name)
    cap = math.inf if max_norm is None else max_norm

    def init_fn(params: Any) -> AutoClipState:
        del params
        zero = jnp.zeros([], jnp.int32)
        return AutoClipState(
            count=zero,
            stats=_state.initial_stats(jnp.zeros([]), _scaling.threshold_at(cap, zero)),
            norms=jnp.zeros([history], jnp.float32),
            num_recorded=zero,
            position=zero,
        )

    def update_fn(updates: Any, state: AutoClipState, params: Any = None, **extra):
        del params, extra
        norm = _norms.global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        record = jnp.isfinite(norm) & (norm > 0)
        norms = jnp.where(record, state.norms.at[state.position].set(norm), state.norms)
        num_recorded = jnp.where(
            record, optax.safe_increment(state.num_recorded), state.num_recorded
        )
        position = jnp.where(record, (state.position + 1) % history, state.position)
        filled = jnp.minimum(num_recorded, history)
        valid = jnp.arange(history) < filled
        ordered = jnp.sort(jnp.where(valid, norms, jnp.inf))
        adaptive = jnp.where(filled > 0, _percentile(ordered, filled, percentile), jnp.inf)
        threshold = jnp.minimum(adaptive, _scaling.threshold_at(cap, state.count))
        scale, clipped = _scaling.scale_factor(norm, threshold)
        out = jax.tree.map(lambda g: _scaling.apply_scale(g, scale), updates)
        return out, AutoClipState(
            count=optax.safe_increment(state.count),
            stats=_state.make_stats(norm, threshold, scale, clipped),
            norms=norms,
            num_recorded=num_recorded,
            position=position,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
