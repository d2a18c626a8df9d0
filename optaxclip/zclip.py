"""ZClip: clips gradient-norm spikes detected by a z-score against EMA statistics."""

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
    validate_eps,
    validate_int,
    validate_real,
    validate_threshold,
)

Array = jax.Array

__all__ = ["ZClipState", "zclip"]

_MODES = ("zscore", "mean", "percentile")


class ZClipState(NamedTuple):
    """State of ``zclip``.

    Attributes:
      count: number of updates so far (int32).
      stats: ``ClipStats`` of the last update (global norm, threshold, scale).
      ema_mean: EMA of the (adaptively clipped) gradient norm; 0 until warmup ends.
      ema_std: EMA standard deviation of it (the square root of the EMA of
        squared deviations); 0 until warmup ends.
      warmup: the finite norms seen during warmup (a ``History`` of
        ``warmup_steps`` slots); the EMAs are live once it is full.
    """

    count: Array
    stats: ClipStats
    ema_mean: Array
    ema_std: Array
    warmup: History


@register_factory(threshold="max_norm", test_kwargs={"warmup_steps": 3})
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
    ``max_norm``. One expression decides both what is a spike and where the
    clip boundary is: a step is a spike exactly when its norm is above the
    ``threshold`` the stats report for a non-spike step, so a step that is not
    a spike is never clipped by the relative rule.

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
       ``sigma`` itself is stored and updated scaled by its largest term, so a
       huge but finite norm (above 1.8e19, whose square overflows float32)
       gives a large finite ``sigma``, not an infinite threshold.

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
      * rescaling only; one float32 (float64 for float64 gradients)
        overflow-safe global norm per step; with
        ``axis_name`` it covers all shards, so every shard keeps the same EMAs.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      warmup steps                 clipped to ``max_norm`` only
      zero gradients               zeros; the EMAs see 0
      constant norms (sigma = 0)   any larger norm is a spike, clipped to
                                   ``mu`` (every mode); ``mu`` and ``sigma``
                                   stay exactly as they were
      NaN / inf norm               every entry NaN, in warmup too and with
                                   ``max_norm=None``; EMAs and warmup
                                   untouched
      a huge finite norm           clipped as any spike; the EMAs stay
                                   finite
      ``max_norm = None``          no absolute cap (relative only)
      invalid static argument      ``ValueError`` naming it
      ===========================  ===========================================

    Args:
      alpha: EMA smoothing factor in [0, 1).
      z_thresh: z-score above which a norm is a spike (> 0; ``inf``: never a
        spike, so only ``max_norm`` clips).
      warmup_steps: number of finite norms that initialise the EMAs (>= 1).
      mode: ``"zscore"`` (reciprocal rule), ``"mean"`` or ``"percentile"``.
      max_norm: absolute cap on the threshold at every step, warmup included;
        None disables it.
      eps: added to ``sigma`` in the z-score, as the reference's ``1e-6``.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

    Returns:
      The clipper; its state is
      ``ZClipState(count, stats, ema_mean, ema_std, warmup)``.

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
    alpha = validate_real(
        alpha, "alpha", low=0.0, high=1.0, high_open=True,
        hint="It is the EMAs' decay: at 1 they would never move. Try 0.97.",
    )
    z_thresh = validate_real(z_thresh, "z_thresh", low=0.0, high=math.inf, low_open=True)
    warmup_steps = validate_int(warmup_steps, "warmup_steps")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
    if max_norm is not None:
        validate_threshold(max_norm, "max_norm")
    eps = validate_eps(eps)
    cap = math.inf if max_norm is None else max_norm
    spec = ClipSpec(
        "zclip",
        scope="global",
        axis_name=validate_axis_name(axis_name),
        stat_fields=("ema_mean", "ema_std"),
        strict_nonfinite=True,
    )

    def init(params: Any) -> dict[str, Any]:
        dtype = _history.dtype_for(params)
        return {
            "ema_mean": jnp.zeros([], dtype),
            "ema_std": jnp.zeros([], dtype),
            "warmup": _history.empty(warmup_steps, dtype),
        }

    def threshold(norm: Array, state: ZClipState, params: Any) -> tuple[Array, dict]:
        del params
        norm = norm.astype(state.ema_mean.dtype)
        finite = jnp.isfinite(norm)
        limit = _scaling.threshold_at(cap, state.count).astype(norm.dtype)
        in_warmup = state.warmup.num_recorded < warmup_steps

        # Warmup: record the norm; the last one initialises the EMAs.
        record = finite & in_warmup
        warmup = _history.record(state.warmup, norm, record)
        warmup_done = record & (warmup.num_recorded == warmup_steps)
        first_mean, first_std = _history.mean_std(warmup)

        # After warmup, one boundary decides both "spike" and the clip limit.
        mean, std = state.ema_mean, state.ema_std
        spread = std if mode == "percentile" else std + eps
        # z_thresh = inf: nothing is a spike, whatever the spread (inf * 0 is NaN).
        boundary = jnp.full_like(mean, math.inf) if math.isinf(z_thresh) \
            else mean + z_thresh * spread
        spike = ~in_warmup & (norm > boundary)
        if mode == "zscore":
            # mu + z^2 sigma / z with z = (norm - mu) / (sigma + eps), written so it
            # neither divides by zero (sigma = eps = 0) nor overflows: the ratio is
            # below 1 / z_thresh on a spike.
            excess = jnp.where(spike, norm - mean, 1)
            adaptive = mean + z_thresh * std * (z_thresh * spread / excess)
        elif mode == "mean":
            adaptive = mean
        else:
            adaptive = boundary
        relative = jnp.where(spike, adaptive, boundary)
        threshold = jnp.where(in_warmup, limit, jnp.minimum(relative, limit))

        # The EMA step in increment form: with d = x - mu, mu' = mu + (1 - alpha) d and
        # x - mu' = alpha d exactly, so the deviation is not the difference of two
        # nearly equal numbers. (alpha mu + (1 - alpha) x, then x - mu', rounds
        # differently eagerly and under jit, and turned sigma = 0 into 4e-8 on a
        # constant norm.) d cannot overflow: both norms are finite and >= 0.
        fed_back = jnp.where(spike, adaptive, norm)
        step = fed_back - mean
        new_mean = mean + (1 - alpha) * step
        new_std = _history.scaled_rms(alpha, std, 1 - alpha, alpha * step)
        live = finite & ~in_warmup
        ema_mean = jnp.where(warmup_done, first_mean, jnp.where(live, new_mean, mean))
        ema_std = jnp.where(warmup_done, first_std, jnp.where(live, new_std, std))
        return threshold, {"ema_mean": ema_mean, "ema_std": ema_std, "warmup": warmup}

    rule = ThresholdRule(
        threshold=threshold, init=init, fields=("ema_mean", "ema_std", "warmup")
    )
    return make_clipper(spec, rule, state_cls=ZClipState)
