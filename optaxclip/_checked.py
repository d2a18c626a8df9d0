"""The runtime guard ``checked``: invariants asserted inside ``jax.jit``.

Kept apart from ``invariants`` (the static and behavioural checks) because it
rebuilds transformations around taps; it is re-exported from there and from the
package root.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from optaxclip import _norms, _state, _structure
from optaxclip import fixed as _fixed

Array = jax.Array


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
