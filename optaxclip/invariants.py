"""Checked invariants: clip before momentum, and outputs inside the clip ball.

Three tools, from cheapest to most thorough:

* ``check_order(tx, params)``: a static look at the structure of ``tx`` (it never
  runs an update) that raises ``OrderingError`` when a moment accumulator (Adam,
  Lion, RMSProp, momentum, EMA, Adafactor ...) comes before a gradient clipper.
* ``assert_moments_bounded(tx, params, max_norm)``: a behavioural check that feeds
  huge random gradients and asserts every gradient accumulator stays inside the
  ball the clipper promises.
* ``checked(tx)``: a wrapper whose update asserts, inside ``jit``, that the output
  is finite and that every clipper really put its output inside its clip ball.

Why order matters: in ``optax.chain(optax.adam(lr), clip)`` Adam's moments see the
raw gradients, and the clipper only clips Adam's normalised step. Keras
``clipnorm`` and PyTorch ``clip_grad_norm_`` clip the raw gradient *before* the
optimizer, which is ``optax.chain(clip, optax.adam(lr))``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from optaxclip import _norms, _state, _structure
from optaxclip import fixed as _fixed
from optaxclip._structure import OrderingError, Stage, find_stages

Array = jax.Array

__all__ = [
    "OrderingError",
    "Stage",
    "check_order",
    "assert_moments_bounded",
    "checked",
]


def check_order(tx: Any, params: Any, *, on_unknown: str = "raise") -> tuple[Stage, ...]:
    """Raises ``OrderingError`` if a moment accumulator runs before a gradient clipper.

    A static check: it reads the structure of ``tx`` and the *shapes* of its state
    (``jax.eval_shape(tx.init, params)``); it never runs an update.

    Equivalents: none in optax, Keras or PyTorch; Keras and PyTorch always clip
    the raw gradient first, so the mistake cannot happen there.

    Formal guarantees:
      * it raises when, on some parameter, a moment accumulator (``scale_by_adam``,
        ``scale_by_lion``, ``scale_by_rms``, ``scale_by_amsgrad``,
        ``scale_by_belief``, ``scale_by_factored_rms``, ``trace``, ``ema``,
        ``scale_by_rss`` ..., and any transformation whose state holds a
        parameter-shaped float tree) is applied before a clipper (optaxclip's,
        and ``optax.clip``, ``clip_by_global_norm``, ``clip_by_block_rms``,
        ``adaptive_grad_clip``); the message names both and says how to reorder;
      * it looks inside ``chain``, ``named_chain``, ``inject_hyperparams``,
        ``masked``, ``partition``/``multi_transform``, ``MultiSteps`` and wrappers
        whose state has an ``inner_state`` (``apply_if_finite``, optaxclip guards);
      * masks are honoured: a clipper and an accumulator on disjoint parameter
        subsets do not conflict. Note that a global clipper inside ``masked`` or
        ``multi_transform`` clips only its subset: its norm is the norm of the
        selected parameters' gradients, and the others pass through unclipped;
      * Adafactor's own update clipping (``clip_by_block_rms`` right after
        ``scale_by_factored_rms``, as ``optax.adafactor`` builds it) is by design
        and is not flagged.

    Edge cases:

      ==================================  ========================================
      ``tx``                              result
      ==================================  ========================================
      clip first, or no clipper           passes; returns the stages it saw
      clipper after an accumulator        ``OrderingError``
      a transformation it cannot read     ``on_unknown``: ``"raise"`` (default,
      (custom state, unknown combinator)  ``OrderingError``), ``"warn"``
                                          (``UserWarning``) or ``"ignore"``; only
                                          when it could hide a wrong order
      ==================================  ========================================

    Args:
      tx: an ``optax.GradientTransformation`` (or ``optax.MultiSteps``).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``), for shapes only.
      on_unknown: what to do when part of ``tx`` cannot be seen into.

    Returns:
      The stages in the order they are applied, each a ``Stage`` (name, kind
      ``"clipper"``/``"moment"``/``"other"``/``"unknown"``, location).

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> params = {"w": jnp.zeros(3)}
      >>> _ = oc.check_order(optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3)), params)
      >>> try:
      ...     oc.check_order(optax.chain(optax.adam(1e-3), oc.clip_by_global_norm(1.0)), params)
      ... except oc.OrderingError as error:
      ...     print(str(error).splitlines()[0])
      clip_by_global_norm (chain[1]) runs after scale_by_adam (chain[0] > chain[0]).

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
      neural networks", ICML 2013 (clip the gradient, then step).
    """
    if on_unknown not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"on_unknown must be 'raise', 'warn' or 'ignore'; got {on_unknown!r}."
        )
    stages = find_stages(tx, params)
    _structure.raise_on_wrong_order(stages)
    problems = _structure.unknown_problems(stages)
    if problems and on_unknown != "ignore":
        message = (
            "check_order cannot see into part of this transformation, so it cannot "
            "prove that every clipper runs before the moment accumulators:\n  "
            + "\n  ".join(problems)
            + "\nUse optaxclip.assert_moments_bounded(tx, params, max_norm) for a "
            "behavioural check, or pass on_unknown='warn' or 'ignore'."
        )
        if on_unknown == "raise":
            raise OrderingError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return tuple(stages)


# ---------------------------------------------------------------- moment bounds


class _Accumulator(NamedTuple):
    field: str
    rule: str  # "ema", "ema_square", "trace", "sum_square", "factored"


_ACCUMULATORS: dict[str, tuple[_Accumulator, ...]] = {
    "ScaleByAdamState": (_Accumulator("mu", "ema"),),
    "ScaleByAmsgradState": (_Accumulator("mu", "ema"), _Accumulator("nu", "ema_square")),
    "ScaleByLionState": (_Accumulator("mu", "ema"),),
    "ScaleByBeliefState": (_Accumulator("mu", "ema"),),
    "ScaleByRStdDevState": (_Accumulator("mu", "ema"), _Accumulator("nu", "ema_square")),
    "ScaleByRmsState": (_Accumulator("nu", "ema_square"),),
    "EmaState": (_Accumulator("ema", "ema"),),
    "TraceState": (_Accumulator("trace", "trace"),),
    "ScaleByRssState": (_Accumulator("sum_of_squares", "sum_square"),),
    "FactoredState": (_Accumulator("v_row", "factored"),),
}


def _accumulator_specs(node: Any) -> tuple[_Accumulator, ...] | None:
    cls = type(node)
    specs = _ACCUMULATORS.get(cls.__name__)
    if specs is not None and getattr(optax, cls.__name__, None) is cls:
        return specs
    return None


def _sum_square_mass(tree: Any) -> Array:
    return sum(
        (jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
        jnp.zeros([], jnp.float32),
    )


def _factored_mass(node: Any, params: Any) -> Array:
    """``sum(g**2)``-sized mass of Adafactor's factored second moment, per leaf."""
    total = jnp.zeros([], jnp.float32)
    for row, full, param in zip(
        jax.tree.leaves(node.v_row), jax.tree.leaves(node.v), jax.tree.leaves(params)
    ):
        # Unfactored leaves keep the full v. Factored ones keep v_row, the mean over
        # one axis: times that axis' length it is a sum of squares again.
        if np.shape(full) == np.shape(param):
            total = total + jnp.sum(full.astype(jnp.float32))
        else:
            per_row = math.prod(np.shape(param)) / max(math.prod(np.shape(row)), 1)
            total = total + jnp.sum(row.astype(jnp.float32)) * per_row
    return total


def _measure(spec: _Accumulator, node: Any, params: Any) -> Array:
    """The accumulator's size in gradient-norm units (see the bounds table)."""
    value = getattr(node, spec.field)
    if spec.rule in ("ema", "trace"):
        return _norms.global_norm(value).astype(jnp.float32)
    if spec.rule == "factored":
        return jnp.sqrt(_factored_mass(node, params))
    return jnp.sqrt(_sum_square_mass(value))


def _bound(spec: _Accumulator, initial: float, max_norm: float, steps: int, decay: Any) -> float:
    if spec.rule in ("ema", "ema_square", "factored"):
        return max(max_norm, initial)
    if spec.rule == "trace":
        if decay is None:  # decay unknown: any decay <= 1 gives at most one max_norm a step
            return initial + steps * max_norm
        d = float(decay)
        return d**steps * initial + max_norm * sum(d**k for k in range(steps))
    # sum_square (Adagrad): the squares of `steps` gradients are added to the start.
    return math.sqrt(initial**2 + steps * max_norm**2)


def _adversarial_gradients(params: Any, max_norm: float, steps: int, seed: int) -> list[Any]:
    """Gradients with global norm 1e3..1e6 x max_norm, half repeating a direction."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    out, direction = [], None
    for step in range(steps):
        if direction is None or step % 2 == 0:
            direction = [
                rng.standard_normal(np.shape(x)) if _norms.is_float_leaf(x) else None
                for x in leaves
            ]
            total = math.sqrt(sum(float(np.sum(d * d)) for d in direction if d is not None))
            direction = [d if d is None else d / max(total, 1e-30) for d in direction]
        size = max_norm * 10.0 ** rng.uniform(3, 6)
        grads = [
            x if d is None else jnp.asarray(d * size, jnp.asarray(x).dtype)
            for x, d in zip(leaves, direction)
        ]
        out.append(jax.tree.unflatten(treedef, grads))
    return out


def assert_moments_bounded(
    tx: Any,
    params: Any,
    max_norm: float,
    *,
    steps: int = 6,
    seed: int = 0,
    rtol: float = 1e-4,
    jit: bool = True,
) -> dict[str, float]:
    """Asserts every gradient accumulator of ``tx`` stays inside the clip ball.

    Feeds ``steps`` random gradients of global L2 norm ``1e3 .. 1e6 x max_norm``
    (seeded; pairs of steps share a direction, the worst case for momentum) and,
    after every step, measures each accumulator that consumes the gradient.

    Bounds, for gradients of global L2 norm at most ``c = max_norm`` after
    clipping (derived by induction over the steps, starting from the init):

      =========================  ======================  ================================
      accumulator (optax state)  update                  asserted bound
      =========================  ======================  ================================
      ``mu`` of Adam, AdamW,     ``m = b m + (1-b) g``   ``||m|| <= c`` (a convex
      NAdam, AMSGrad, Lion,                              combination of clipped
      AdaBelief, centered                                gradients and the zero start)
      RMSProp; ``ema``
      ``nu`` of RMSProp,         ``v = b v+(1-b) g^2``   ``sqrt(sum v) <= c``
      AMSGrad
      Adafactor ``v_row``/``v``  EMA of g^2 (row means)  ``sqrt(g^2-mass) <= c``
      ``trace`` (SGD momentum,   ``t = d t + g``         ``||t|| <= c (1-d^n)/(1-d)``,
      Nesterov too)                                      below ``c / (1-d)``
      Adagrad                    ``s = s + g^2``         ``sqrt(sum s - sum s0)
      ``sum_of_squares``                                 <= c sqrt(n)``
      =========================  ======================  ================================

    Adam's ``nu`` is not checked: Adamax and Yogi share its state type with
    other update rules. Adafactor's g^2-mass is ``sum v`` for unfactored leaves
    and ``sum v_row`` times the length of the averaged axis for factored ones.
    Adafactor's ``epsilon`` (1e-30 per entry) hides in the tolerance.

    A non-zero start (``initial_accumulator_value``, ``initial_scale``) enters the
    bound as ``max(c, start)`` for EMAs. Only the first accumulator on each
    parameter is checked: a later one (Adafactor's momentum, a lookahead) sees
    normalised steps, not gradients. ``max_norm`` is a bound on the *global L2
    norm* of what the accumulators receive: the threshold of
    ``clip_by_global_norm``; ``c * sqrt(leaves)`` for ``clip_by_norm(c)``;
    ``c * sqrt(entries)`` for ``clip_by_value(c)``. Transformations between the
    clipper and the accumulator that scale gradients up break these bounds.

    Equivalents: none in optax, Keras or PyTorch.

    Formal guarantees:
      * raises ``AssertionError`` naming the accumulator, its norm, the bound and
        the step as soon as one is outside its bound, and when one is not finite;
      * a chain that clips after Adam or momentum fails: the accumulator sees
        gradients ``>= 1e3 x max_norm``;
      * it finds accumulators anywhere in the state, also inside wrappers it
        cannot read, and works with optax's own clippers;
      * deterministic for a given ``seed``; it runs ``tx`` on fresh state and does
        not touch anything the caller holds.

    Edge cases:

      =====================================  ====================================
      situation                              result
      =====================================  ====================================
      no accumulator (plain SGD)             passes, returns ``{}``
      accumulator without a known bound      ``UserWarning``, not checked
      (Adan, NovoGrad, SM3, custom)
      ``MultiSteps`` / masks                 inner accumulators checked on their
                                             own subsets
      ``max_norm`` <= 0 or inf, ``steps<1``  ``ValueError``
      =====================================  ====================================

    Args:
      tx: the transformation to test, e.g. ``optax.chain(clip, optax.adam(lr))``.
      params: example parameters (shapes and dtypes of the gradients).
      max_norm: the clip ball's radius in global L2 norm.
      steps: number of updates (at least 1).
      seed: seed of the gradient generator.
      rtol: relative tolerance on every bound (float32 rounding).
      jit: run ``tx.update`` under ``jax.jit`` (default) or eagerly.

    Returns:
      ``{"<location> > <name>/<field>": largest norm / bound ratio seen}`` for
      every accumulator checked; empty when ``tx`` holds none.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> params = {"w": jnp.zeros(4)}
      >>> right = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
      >>> sorted(oc.assert_moments_bounded(right, params, 1.0))
      ['chain[1] > chain[0] > scale_by_adam/mu']

    References:
      Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
      Sutskever, Martens, Dahl and Hinton, "On the importance of initialization
      and momentum in deep learning", ICML 2013.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (
        0 < max_norm < math.inf
    ):
        raise ValueError(f"max_norm must be a finite number > 0; got {max_norm!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    tx = tx.gradient_transformation() if isinstance(tx, optax.MultiSteps) else tx
    stages = find_stages(tx, params)
    first_by_path = _structure.first_moment_paths(stages)
    state = tx.init(params)
    targets = _find_accumulators(state, stages, first_by_path, params)
    measured_paths = {target[5] for target in targets.values()}
    for stage in stages:
        if stage.kind == "moment" and first_by_path.get(stage.state_path) and (
            stage.state_path not in measured_paths
        ):
            warnings.warn(
                f"assert_moments_bounded has no bound for {stage.name} ({stage.location}); "
                f"its state is not checked.",
                UserWarning,
                stacklevel=2,
            )
    if jit:  # checkify, so that a tx wrapped in optaxclip.checked can run here too
        checked_update = jax.jit(checkify.checkify(tx.update))

        def update(*args: Any) -> Any:
            error, out = checked_update(*args)
            error.throw()
            return out
    else:
        update = tx.update
    initial = {key: float(_measure(spec, get(state), sub))
               for key, (spec, get, sub, *_) in targets.items()}
    ratios = {key: 0.0 for key in targets}
    for step, grads in enumerate(_adversarial_gradients(params, max_norm, steps, seed), 1):
        _, state = update(grads, state, params)
        for key, (spec, get, sub, decay, label, _) in targets.items():
            value = float(_measure(spec, get(state), sub))
            bound = _bound(spec, initial[key], float(max_norm), step, decay)
            if not math.isfinite(value) or value > bound * (1 + rtol):
                raise AssertionError(
                    f"{label} has norm {value:.6g} after step {step} of {steps}, above "
                    f"its bound {bound:.6g} (max_norm={max_norm}, rule '{spec.rule}'). It "
                    f"accumulates gradients that were not clipped to max_norm: put the "
                    f"clipper before it, e.g. optax.chain(optaxclip.clip_by_global_norm("
                    f"{max_norm}), optimizer), or pass the max_norm your clipper guarantees."
                )
            ratios[key] = max(ratios[key], value / bound)
    return ratios


def _find_accumulators(
    state: Any, stages: list[Stage], first_by_path: dict, params: Any
) -> dict:
    """Accumulators to check: ``key -> (spec, getter, sub-params, decay, label, path)``."""
    found = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda node: _accumulator_specs(node) is not None
    )[0]
    by_path = {stage.state_path: stage for stage in stages}
    out = {}
    for path, node in found:
        specs = _accumulator_specs(node)
        if specs is None:
            continue
        key_path = jax.tree_util.keystr(path)
        stage = by_path.get(key_path)
        if stage is not None and not first_by_path.get(key_path, True):
            continue  # downstream of another accumulator: it sees steps, not gradients
        where = f"{stage.location} > {stage.name}" if stage is not None else f"state{key_path}"
        sub = stage.params if stage is not None else params
        decay = stage.decay if stage is not None else None
        for spec in specs:
            getter = _getter(path)
            label = f"{where}/{spec.field}"
            described = f"{type(node).__name__}.{spec.field} at {where}"
            out[label] = (spec, getter, sub, decay, described, key_path)
    return out


def _getter(path: tuple) -> Callable[[Any], Any]:
    def get(tree: Any) -> Any:
        for key in path:
            if isinstance(key, jax.tree_util.SequenceKey):
                tree = tree[key.idx]
            elif isinstance(key, jax.tree_util.DictKey):
                tree = tree[key.key]
            else:
                tree = getattr(tree, key.name)
        return tree

    return get


# ---------------------------------------------------------------- runtime guard


def checked(tx: Any, *, rtol: float = 1e-6) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so every update asserts its invariants, also inside ``jax.jit``.

    After each update it asserts that the output is finite and that every
    optaxclip clipper put its output inside its clip ball, measured on the
    actual data:

    * each clipper reachable through ``chain``, ``named_chain``, ``masked`` and
      ``partition`` is tapped: its real input and output are compared. For
      ``clip_by_value``, ``clip_by_norm``, ``clip_by_global_norm`` and
      ``clip_by_block_rms`` the output is measured again in the clipper's own
      norm (``<= threshold * (1 + rtol)``) and the recorded pre-clip norm is
      recomputed from the input. For any other registered clipper it checks that
      the recorded scale was really applied (``out == g * scale`` for global and
      per-leaf scales);
    * every clipper in the new state (reachable or not, e.g. inside
      ``inject_hyperparams`` or ``MultiSteps``) must have recorded a consistent
      step: ``norm * scale <= threshold * (1 + rtol)`` (per-unit limits for AGC)
      and a scale in ``[0, 1]``.

    Bounds are only asserted on steps whose input is finite; a non-finite input
    makes the output NaN by the library's policy, and the finiteness check
    reports it.

    The checks are ``jax.experimental.checkify`` checks, so a failure surfaces as
    ``JaxRuntimeError``:

    * eagerly, at the failing update;
    * under ``jit``, only inside a checkified function. Wrap the train step:
      ``step = chex.chexify(jax.jit(train_step))``; chex raises on a later call or
      at ``chex.block_until_chexify_assertions_complete()`` (with
      ``async_check=False``, at the failing call itself). Or
      ``err, out = jax.jit(checkify.checkify(train_step))(...); err.throw()``.
      A jitted step that is not checkified fails to trace with "Cannot abstractly
      evaluate a checkify.check which was not functionalized".

    Cost: nothing when not used (it is a wrapper you add). When used, about one
    extra read of the gradients per clipper plus the output check; no host
    callbacks on the happy path beyond checkify's error value. The state is
    ``tx``'s own, so checkpoints move between checked and unchecked runs.

    Equivalents: none in optax, Keras or PyTorch.

    Formal guarantees:
      * an update whose output has a NaN/inf entry fails;
      * a fixed clipper whose output lies outside its ball, or whose recorded
        norm differs from the input's norm by more than ``1e-4`` relative, fails;
      * a registered clipper that records a scale it did not apply fails.

    Edge cases:

      ===============================  =======================================
      situation                        result
      ===============================  =======================================
      no clipper in ``tx``             only the finiteness check
      NaN / inf gradients              fails: "update is not finite"
      threshold ``inf``                bound trivially holds
      ``rtol`` negative or NaN         ``ValueError``
      ===============================  =======================================

    Args:
      tx: any optax transformation (or ``optax.MultiSteps``).
      rtol: relative slack on every bound.

    Returns:
      A transformation with ``tx``'s state, updates and extra-args support.

    Example:
      >>> import chex, jax, jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = oc.checked(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)))
      >>> params = {"w": jnp.zeros(2)}
      >>> update = chex.chexify(jax.jit(tx.update))
      >>> out, state = update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
      >>> chex.block_until_chexify_assertions_complete()
      >>> [round(x, 4) for x in out["w"].tolist()]
      [-0.06, -0.08]

    References:
      The JAX authors, "checkify: functionalized error checking", JAX
      documentation (jax.experimental.checkify).
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
        raise ValueError(f"rtol must be a number >= 0; got {rtol!r}.")
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    rtol = float(rtol)
    instrumented = _instrument(tx, rtol)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        new_updates, new_state = instrumented.update(updates, state, params, **extra_args)
        finite = _all_finite(new_updates)
        checkify.check(finite, "optaxclip.checked: the update is not finite (NaN or inf).")
        _check_recorded(new_state, rtol)
        return new_updates, new_state

    update_fn.passes_state_to = instrumented  # check_order reads through the guard
    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree) if _norms.is_float_leaf(x)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def _instrument(tx: Any, rtol: float) -> Any:
    """``tx`` rebuilt with every leaf transformation tapped (same state layout)."""
    try:
        return _rebuild(tx, rtol)
    except (KeyError, AttributeError, TypeError):  # not laid out as expected: tap it whole
        return _tap(tx, rtol)


def _rebuild(tx: Any, rtol: float) -> Any:
    update = _structure._unwrap(tx.update)
    closure = _structure._closure(update)
    qualname = getattr(update, "__qualname__", "")
    from_optax = (getattr(update, "__module__", "") or "").startswith("optax")
    if from_optax and qualname == "chain.<locals>.update_fn":
        inits = _structure._closure(tx.init)["init_fns"]
        return optax.chain(*[
            _instrument(optax.GradientTransformationExtraArgs(i, u), rtol)
            for i, u in zip(inits, closure["update_fns"])
        ])
    if from_optax and qualname == "named_chain.<locals>.update_fn":
        return optax.named_chain(*[(n, _instrument(t, rtol)) for n, t in closure["transforms"]])
    if from_optax and qualname == "masked.<locals>.update_fn":
        extra = _structure._closure(closure["maybe_mask_values"])
        return optax.masked(
            _instrument(closure["inner"], rtol), closure["mask"],
            mask_compatible_extra_args=extra.get("mask_compatible_extra_args", False),
        )
    if from_optax and qualname == "partition.<locals>.update_fn":
        return optax.partition(
            {k: _instrument(t, rtol) for k, t in closure["transforms"].items()},
            closure["param_labels"],
            mask_compatible_extra_args=closure.get("mask_compatible_extra_args", False),
        )
    return _tap(tx, rtol)


def _tap(tx: Any, rtol: float) -> optax.GradientTransformationExtraArgs:
    inner = optax.with_extra_args_support(tx)
    inner_update = _structure._unwrap(tx.update)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        out, new_state = inner.update(updates, state, params, **extra_args)
        if _is_clipper_state(new_state):
            _verify_clipper(updates, out, new_state, inner_update, rtol)
        return out, new_state

    update_fn.passes_state_to = inner
    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _is_clipper_state(node: Any) -> bool:
    return type(node) in _state._REGISTRY and hasattr(node, "stats")


def _clip_settings(update_fn: Any) -> tuple[float, Any]:
    """``(ord, axis_name)`` of a fixed clipper, read from its closure."""
    clip = _structure._closure(update_fn).get("clip")
    settings = _structure._closure(clip) if clip is not None else {}
    return settings.get("p", 2.0), settings.get("axis_name")


def _verify_clipper(g: Any, u: Any, new_state: Any, update_fn: Any, rtol: float) -> None:
    name = _state._REGISTRY[type(new_state)][0]
    stats = new_state.stats
    finite_in = jnp.isfinite(_norms.global_norm(g, math.inf))
    threshold = stats.threshold.astype(jnp.float32)
    limit = threshold * (1 + rtol)
    cls = type(new_state)
    if cls in (_fixed.ClipByValueState, _fixed.ClipByGlobalNormState):
        p, axis_name = _clip_settings(update_fn)
        if cls is _fixed.ClipByValueState:
            p = math.inf
        after = _norms.global_norm(u, p, axis_name=axis_name)
        before = _norms.global_norm(g, p, axis_name=axis_name)
        _check_bound(name, finite_in, after, limit, threshold)
        _check_recorded_norm(name, finite_in, before, stats.norm)
    elif cls in (_fixed.ClipByNormState, _fixed.ClipByBlockRmsState):
        p, axis_name = _clip_settings(update_fn)
        after = _norms.leaf_norms(u, p, axis_name=axis_name)
        before = _norms.leaf_norms(g, p, axis_name=axis_name)
        if cls is _fixed.ClipByBlockRmsState:
            root = lambda x: jnp.sqrt(jnp.float32(max(int(np.size(x)), 1)))
            after = jax.tree.map(lambda n, x: n / root(x), after, u)
            before = jax.tree.map(lambda n, x: n / root(x), before, g)
        flat = lambda t: jnp.concatenate(
            [jnp.ravel(x) for x in jax.tree.leaves(t)] or [jnp.zeros(1)]
        )
        _check_bound(name, finite_in, jnp.max(flat(after)), limit, threshold)
        _check_recorded_norm(name, finite_in, flat(before), flat(stats.norm))
    else:
        _check_scale_applied(name, finite_in, g, u, stats.scale, rtol)


def _check_bound(name: str, finite_in: Array, after: Array, limit: Array, threshold: Array):
    checkify.check(
        ~finite_in | (after <= limit),
        f"optaxclip.checked: {name} output has norm {{after}}, above its threshold "
        f"{{threshold}} * (1 + rtol); the clipper did not clip.",
        after=after, threshold=threshold,
    )


def _check_recorded_norm(name: str, finite_in: Array, actual: Array, recorded: Any) -> None:
    recorded, actual = jnp.ravel(jnp.asarray(recorded)), jnp.ravel(actual)
    close = jnp.abs(actual - recorded) <= 1e-4 * jnp.maximum(jnp.abs(actual), 1e-30)
    checkify.check(
        ~finite_in | jnp.all(close),
        f"optaxclip.checked: {name} recorded pre-clip norm {{recorded}} but the input's "
        f"norm is {{actual}}.",
        recorded=recorded, actual=actual,
    )


def _check_scale_applied(name: str, finite_in: Array, g: Any, u: Any, scale: Any, rtol: float):
    g_leaves, treedef = jax.tree.flatten(g)
    scale_leaves = jax.tree.leaves(scale)
    if len(scale_leaves) == 1 and jnp.ndim(scale_leaves[0]) == 0:
        scale_leaves = scale_leaves * len(g_leaves)
    elif jax.tree.structure(scale) != treedef:
        return  # a layout this check cannot align with the gradients
    u_leaves = treedef.flatten_up_to(u)
    worst = jnp.zeros([], jnp.float32)
    for grad, out, s in zip(g_leaves, u_leaves, scale_leaves):
        if not _norms.is_float_leaf(grad) or jnp.ndim(s) not in (0, jnp.ndim(grad)):
            continue
        expected = jnp.asarray(grad).astype(jnp.float32) * s.astype(jnp.float32)
        slack = (rtol + 2 * float(jnp.finfo(jnp.asarray(out).dtype).eps)) * jnp.abs(expected)
        excess = jnp.abs(jnp.asarray(out).astype(jnp.float32) - expected) - slack - 1e-30
        worst = jnp.maximum(worst, jnp.max(jnp.where(jnp.isfinite(s), excess, 0), initial=0))
    checkify.check(
        ~finite_in | (worst <= 0),
        f"optaxclip.checked: {name} recorded a scale it did not apply: the output "
        f"differs from input * scale by up to {{worst}} beyond rounding.",
        worst=worst,
    )


def _check_recorded(state: Any, rtol: float) -> None:
    """Stats-level consistency of every registered clipper anywhere in ``state``."""
    found = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_clipper_state)[0]
    for path, node in found:
        if not _is_clipper_state(node):
            continue
        name = f"{_state._REGISTRY[type(node)][0]} at state{jax.tree_util.keystr(path)}"
        stats = node.stats
        limits = getattr(node, "unit_threshold", None)
        norms, scales = jax.tree.leaves(stats.norm), jax.tree.leaves(stats.scale)
        if limits is None:
            limits = [stats.threshold] * len(norms)
        else:
            limits = jax.tree.leaves(limits)
        ok = jnp.bool_(True)
        for norm, scale, bound in zip(norms, scales, limits):
            norm, scale = norm.astype(jnp.float32), scale.astype(jnp.float32)
            consistent = (norm * scale <= bound * (1 + rtol)) & (scale >= 0) & (scale <= 1)
            ok = ok & jnp.all(~jnp.isfinite(norm) | consistent)
        checkify.check(
            ok,
            f"optaxclip.checked: {name} recorded norm * scale above its threshold, or a "
            f"scale outside [0, 1].",
        )
