"""Update clippers: they clip the optimizer's *update*, after the preconditioner.

A gradient clipper sits ahead of the moment accumulators
(``optax.chain(oc.clip_by_global_norm(1.0), optax.adam(lr))``). An update
clipper sits after them on purpose: it bounds the step that Adam's
preconditioner produced, which is where an under-estimated second moment shows
up as a spike a few steps later (Wortsman et al., 2023). Their ``ClipSpec`` has
``role="update"``, so ``check_order`` accepts them after ``scale_by_adam``
while still rejecting a gradient clipper there::

    tx = optax.chain(optax.scale_by_adam(), oc.clip_update_rms(1.0), optax.scale(-lr))

Put them between the preconditioner and the learning-rate scale, as above: the
clipped quantity is then the preconditioned direction, whose size does not
follow the learning-rate schedule.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _history, _scaling
from optaxclip._clipper import ThresholdRule, fixed_threshold, make_clipper
from optaxclip._history import History
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold
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

__all__ = ["ClipUpdateNormState", "ClipUpdateRmsState", "clip_update_norm", "clip_update_rms"]


class ClipUpdateRmsState(NamedTuple):
    """State of ``clip_update_rms``: step count and per-leaf stats of the last update."""

    count: Array
    stats: ClipStats


class ClipUpdateNormState(NamedTuple):
    """State of ``clip_update_norm``.

    Attributes:
      count: number of updates so far (int32).
      stats: ``ClipStats`` of the last update (global update norm, threshold,
        scale).
      history: the pre-clip norms of the last ``window`` finite, non-zero
        updates (``History``).
    """

    count: Array
    stats: ClipStats
    history: History


@register_factory(threshold="max_rms", limit_is_threshold=True)
def clip_update_rms(
    max_rms: Threshold, *, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """Clips each tensor of the optimizer's update so its RMS is at most ``max_rms``.

    ``rms(u) = ||u||_2 / sqrt(size(u))`` per leaf; ``out = u * min(1, max_rms / rms(u))``.
    An *update* clipper: chain it after the preconditioner,
    ``optax.chain(optax.scale_by_adam(), oc.clip_update_rms(1.0), optax.scale(-lr))``.
    For Adam the preconditioned update ``m_hat / (sqrt(v_hat) + eps)`` has RMS
    near 1 when the second moment tracks the gradients; an RMS far above 1 means
    ``v`` under-estimates the current gradient scale (a stale second moment),
    and this clip bounds the step in that case.

    Equivalents: Adafactor's update clipping (``optax.adafactor(clipping_threshold=1.0)``
    is ``optax.clip_by_block_rms`` right after ``scale_by_factored_rms``).
    StableAdamW (Wortsman et al.,
    2023) divides each tensor's learning rate by ``max(1, RMS(g^2 / v_hat))``:
    the same idea, measured on the gradient-to-moment ratio instead of the
    update. No Keras or PyTorch built-in.

    Formal guarantees:
      * for finite input, ``rms(out_leaf) <= max_rms * (1 + 1e-6)`` for every leaf;
      * a leaf at or under ``max_rms`` comes back bit-identical;
      * rescaling only: direction and signs are kept; structure and dtypes kept;
      * RMS accumulated in float32 or wider, overflow-safe; with ``axis_name``
        each leaf's RMS (entries counted too) covers every shard;
      * ``role="update"``: ``check_order`` accepts it after the moments.

    Edge cases:

      ===========================  ============================================
      input                        output
      ===========================  ============================================
      zero leaf / empty leaf       unchanged; finite ``jax.grad``
      RMS ``<= max_rms``           the leaf, untouched, as computed: the
                                   float32 RMS can round 1 ulp above an
                                   exact one (then a scale of ``1 - 2^-24``)
      ``max_rms = 0``              zeros
      ``max_rms = inf``            identity, also for non-finite updates
      NaN / inf in a leaf          that leaf all NaN; its ``norm`` stat NaN /
                                   inf, ``scale`` NaN
      negative static value        ``ValueError`` at construction
      bf16 / fp16 leaves           scaled in float32, rounded toward zero
      integer / ``float0`` leaf    passed through
      ===========================  ============================================

    Args:
      max_rms: the largest RMS allowed per leaf: a float, a scalar array or a
        schedule of the step count.
      axis_name: under ``shard_map``/``pmap``, the axis (or axes) the leaves are
        sharded over.

    Returns:
      The clipper; its state is ``ClipUpdateRmsState(count, stats)`` with one
      RMS and scale per leaf (the ``norm`` stats are RMS values).

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = optax.chain(optax.scale_by_adam(), oc.clip_update_rms(0.5))
      >>> params = {"w": jnp.zeros(4)}
      >>> out, state = tx.update({"w": jnp.array([1.0, -2.0, 3.0, -4.0])}, tx.init(params))
      >>> out["w"].round(3).tolist()  # Adam's first update is sign(g): RMS 1 -> 0.5
      [0.5, -0.5, 0.5, -0.5]
      >>> oc.check_order(optax.chain(optax.adam(1e-3), oc.clip_update_rms(1.0)), params)[-1].kind
      'update_clipper'

    References:
      Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost", ICML 2018 (update clipping).
      Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi and Schmidt, "Stable and
      low-precision training for large-scale vision-language models", NeurIPS
      2023 (StableAdamW).
    """
    spec = ClipSpec(
        "clip_update_rms", scope="leaf", role="update", rms=True,
        axis_name=validate_axis_name(axis_name),
    )
    rule = fixed_threshold(max_rms, "max_rms")
    return make_clipper(spec, rule, state_cls=ClipUpdateRmsState)


@register_factory(threshold="max_norm", test_kwargs={"window": 8, "min_history": 2})
def clip_update_norm(
    max_norm: Threshold | None = None,
    *,
    window: int = 128,
    z: float = 3.0,
    min_history: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips the global norm of the update to ``mean + z std`` of its recent history.

    With ``m, s`` the mean and population standard deviation of the last
    ``window`` recorded update norms, ``threshold = min(m + z s, max_norm)``
    once ``min_history`` norms are recorded (``max_norm`` alone before), and
    ``out = u * min(1, threshold / ||u||)``. An *update* clipper: chain it
    after the preconditioner,
    ``optax.chain(optax.scale_by_adam(), oc.clip_update_norm(), optax.scale(-lr))``.

    Decisions:

    * *What is recorded*: the pre-clip norm of every finite, non-zero update,
      after the threshold of the step was computed (a step is compared with the
      past only). Recording the unclipped norm, as Levanter does, keeps the
      threshold from collapsing: Adam's update norms are very regular, and a
      history of clipped values with a near-zero spread would clip every later
      rise back to the old mean for good. The price: a spike widens the window
      for ``window`` steps, so a second spike soon after is clipped less.
      Non-finite norms would poison the statistics and zero norms (a skipped or
      masked step) say nothing about the scale: neither is recorded.
    * *Warmup*: until ``min_history`` norms are recorded (default
      ``max(2, window // 2)``, Levanter's rule) the threshold is ``max_norm``
      (``inf`` when None): the relative clip is off.
    * *Non-finite updates*: the output is all NaN (library policy), also
      during warmup and with ``max_norm=None``; the stats show the NaN / inf
      norm; nothing is recorded. Wrap the optimizer in
      ``oc.skip_nonfinite(...)`` to drop such a step instead.
    * *Absolute cap*: ``max_norm`` bounds the threshold at every step, warmup
      included. A learning-rate warmup makes the update norm grow by design;
      chained before ``optax.scale_by_learning_rate`` the clip does not see it.

    Equivalents: Levanter's ``clip_update_by_historical_norm`` (window 128,
    ``sigma_factor`` 3, clipping after ``window // 2`` norms, unclipped norms
    recorded). No Keras, PyTorch or optax built-in.

    Formal guarantees:
      * for finite input, ``||out|| <= threshold * (1 + 1e-6)`` with the stats'
        ``threshold``; an update at or under it comes back bit-identical;
      * rescaling only: direction and signs are kept;
      * the threshold is finite and at most ``max_norm`` once ``min_history``
        norms are recorded, and stays finite after a huge but finite norm
        (the window statistics are computed scaled by their largest value);
      * fixed memory: ``window`` values (float32, float64 for float64 params);
        with ``axis_name`` the norm, hence the history, covers every shard;
      * ``role="update"``: ``check_order`` accepts it after the moments.

    Edge cases:

      ===========================  ============================================
      input                        output
      ===========================  ============================================
      fewer than ``min_history``   clipped to ``max_norm`` only (none if None)
      zero update                  zeros; not recorded
      constant norms (std = 0)     any larger norm is clipped to the mean
      NaN / inf norm               every entry NaN; not recorded
      a huge finite norm           clipped as any spike; threshold stays finite
      ``max_norm = 0``             zeros
      invalid static argument      ``ValueError`` naming it
      ===========================  ============================================

    Args:
      max_norm: optional absolute cap on the threshold (a float, scalar array or
        schedule); None: relative clipping only.
      window: how many recent update norms the statistics cover (>= 2).
      z: the threshold in standard deviations above the mean (>= 0).
      min_history: recorded norms needed before the relative clip starts
        (2..window); default ``max(2, window // 2)``.
      axis_name: under ``shard_map``/``pmap``, the axis the updates are sharded
        over.

    Returns:
      The clipper; its state is ``ClipUpdateNormState(count, stats, history)``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_update_norm(window=4, z=2.0, min_history=4)
      >>> state = tx.init(None)
      >>> for norm in [1.0, 1.2, 0.8, 1.0, 10.0]:
      ...     out, state = tx.update([jnp.array([norm])], state)
      >>> round(float(oc.stats(state)["clip_update_norm/threshold"]), 4), out[0].round(4).tolist()
      (1.2828, [1.2828])

    References:
      Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi and Schmidt, "Stable and
      low-precision training for large-scale vision-language models", NeurIPS
      2023 (loss spikes follow 1-8 steps after the second moment under-estimates
      the squared gradients; clipping the update avoids them).
      Levanter (Stanford CRFM), JAX training library, 2023-2025:
      ``clip_update_by_historical_norm``.
    """
    window = validate_int(window, "window", minimum=2)
    if min_history is None:
        min_history = max(2, window // 2)
    min_history = validate_int(min_history, "min_history", minimum=2)
    if min_history > window:
        raise ValueError(
            f"min_history ({min_history}) must be <= window ({window}): the window can "
            f"never hold that many norms."
        )
    z = validate_real(z, "z", low=0.0, high=math.inf, high_open=True)
    if max_norm is not None:
        validate_threshold(max_norm, "max_norm")
    cap = math.inf if max_norm is None else max_norm
    spec = ClipSpec(
        "clip_update_norm",
        scope="global",
        role="update",
        axis_name=validate_axis_name(axis_name),
        stat_fields=("history.num_recorded",),
        strict_nonfinite=True,
    )

    def init(params: Any) -> dict[str, Any]:
        return {"history": _history.empty(window, _history.dtype_for(params))}

    def threshold(norm: Array, state: ClipUpdateNormState, params: Any) -> tuple[Array, dict]:
        del params
        stored = norm.astype(state.history.values.dtype)
        mean, std = _history.mean_std(state.history)
        ready = _history.filled(state.history) >= min_history
        relative = jnp.where(ready, mean + z * std, jnp.inf)
        limit = _scaling.threshold_at(cap, state.count)
        history = _history.record(state.history, stored, jnp.isfinite(stored) & (stored > 0))
        return jnp.minimum(relative.astype(limit.dtype), limit), {"history": history}

    rule = ThresholdRule(threshold=threshold, init=init, fields=("history",))
    return make_clipper(spec, rule, state_cls=ClipUpdateNormState)
