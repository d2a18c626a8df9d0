"""Guards that skip a whole optimizer step on non-finite or spiking gradients.

``skip_nonfinite(inner)`` and ``skip_on_spike(inner)`` wrap an inner
transformation (``optax.adam(...)``, or a whole chain). On a skipped step they
return zero updates and leave the inner state exactly as it was, so moment
accumulators never see the bad gradient; the inner update sits behind a
``lax.cond`` and does not run. Unlike ``optax.apply_if_finite``, they
never let a NaN through after some number of failures unless asked to with
``skip_nonfinite(max_consecutive_skips=N)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optaxclip import _history, _norms, _spec, _state, _validate
from optaxclip._history import History
from optaxclip._registry import register_factory
from optaxclip._validate import (
    AxisName,
    validate_axis_name,
    validate_int,
    validate_real,
)

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
      num_skipped: skipped steps so far (int32, saturating).
      consecutive_skips: skipped steps in a row up to the last one; the last
        step was skipped exactly when it is above 0 (``skipped``).
      norm: the last step's gradient global norm (float32 or wider).
    """

    num_skipped: Array
    consecutive_skips: Array
    norm: Array

    @property
    def skipped(self) -> Array:
        """Whether the last step was skipped."""
        return jnp.asarray(self.consecutive_skips) > 0


class SkipOnSpikeStats(NamedTuple):
    """What ``skip_on_spike`` did; ``optaxclip.stats`` reports it.

    Attributes:
      num_skipped, consecutive_skips, norm: as in ``SkipNonfiniteStats``.
      threshold: the spike threshold ``mean + z std`` the last norm was tested
        against (``inf`` before ``min_history`` norms were recorded).
    """

    num_skipped: Array
    consecutive_skips: Array
    norm: Array
    threshold: Array

    @property
    def skipped(self) -> Array:
        """Whether the last step was skipped."""
        return jnp.asarray(self.consecutive_skips) > 0


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
      norms: the norms of the last ``window`` applied steps (a ``History``).
      losses: the losses of the last ``window`` applied steps (used only when
        ``loss`` is passed).
    """

    inner_state: Any
    guard: SkipOnSpikeStats
    norms: History
    losses: History


_state.register_report(
    SkipNonfiniteStats, "skip_nonfinite", ("skipped", "num_skipped", "norm")
)
_state.register_report(
    SkipOnSpikeStats, "skip_on_spike", ("skipped", "num_skipped", "norm", "threshold")
)


def _check_inner(inner: Any, guard: str) -> optax.GradientTransformationExtraArgs:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        hint = ""
        if callable(inner):
            hint = (
                f" {getattr(inner, '__name__', 'It')} looks like a factory: call it, e.g. "
                f"optaxclip.{guard}(optax.adam(1e-3))."
            )
        raise TypeError(
            f"{guard}: inner must be an optax.GradientTransformation, e.g. optax.adam(1e-3) "
            f"or an optax.chain(...); got {type(inner).__name__}.{hint}"
        )
    return optax.with_extra_args_support(inner)


def _check_max_skips(value: Any, *, minimum: int) -> int | None:
    if value is None:
        return None
    return validate_int(value, "max_consecutive_skips", minimum=minimum)


def _inner_unless(skip: Array, inner: Any, updates: Any, inner_state: Any, params: Any,
                  extra_args: dict) -> tuple[Any, Any]:
    """The inner update, or zero updates and ``inner_state`` as it was where ``skip``.

    One ``lax.cond``, so a skipped step runs nothing. The applying branch must be
    the *true* branch: XLA:CPU then writes the new moments into the donated
    buffers in place. With the branches the other way round it copied every state
    buffer out of the conditional (48 copies, 33 MiB of temporaries and 4.4x
    Adam's step time in a donated MLP update, against 6 copies, 11 MiB and
    1.1-1.6x), and the select form this replaced (the inner update always run,
    then ``where(skip, old, new)`` on the state) copied every donated moment
    buffer before updating it, since both the kept state and the updates read the
    old moments (18 copies, 22 MiB, 2.0-2.2x). Under ``jax.vmap`` with a batched
    ``skip`` the conditional is a select of both branches, i.e. the select form.

    Called eagerly (``skip`` is a concrete value), the choice is made in Python: a
    conditional of fresh branch functions would be compiled again on every call
    (150 ms against 4 ms per eager Adam update). Where the branches' types cannot
    be matched (jax 0.6 under ``shard_map``, whose ``eval_shape`` drops the varying
    manual axes the zeros need), the select form is used; its values are the same.
    """

    def apply(_: None) -> tuple[Any, Any]:
        return inner.update(updates, inner_state, params, **extra_args)

    def keep(_: None) -> tuple[Any, Any]:
        # Zeros typed like what the inner update returns (its dtypes and, under an
        # Explicit mesh, its shardings), which need not be the gradients' own.
        shapes = jax.eval_shape(apply, None)[0]
        return jax.tree.map(jnp.zeros_like, shapes), inner_state

    if not _validate.is_traced(skip):
        return keep(None) if bool(skip) else apply(None)
    try:
        return lax.cond(~skip, apply, keep, None)
    except TypeError:
        pass  # the branches' types differ: the select form below
    new_updates, new_state = apply(None)
    keep_where = lambda old, new: jnp.where(skip, old, new)
    return (jax.tree.map(keep_where, jax.tree.map(jnp.zeros_like, new_updates), new_updates),
            jax.tree.map(keep_where, inner_state, new_state))


def _counters(skip: Array, guard: Any) -> tuple[Array, Array]:
    num_skipped, consecutive = guard.num_skipped, guard.consecutive_skips
    return (
        jnp.where(skip, optax.safe_increment(num_skipped), num_skipped),
        jnp.where(skip, optax.safe_increment(consecutive), jnp.zeros_like(consecutive)),
    )


def _loss_value(extra_args: dict, axis_name: AxisName) -> Array | None:
    """The ``loss`` extra argument as a float32 scalar, averaged over ``axis_name``.

    Each shard passes its own loss; the mean over the axis (NaN and inf survive it)
    makes the skip decision and the recorded loss the same on every shard. A loss
    that is already the same on every shard comes back as it was, up to rounding.
    """
    loss = extra_args.get("loss")
    if loss is None:
        return None
    if jnp.size(loss) != 1:
        raise ValueError(
            f"loss must be a scalar (the step's mean loss); got an array of shape "
            f"{jnp.shape(loss)}. Pass loss=jnp.mean(per_example_losses)."
        )
    loss = jnp.asarray(loss, jnp.float32).reshape(())
    return loss if axis_name is None else lax.pmean(loss, axis_name)


def _fresh(tree: Any) -> Any:
    """Every leaf its own buffer, so that the whole state can be donated."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@register_factory(kind="guard")
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

    Cost: one read of the gradients for the norm, and the inner update behind one
    ``lax.cond`` (a skipped step runs none of it). The conditional's updates are
    materialised, one buffer the size of the updates, which the unguarded chain
    would have fused into ``apply_updates``; the donated moments are still
    updated in place. Under ``jax.vmap`` with a batched decision the conditional
    is a select: both branches run, and the moments are copied. On a GPU the
    predicate is read on the host once per step.

    Equivalents: ``optax.apply_if_finite`` (which lets the bad step through after
    ``max_consecutive_errors``), Keras/PyTorch AMP loss scalers' step skipping.

    Formal guarantees:
      * a skipped step's updates are exact zeros and its inner state is the
        previous one, bit for bit: no NaN ever reaches the moments;
      * with ``max_consecutive_skips=None`` (default) that holds forever; with
        ``N``, the step after ``N`` consecutive skips is applied whatever it is
        (``optax.apply_if_finite`` semantics, opt-in);
      * no host callback or Python branch on traced values (jit/TPU friendly);
        with ``axis_name`` the norm and the mean loss, hence the decision, are
        the same on every shard.

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
        sharded over. The ``loss`` extra argument, if given, is averaged over
        it, so a shard may pass its own local loss.

    Returns:
      The guarded transformation; its state is
      ``SkipNonfiniteState(inner_state, guard)``.

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
    max_skips = _check_max_skips(max_consecutive_skips, minimum=0)
    axis_name = validate_axis_name(axis_name)
    inner = _check_inner(inner, "skip_nonfinite")

    def init_fn(params: Any) -> SkipNonfiniteState:
        return _fresh(SkipNonfiniteState(
            inner_state=inner.init(params),
            guard=SkipNonfiniteStats(
                num_skipped=jnp.zeros([], jnp.int32),
                consecutive_skips=jnp.zeros([], jnp.int32),
                norm=jnp.zeros([], _history.dtype_for(params)),
            ),
        ))

    def update_fn(updates: Any, state: SkipNonfiniteState, params: Any = None, **extra_args):
        state = jax.tree.map(jnp.asarray, state)
        norm = _norms.global_norm(updates, axis_name=axis_name)
        bad = ~jnp.isfinite(norm)
        loss = _loss_value(extra_args, axis_name)
        if loss is not None:
            bad = bad | ~jnp.isfinite(loss)
        skip = bad
        if max_skips is not None:  # the opt-in release valve of optax.apply_if_finite
            skip = bad & (state.guard.consecutive_skips < max_skips)
        out, inner_state = _inner_unless(skip, inner, updates, state.inner_state, params,
                                         extra_args)
        num_skipped, consecutive = _counters(skip, state.guard)
        guard = SkipNonfiniteStats(num_skipped, consecutive, norm.astype(state.guard.norm.dtype))
        return out, SkipNonfiniteState(inner_state=inner_state, guard=guard)

    remake = lambda new_inner: skip_nonfinite(
        new_inner, max_consecutive_skips=max_skips, axis_name=axis_name
    )
    return optax.GradientTransformationExtraArgs(init_fn, _spec.attach_inner(
        update_fn, inner, "inner_state", name="skip_nonfinite", remake=remake
    ))


def _spike_threshold(window: History, z: float, min_history: int) -> Array:
    """``mean + z * std`` of the recorded values, or ``inf`` before ``min_history``."""
    mean, std = _history.mean_std(window)
    return jnp.where(_history.filled(window) >= min_history, mean + z * std, jnp.inf)


@register_factory(kind="guard", test_kwargs={"window": 8, "min_history": 4})
def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    z: float = 6.0,
    min_history: int = 64,
    max_consecutive_skips: int | None = 16,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole inner update on a non-finite or spiking gradient norm (or loss).

    With ``m, s`` the mean and population std of the norms of the last
    ``window`` *applied* steps, a step is skipped when ``||g||`` is not finite or
    ``||g|| > m + z s`` (tested once ``min_history`` norms are recorded). The
    same test runs on the optional ``loss`` extra argument, with its own window
    of applied-step losses: ``tx.update(grads, state, params, loss=loss)``.

    Skipped steps are not recorded, so a spike cannot inflate the window and
    hide the next one. The inner update runs behind one ``lax.cond``, at the
    cost described in ``skip_nonfinite``. The flip side: after a genuine, lasting
    jump in the norm level every step looks like a spike, and with deterministic gradients a
    skipped step (parameters unchanged) is flagged again forever. So after
    ``max_consecutive_skips`` skips in a row (16 by default) the guard treats
    the level as shifted: it empties its windows and applies the next finite
    step; spike tests resume once ``min_history`` new values are recorded.
    Non-finite steps are always skipped, never applied. ``None`` disables the
    release (a flagged step is never applied, whatever happens).

    The window statistics are computed scaled by their largest value, so one
    recorded norm above 1.8e19 (whose square overflows float32) gives a large,
    finite threshold rather than an infinite one that would stop all spike
    tests.

    Equivalents: the "skip the update on a loss/gradient spike" heuristics of
    large-scale LM training (e.g. PaLM restarts and skips batches). No Keras,
    PyTorch or optax built-in; ``optax.apply_if_finite`` covers the non-finite
    case only.

    Formal guarantees:
      * a skipped step returns exact zeros and keeps the inner state bit-identical;
      * a non-finite norm or loss is never applied;
      * a finite step under the threshold (or before ``min_history``) is exactly
        the inner update; the threshold used is in the stats;
      * fixed memory (two float32 buffers of ``window``); no host callback; with
        ``axis_name`` the norm and the mean loss, hence the decision, are the same
        on every shard.

    Edge cases:

      ===========================  ===========================================
      input                        output
      ===========================  ===========================================
      fewer than ``min_history``   only non-finite steps are skipped
      NaN / inf norm or loss       skipped, never recorded
      constant norms (std = 0)     any larger norm is a spike
      16 skips in a row            windows emptied, next finite step applied
      zero gradients               applied and recorded (norm 0)
      invalid static argument      ``ValueError`` naming it
      ===========================  ===========================================

    Args:
      inner: the transformation to guard, e.g. ``optax.adam(1e-3)``.
      window: how many recent applied steps the statistics cover (>= 1).
      z: spike threshold in standard deviations (> 0).
      min_history: recorded steps needed before spikes are tested (1..window).
      max_consecutive_skips: after this many skips in a row, empty the windows
        and apply the next finite step (>= 1); None never does.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over. The ``loss`` extra argument, if given, is averaged over
        it (a shard may pass its own local loss), and the window records the mean.

    Returns:
      The guarded transformation; its state is
      ``SkipOnSpikeState(inner_state, guard, norms, losses)``.

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
    window = validate_int(window, "window")
    min_history = validate_int(min_history, "min_history")
    if min_history > window:
        raise ValueError(
            f"min_history ({min_history}) must be <= window ({window}): the window "
            f"can never hold that many norms."
        )
    z = validate_real(z, "z", low=0.0, high=math.inf, low_open=True, high_open=True)
    max_skips = _check_max_skips(max_consecutive_skips, minimum=1)
    axis_name = validate_axis_name(axis_name)
    inner = _check_inner(inner, "skip_on_spike")

    def init_fn(params: Any) -> SkipOnSpikeState:
        dtype = _history.dtype_for(params)
        return _fresh(SkipOnSpikeState(
            inner_state=inner.init(params),
            guard=SkipOnSpikeStats(
                num_skipped=jnp.zeros([], jnp.int32),
                consecutive_skips=jnp.zeros([], jnp.int32),
                norm=jnp.zeros([], dtype),
                threshold=jnp.full([], jnp.inf, dtype),
            ),
            norms=_history.empty(window, dtype),
            losses=_history.empty(window, jnp.float32),
        ))

    def update_fn(updates: Any, state: SkipOnSpikeState, params: Any = None, **extra_args):
        state = jax.tree.map(jnp.asarray, state)
        norm = _norms.global_norm(updates, axis_name=axis_name).astype(state.norms.values.dtype)
        shifted = jnp.zeros([], bool)
        if max_skips is not None:
            # The level moved: start the windows afresh instead of skipping forever.
            shifted = state.guard.consecutive_skips >= max_skips
        norms = _history.clear(state.norms, shifted)
        losses = _history.clear(state.losses, shifted)
        threshold = _spike_threshold(norms, z, min_history)
        finite = jnp.isfinite(norm)
        skip = ~finite | (norm > threshold)
        loss = _loss_value(extra_args, axis_name)
        if loss is not None:
            loss_threshold = _spike_threshold(losses, z, min_history)
            finite = finite & jnp.isfinite(loss)
            skip = skip | ~jnp.isfinite(loss) | (loss > loss_threshold)
        out, inner_state = _inner_unless(skip, inner, updates, state.inner_state, params,
                                         extra_args)
        num_skipped, consecutive = _counters(skip, state.guard)
        applied = ~skip
        norms = _history.record(norms, norm, applied)
        if loss is not None:
            losses = _history.record(losses, loss, applied)
        guard = SkipOnSpikeStats(num_skipped, consecutive, norm, threshold)
        return out, SkipOnSpikeState(
            inner_state=inner_state,
            guard=guard,
            norms=norms,
            losses=losses,
        )

    remake = lambda new_inner: skip_on_spike(
        new_inner, window=window, z=z, min_history=min_history,
        max_consecutive_skips=max_skips, axis_name=axis_name,
    )
    return optax.GradientTransformationExtraArgs(init_fn, _spec.attach_inner(
        update_fn, inner, "inner_state", name="skip_on_spike", remake=remake
    ))
