"""The runtime guard ``checked``: invariants asserted inside ``jax.jit``.

Kept apart from ``invariants`` (the static and behavioural checks) because it
rebuilds transformations around taps; it is re-exported from there and from the
package root. Everything it knows about a clipper comes from the clipper's
``ClipSpec`` and ``ClipStats``; combinators are rebuilt through the table in
``_combinators``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, cast

import jax
import jax.core
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from optaxclip import _clipper, _combinators, _norms, _reductions, _scaling, _spec, _validate
from optaxclip._registry import register_factory
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats

Array = jax.Array


@register_factory(kind="wrapper")
def checked(
    tx: optax.GradientTransformation | optax.MultiSteps, *, rtol: float = 1e-6
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so every update asserts its invariants, also inside ``jax.jit``.

    After each update it asserts that the output is finite and that every
    optaxclip clipper put its output inside its clip ball, measured on the
    actual data:

    * each clipper reachable through ``chain``, ``named_chain``, ``masked``,
      ``partition``, ``MultiSteps``, ``apply_if_finite`` and optaxclip's guards
      is tapped: its real input and output are compared. The output is measured
      again in the clipper's own norm (its ``ClipSpec``: scope, order, RMS,
      ``axis_name``) against the recorded threshold(s), the recorded pre-clip
      norm is checked against the input's, and for scaling clippers
      ``out == g * scale`` is checked up to rounding (``rtol`` plus two ulps of
      the output's dtype, relative; near zero, the output dtype's smallest
      subnormal, or 1e-30 for wider dtypes, absolute). A failure names the leaf;
    * ``clip_per_example`` (no ``ClipSpec``: it reduces the batch) is checked
      on its own terms: without noise the output's norm is at most
      ``max_norm`` (times ``B`` for ``reduce="sum"``), the recorded
      ``norm_max`` is the input's largest per-example norm, and
      ``clipped_fraction`` is the fraction of examples above the threshold;
    * every clipper in the new state (reachable or not, e.g. inside
      ``inject_hyperparams``) must have recorded a consistent step:
      ``norm * scale <= threshold * (1 + rtol)`` per scope and a scale in
      ``[0, 1]``.

    Bounds are only asserted on steps whose input is finite; a non-finite input
    makes the output NaN by the library's policy, and the finiteness check
    reports it.

    The checks are ``jax.experimental.checkify`` checks, so a failure surfaces as
    ``JaxRuntimeError``:

    * eagerly, at the failing update. A wrapper that traces its inner update
      (``MultiSteps`` and ``apply_if_finite`` run it inside a ``lax.cond``) has
      its update run under ``checkify.checkify`` instead, whose error is thrown
      there; its result can then differ from the unchecked update's in the
      last bit, since the checks change how XLA fuses that computation. With
      jax 0.6 a check inside that conditional is dropped when called eagerly:
      use the jitted, checkified form there;
    * under ``jit``, only inside a checkified function. Wrap the train step:
      ``step = chex.chexify(jax.jit(train_step))``; chex raises on a later call or
      at ``chex.block_until_chexify_assertions_complete()`` (with
      ``async_check=False``, at the failing call itself). Or
      ``err, out = jax.jit(checkify.checkify(train_step))(...); err.throw()``.
      Under a plain ``jax.jit`` the update raises ``ValueError`` saying so.

    Cost: nothing when not used (it is a wrapper you add). When used, about one
    extra read of the gradients per clipper plus the output check; no host
    callbacks on the happy path beyond checkify's error value. The state is
    ``tx``'s own, so checkpoints move between checked and unchecked runs.

    Equivalents: none in optax, Keras or PyTorch.

    Formal guarantees:
      * an update whose output has a NaN/inf entry fails;
      * a clipper whose output lies outside its ball, or whose recorded norm
        differs from the input's norm by more than ``1e-4`` relative, fails;
      * a clipper that records a scale it did not apply fails.

    Edge cases:

      ===============================  =======================================
      situation                        result
      ===============================  =======================================
      no clipper in ``tx``             only the finiteness check
      NaN / inf gradients              fails: "update is not finite"
      threshold ``inf``                bound trivially holds
      ``g * scale`` < smallest subn.   passes (stored as 0; fp16: below 6e-8)
      plain ``jax.jit``                ``ValueError`` naming ``chex.chexify``
      ``tx`` is a factory              ``TypeError`` (call it first)
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
    rtol = _validate.validate_real(
        rtol, "rtol", low=0.0, high=math.inf, hint="Use e.g. rtol=1e-6."
    )
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        hint = " It looks like a factory: call it, e.g. optax.adam(1e-3)." if callable(tx) else ""
        raise TypeError(
            f"checked: tx must be an optax.GradientTransformation; got "
            f"{type(tx).__name__}.{hint}"
        )
    instrumented = _instrument(tx, rtol)

    def checked_update(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        new_updates, new_state = instrumented.update(updates, state, params, **extra_args)
        checkify.check(
            _all_finite(new_updates), "optaxclip.checked: the update is not finite (NaN or inf)."
        )
        _check_recorded(new_state, rtol)
        return new_updates, new_state

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        if _refuse_plain_jit(updates):
            return checked_update(updates, state, params, **extra_args)
        # Called eagerly: checks raise at once, at the failing update, and the
        # result is the wrapped update's own, bit for bit. A wrapped transformation
        # may still trace its inner update (optax.MultiSteps and apply_if_finite run
        # it inside a lax.cond), where a check must be functionalized; JAX refuses
        # it while tracing, before anything is computed. Such an update runs again
        # under checkify, whose error is thrown here.
        try:
            return checked_update(updates, state, params, **extra_args)
        except ValueError as error:
            if "checkify" not in str(error) or "functionalized" not in str(error):
                raise
        error, out = checkify.checkify(checked_update)(updates, state, params, **extra_args)
        error.throw()
        return out

    update_fn = _spec.attach_inner(update_fn, instrumented, None, name="")
    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _refuse_plain_jit(updates: Any) -> bool:
    """Whether ``updates`` are traced; raises a clear error under a plain ``jit``.

    checkify checks only work inside a checkified function; under a plain jit
    JAX would fail later, while lowering, with a message that does not name the
    cause. Staged tracing happens on the Python stack of the checkify call when
    there is one, so its absence there means a plain ``jit``.
    """
    leaves = [x for x in jax.tree.leaves(updates) if isinstance(x, jax.core.Tracer)]
    if not leaves or not _is_staged(leaves[0]):
        return bool(leaves)
    frame = sys._getframe(1)
    while frame is not None:
        if "checkify" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    raise ValueError(
        "optaxclip.checked runs checkify checks, and under jax.jit they must be "
        "functionalized: wrap the jitted step as chex.chexify(jax.jit(step)) (then "
        "chex.block_until_chexify_assertions_complete()), or call "
        "err, out = jax.jit(checkify.checkify(step))(...) and err.throw(). Leave "
        "optaxclip.checked out of steps you jit without them."
    )


def _is_staged(tracer: Any) -> bool:
    return "Jaxpr" in type(tracer).__name__


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree) if _norms.is_float_leaf(x)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def _instrument(tx: Any, rtol: float) -> Any:
    """``tx`` rebuilt with every leaf transformation tapped (same state layout)."""
    try:
        rebuilt = _combinators.rebuild(tx, lambda child: _instrument(child, rtol))
    except (KeyError, AttributeError, TypeError):  # not laid out as expected: tap it whole
        rebuilt = None
    return rebuilt if rebuilt is not None else _tap(tx, rtol)


def _tap(tx: Any, rtol: float) -> optax.GradientTransformationExtraArgs:
    inner = optax.with_extra_args_support(tx)
    spec = _spec.spec_of(_combinators.unwrap(tx.update))
    per_example = getattr(_combinators.unwrap(tx.update), _spec.PER_EXAMPLE_ATTRIBUTE, None)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        out, new_state = inner.update(updates, state, params, **extra_args)
        new_state = cast(Any, new_state)  # a clipper's NamedTuple state, or anything else
        if per_example is not None:
            reduce, per_layer = per_example
            _verify_per_example(reduce, per_layer, updates, out, new_state.stats, rtol)
        elif spec is not None:
            _verify_clipper(spec, updates, out, new_state.stats, rtol)
        elif _is_clipper_state(new_state) and new_state.stats.scale is not None:
            # A clipper state from an update that does not carry its spec (a
            # hand-written wrapper): its scope is known from the state class, its
            # norm settings are not, so only the recorded scale can be checked.
            class_spec = _spec.spec_for_state(new_state)
            assert class_spec is not None  # _is_clipper_state checked it
            finite_in = jnp.isfinite(_norms.global_norm(updates, math.inf))
            _check_scale_applied(class_spec, finite_in, updates, out, new_state.stats.scale, rtol)
        return out, new_state

    return optax.GradientTransformationExtraArgs(
        inner.init, _spec.attach_inner(update_fn, inner, None, name="")
    )


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) or "(the only leaf)"
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _verify_clipper(spec: ClipSpec, g: Any, u: Any, record: ClipStats, rtol: float) -> None:
    finite_in = jnp.isfinite(_norms.global_norm(g, math.inf))
    before, after = _clipper.measure(spec, g), _clipper.measure(spec, u)
    if spec.scope in ("element", "global"):
        triples = [("all leaves", before, after, record.norm, record.threshold)]
    else:
        names = _paths(before)
        norms = jax.tree.leaves(record.norm)
        thresholds = jax.tree.leaves(record.threshold)
        if len(thresholds) != len(names):
            thresholds = thresholds * len(names)
        triples = list(zip(names, jax.tree.leaves(before), jax.tree.leaves(after), norms,
                           thresholds))
    for where, actual, measured_out, recorded, threshold in triples:
        threshold = jnp.asarray(threshold)
        limit = threshold * (1 + rtol)
        checkify.check(
            ~finite_in | jnp.all(measured_out <= limit),
            f"optaxclip.checked: {spec.name} output at {where} has norm {{after}}, above its "
            f"threshold {{threshold}} * (1 + rtol): the clipper did not clip.",
            after=measured_out, threshold=threshold,
        )
        recorded = jnp.asarray(recorded).astype(actual.dtype)
        close = (actual == recorded) | (
            jnp.abs(actual - recorded) <= 1e-4 * jnp.maximum(jnp.abs(actual), 1e-30)
        )
        checkify.check(
            ~finite_in | jnp.all(close),
            f"optaxclip.checked: {spec.name} recorded pre-clip norm {{recorded}} at {where}, "
            f"but the input's norm there is {{actual}}.",
            recorded=recorded, actual=actual,
        )
    if record.scale is not None:
        _check_scale_applied(spec, finite_in, g, u, record.scale, rtol, record.norm,
                             record.threshold)


def _verify_per_example(reduce: str, per_layer: bool, g: Any, out: Any, record: Any,
                        rtol: float) -> None:
    """``clip_per_example``: the reduced output inside its ball (without noise), and
    the recorded largest norm and clipped fraction against the input's."""
    leaves = [jnp.asarray(x) for x in _norms._float_leaves(g)]
    if not leaves or leaves[0].shape[0] == 0:
        return
    batch = leaves[0].shape[0]
    finite_in = jnp.isfinite(_norms.global_norm(leaves, math.inf))
    threshold = jnp.asarray(record.threshold, jnp.float32)
    norms = _norms.batched_global_norm(leaves).astype(jnp.float32)
    bound = threshold * (batch if reduce == "sum" else 1) * (1 + rtol)
    measured = _norms.global_norm(out).astype(jnp.float32)
    checkify.check(
        ~finite_in | (record.noise_std > 0) | (measured <= bound),
        "optaxclip.checked: clip_per_example's output has norm {measured}, above the "
        "bound {bound} (max_norm, times B for reduce='sum') * (1 + rtol).",
        measured=measured, bound=bound,
    )
    largest = _reductions.max_keeping_nan(norms)
    close = (largest == record.norm_max) | (
        jnp.abs(largest - record.norm_max) <= 1e-4 * jnp.maximum(largest, 1e-30)
    )
    checkify.check(
        ~finite_in | close,
        "optaxclip.checked: clip_per_example recorded norm_max {recorded}, but the "
        "largest per-example norm of the input is {actual}.",
        recorded=record.norm_max, actual=largest,
    )
    # An example is clipped when its norm (per layer: one of its layers' norms) is
    # above the threshold; within rounding of it, either answer is right.
    if per_layer:
        limit = threshold / math.sqrt(len(leaves))
        per_leaf = jnp.stack([_norms.batched_global_norm([x]).astype(jnp.float32)
                              for x in leaves])
        surely = jnp.any(per_leaf > limit * (1 + 1e-5), axis=0)
        maybe = jnp.any(per_leaf > limit * (1 - 1e-5), axis=0)
    else:
        surely, maybe = norms > threshold * (1 + 1e-5), norms > threshold * (1 - 1e-5)
    low, high = jnp.mean(surely.astype(jnp.float32)), jnp.mean(maybe.astype(jnp.float32))
    fraction = record.clipped_fraction
    checkify.check(
        ~finite_in | ((fraction >= low - 1e-6) & (fraction <= high + 1e-6)),
        "optaxclip.checked: clip_per_example recorded clipped_fraction {fraction}, but "
        "{low} to {high} of the examples are above the threshold.",
        fraction=fraction, low=low, high=high,
    )


def _check_scale_applied(spec: ClipSpec, finite_in: Array, g: Any, u: Any, scale: Any,
                         rtol: float, norm: Any = None, threshold: Any = None) -> None:
    """``out == g * scale`` up to rounding, for every float leaf.

    A scale below the normal range (float32: 1.2e-38; threshold 1, norm 1e38)
    reads as 0 where XLA flushes subnormals, while the clipper applies it exactly
    as a normal number times a power of two (``_scaling.split_tiny``). There the
    expected output comes from the recorded ``norm`` and ``threshold`` in the
    same split form; without them (or for a norm that overflowed to ``inf``) the
    output is only held to ``|out| <= |g| * 1.2e-38``.
    """
    g_leaves, treedef = jax.tree.flatten(g)
    u_leaves = treedef.flatten_up_to(u)
    count = len(g_leaves)

    def per_leaf(tree: Any) -> list[Any]:
        if tree is None:
            return [None] * count
        if spec.scope == "global" or (hasattr(tree, "dtype") and jnp.ndim(tree) == 0):
            return [tree] * count
        return treedef.flatten_up_to(tree)

    rows = zip(_paths(g), g_leaves, u_leaves, per_leaf(scale), per_leaf(norm),
               per_leaf(threshold))
    for where, grad, out, s, n, t in rows:
        if not _norms.is_float_leaf(grad):
            continue
        grad, out, s = jnp.asarray(grad), jnp.asarray(out), jnp.asarray(s)
        axes = _clipper.reduced_axes(spec, tuple(grad.shape))

        def expand(x: Any, axes: Any = axes) -> Any:
            return x if axes is None or not jnp.ndim(x) else jnp.expand_dims(x, axes)

        wide = jnp.promote_types(_norms.accumulation_dtype(grad.dtype), jnp.float32)
        s = expand(s).astype(jnp.finfo(wide).dtype)
        tiny = float(jnp.finfo(s.dtype).tiny)
        high, low = s, jnp.ones([], s.dtype)
        known_zero = jnp.zeros([], bool)
        if n is not None and t is not None:
            n, t = expand(jnp.asarray(n)).astype(s.dtype), expand(jnp.asarray(t)).astype(s.dtype)
            high, low = _scaling.split_tiny(s, t, n + spec.eps)
            known_zero = t == 0
        # A scale below the normal range that the record cannot reproduce.
        unresolved = (s < tiny) & (high == s) & ~known_zero
        expected = grad.astype(jnp.result_type(wide, grad.dtype)) * high * low
        finfo = jnp.finfo(out.dtype)
        slack = (rtol + 2 * float(finfo.eps)) * jnp.abs(expected)
        # Near zero the output's resolution is absolute: an entry below the output
        # dtype's smallest subnormal (fp16: 6e-8) is stored as 0. 1e-30 covers
        # float32 subnormals flushed to zero.
        floor = max(1e-30, float(finfo.smallest_subnormal))
        magnitude = jnp.abs(out.astype(expected.dtype))
        excess = jnp.where(unresolved, magnitude - jnp.abs(grad).astype(magnitude.dtype) * tiny,
                           jnp.abs(out.astype(expected.dtype) - expected) - slack) - floor
        worst = jnp.max(jnp.where(jnp.isfinite(s), excess, 0), initial=0)
        checkify.check(
            ~finite_in | (worst <= 0),
            f"optaxclip.checked: {spec.name} recorded a scale it did not apply at {where}: "
            f"the output differs from input * scale by up to {{worst}} beyond rounding.",
            worst=worst,
        )


def _is_clipper_state(node: Any) -> bool:
    return _spec.spec_for_state(node) is not None


def _check_recorded(state: Any, rtol: float) -> None:
    """Stats-level consistency of every clipper anywhere in ``state``."""
    found = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_clipper_state)[0]
    for path, node in found:
        spec = _spec.spec_for_state(node)
        if spec is None or node.stats.scale is None:
            continue
        where = f"{spec.name} at state{jax.tree_util.keystr(path)}"
        norms = jax.tree.leaves(node.stats.norm)
        scales = jax.tree.leaves(node.stats.scale)
        limits = jax.tree.leaves(node.stats.threshold)
        if len(limits) != len(norms):
            limits = limits * len(norms)
        ok = jnp.bool_(True)
        for norm, scale, bound in zip(norms, scales, limits):
            wide = jnp.promote_types(jnp.asarray(norm).dtype, jnp.float32)
            norm, scale = jnp.asarray(norm).astype(wide), jnp.asarray(scale).astype(wide)
            consistent = (norm * scale <= jnp.asarray(bound) * (1 + rtol)) & (scale >= 0) & (
                scale <= 1
            )
            ok = ok & jnp.all(~jnp.isfinite(norm) | consistent)
        checkify.check(
            ok,
            f"optaxclip.checked: {where} recorded norm * scale above its threshold, or a "
            f"scale outside [0, 1].",
        )
