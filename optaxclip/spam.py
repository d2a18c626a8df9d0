"""SPAM-style spike clipping: each coordinate against Adam's own second moment.

``spam(inner)`` wraps an Adam-like optimizer. Before the inner update it reads
the second moment ``v`` the inner optimizer keeps (``nu`` of its
``ScaleByAdamState``) and clips each gradient coordinate whose square exceeds
``theta * v`` to ``sign(g) * sqrt(theta * v)``; optionally it resets the
moments every ``reset_interval`` steps and warms the update back up, as SPAM
does (Huang et al., ICLR 2025).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optaxclip import _norms, _scaling, _spec, _state
from optaxclip._clipper import round_down
from optaxclip._registry import register_factory
from optaxclip._validate import validate_int, validate_real

Array = jax.Array

__all__ = ["SpamSpec", "SpamState", "SpamStats", "clip_spikes", "spam"]

# The attribute of spam's update function that carries its hyperparameters, so
# that contract checks reproduce a step without reading closures.
SPEC_ATTRIBUTE = "optaxclip_moment_clip"


@dataclasses.dataclass(frozen=True)
class SpamSpec:
    """``spam``'s static description: its spike threshold and reset schedule."""

    theta: float
    reset_interval: int | None
    warmup_steps: int


class SpamStats(NamedTuple):
    """What ``spam`` did on its last update; ``optaxclip.stats`` reports it.

    Attributes:
      num_clipped: coordinates clipped (``g^2 > theta v`` with ``v > 0``).
      clipped_fraction: ``num_clipped`` over the number of float coordinates.
      num_nonfinite: NaN / inf gradient coordinates seen (NaN ones are passed on).
      steps_since_reset: steps since the last moment reset (0 on a reset step;
        steps since the start before the first reset).
      num_resets: moment resets so far.
      warmup_scale: the factor the inner update was multiplied by (1 outside
        the warmup after a reset).
    """

    num_clipped: Array
    clipped_fraction: Array
    num_nonfinite: Array
    steps_since_reset: Array
    num_resets: Array
    warmup_scale: Array


class SpamState(NamedTuple):
    """State of ``spam``: the inner optimizer's state, the step count and the stats."""

    inner_state: Any
    count: Array
    spam: SpamStats


_state.register_report(SpamStats, "spam", (
    "clipped_fraction", "num_clipped", "num_nonfinite", "steps_since_reset", "warmup_scale"
))


# ---------------------------------------------------------------- the second moment


def is_moment_node(node: Any) -> bool:
    """A ``NamedTuple`` state with a ``nu`` field (``ScaleByAdamState`` and kin)."""
    return hasattr(node, "_fields") and "nu" in node._fields


def moment_nodes(inner_state: Any) -> list[Any]:
    """Every node of the inner state that keeps a second moment ``nu``, in tree order."""
    return [n for n in jax.tree.leaves(inner_state, is_leaf=is_moment_node) if is_moment_node(n)]


def second_moments(inner_state: Any, updates: Any) -> list[Array | None]:
    """For each leaf of ``updates``, the ``nu`` of the first moment node holding one
    of the same shape (None: no second moment for that leaf)."""
    leaves, treedef = jax.tree.flatten(updates)
    found: list[Array | None] = [None] * len(leaves)
    for node in moment_nodes(inner_state):
        try:
            nu_leaves = treedef.flatten_up_to(node.nu)
        except (ValueError, TypeError):
            continue  # a moment over other parameters
        for i, (g, v) in enumerate(zip(leaves, nu_leaves)):
            if found[i] is None and _norms.is_float_leaf(g) and hasattr(v, "shape") and (
                jnp.shape(v) == jnp.shape(g)
            ):
                found[i] = v
    return found


def _missing_moment_error(inner_state: Any, detail: str) -> ValueError:
    return ValueError(
        f"spam(inner) clips each gradient coordinate against the second moment `nu` that "
        f"an Adam-like inner optimizer keeps, but {detail} (its state is "
        f"{type(inner_state).__name__}). Fix: wrap an Adam-family optimizer, e.g. "
        f"oc.spam(optax.adam(1e-3)) or oc.spam(optax.adamw(1e-3)); for SGD or momentum, "
        f"use a gradient clipper such as optax.chain(oc.zclip(), optax.sgd(...))."
    )


# States with a `nu` that is not a mean of g^2: AdaBelief's is a mean of (g - m)^2,
# SM3's a momentum of preconditioned updates. Clipping g^2 against them flags
# steady gradients as spikes.
_NOT_SQUARED_GRADIENTS = {
    "ScaleByBeliefState": "a mean of (g - m)^2 (AdaBelief), not of g^2",
    "ScaleBySM3State": "a momentum of SM3's preconditioned updates, not a mean of g^2",
}


def _refuse_known(inner_state: Any) -> None:
    for node in moment_nodes(inner_state):
        if type(node).__name__ in _NOT_SQUARED_GRADIENTS:
            raise _missing_moment_error(
                inner_state, f"its `nu` is {_NOT_SQUARED_GRADIENTS[type(node).__name__]}")


def _check_second_moment(inner: optax.GradientTransformation) -> None:
    """Refuses an inner optimizer whose `nu` is not a running mean of squared gradients.

    Known states are refused by type (here and in ``init``). Others are probed
    once, on a scalar parameter, with ``jax.ensure_compile_time_eval``: one step
    from a fresh state moves a mean of g^2 4x as far when the gradient doubles
    (``optax.adamax`` keeps ``ScaleByAdamState`` with a maximum of |g|: 2x). The
    gradients are small (2^-10, 2^-9), so a clipper inside the inner chain leaves
    them alone. An inner optimizer the probe cannot run (a mask over the real
    parameters, extra arguments) is not probed.
    """
    probe = jnp.zeros([], jnp.float32)
    steps = []
    with jax.ensure_compile_time_eval():
        try:
            for gradient in (2.0**-10, 2.0**-9):
                state = inner.init(probe)
                before = second_moments(state, probe)[0]
                _, after_state = inner.update(jnp.asarray(gradient, jnp.float32), state, probe)
                after = second_moments(after_state, probe)[0]
                if before is None or after is None:
                    break
                steps.append(float(after) - float(before))
        except Exception:  # noqa: BLE001 -- best effort; init checks what it can
            return
    _refuse_known(state)
    # In magnitude: Yogi's nu moves toward g^2 from its initial value, either way.
    if len(steps) == 2 and steps[0] != 0 and not 3.9 <= abs(steps[1] / steps[0]) <= 4.1:
        raise _missing_moment_error(
            state, f"its `nu` moved {abs(steps[1] / steps[0]):.3g}x as far when the gradient "
                   f"doubled, not 4x, so it is not a running mean of g^2 (optax.adamax "
                   f"keeps a maximum of |g| there)")


def _check_moments(inner_state: Any, params: Any) -> None:
    if not moment_nodes(inner_state):
        raise _missing_moment_error(inner_state, "the inner state keeps no `nu`")
    _refuse_known(inner_state)
    floats = [x for x in jax.tree.leaves(params) if _norms.is_float_leaf(x)]
    if floats and all(v is None for v in second_moments(inner_state, params)):
        raise _missing_moment_error(
            inner_state, "no `nu` in the inner state is shaped like the parameters"
        )


# ---------------------------------------------------------------- clipping


_EXACT_COUNT = 2**24  # float32 counts every integer up to here exactly


def _counts(*masks: Array) -> tuple[Array, ...]:
    """How many entries of each mask are True, as int32, exactly, in one pass.

    One variadic float32 sum reduction over all the masks: XLA:CPU fuses it with
    the masks' producer, where an int32 sum (or a float32 ``jnp.sum`` of one mask)
    first writes each mask out as a full array. A float32 sum of at most 2^24
    ones is exact in any order, so a larger leaf is summed along its last axis
    first and the row counts are added as int32.
    """
    flags = tuple(jnp.where(lax.stop_gradient(m), 1.0, 0.0).astype(jnp.float32) for m in masks)
    shape = flags[0].shape
    if math.prod(shape) <= _EXACT_COUNT:
        axes = tuple(range(len(shape)))
    elif len(shape) >= 2 and shape[-1] <= _EXACT_COUNT:
        axes = (len(shape) - 1,)
    else:  # a huge 1-D leaf: int32 sums, exact at any size
        return tuple(jnp.sum(m, dtype=jnp.int32) for m in masks)
    zero = jnp.zeros([], jnp.float32)
    sums = lax.reduce(flags, (zero,) * len(flags),
                      lambda a, b: tuple(x + y for x, y in zip(a, b)), axes)
    # dtype= keeps int32 under x64 too (a plain sum of int32 widens to int64 there,
    # and the state's counts would change dtype after init).
    return tuple(jnp.sum(c.astype(jnp.int32), dtype=jnp.int32) for c in sums)


def clip_spikes(
    updates: Any, moments: list[Array | None], theta: float
) -> tuple[Any, Array, Array]:
    """``updates`` with every coordinate where ``g^2 > theta v`` (and ``v > 0``) set to
    ``sign(g) sqrt(theta v)``; returns ``(clipped, num_clipped, num_nonfinite)``.

    The test is ``|g| > sqrt(theta) sqrt(v)`` in float32 or wider, so neither
    ``g^2`` nor ``theta v`` can overflow. The limit is rounded down to the leaf's
    dtype, so the bound holds exactly in bf16/fp16. Complex coordinates are
    compared by their modulus and set to their phase times the limit.
    Coordinates at or under the limit, and every coordinate of a leaf without a
    second moment, come back bit-identical.
    """
    leaves, treedef = jax.tree.flatten(updates)
    root_theta = math.sqrt(theta)
    out = list(leaves)
    num_clipped = jnp.zeros([], jnp.int32)
    num_nonfinite = jnp.zeros([], jnp.int32)
    for i, (g, v) in enumerate(zip(leaves, moments)):
        if not _norms.is_float_leaf(g):
            continue
        g = jnp.asarray(g)
        acc = _norms.accumulation_dtype(g.dtype)
        if v is None:
            (leaf_nonfinite,) = _counts(~jnp.isfinite(g))
            num_nonfinite += leaf_nonfinite
            continue
        magnitude = _norms._magnitude(g, acc)
        second = jnp.abs(jnp.real(jnp.asarray(v))).astype(acc)
        limit = jnp.asarray(root_theta, acc) * jnp.sqrt(second)
        over = (second > 0) & (magnitude > limit)
        leaf_clipped, leaf_nonfinite = _counts(over, ~jnp.isfinite(g))
        num_clipped += leaf_clipped
        num_nonfinite += leaf_nonfinite
        # The same mask, made to depend on the leaf's count: XLA must then finish the
        # count (which reads v) before the inner optimizer overwrites v in place;
        # without that order it copied every donated second moment first.
        over = over & (leaf_clipped > 0)
        if jnp.iscomplexobj(g):
            # The unit phase first, then the limit: limit / |g| could be subnormal.
            # An entry whose modulus overflows, or with an infinite component, gets
            # its phase from _scaling.unit_phase (g / |g| would be 0 or NaN).
            phase = _scaling.unit_phase(g, magnitude, over)
            out[i] = jnp.where(over, (phase * limit.astype(phase.dtype)).astype(g.dtype), g)
        else:
            capped = round_down(jnp.where(over, limit, 0), g.dtype)
            out[i] = jnp.where(over, jnp.sign(g) * capped, g)
    return treedef.unflatten(out), num_clipped, num_nonfinite


def _reset_moments(inner_state: Any, now: Array) -> Any:
    """Every moment node's fields but ``count`` zeroed where ``now`` (mu, nu, nu_max ...)."""

    def reset(node: Any) -> Any:
        if not is_moment_node(node):
            return node
        zeroed = {
            field: jax.tree.map(
                lambda x: jnp.where(now, jnp.zeros_like(x), x) if _norms.is_float_leaf(x) else x,
                getattr(node, field),
            )
            for field in node._fields if field != "count"
        }
        return node._replace(**zeroed)

    return jax.tree.map(reset, inner_state, is_leaf=is_moment_node)


_COUNT_MAX = jnp.iinfo(jnp.int32).max  # where optax.safe_increment holds the count


def reset_due(count: Array, steps_since_reset: Array, reset_interval: int) -> Array:
    """Whether the moments reset before this update: steps ``T, 2T, ...`` (from 1).

    ``count % T == T - 1`` while the int32 step count runs. Once it has saturated
    at 2^31 - 1 it no longer moves, and the test would be frozen (true on every
    step for a ``T`` that divides 2^31, false for good otherwise): the steps since
    the last reset take over. From the first reset on (long before 2^31 steps for
    any ``T`` that resets at all) they equal ``count % T`` before each update.
    """
    running = count < _COUNT_MAX
    return jnp.where(running, count % reset_interval, steps_since_reset) == reset_interval - 1


def warmup_factor(steps_since_reset: Array, warmup_steps: int) -> Array:
    """The cosine ramp after a reset: 0.01 on the reset step, rising to 1 at ``warmup_steps``.

    ``1 - 0.99 (1 + cos(pi k / (N + 1))) / 2`` for ``k < N``, else 1; the
    authors' schedule (a cosine decay of 0.99 over ``N + 1`` steps, subtracted
    from 1).
    """
    if warmup_steps == 0:
        return jnp.ones([], jnp.float32)
    k = steps_since_reset.astype(jnp.float32)
    ramp = 1 - 0.99 * (1 + jnp.cos(jnp.pi * k / (warmup_steps + 1))) / 2
    return jnp.where(steps_since_reset < warmup_steps, ramp, 1.0).astype(jnp.float32)


# ---------------------------------------------------------------- the transformation


def _check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        hint = " It looks like a factory: call it, e.g. oc.spam(optax.adam(1e-3))." if callable(
            inner) else ""
        raise TypeError(
            f"spam: inner must be an Adam-like optax.GradientTransformation, e.g. "
            f"optax.adam(1e-3); got {type(inner).__name__}.{hint}"
        )
    return optax.with_extra_args_support(inner)


@register_factory(kind="moment_clipper", threshold="theta",
                  test_kwargs={"reset_interval": 4, "warmup_steps": 2})
def spam(
    inner: optax.GradientTransformation,
    *,
    theta: float = 5000.0,
    reset_interval: int | None = None,
    warmup_steps: int = 150,
) -> optax.GradientTransformationExtraArgs:
    """SPAM's spike-aware clipping (and optional momentum reset) around an Adam-like optimizer.

    ``g_i <- sign(g_i) sqrt(theta v_i)`` where ``g_i^2 > theta v_i``, with ``v``
    the inner optimizer's second moment *before* this step (``nu``, the raw EMA
    of squared gradients, not bias-corrected, as in the paper); then the inner
    update runs on the clipped gradients, so its moments only see them.

    Where ``v`` comes from: for each gradient leaf, the ``nu`` of the first
    node of the inner state (in tree order) that has a ``nu`` field and an
    array of that leaf's shape: ``ScaleByAdamState`` (``adam``, ``adamw``,
    ``nadam``), ``ScaleByAmsgradState``, ``ScaleByRmsState``, and one Adam per
    group inside ``optax.partition``. Construction cannot see the state;
    ``init`` raises ``ValueError`` naming the fix when the inner optimizer keeps
    no ``nu`` (SGD, momentum, Lion, Adafactor's factored moments).

    Decisions:

    * *First step*: where ``v`` is 0 (the first step, the step right after a
      reset, a coordinate whose gradients were always 0) nothing is clipped:
      there is no scale to compare with. The authors' code also waits 20 steps
      after the start and after each reset before clipping; this one clips as
      soon as ``v > 0``.
    * *Momentum reset* (``reset_interval = T``): before the update of steps
      ``T, 2T, ...`` (counting from 1) every field but ``count`` of every such
      moment node is zeroed: ``mu`` and ``nu`` (and ``nu_max`` of amsgrad). As in
      the authors' code the inner ``count``, hence Adam's bias correction, is
      *not* reset, so the first steps after a reset would be up to
      ``(1 - b1) / sqrt(1 - b2)`` (3.2x) larger than usual; the paper's cosine
      warmup covers them: the inner update is multiplied by
      ``1 - 0.99 (1 + cos(pi k / (N + 1))) / 2`` on the ``k``-th step after the
      reset (``k = 0`` on the reset step, 0.01), for ``k < N = warmup_steps``.
      No warmup happens before the first reset. The factor multiplies the whole
      inner update, decoupled weight decay included.
    * *Non-finite gradients*: a NaN coordinate is passed on as NaN (the inner
      moments then hold NaN, as without the wrapper); an inf coordinate with
      ``v > 0`` is a spike and is clipped to ``+-sqrt(theta v)``, as
      ``clip_by_value`` clips inf entries; with ``v = 0`` it is passed on. The
      stats count them (``num_nonfinite``). Wrap it to drop such steps:
      ``oc.skip_nonfinite(oc.spam(optax.adam(lr)))``.

    Equivalents: ``SPAM`` of the authors' PyTorch code (``threshold=5000``,
    ``DeltaT=500``, ``warmup_steps=150``; its sparse-momentum ``density`` option
    is not implemented). No Keras, PyTorch or optax built-in.

    Formal guarantees:
      * for finite input, every coordinate passed to the inner optimizer has
        ``|g_i| <= sqrt(theta v_i)`` where ``v_i > 0``, exactly in the leaf's
        dtype (the limit is rounded down), and its sign kept; complex
        coordinates keep their phase (one whose modulus overflows float32, or
        with an infinite part, is set to the limit along that phase, as a real
        ``inf`` is set to ``+limit``);
      * a coordinate with ``g_i^2 <= theta v_i``, or with ``v_i = 0``, reaches
        the inner optimizer bit-identical; with ``reset_interval=None`` a step
        without spikes computes exactly the inner update (bit-identical
        eagerly; under ``jit`` XLA may fuse it differently, within an ulp);
      * the test is ``|g| > sqrt(theta) sqrt(v)`` in float32 or wider, so
        neither ``g^2`` (``1e20`` in float32) nor ``theta v`` overflows;
      * the state is the inner state, a step count and the stats: arrays only,
        no host callback; the stats are counts computed in the same pass.

    Edge cases:

      ===========================  ============================================
      input                        output
      ===========================  ============================================
      first step (``v = 0``)       the inner update of the raw gradients
      zero gradients               the inner update of zeros; nothing clipped
      ``theta = 0``                every coordinate with ``v > 0`` set to 0
      ``theta = inf``              never clips (the inner update)
      NaN coordinate               passed on as NaN; counted
      inf coordinate, ``v > 0``    clipped to ``+-sqrt(theta v)``; counted
      bf16 / fp16 gradients        compared in float32; the limit rounded down
      inner state without ``nu``   ``ValueError`` at ``init`` naming the fix
      invalid static argument      ``ValueError`` naming it
      ===========================  ============================================

    Args:
      inner: an Adam-like optimizer, e.g. ``optax.adam(1e-3)`` or a chain that
        contains ``optax.scale_by_adam()``: its ``nu`` must be a running mean of
        g^2 (AdaBelief's, Adamax's and SM3's are not, and are refused). With one
        whose ``nu`` starts above 0 and grows additively (``optax.yogi``: 1e-6),
        gradients are clipped as spikes until ``nu`` catches up with them.
      theta: the spike threshold on ``g^2 / v`` (>= 0); the paper's 5000.
      reset_interval: reset the moments every this many steps (>= 1); None
        (default) never resets. The paper uses 500.
      warmup_steps: length of the cosine warmup after each reset (>= 0); the
        paper's 150.

    Returns:
      The wrapped optimizer; its state is ``SpamState(inner_state, count, spam)``
      and ``oc.stats`` reports ``spam/clipped_fraction``, ``spam/num_clipped``,
      ``spam/num_nonfinite``, ``spam/steps_since_reset`` and
      ``spam/warmup_scale``.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = oc.spam(optax.adam(0.1), theta=2000.0)
      >>> state = tx.init(jnp.zeros(3))
      >>> _, state = tx.update(jnp.array([1.0, 1.0, 1.0]), state)  # now v = 0.001
      >>> _, state = tx.update(jnp.array([1.0, 50.0, -50.0]), state)  # limit sqrt(2)
      >>> adam = state.inner_state[0]  # mu = 0.9 * 0.1 + 0.1 * clipped g
      >>> [round(float(m), 4) for m in adam.mu]
      [0.19, 0.2314, -0.0514]
      >>> int(oc.stats(state)["spam/num_clipped"])
      2

    References:
      Huang, Zhu, Jin, Liu, Wang and Liu, "SPAM: Spike-Aware Adam with Momentum
      Reset for Stable LLM Training", ICLR 2025.
    """
    theta = validate_real(theta, "theta", low=0.0, high=math.inf,
                          hint="The paper uses theta=5000.")
    if reset_interval is not None:
        reset_interval = validate_int(reset_interval, "reset_interval")
    warmup_steps = validate_int(warmup_steps, "warmup_steps", minimum=0)
    spec = SpamSpec(theta=theta, reset_interval=reset_interval, warmup_steps=warmup_steps)
    inner = _check_inner(inner)
    _check_second_moment(inner)

    def init_fn(params: Any) -> SpamState:
        inner_state = inner.init(params)
        _check_moments(inner_state, params)
        zero = jnp.zeros([], jnp.int32)
        state = SpamState(
            inner_state=inner_state,
            count=zero,
            spam=SpamStats(zero, jnp.zeros([], jnp.float32), zero, zero, zero,
                           jnp.ones([], jnp.float32)),
        )
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        state = jax.tree.map(jnp.asarray, state)
        inner_state, stats = state.inner_state, state.spam
        if reset_interval is not None:
            now = reset_due(state.count, stats.steps_since_reset, reset_interval)
            inner_state = _reset_moments(inner_state, now)
            # 0 on the first step, as without resets: steps since the start.
            since = jnp.where(now | (state.count == 0), 0,
                              optax.safe_increment(stats.steps_since_reset))
            resets = jnp.where(now, optax.safe_increment(stats.num_resets), stats.num_resets)
            scale = jnp.where(resets > 0, warmup_factor(since, warmup_steps), 1.0)
        else:
            since = jnp.where(state.count > 0, optax.safe_increment(stats.steps_since_reset), 0)
            resets, scale = stats.num_resets, jnp.ones([], jnp.float32)
        if not moment_nodes(inner_state):
            raise _missing_moment_error(inner_state, "the inner state keeps no `nu`")
        moments = second_moments(inner_state, updates)
        clipped, num_clipped, num_nonfinite = clip_spikes(updates, moments, theta)
        inner_updates, new_inner = inner.update(clipped, inner_state, params, **extra_args)
        out = jax.tree.map(lambda u: _scaling.apply_scale(u, scale), inner_updates)
        total = sum(jnp.size(g) for g in jax.tree.leaves(updates) if _norms.is_float_leaf(g))
        fraction = num_clipped.astype(jnp.float32) / max(total, 1)
        new_stats = SpamStats(num_clipped, fraction, num_nonfinite, since.astype(jnp.int32),
                              resets.astype(jnp.int32), scale.astype(jnp.float32))
        return out, SpamState(new_inner, jnp.asarray(optax.safe_increment(state.count)), new_stats)

    remake = lambda new_inner: spam(new_inner, theta=theta, reset_interval=reset_interval,
                                    warmup_steps=warmup_steps)
    update_fn = _spec.attach_inner(update_fn, inner, "inner_state", name="spam", remake=remake)
    setattr(update_fn, SPEC_ATTRIBUTE, spec)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
