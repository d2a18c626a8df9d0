"""Fixed-threshold clippers: by value, per-leaf norm, global norm, and block RMS.

The threshold is a Python number, a scalar array (also through
``optax.inject_hyperparams``), or an optax schedule of the clipper's own step
count. Each clipper chains *ahead of* the optimizer,
``optax.chain(clip, optax.adam(...))``, so moment accumulators only see clipped
gradients (Keras ``clipnorm`` order).

Shared contracts, tested for every clipper:

* **Bound**: for finite input, ``norm(output) <= threshold * (1 + 1e-6)`` in the
  clipper's own norm. Low-precision leaves are scaled in float32 and rounded
  back toward zero, so bf16/fp16 outputs keep the bound too.
* **Identity below the threshold**: input at or under the threshold comes back
  bit-identical.
* **Direction**: norm clipping only rescales; it never changes direction or sign.
* **Structure and dtype**: same tree, shapes and dtypes out as in. ``None`` and
  ``optax.MaskedNode`` leaves pass through. Integer, bool and ``float0`` leaves
  pass through untouched and do not count towards any norm.
* **Non-finite input**: a NaN or inf norm makes every entry in the clipper's
  scope NaN (the whole tree for global clipping, the leaf for per-leaf
  clipping), and the stats record the non-finite norm and a NaN scale. Finite
  entries are never silently zeroed. This matches ``tf.clip_by_global_norm`` and
  Keras ``global_clipnorm``. Wrap the optimizer in a guard such as
  ``optax.apply_if_finite`` or run under ``optaxclip.checked`` to stop such a
  step. A threshold of ``inf`` is the identity even then.
* **Subnormal floats**: XLA on CPU flushes them to zero, so a threshold below
  the smallest normal float32 (``1.2e-38``), or a scale ``threshold / norm``
  below it (a norm 1e38 times the threshold), acts as 0 and gives zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from optaxclip._clipper import fixed_threshold, make_clipper, stacked_spec
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import AxisName, validate_axis_name, validate_eps, validate_ord

Array = jax.Array

__all__ = [
    "ClipByValueState",
    "ClipByNormState",
    "ClipByGlobalNormState",
    "ClipByBlockRmsState",
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
    "clip_by_block_rms",
]


class ClipByValueState(NamedTuple):
    """State of ``clip_by_value``: step count and the last update's stats."""

    count: Array
    stats: ClipStats


class ClipByNormState(NamedTuple):
    """State of ``clip_by_norm``: step count and per-leaf stats of the last update."""

    count: Array
    stats: ClipStats


class ClipByGlobalNormState(NamedTuple):
    """State of ``clip_by_global_norm``: step count and the last update's stats."""

    count: Array
    stats: ClipStats


class ClipByBlockRmsState(NamedTuple):
    """State of ``clip_by_block_rms``: step count and per-leaf stats of the last update."""

    count: Array
    stats: ClipStats


@register_factory(threshold="max_delta", limit_is_threshold=True)
def clip_by_value(
    max_delta: Threshold, *, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """Clips every entry to ``[-max_delta, max_delta]``.

    ``out_i = clip(g_i, -max_delta, max_delta)``, element-wise, in each leaf's dtype.

    Equivalents: Keras ``clipvalue``, ``torch.nn.utils.clip_grad_value_``,
    ``tf.clip_by_value(g, -t, t)``, ``optax.clip``.

    Formal guarantees:
      * ``max|out| <= max_delta`` exactly (``max_delta`` as float32): the
        threshold is rounded *down* to the leaf's dtype before clipping, so bf16
        output never exceeds it.
      * entries with ``|g_i| <= max_delta`` are returned bit-identical; signs are kept.
      * same structure, shapes and dtypes; non-float leaves pass through.
      * stats: ``norm`` is the pre-clip max-norm ``max|g_i|`` (NaN if any entry is
        NaN), ``threshold`` the limit, ``clipped`` whether any entry was changed
        (NaN entries are never changed). There is no ``scale``: entries are
        clipped one by one, so no single factor was applied.

    Cost of the stats: ``optax.clip`` only clamps; this clipper also reads
    every gradient once more, in one reduction per leaf that gives both ``norm``
    and ``clipped``, and the clamp of each leaf is selected by that leaf's
    flag. Standalone with the gradients donated, on GPT-2-small/4 shapes on
    XLA:CPU, the update took 1.77-1.78x ``optax.clip``'s time (a read plus a
    read-and-write against one read-and-write; the earlier two-reduction form,
    which XLA could not order before the in-place clamp, copied every donated
    leaf and took 13-17x). In a jitted GPT train step it measured 1.01-1.02x
    Adam alone (``benchmarks/RESULTS.md``, "clip_by_value").

    Edge cases:

      ==========================  ============================================
      input                       output
      ==========================  ============================================
      zero gradients              zeros; finite ``jax.grad``
      ``max_delta = 0``           signed zeros; NaN entries stay NaN
      ``max_delta = inf``         identity
      ``+inf`` / ``-inf`` entry   ``+max_delta`` / ``-max_delta`` (as torch)
      NaN entry                   stays NaN; other entries clipped as usual;
                                  ``norm`` stat NaN; ``clipped`` says whether
                                  another entry was clipped
      negative static threshold   ``ValueError`` at construction
      negative traced threshold   clamped to 0
      bf16 / fp16 leaves          clipped in their own dtype, bound exact
      complex entries             scaled to modulus ``<= max_delta`` (a few
                                  ulps inside it), phase kept
      complex ``inf`` part        modulus ``max_delta`` along the infinite
                                  parts' phase (``inf + 5j`` -> ``max_delta``);
                                  a NaN part keeps the entry NaN
      ``max_delta`` above the     finite entries untouched; ``inf`` entries go
      dtype's largest value       to the dtype's largest value (fp16: 65504)
      ``max_delta`` beyond        identity, ``inf`` entries too: the threshold
      float32's range (1e39;      is kept in float32, where it is ``inf``
      float64 under x64)          (torch refuses such a value for the dtype)
      ==========================  ============================================

    Args:
      max_delta: the largest magnitude allowed: a float, a scalar array, or a
        schedule of the step count.
      axis_name: under ``shard_map``/``pmap``, the axis name (or names) the
        gradients are split over. The clamp is entry by entry either way; the name
        makes the stats (``norm``, ``clipped``) those of the whole tree, the same
        on every shard, rather than each shard's own.

    Returns:
      The clipper; its state is ``ClipByValueState(count, stats)``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_value(1.0)
      >>> out, _ = tx.update({"w": jnp.array([-3.0, 0.5, 2.0])}, tx.init(None))
      >>> out["w"].tolist()
      [-1.0, 0.5, 1.0]

    References:
      Mikolov, "Statistical Language Models Based on Neural Networks", PhD thesis, 2012.
    """
    spec = ClipSpec("clip_by_value", scope="element", ord=float("inf"),
                    axis_name=validate_axis_name(axis_name))
    return make_clipper(spec, fixed_threshold(max_delta, "max_delta"), state_cls=ClipByValueState)


@register_factory(threshold="max_norm", limit_is_threshold=True)
def clip_by_norm(
    max_norm: Threshold, *, ord: float | None = None, axis_name: AxisName = None,
    stacked: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Clips each leaf separately so its p-norm is at most ``max_norm``.

    ``out_leaf = g_leaf * min(1, max_norm / ||g_leaf||_p)`` for every leaf.

    Equivalents: Keras ``clipnorm`` (per variable), ``tf.clip_by_norm`` applied
    to each gradient. There is no direct PyTorch or optax transform: optax's
    ``clip_by_block_rms`` clips per-leaf RMS, not per-leaf norm.

    Formal guarantees:
      * for finite input, ``||out_leaf||_p <= max_norm * (1 + 1e-6)`` for every
        leaf;
      * a leaf at or under ``max_norm`` comes back bit-identical;
      * a leaf over it is only rescaled, never rotated or sign-flipped;
      * norms accumulate in float32 or wider, overflow-safe (``1e20`` entries,
        fp16 ``[300, 1]``);
      * stats hold one norm and scale per leaf (``clipped`` is ``scale != 1``).

    Edge cases:

      =========================  ==============================================
      input                      output
      =========================  ==============================================
      zero leaf                  zeros; finite ``jax.grad``
      norm exactly ``max_norm``  the leaf, untouched
      ``max_norm = 0``           zeros
      ``max_norm = inf``         identity
      NaN / inf in a leaf        that leaf becomes all NaN, other leaves are
                                 clipped normally; its ``norm`` stat is NaN/inf
      negative static value      ``ValueError`` at construction
      negative traced value      clamped to 0
      integer / ``float0`` leaf  passed through
      =========================  ==============================================

    Args:
      max_norm: the largest p-norm allowed per leaf: a float, a scalar array, or
        a schedule of the step count.
      ord: 1, 2, ``inf``, or any float p > 0. ``None`` (the default) means 2; it
        keeps ``optax.inject_hyperparams`` from injecting the order as an array.
      axis_name: under ``shard_map``/``pmap``, the axis (or axes) the leaves are
        sharded over, so each leaf's norm covers all its shards. With
        ``stacked=True`` it must not split the layer axis: the shards' layers
        differ, and psumming their norms would mix them (not detected).
      stacked: every leaf's leading axis indexes stacked layers (``nn.scan``,
        ``lax.scan`` over a layer stack): each layer is clipped by its own norm,
        and the stats hold one norm and scale per layer
        (``stats(state, per_leaf=True)`` reports them). Scalars are one layer.
        Wrap the clipper in ``optax.masked`` to apply it to the stacked subtree only.

    Returns:
      The clipper; its state is ``ClipByNormState(count, stats)`` with one norm
      and scale per leaf (per layer when ``stacked``).

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_norm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.6, 0.0])}
      >>> out, _ = tx.update(grads, tx.init(grads))
      >>> out["a"].tolist(), out["b"].tolist()
      ([0.6000000238418579, 0.800000011920929], [0.6000000238418579, 0.0])

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
      neural networks", ICML 2013.
    """
    spec = stacked_spec(ClipSpec(
        "clip_by_norm", scope="leaf", ord=validate_ord(ord), axis_name=validate_axis_name(axis_name)
    ), stacked)
    return make_clipper(spec, fixed_threshold(max_norm, "max_norm"), state_cls=ClipByNormState)


@register_factory(threshold="max_norm", limit_is_threshold=True)
def clip_by_global_norm(
    max_norm: Threshold,
    *,
    ord: float | None = None,
    eps: float = 0.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescales all gradients together so their global p-norm is at most ``max_norm``.

    ``out = g * min(1, max_norm / (||g||_p + eps))`` with ``||g||_p`` taken over
    every entry of every leaf.

    Equivalents: Keras ``global_clipnorm``, ``torch.nn.utils.clip_grad_norm_``
    (``norm_type=ord``; pass ``eps=1e-6`` for torch's exact coefficient),
    ``tf.clip_by_global_norm``, ``optax.clip_by_global_norm`` (L2 only, and not
    global across ``shard_map`` shards).

    Formal guarantees:
      * for finite input, ``||out||_p <= max_norm * (1 + 1e-6)``;
      * with ``eps = 0``, input at or under ``max_norm`` comes back bit-identical;
        bf16/fp16 leaves are rounded toward zero after scaling, so the bound
        holds for them too;
        with ``eps > 0`` that holds when ``norm + eps <= max_norm``, as in torch;
      * clipping only rescales: direction and signs are kept;
      * one float32 (or wider) overflow-safe norm for the whole tree, read once;
      * with ``axis_name``, the norm is global across ``shard_map``/``pmap``
        shards: clipped gradients have global norm ``max_norm``, not
        ``max_norm * sqrt(shards)``;
      * stats: pre-clip norm, threshold and scale, no extra pass.

    Edge cases:

      =========================  ==============================================
      input                      output
      =========================  ==============================================
      zero gradients             zeros; finite ``jax.grad``
      norm exactly ``max_norm``  untouched (``eps = 0``)
      ``max_norm = 0``           zeros
      ``max_norm = inf``         identity, also for non-finite gradients
      NaN / inf anywhere         every entry NaN; ``norm`` stat NaN / inf,
                                 ``scale`` NaN, ``clipped`` true (torch
                                 zeroes finite entries on inf; optaxclip
                                 never does)
      negative static value      ``ValueError`` at construction
      negative traced value      clamped to 0
      bf16 grads, f32 threshold  works (``optax`` raises ``TypeError``)
      integer / ``float0`` leaf  passed through, not counted
      =========================  ==============================================

    Args:
      max_norm: the largest global p-norm allowed: a float, a scalar array of any
        float dtype, or a schedule of the step count.
      ord: 1, 2, ``inf``, or any float p > 0. ``None`` (the default) means 2; it
        keeps ``optax.inject_hyperparams`` from injecting the order as an array.
      eps: added to the norm in the denominator, as torch's ``1e-6``.
      axis_name: under ``shard_map``/``pmap``, the axis name (or tuple of names)
        the gradients are sharded over.

    Returns:
      The clipper; its state is ``ClipByGlobalNormState(count, stats)``.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0))
      >>> grads = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> float(oc.global_norm(updates)), float(oc.stats(state)["clip_by_global_norm/norm"])
      (1.0, 5.0)

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
      neural networks", ICML 2013.
    """
    spec = ClipSpec(
        "clip_by_global_norm",
        scope="global",
        ord=validate_ord(ord),
        eps=validate_eps(eps),
        axis_name=validate_axis_name(axis_name),
    )
    return make_clipper(
        spec, fixed_threshold(max_norm, "max_norm"), state_cls=ClipByGlobalNormState
    )


@register_factory(threshold="threshold", limit_is_threshold=True)
def clip_by_block_rms(
    threshold: Threshold, *, axis_name: AxisName = None, stacked: bool = False
) -> optax.GradientTransformationExtraArgs:
    """Clips each leaf so its root-mean-square is at most ``threshold``.

    ``rms = ||g_leaf||_2 / sqrt(size)``; ``out_leaf = g_leaf * min(1, threshold / rms)``.

    Equivalents: ``optax.clip_by_block_rms``; the per-block update clipping of
    Adafactor (Shazeer and Stern, 2018). No Keras or PyTorch built-in.

    Formal guarantees:
      * for finite input, ``rms(out_leaf) <= threshold * (1 + 1e-6)`` per leaf;
      * a leaf at or under the threshold comes back bit-identical;
      * rescaling only; structure and dtypes kept; norms overflow-safe;
      * stats hold each leaf's pre-clip RMS, scale and clipped flag.

    Edge cases:

      ===========================  ============================================
      input                        output
      ===========================  ============================================
      zero leaf / empty leaf       unchanged; finite ``jax.grad``
      RMS ``<= threshold``         the leaf, untouched, as computed: the
                                   float32 RMS can round 1 ulp above an
                                   exact one (then a scale of ``1 - 2^-24``)
      ``threshold = 0``            zeros
      ``threshold = inf``          identity
      NaN / inf in a leaf          that leaf all NaN; its stat NaN / inf
      negative static threshold    ``ValueError`` at construction
      integer / ``float0`` leaf    passed through
      ===========================  ============================================

    Args:
      threshold: the largest RMS allowed per leaf: a float, a scalar array, or a
        schedule of the step count.
      axis_name: under ``shard_map``/``pmap``, the axis (or axes) the leaves are
        sharded over; each leaf's RMS then covers every shard (entries counted
        across shards too). With ``stacked=True`` it must not split the layer
        axis (the shards' layers differ; not detected).
      stacked: every leaf's leading axis indexes stacked layers: each layer is
        a block with its own RMS (its entries only), and the stats hold one
        RMS and scale per layer. Scalars are one block.

    Returns:
      The clipper; its state is ``ClipByBlockRmsState(count, stats)`` with one
      RMS and scale per leaf (per layer when ``stacked``).

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_block_rms(1.0)
      >>> grads = [jnp.array([4.0, 0.0, 0.0, 0.0])]
      >>> out, _ = tx.update(grads, tx.init(grads))
      >>> out[0].tolist()  # RMS was 2.0
      [2.0, 0.0, 0.0, 0.0]

    References:
      Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost", ICML 2018.
    """
    spec = stacked_spec(ClipSpec(
        "clip_by_block_rms", scope="leaf", rms=True, axis_name=validate_axis_name(axis_name)
    ), stacked)
    rule = fixed_threshold(threshold, "threshold")
    return make_clipper(spec, rule, state_cls=ClipByBlockRmsState)
