"""Guards that skip a whole optimizer step on non-finite or spiking gradients.

``skip_nonfinite(inner)`` and ``skip_on_spike(inner)`` wrap an inner
transformation (``optax.adam(...)``, or a whole chain). On a skipped step they
return zero updates and leave the inner state exactly as it was, so moment
accumulators never see the bad gradient. Unlike ``optax.apply_if_finite``, they
never let a NaN through after some number of failures unless asked to with
``max_consecutive_skips``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _state, _validate
from optaxclip._norms import AxisName

Array = jax.Array

__all__ = [
    "SkipNonfiniteState",
    "SkipNonfiniteStats",
    "SkipOnSpikeState",
    "SkipOnSpikeStats",
    "skip_nonfinite",
    "skip_on_spike",
]


class SkipNonfiniteStats(NamedTuple):
    """What ``skip_nonfinite`` did; ``optaxclip.stats`` reports it.

    Attributes:
      skipped: whether the last step was skipped.
      num_skipped: skipped steps so far (int32, saturating).
      consecutive_skips: skipped steps in a row up to the last one.
      norm: the last step's gradient global norm (float32).
    """

    skipped: Array
    num_skipped: Array
    consecutive_skips: Array
    norm: Array


class SkipOnSpikeStats(NamedTuple):
    """What ``skip_on_spike`` did; ``optaxclip.stats`` reports it.

    Attributes:
      skipped, num_skipped, consecutive_skips, norm: as in ``SkipNonfiniteStats``.
      threshold: the spike threshold ``mean + z std`` the last norm was tested
        against (``inf`` before ``min_history`` norms were recorded).
    """

    skipped: Array
    num_skipped: Array
    consecutive_skips: Array
    norm: Array
    threshold: Array


class SkipNonfiniteState(NamedTuple):
    """State of ``skip_nonfinite``: the wrapped state and the guard's stats.

    The stats sit in their own node so that ``optaxclip.stats`` reports both
    them and any clipper inside ``inner_state``.
    """

    inner_state: Any
    guard: SkipNonfiniteStats


class SkipOnSpikeState(NamedTuple):
    """State of ``skip_on_spike``.

    Attributes:
      inner_state: the wrapped transformation's state (untouched on skipped steps).
      guard: ``SkipOnSpikeStats`` of the last step.
      norms: ring buffer of the last ``window`` norms of applied steps.
      losses: ring buffer of the last ``window`` losses of applied steps (used
        only when ``loss`` is passed).
      num_recorded, num_losses: values recorded so far (int32, saturating).
      position, loss_position: the slots the next norm and loss are written to.
    """

    inner_state: Any
    guard: SkipOnSpikeStats
    norms: Array
    losses: Array
    num_recorded: Array
    num_losses: Array
    position: Array
    loss_position: Array


_state.register_state(
    SkipNonfiniteStats, "skip_nonfinite", extra_fields=("skipped", "num_skipped", "norm")
)
_state.register_state(
    SkipOnSpikeStats,
    "skip_on_spike",
    extra_fields=("skipped", "num_skipped", "norm", "threshold"),
)


def _check_max_skips(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(
            f"max_consecutive_skips must be None (never apply a bad step) or an int "
            f">= 0; got {value!r}."
        )
    return int(value)


def _select(skip: Array, old: Any, new: Any) -> Any:
    return jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)


def _zeros_like(updates: Any) -> Any:
    return jax.tree.map(
        lambda u: jnp.zeros_like(u) if _norms.is_float_leaf(u) else u, updates
    )


def _forced(consecutive: Array, max_skips: int | None) -> Array:
    """Whether this step must be applied whatever it is (the opt-in release valve)."""
    if max_skips is None:
        return jnp.zeros([], bool)
    return consecutive >= max_skips


def _bookkeeping(skip: Array, guard: Any) -> tuple[Array, Array]:
    num_skipped, consecutive = guard.num_skipped, guard.consecutive_skips
    return (
        jnp.where(skip, optax.safe_increment(num_skipped), num_skipped),
        jnp.where(skip, optax.safe_increment(consecutive), jnp.zeros_like(consecutive)),
    )


def _loss_value(extra_args: dict) -> Array | None:
    loss = extra_args.get("loss")
    return None if loss is None else jnp.asarray(loss, jnp.float32).reshape(())


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive_skips: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole inner update when the gradients (or the loss) are not finite.

    ``skip = not isfinite(||g||) or not isfinite(loss)``; a skipped step returns
    zeros and keeps the inner state bit-identical; otherwise the inner update
    is returned as is.

    Equivalents: ``optax.apply_if_finite`` (which lets the bad step through after
    ``max_consecutive_errors``), Keras/PyTorch AMP loss scalers' step skipping.

    Formal guarantees:
      * a skipped step's updates are exact zeros and its inner state is the
        previous one, bit for bit: no NaN ever reaches the moments;
      * with ``max_consecutive_skips=None`` (default) that holds forever; with
        ``N``, the step after ``N`` consecutive skips is applied whatever it is
        (``optax.apply_if_finite`` semantics, opt-in);
      * no host callback or Python branch on traced values (jit/TPU friendly);
        with ``axis_name`` the norm, hence the decision, is the same on every
        shard.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      NaN / inf gradient entry     zeros; inner state kept; ``skipped`` True
      ``loss=nan`` extra argument  skipped, even with finite gradients
      zero gradients               applied (finite)
      ===========================  ===========================================

    Args:
      inner: the transformation to guard, e.g. ``optax.adam(1e-3)``.
      max_consecutive_skips: None (never apply a non-finite step) or N >= 0.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = oc.skip_nonfinite(optax.adam(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> out, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state)
      >>> out["w"].tolist(), int(oc.stats(state)["skip_nonfinite/num_skipped"])
      ([0.0, 0.0], 1)

    References:
      Micikevicius et al., "Mixed Precision Training", ICLR 2018 (skipping steps
      whose gradients overflowed).
    """
    max_skips = _check_max_skips(max_consecutive_skips)
    axis_name = _validate.validate_axis_name(axis_name)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> SkipNonfiniteState:
        zero = jnp.zeros([], jnp.int32)
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            guard=SkipNonfiniteStats(
                skipped=jnp.zeros([], bool),
                num_skipped=zero,
                consecutive_skips=zero,
                norm=jnp.zeros([], jnp.float32),
            ),
        )

    def update_fn(updates: Any, state: SkipNonfiniteState, params: Any = None, **extra_args):
        norm = _norms.global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        bad = ~jnp.isfinite(norm)
        loss = _loss_value(extra_args)
        if loss is not None:
            bad = bad | ~jnp.isfinite(loss)
        skip = bad & ~_forced(state.guard.consecutive_skips, max_skips)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        num_skipped, consecutive = _bookkeeping(skip, state.guard)
        return _select(skip, _zeros_like(inner_updates), inner_updates), SkipNonfiniteState(
            inner_state=_select(skip, state.inner_state, inner_state),
            guard=SkipNonfiniteStats(skip, num_skipped, consecutive, norm),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _spike_threshold(buffer: Array, filled: Array, z: float, min_history: int) -> Array:
    """``mean + z * std`` (population std) of the first ``filled`` entries, else inf."""
    valid = jnp.arange(buffer.shape[0]) < filled
    count = jnp.maximum(filled, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, buffer, 0)) / count
    var = jnp.sum(jnp.where(valid, jnp.square(buffer - mean), 0)) / count
    return jnp.where(filled >= min_history, mean + z * jnp.sqrt(var), jnp.inf)


def _record(buffer: Array, position: Array, count: Array, value: Array, keep: Array, size: int):
    buffer = jnp.where(keep, buffer.at[position].set(value), buffer)
    count = jnp.where(keep, optax.safe_increment(count), count)
    return buffer, jnp.where(keep, (position + 1) % size, position), count


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    z: float = 6.0,
    min_history: int = 64,
    max_consecutive_skips: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole inner update on a non-finite or spiking gradient norm (or loss).

    With ``m, s`` the mean and population std of the norms of the last
    ``window`` *applied* steps, a step is skipped when ``||g||`` is not finite or
    ``||g|| > m + z s`` (tested once ``min_history`` norms are recorded). The
    same test runs on the optional ``loss`` extra argument, with its own window
    of applied-step losses: ``tx.update(grads, state, params, loss=loss)``.

    Skipped steps are not recorded, so a spike cannot inflate the window and
    hide the next one. The flip side: after a genuine, lasting jump in the norm
    level every step looks like a spike; ``max_consecutive_skips=N`` applies
    (and records) the step after ``N`` consecutive skips, whatever it is, so the
    window can adapt. The default None never applies a flagged step.

    Equivalents: the "skip the update on a loss/gradient spike" heuristics of
    large-scale LM training (e.g. PaLM restarts and skips batches). No Keras,
    PyTorch or optax built-in; ``optax.apply_if_finite`` covers the non-finite
    case only.

    Formal guarantees:
      * a skipped step returns exact zeros and keeps the inner state bit-identical;
      * a finite step under the threshold (or before ``min_history``) is exactly
        the inner update; the threshold used is in the stats;
      * fixed memory (two float32 buffers of ``window``); no host callback; with
        ``axis_name`` the norm, hence the decision, is the same on every shard.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      fewer than ``min_history``   only non-finite steps are skipped
      NaN / inf norm or loss       skipped, never recorded
      constant norms (std = 0)     any larger norm is a spike
      zero gradients               applied and recorded (norm 0)
      invalid static argument      ``ValueError`` naming it
      ===========================  ===========================================

    Args:
      inner: the transformation to guard, e.g. ``optax.adam(1e-3)``.
      window: how many recent applied steps the statistics cover (>= 1).
      z: spike threshold in standard deviations (> 0).
      min_history: recorded steps needed before spikes are tested (1..window).
      max_consecutive_skips: None (never apply a flagged step) or N >= 0.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = oc.skip_on_spike(optax.sgd(1.0), window=4, z=3.0, min_history=4)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0]:
      ...     out, state = tx.update(jnp.array([g]), state)
      >>> out.tolist(), bool(oc.stats(state)["skip_on_spike/skipped"])
      ([0.0], True)

    References:
      Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", JMLR
      2023 (skipping batches around loss spikes).
    """
    window = _validate.validate_int(window, "window")
    min_history = _validate.validate_int(min_history, "min_history")
    if min_history > window:
        raise ValueError(
            f"min_history ({min_history}) must be <= window ({window}): the window "
            f"can never hold that many norms."
        )
    z = _validate.validate_real(z, "z", low=0.0, high=math.inf, low_open=True, high_open=True)
    max_skips = _check_max_skips(max_consecutive_skips)
    axis_name = _validate.validate_axis_name(axis_name)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> SkipOnSpikeState:
        zero = jnp.zeros([], jnp.int32)
        empty = jnp.zeros([window], jnp.float32)
        return SkipOnSpikeState(
            inner_state=inner.init(params),
            guard=SkipOnSpikeStats(
                skipped=jnp.zeros([], bool),
                num_skipped=zero,
                consecutive_skips=zero,
                norm=jnp.zeros([], jnp.float32),
                threshold=jnp.full([], jnp.inf, jnp.float32),
            ),
            norms=empty,
            losses=empty,
            num_recorded=zero,
            num_losses=zero,
            position=zero,
            loss_position=zero,
        )

    def update_fn(updates: Any, state: SkipOnSpikeState, params: Any = None, **extra_args):
        norm = _norms.global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        filled = jnp.minimum(state.num_recorded, window)
        threshold = _spike_threshold(state.norms, filled, z, min_history)
        bad = ~jnp.isfinite(norm) | (norm > threshold)
        loss = _loss_value(extra_args)
        if loss is not None:
            loss_filled = jnp.minimum(state.num_losses, window)
            loss_threshold = _spike_threshold(state.losses, loss_filled, z, min_history)
            bad = bad | ~jnp.isfinite(loss) | (loss > loss_threshold)
        skip = bad & ~_forced(state.guard.consecutive_skips, max_skips)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        num_skipped, consecutive = _bookkeeping(skip, state.guard)
        norms, position, num_recorded = _record(
            state.norms, state.position, state.num_recorded, norm,
            ~skip & jnp.isfinite(norm), window,
        )
        losses, loss_position, num_losses = state.losses, state.loss_position, state.num_losses
        if loss is not None:
            losses, loss_position, num_losses = _record(
                losses, loss_position, num_losses, loss, ~skip & jnp.isfinite(loss), window
            )
        return _select(skip, _zeros_like(inner_updates), inner_updates), SkipOnSpikeState(
            inner_state=_select(skip, state.inner_state, inner_state),
            guard=SkipOnSpikeStats(skip, num_skipped, consecutive, norm, threshold),
            norms=norms,
            losses=losses,
            num_recorded=num_recorded,
            num_losses=num_losses,
            position=position,
            loss_position=loss_position,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
