"""Clipping as plain functions, for custom training loops, and a norm monitor.

``clip``, ``clip_per_leaf`` and ``clip_values`` are the functional forms of
``clip_by_global_norm``, ``clip_by_norm`` and ``clip_by_value``: they take
gradients and return ``(clipped, norm)``, like PyTorch's
``torch.nn.utils.clip_grad_norm_`` returns the total norm and TensorFlow's
``tf.clip_by_global_norm`` returns ``(clipped, global_norm)``. They run the very
same code as the transformations (one pass, overflow-safe norms, the bound
kept exactly), so a loop can switch between the two without a numerical change.

``monitor_norm`` is a transformation that records the gradient norm in its
state, for ``stats()``, and hands the updates on unchanged: logging the norm
without clipping (what HF Trainer logs as ``grad_norm`` when
``max_grad_norm`` is unset).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import optax

from optaxclip._clipper import fixed_threshold, make_clipper
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import AxisName, validate_ord
from optaxclip.fixed import clip_by_global_norm, clip_by_norm, clip_by_value

__all__ = [
    "MonitorLeafNormsState", "MonitorNormState", "clip", "clip_per_leaf", "clip_values",
    "monitor_norm",
]

Array = Any


def _run(tx: optax.GradientTransformation, grads: Any) -> tuple[Any, Array]:
    out, state = tx.update(grads, tx.init(grads))
    return out, cast(Any, state).stats.norm


def clip(
    grads: Any, max_norm: Threshold, *, ord: float | None = None, eps: float = 0.0,
    axis_name: AxisName = None,
) -> tuple[Any, Array]:
    """Scales ``grads`` into the ball of radius ``max_norm``; returns ``(clipped, norm)``.

    The functional form of ``clip_by_global_norm``: ``clipped = grads *
    min(1, max_norm / (norm + eps))``, with ``norm`` the global ``ord``-norm of
    the whole tree before clipping.

    Equivalents: ``torch.nn.utils.clip_grad_norm_(params, max_norm,
    norm_type=ord)`` (which returns the total norm and clips in place),
    ``tf.clip_by_global_norm(grads, max_norm)`` (which returns ``(clipped,
    norm)``), ``optax.clip_by_global_norm(max_norm)`` as a transformation.

    Formal guarantees (those of ``clip_by_global_norm``):
      * ``global_norm(clipped, ord) <= max_norm`` for finite input, in every
        float dtype, bf16 and fp16 included; never scales up;
      * ``norm`` is accumulated in float32 or wider and is overflow-safe; it is
        the norm *before* clipping (what PyTorch returns);
      * same structure, shapes and dtypes; ``None``, ``optax.MaskedNode`` and
        integer leaves pass through; works eagerly, under ``jit``, ``vmap`` and
        ``grad``, and with a traced ``max_norm``.

    Edge cases:

      ==========================  ============================================
      input                       result
      ==========================  ============================================
      zero gradients              zeros; ``norm`` 0
      ``max_norm = 0``            zeros
      ``max_norm = inf``          ``grads`` unchanged
      a NaN or inf entry          every entry NaN, ``norm`` NaN/inf (torch:
                                  the same for NaN; for inf it zeroes
                                  every finite entry)
      negative static threshold   ``ValueError`` naming ``max_norm``
      ==========================  ============================================

    Args:
      grads: a pytree of gradients.
      max_norm: the largest norm allowed: a float or a scalar array.
      ord: the norm's order (default 2; 1, ``inf`` or any p > 0).
      eps: added to the norm in the scale's denominator (torch uses ``1e-6``).
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over; the norm then covers every shard.

    Returns:
      ``(clipped, norm)``: the clipped gradients and the pre-clip global norm.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> clipped, norm = oc.clip({"w": jnp.array([3.0, 4.0])}, 1.0)
      >>> float(norm), clipped["w"].tolist()
      (5.0, [0.6000000238418579, 0.800000011920929])
    """
    return _run(clip_by_global_norm(max_norm, ord=ord, eps=eps, axis_name=axis_name), grads)


def clip_per_leaf(
    grads: Any, max_norm: Threshold, *, ord: float | None = None, axis_name: AxisName = None
) -> tuple[Any, Any]:
    """Scales each leaf into the ball of radius ``max_norm``; returns ``(clipped, norms)``.

    The functional form of ``clip_by_norm`` (Keras ``clipnorm``): each leaf on
    its own, ``leaf * min(1, max_norm / norm(leaf))``.

    Equivalents: ``tf.clip_by_norm`` applied to each tensor; Keras ``clipnorm``.

    Formal guarantees: those of ``clip_by_norm``; ``norms`` has the structure of
    ``grads`` with one float32 (or wider) scalar per float leaf, before clipping.

    Edge cases: as ``clip``, leaf by leaf (a NaN poisons only its own leaf).

    Args:
      grads: a pytree of gradients.
      max_norm: the largest norm allowed per leaf.
      ord: the norm's order (default 2).
      axis_name: under ``shard_map``/``pmap``, the axis the leaves are sharded over.

    Returns:
      ``(clipped, norms)``: the clipped gradients and each leaf's pre-clip norm.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> clipped, norms = oc.clip_per_leaf({"a": jnp.array([3.0, 4.0]),
      ...                                    "b": jnp.array([0.5])}, 1.0)
      >>> float(norms["a"]), clipped["b"].tolist()
      (5.0, [0.5])
    """
    return _run(clip_by_norm(max_norm, ord=ord, axis_name=axis_name), grads)


def clip_values(grads: Any, max_delta: Threshold) -> tuple[Any, Array]:
    """Clips each entry to ``[-max_delta, max_delta]``; returns ``(clipped, max_abs)``.

    The functional form of ``clip_by_value`` (``torch.nn.utils.clip_grad_value_``,
    Keras ``clipvalue``); ``max_abs`` is the largest ``|g_i|`` before clipping.

    Formal guarantees and edge cases: those of ``clip_by_value`` (entries inside
    the bound are returned bit-identical; NaN stays NaN; ``inf`` goes to
    ``max_delta``).

    Args:
      grads: a pytree of gradients.
      max_delta: the largest magnitude allowed.

    Returns:
      ``(clipped, max_abs)``: the clipped gradients and the pre-clip max-norm.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> clipped, max_abs = oc.clip_values([jnp.array([-3.0, 0.5])], 1.0)
      >>> float(max_abs), clipped[0].tolist()
      (3.0, [-1.0, 0.5])
    """
    return _run(clip_by_value(max_delta), grads)


class MonitorNormState(NamedTuple):
    """State of ``monitor_norm``: the step count and the measured norm.

    ``stats.threshold`` is ``inf`` and ``stats.scale`` is 1: nothing is clipped.
    """

    count: Array
    stats: ClipStats


class MonitorLeafNormsState(NamedTuple):
    """State of ``monitor_norm(per_leaf=True)``: the step count and each leaf's norm."""

    count: Array
    stats: ClipStats


@register_factory()
def monitor_norm(
    *, ord: float | None = None, per_leaf: bool = False, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """Records the gradient norm for ``stats()`` and passes the updates on unchanged.

    Logging the norm without clipping: ``stats(state)["monitor_norm/norm"]``.
    Put it where you want to measure: first in the chain for the raw gradient
    norm, after ``scale_by_adam`` for the update norm; ``check_order`` accepts
    it anywhere, because it never changes an update.

    Equivalents: the ``grad_norm`` that HF Trainer logs, PyTorch's
    ``clip_grad_norm_(params, inf)`` used only for its return value,
    ``optax.global_norm(grads)`` computed in the train step by hand.

    Formal guarantees:
      * the output is the input, bit for bit, with the same structure;
      * the norm is that of ``clip_by_global_norm`` (or, with ``per_leaf``, of
        ``clip_by_norm``): float32 or wider, overflow-safe, across
        ``axis_name`` shards;
      * stats: ``norm``; ``threshold`` is ``inf`` and ``scale`` is 1.

    Edge cases:

      ==========================  ============================================
      input                       result
      ==========================  ============================================
      zero gradients              zeros; ``norm`` 0
      a NaN or inf entry          passed on unchanged; ``norm`` NaN or inf
      the empty tree              the empty tree; ``norm`` 0
      ==========================  ============================================

    Args:
      ord: the norm's order (default 2; 1, ``inf`` or any p > 0).
      per_leaf: record one norm per leaf instead of the global norm
        (``stats(state, per_leaf=True)`` reports them).
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

    Returns:
      The monitor; its state is ``MonitorNormState(count, stats)``
      (``MonitorLeafNormsState`` with ``per_leaf=True``).

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = optax.chain(oc.monitor_norm(), optax.sgd(0.1))
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> float(oc.stats(state)["monitor_norm/norm"]), updates["w"].tolist()
      (5.0, [-0.30000001192092896, -0.4000000059604645])
    """
    p = 2.0 if ord is None else validate_ord(ord, name="ord")
    if not isinstance(per_leaf, bool):
        raise TypeError(f"per_leaf must be True or False; got {per_leaf!r}.")
    spec = ClipSpec(
        "monitor_norm", scope="leaf" if per_leaf else "global", role="monitor", ord=p,
        axis_name=axis_name,
    )
    state_cls = MonitorLeafNormsState if per_leaf else MonitorNormState
    return make_clipper(spec, fixed_threshold(math.inf, "max_norm"), state_cls=state_cls)
