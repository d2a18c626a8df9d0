"""Clipping by several norms at once: one global norm per group of parameters.

``clip_by_group_norms`` labels the parameters into groups and clips each group
by its own global norm and threshold; a group whose threshold is ``None`` is
left out of clipping and out of every norm. It is ``optax.partition`` over one
``make_clipper`` global clipper per group, so everything that reads optaxclip
clippers (``stats``, ``check_order``, ``checked``, the contract checks of
``optaxclip.testing`` applied to one group) sees ordinary clippers inside an
ordinary partition.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import optax

from optaxclip._clipper import fixed_threshold, make_clipper
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import AxisName, validate_axis_name, validate_eps, validate_ord

Array = jax.Array

__all__ = ["GROUP_CLIPPER_NAME", "ClipByGroupNormsState", "clip_by_group_norms"]

# The name of every group's clipper: its ``stats()`` keys are
# ``<group>/clip_by_group_norms/<field>``, and check_order knows that the
# partition around it is its own.
GROUP_CLIPPER_NAME = "clip_by_group_norms"


class ClipByGroupNormsState(NamedTuple):
    """State of one group's clipper: step count and the last update's stats.

    The whole transformation's state is ``optax.PartitionState``: one
    ``MaskedState`` per group holding this state (``EmptyState`` for a group
    whose threshold is ``None``).
    """

    count: Array
    stats: ClipStats


Labels = Any  # a pytree of group labels, or a callable params -> such a tree


@register_factory(kind="preset")
def clip_by_group_norms(
    max_norms: Mapping[Hashable, Threshold | None],
    param_labels: Labels | Callable[[Any], Labels],
    *,
    ord: float | None = None,
    eps: float = 0.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips each group of parameters by its own global p-norm and threshold.

    For every group ``k`` with ``max_norms[k]`` not None:
    ``out_k = g_k * min(1, max_norms[k] / (||g_k||_p + eps))``, where ``g_k`` are
    the leaves labelled ``k`` and ``||g_k||_p`` their global norm. Leaves of a
    group whose threshold is ``None`` pass through unchanged and count in no
    norm (e.g. the matrices Muon orthogonalises, clipped by nothing).

    Equivalents: ``optax.partition`` with one ``clip_by_global_norm`` per group
    (this is that, with the groups declared as clipping groups, so
    ``check_order`` does not warn about global clippers inside a partition);
    PyTorch's ``clip_grad_norm_`` called once per parameter group. No Keras
    built-in.

    Formal guarantees:
      * for finite input, ``||out_k||_p <= max_norms[k] * (1 + 1e-6)`` for every
        clipped group; each group's norm is measured on its own leaves only;
      * a group at or under its threshold (``eps = 0``) comes back
        bit-identical, and so does every leaf of an excluded group, whatever its
        values (NaN included);
      * clipping only rescales a group: direction and signs are kept;
      * each group's norm is float32 (or wider), overflow-safe, read once, and
        global across ``shard_map``/``pmap`` shards with ``axis_name``;
      * stats per group: ``<group>/clip_by_group_norms/norm``, ``threshold``,
        ``scale`` and ``clipped`` (``optaxclip.stats``).

    Edge cases:

      ==============================  ==========================================
      input                           output
      ==============================  ==========================================
      zero gradients                  zeros; finite ``jax.grad``
      ``max_norms[k] = 0``            group ``k`` all zeros
      ``max_norms[k] = inf``          group ``k`` unchanged; its norm recorded
      ``max_norms[k] = None``         group ``k`` unchanged, in no norm, no stats
      NaN / inf in group ``k``        group ``k`` all NaN (``norm`` stat NaN /
                                      inf); the other groups clipped as usual
      a label with no entry in        ``ValueError`` at ``init`` naming it
      ``max_norms``
      negative static threshold       ``ValueError`` at construction
      negative traced threshold       clamped to 0
      integer / ``float0`` leaf       passed through, in no norm
      ==============================  ==========================================

    Args:
      max_norms: group label -> the largest global p-norm allowed for that group
        (a float, a scalar array or a schedule of the step count), or ``None``
        to leave the group out of clipping and of every norm.
      param_labels: a pytree of labels shaped like the parameters (or a prefix
        of them), or a function of the parameters returning one, as
        ``optax.partition`` takes.
      ord: 1, 2, ``inf``, or any float p > 0, for every group. ``None`` means 2.
      eps: added to each group's norm in the denominator, as torch's ``1e-6``.
      axis_name: under ``shard_map``/``pmap``, the axis name (or names) the
        gradients are sharded over; each group's norm then covers every shard.

    Returns:
      An ``optax.partition`` transformation; its state is ``optax.PartitionState``
      with a ``ClipByGroupNormsState`` per clipped group.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]),
      ...          "m": jnp.array([100.0])}
      >>> labels = {"w": "dense", "b": "bias", "m": "muon"}
      >>> tx = oc.clip_by_group_norms({"dense": 1.0, "bias": 1.0, "muon": None}, labels)
      >>> out, state = tx.update(grads, tx.init(grads))
      >>> [round(x, 4) for x in out["w"].tolist()], out["b"].tolist() == grads["b"].tolist()
      ([0.6, 0.8], True)
      >>> out["m"].tolist(), float(oc.stats(state)["dense/clip_by_group_norms/norm"])
      ([100.0], 5.0)

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
      neural networks", ICML 2013 (norm clipping); Jordan et al., "Muon: An
      optimizer for hidden layers in neural networks", 2024 (a group that is not
      clipped by norm).
    """
    if not isinstance(max_norms, Mapping) or not max_norms:
        raise ValueError(
            f"max_norms must be a non-empty mapping from group label to threshold (or None "
            f"to leave a group unclipped), e.g. {{'matrices': None, 'other': 1.0}}; got "
            f"{max_norms!r}."
        )
    spec = ClipSpec(
        GROUP_CLIPPER_NAME,
        scope="global",
        ord=validate_ord(ord),
        eps=validate_eps(eps),
        axis_name=validate_axis_name(axis_name),
    )
    transforms = {}
    for group, max_norm in max_norms.items():
        if max_norm is None:
            transforms[group] = optax.identity()
            continue
        rule = fixed_threshold(max_norm, f"max_norms[{group!r}]")
        transforms[group] = make_clipper(spec, rule, state_cls=ClipByGroupNormsState)
    partitioned = optax.partition(transforms, param_labels)

    def init_fn(params: Any) -> Any:
        labels = param_labels(params) if callable(param_labels) else param_labels
        # By equality, as optax.partition looks labels up: np.str_("bias") finds "bias".
        missing = sorted({repr(label) for label in jax.tree.leaves(labels)
                          if label not in max_norms})
        if missing:
            raise ValueError(
                f"clip_by_group_norms: parameters are labelled {', '.join(missing)}, but "
                f"max_norms has no entry for them (it has {sorted(map(repr, max_norms))}). "
                f"Give every label a threshold, or None to leave its group unclipped."
            )
        return partitioned.init(params)

    # The update is optax.partition's own, so check_order, checked and stats open
    # it like any partition.
    return optax.GradientTransformationExtraArgs(init_fn, partitioned.update)
