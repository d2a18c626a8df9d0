"""Adaptive gradient clipping (AGC): each unit's gradient bounded by its weight norm."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optaxclip import _norms, _validate
from optaxclip._clipper import (
    ThresholdRule,
    fixed_threshold,
    make_clipper,
    reduced_axes,
    stacked_spec,
)
from optaxclip._norms import is_float_leaf
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import AxisName, validate_axis_name, validate_eps

Array = jax.Array

__all__ = ["AdaptiveGradClipState", "adaptive_grad_clip"]


class AdaptiveGradClipState(NamedTuple):
    """State of ``adaptive_grad_clip``.

    Attributes:
      count: number of updates so far (int32).
      stats: per-unit ``ClipStats`` of the last update: ``norm``, ``threshold``
        (the limits ``clipping * max(||W_u||, eps)``; ``inf`` before the first
        update) and ``scale`` are trees of per-unit arrays shaped like the
        gradients' units.
    """

    count: Array
    stats: ClipStats


def _validate_axis(axis: Any) -> tuple[int, ...]:
    if axis is None:
        return (-1,)
    _validate._refuse_traced(axis, "axis")
    axis = _validate._as_python_number(axis)
    if isinstance(axis, (tuple, list)):
        for a in axis:
            _validate._refuse_traced(a, "axis")
        axis = tuple(_validate._as_python_number(a) for a in axis)
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



@register_factory(threshold="clipping", needs_params=True)
def adaptive_grad_clip(
    clipping: Threshold,
    *,
    eps: float = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    axis_name: AxisName = None,
    stacked: bool = False,
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
        for every unit; these per-unit limits are the ``threshold`` stat;
      * a unit at or under its limit comes back bit-identical; clipping only
        rescales a unit, never rotates it;
      * gradient and weight norms accumulate in float32 or wider, overflow-safe;
      * with ``axis_name`` both norms cover all ``shard_map``/``pmap`` shards;
      * stats: per-unit pre-clip gradient norms, limits and scales.

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
        over, so unit norms cover every shard. It may only split the reduced axes
        (a kernel's input axis): a shard of the output axis holds other units,
        and psumming their norms would mix them (not detected).
      stacked: every leaf's (and weight's) leading axis indexes stacked layers:
        each layer's slice is split into units as an unstacked leaf of that
        shape would be (``axis`` counts within the slice), so a ``[L, in, out]``
        kernel has ``L x out`` units and a ``[L, d]`` bias ``L``.

    Returns:
      The clipper; its state is ``AdaptiveGradClipState(count, stats)`` with one
      norm, limit and scale per unit.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.adaptive_grad_clip(0.1)
      >>> params = {"w": jnp.array([[1.0, 10.0], [0.0, 0.0]])}   # (in, out)
      >>> grads = {"w": jnp.array([[3.0, 0.5], [4.0, 0.0]])}
      >>> out, state = tx.update(grads, tx.init(params), params)
      >>> out["w"].round(4).tolist()   # column 0: 5.0 > 0.1 * 1.0; column 1: 0.5 <= 1.0
      [[0.06, 0.5], [0.08, 0.0]]

      >>> oc.stats(state)["adaptive_grad_clip/threshold_max"].tolist()   # 0.1 * 10.0
      1.0

    References:
      Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
      Recognition Without Normalization", ICML 2021.
    """
    eps = validate_eps(eps)
    spec = stacked_spec(ClipSpec(
        "adaptive_grad_clip",
        scope="unit",
        unit_axes=_validate_axis(axis),
        axis_name=validate_axis_name(axis_name),
    ), stacked)
    ratio_rule = fixed_threshold(clipping, "clipping")

    def threshold(norm: Any, state: Any, params: Any) -> tuple[Any, dict[str, Any]]:
        ratio, _ = ratio_rule.threshold(norm, state, params)
        grad_leaves, treedef = jax.tree.flatten(norm)
        param_leaves = treedef.flatten_up_to(params)
        positions = [i for i, p in enumerate(param_leaves) if is_float_leaf(p)]
        weights = [jnp.asarray(param_leaves[i]) for i in positions]
        axes = [reduced_axes(spec, tuple(w.shape)) for w in weights]
        weight_parts = _norms.unit_norm_parts(weights, 2, axes, spec.axis_name)
        limits = [jnp.full_like(n, jnp.inf) for n in grad_leaves]
        for i, (root, multiplier) in zip(positions, weight_parts):
            # ratio inf means no limit, also for zero weights with eps = 0 (inf * 0).
            # NaN weights give a NaN limit, which poisons that unit's output.
            weight_norm = _norms._norm(root, multiplier)
            limit = ratio * jnp.maximum(weight_norm, eps)
            # A unit's weight norm past float32's range (finite weights near 3e38): the
            # limit from its parts, ratio * multiplier first (the barrier keeps XLA from
            # multiplying the parts back into the norm that overflowed).
            overflowed = jnp.isposinf(weight_norm) & jnp.isfinite(root) & jnp.isfinite(
                multiplier)
            from_parts = lax.optimization_barrier(ratio * multiplier) * root
            limit = jnp.where(overflowed, from_parts.astype(limit.dtype), limit)
            limits[i] = jnp.where(ratio == jnp.inf, jnp.inf, limit).astype(grad_leaves[i].dtype)
        return treedef.unflatten(limits), {}

    def initial(norm: Any, params: Any) -> Any:
        del params  # no limit is known before the first update
        return jax.tree.map(lambda n: jnp.full_like(n, jnp.inf), norm)

    rule = ThresholdRule(threshold=threshold, needs_params=True, initial=initial)
    return make_clipper(spec, rule, state_cls=AdaptiveGradClipState)
