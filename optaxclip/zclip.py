"""ZClip: clips gradient-norm spikes detected by a z-score against EMA statistics."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _scaling, _state, _validate
from optaxclip._norms import AxisName
from optaxclip._state import ClipStats

Array = jax.Array

__all__ = ["ZClipState", "zclip"]

_MODES = ("zscore", "mean", "percentile")


class ZClipState(NamedTuple):
    """State of ``zclip``.

    Attributes:
      count: number of updates so far (int32).
      stats: ``ClipStats`` of the last update (global norm, threshold, scale).
      ema_mean: EMA of the (adaptively clipped) gradient norm; 0 until warmup ends.
      ema_var: EMA of its squared deviation; 0 until warmup ends.
      warmup_norms: the finite norms seen during warmup (float32[warmup_steps]).
      num_warmup: how many finite warmup norms were recorded; the EMAs are live
        once it reaches ``warmup_steps``.
    """

    count: Array
    stats: ClipStats
    ema_mean: Array
    ema_var: Array
    warmup_norms: Array
    num_warmup: Array


_state.register_state(ZClipState, "zclip", extra_fields=("ema_mean", "ema_var"))


def zclip(
    *,
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    mode: str = "zscore",
    max_norm: float | None = 1.0,
    eps: float = 1e-6,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """ZClip: clips the global norm when its z-score against EMA statistics is too high.

    With ``mu, sigma^2`` the EMA mean and variance of past norms and
    ``z = (||g|| - mu) / (sigma + eps)``, a step is a spike when ``z > z_thresh``;
    a spike is clipped to ``mu + z_thresh^2 * sigma / z`` (``mode="zscore"``, the
    paper's reciprocal rule: the bigger the outlier, the harder the clip) or to
    ``mu`` (``mode="mean"``). ``mode="percentile"`` clips any norm above
    ``mu + z_thresh * sigma`` to that value. The threshold is then capped at
    ``max_norm``.

    Update order, as in the authors' reference implementation, per step:

    1. *Warmup* (the first ``warmup_steps`` finite norms): record the norm and
       clip to ``max_norm`` (no clipping if None). When the last warmup norm is
       recorded, ``mu`` and ``sigma^2`` are set to the mean and population
       variance of the warmup norms.
    2. *After warmup*: compute ``z`` from the current ``mu, sigma``, clip with
       ``min(adaptive threshold, max_norm)``, then update the EMAs with the
       adaptively clipped norm ``x`` (the raw norm when it was not a spike; the
       ``max_norm`` cap is not fed back, as in the reference):
       ``mu <- alpha mu + (1 - alpha) x``, then
       ``sigma^2 <- alpha sigma^2 + (1 - alpha) (x - mu)^2`` with the *new* ``mu``.

    Non-finite norms never enter the warmup buffer or the EMAs (the reference
    would make them NaN for good); that step's output is NaN (library policy)
    and it does not count towards warmup.

    Equivalents: ``zclip.ZClip`` (PyTorch/Lightning reference). No Keras, PyTorch
    or optax built-in.

    Formal guarantees:
      * for finite input, ``||out|| <= threshold * (1 + 1e-6)`` with the stats'
        ``threshold`` (for a non-spike step the stats hold the spike boundary
        ``mu + z_thresh (sigma + eps)``, capped at ``max_norm``);
      * a non-spike norm under ``max_norm`` comes back bit-identical;
      * rescaling only; one float32 overflow-safe global norm per step; with
        ``axis_name`` it covers all shards, so every shard keeps the same EMAs.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      warmup steps                 clipped to ``max_norm`` only
      zero gradients               zeros; the EMAs see 0
      constant norms (sigma = 0)   any larger norm is a spike, clipped to
                                   ``mu`` (every mode)
      NaN / inf norm               every entry NaN; EMAs and warmup untouched
      ``max_norm = None``          no absolute cap (relative only)
      invalid static argument      ``ValueError`` naming it
      ===========================  ===========================================

    Args:
      alpha: EMA smoothing factor in [0, 1).
      z_thresh: z-score above which a norm is a spike (> 0).
      warmup_steps: number of finite norms that initialise the EMAs (>= 1).
      mode: ``"zscore"`` (reciprocal rule), ``"mean"`` or ``"percentile"``.
      max_norm: absolute cap on the threshold at every step, warmup included;
        None disables it.
      eps: added to ``sigma`` in the z-score, as the reference's ``1e-6``.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.zclip(warmup_steps=2, max_norm=None)
      >>> state = tx.init(None)
      >>> for norm in [1.0, 3.0, 100.0]:
      ...     out, state = tx.update([jnp.array([norm])], state)
      >>> float(oc.stats(state)["zclip/threshold"]) < 3.0, bool(oc.stats(state)["zclip/clipped"])
      (True, True)

    References:
      Kumar, Owen, Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training", 2025.
    """
    alpha = _validate.validate_real(
        alpha, "alpha", low=0.0, high=1.0, high_open=True,
        hint="At 1 the EMAs never move. Try 0.97.",
    )
    z_thresh = _validate.validate_real(z_thresh, "z_thresh", low=0.0, high=math.inf, low_open=True)
    warmup_steps = _validate.validate_int(warmup_steps, "warmup_steps")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
    if max_norm is not None:
        _validate.validate_threshold(max_norm, "max_norm")
    eps = _validate.validate_eps(eps)
    axis_name = _validate.validate_axis_name(axis_name)
    cap = math.inf if max_norm is None else max_norm

    def init_fn(params: Any) -> ZClipState:
        del params
        zero = jnp.zeros([], jnp.int32)
        return ZClipState(
            count=zero,
            stats=_state.initial_stats(jnp.zeros([]), _scaling.threshold_at(cap, zero)),
            ema_mean=jnp.zeros([], jnp.float32),
            ema_var=jnp.zeros([], jnp.float32),
            warmup_norms=jnp.zeros([warmup_steps], jnp.float32),
            num_warmup=zero,
        )

    def update_fn(updates: Any, state: ZClipState, params: Any = None, **extra):
        del params, extra
        norm = _norms.global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        limit = _scaling.threshold_at(cap, state.count).astype(jnp.float32)
        in_warmup = state.num_warmup < warmup_steps

        # Warmup: record the norm; the last one initialises the EMAs.
        record = finite & in_warmup
        warmup_norms = jnp.where(
            record, state.warmup_norms.at[state.num_warmup].set(norm), state.warmup_norms
        )
        num_warmup = state.num_warmup + record.astype(jnp.int32)
        first_mean = jnp.mean(warmup_norms)
        first_var = jnp.mean(jnp.square(warmup_norms - first_mean))
        warmup_done = record & (num_warmup == warmup_steps)

        # After warmup: z-score against the current EMAs.
        std = jnp.sqrt(state.ema_var)
        denominator = std + eps
        zscore = (norm - state.ema_mean) / jnp.where(denominator > 0, denominator, 1)
        if mode == "percentile":
            boundary = state.ema_mean + z_thresh * std
            spike = norm > boundary
            adaptive = boundary
        else:
            boundary = state.ema_mean + z_thresh * denominator
            spike = zscore > z_thresh
            if mode == "zscore":
                safe_z = jnp.where(spike, zscore, 1)
                adaptive = state.ema_mean + z_thresh * z_thresh * std / safe_z
            else:
                adaptive = state.ema_mean
        spike = spike & ~in_warmup
        relative = jnp.where(spike, adaptive, boundary)
        threshold = jnp.where(in_warmup, limit, jnp.minimum(relative, limit))

        fed_back = jnp.where(spike, adaptive, norm)
        new_mean = alpha * state.ema_mean + (1 - alpha) * fed_back
        new_var = alpha * state.ema_var + (1 - alpha) * jnp.square(fed_back - new_mean)
        update_ema = finite & ~in_warmup
        ema_mean = jnp.where(update_ema, new_mean, state.ema_mean)
        ema_var = jnp.where(update_ema, new_var, state.ema_var)
        ema_mean = jnp.where(warmup_done, first_mean, ema_mean)
        ema_var = jnp.where(warmup_done, first_var, ema_var)

        scale, clipped = _scaling.scale_factor(norm, threshold)
        out = jax.tree.map(lambda g: _scaling.apply_scale(g, scale), updates)
        return out, ZClipState(
            count=optax.safe_increment(state.count),
            stats=_state.make_stats(norm, threshold, scale, clipped),
            ema_mean=ema_mean,
            ema_var=ema_var,
            warmup_norms=warmup_norms,
            num_warmup=num_warmup,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
