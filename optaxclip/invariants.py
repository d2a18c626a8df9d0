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

from optaxclip import _norms, _structure, _validate
from optaxclip._checked import checked
from optaxclip._structure import OrderingError, Stage, find_stages

Array = jax.Array

__all__ = [
    "OrderingError",
    "Stage",
    "check_order",
    "assert_moments_bounded",
    "checked",
]


def check_order(
    tx: optax.GradientTransformation | optax.MultiSteps,
    params: optax.Params,
    *,
    on_unknown: str = "raise",
    allow_group_norms: bool = False,
) -> tuple[Stage, ...]:
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
      * update clippers (a ``ClipSpec`` with ``role="update"``, and optax's
        ``clip_by_block_rms`` right after Adafactor's ``scale_by_factored_rms``)
        are legal after the moments: they clip the preconditioned update on
        purpose. Gradient accumulation (``apply_every``, ``MultiSteps``) is
        neither a clipper nor a moment, so a clipper after it passes;
      * it looks inside ``chain``, ``named_chain``, ``inject_hyperparams``,
        ``masked``, ``partition``/``multi_transform``, ``MultiSteps``,
        ``apply_if_finite``, ``conditionally_mask``/``conditionally_transform``,
        ``flatten``, ``optax.contrib.schedule_free`` (so
        ``schedule_free_adamw`` passes), ``lookahead`` and optaxclip's guards
        and ``checked``;
      * a user's own transformation, also one built with ``optax.stateless`` or
        ``optax.stateless_with_tree_map``, is unknown: it could be a clipper
        after the moments, so by default it raises when it could hide a wrong
        order;
      * a global clipper inside ``partition``/``multi_transform``/``masked``
        computes the norm of its group only: ``UserWarning`` unless
        ``allow_group_norms=True``;
      * masks are honoured: a clipper and an accumulator on disjoint parameter
        subsets do not conflict. Note that a global clipper inside ``masked`` or
        ``multi_transform`` clips only its subset: its norm is the norm of the
        selected parameters' gradients, and the others pass through unclipped;
      * Adafactor's own update clipping (``clip_by_block_rms`` right after
        ``scale_by_factored_rms``, as ``optax.adafactor`` builds it) is an update
        clipper, found by its place in the chain.

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
      allow_group_norms: say that a global clipper inside ``partition`` or
        ``masked`` is meant to clip each group by its own norm (no warning).

    Returns:
      The stages in the order they are applied, each a ``Stage`` (name, kind
      ``"clipper"``/``"update_clipper"``/``"moment"``/``"accumulation"``/
      ``"other"``/``"unknown"``, location).

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
    grouped = _structure.group_norm_problems(stages)
    if grouped and not allow_group_norms:
        warnings.warn(
            "check_order: " + "\n  ".join(grouped) + ".\nTo clip by the norm of the whole "
            "tree, put the clipper before the partition: optax.chain(clipper, "
            "optax.partition(...)); for separate thresholds per group use "
            "optaxclip.clip_by_group_norms. If a per-group norm is intended, pass "
            "allow_group_norms=True.",
            UserWarning,
            stacklevel=2,
        )
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
        # Entries inside each leaf's dtype (fp16's largest is 65504): a gradient cast
        # to inf would be the clipper's documented NaN, not a test of the ordering.
        for x, d in zip(leaves, direction):
            if d is not None and d.size:
                cap = float(jnp.finfo(jnp.asarray(x).dtype).max) / 4
                size = min(size, cap / max(float(np.max(np.abs(d))), 1e-30))
        if size <= 2 * max_norm:
            raise ValueError(
                f"max_norm={max_norm!r} leaves no room above it in the parameters' "
                f"dtypes: gradients past the clip ball would overflow them. Pass a "
                f"smaller max_norm, or float32 parameters."
            )
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
    after every step, measures each accumulator that consumes the gradient. In
    a narrow dtype the norm is lowered so every entry stays under a quarter of
    the dtype's largest value (fp16: 16376); a ``ValueError`` says so when that
    leaves the gradients less than twice ``max_norm``.

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
      Adagrad                    ``s = s + g^2``         ``sqrt(sum s - sum s0)``
      ``sum_of_squares``                                 ``<= c sqrt(n)``
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
    max_norm = _validate.validate_real(
        max_norm, "max_norm", low=0.0, high=math.inf, low_open=True, high_open=True,
        hint="Pass the radius of the clip ball your clipper guarantees, e.g. max_norm=1.0.",
    )
    steps = _validate.validate_int(steps, "steps")
    seed = _validate.validate_int(seed, "seed", minimum=0)
    rtol = _validate.validate_real(rtol, "rtol", low=0.0, high=math.inf)
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
