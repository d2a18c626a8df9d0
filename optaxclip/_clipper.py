"""The one skeleton every clipper is built from: ``make_clipper(spec, rule)``.

An update runs the same five steps for every clipper:

1. **measure** the norm(s) the spec's scope asks for (``_norms``: one fused,
   overflow-safe read of the gradients);
2. ask the **rule** for the threshold: a fixed number or schedule
   (``fixed_threshold``), or a pure function of the norm, the clipper's own
   state and the parameters (adaptive clippers);
3. turn norm and threshold into a **scale** (``_scaling.scale_factor``);
4. **apply** it to each leaf in the leaf's own dtype;
5. return the new state: step count, ``ClipStats`` and the rule's fields.

The state's dtypes never change after ``init`` (state restored as numpy
arrays is accepted, and donated state can be reused), so ``lax.scan`` carries,
donation and checkpoints all see one layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optaxclip import _history, _norms, _reductions, _scaling, _shards, _spec, _validate
from optaxclip._norms import is_float_leaf
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats

Array = jax.Array

__all__ = ["ThresholdRule", "fixed_threshold", "make_clipper"]

# (norm, state, params) -> (threshold, {rule field: new value})
# (norm, state, params) -> (threshold, new fields); rules with ``uses_parts`` also get
# the norm's parts as a fourth argument.
ThresholdFn = Callable[..., tuple[Any, dict[str, Any]]]


def _no_fields(params: Any) -> dict[str, Any]:
    del params
    return {}


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """Where a clipper's threshold comes from.

    Attributes:
      threshold: ``(norm, state, params) -> (threshold, new_fields)``. ``norm``
        is what the spec's scope measured (a scalar, or a tree of per-leaf or
        per-unit arrays), ``state`` the clipper's state before this update (its
        ``count`` is the step), ``params`` what ``update`` was given. It returns
        the threshold (a scalar, or a tree shaped like ``norm``; numbers or
        arrays, held in float32 or wider and clamped at 0, NaN kept) and the new
        values of the rule's own state fields. Must be pure and jit-friendly.
      init: ``params -> {field: initial array}`` for the rule's state fields.
      fields: the names of those fields, in order (they follow ``count`` and
        ``stats`` in the state).
      needs_params: ``update`` raises a clear error when called without params.
      initial: ``(norm, params) -> threshold`` recorded by ``init``, before any
        update; by default ``threshold`` is called with zero norms. Rules whose
        threshold needs collectives (``axis_name``) or real parameters supply it.
      uses_parts: ``threshold`` also receives the norms' ``(root, multiplier)``
        parts as a fourth argument (``norm = root * multiplier``, both finite for
        finite gradients even where the norm overflows); AdaGC uses them.
      uses_norm: ``threshold`` reads its ``norm`` argument. A rule that does not
        (a fixed threshold) may be called with ``norm=None``; an element-wise
        clipper then measures its statistics in the same pass as the clamp.
    """

    threshold: ThresholdFn
    init: Callable[[Any], dict[str, Any]] = _no_fields
    fields: tuple[str, ...] = ()
    needs_params: bool = False
    initial: Callable[[Any, Any], Any] | None = None
    uses_parts: bool = False
    uses_norm: bool = True


def fixed_threshold(value: _scaling.Threshold, name: str = "threshold") -> ThresholdRule:
    """A rule for a threshold that is a number, a scalar array or a schedule of the step.

    ``name`` is the argument's name in error messages. A static value is
    validated now; a traced or scheduled one is clamped at 0 at update time.
    """
    _validate.validate_threshold(value, name)

    def threshold(norm: Any, state: Any, params: Any) -> tuple[Array, dict[str, Any]]:
        del norm, params
        return _scaling.threshold_at(value, state.count), {}

    return ThresholdRule(threshold=threshold, uses_norm=False)


@functools.cache
def _generated_state_class(name: str, fields: tuple[str, ...]) -> type:
    class_name = "".join(part.capitalize() for part in name.split("_")) + "State"
    annotations = [("count", Array), ("stats", ClipStats)] + [(f, Any) for f in fields]
    return NamedTuple(class_name, annotations)


def make_clipper(
    spec: ClipSpec, rule: ThresholdRule, *, state_cls: type | None = None
) -> optax.GradientTransformationExtraArgs:
    """Builds a clipper from its spec and its threshold rule.

    The result is an ordinary ``optax.GradientTransformationExtraArgs``. Its
    update function carries ``spec`` (``optaxclip.spec_of``), and its state class
    is registered with it, so ``stats()``, ``check_order``, ``checked`` and the
    contract checks in ``optaxclip.testing`` handle it like a built-in clipper.

    Args:
      spec: what the clipper is (name, scope, role, norm order ...).
      rule: where its threshold comes from, e.g. ``fixed_threshold(1.0)``.
      state_cls: a ``NamedTuple`` with fields ``("count", "stats", *rule.fields)``;
        by default one is made, named after ``spec.name``
        (``"clip_by_rms"`` -> ``ClipByRmsState``).

    Returns:
      The clipper; its state is ``state_cls(count, stats, *rule fields)``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> spec = oc.ClipSpec("clip_by_max_entry", scope="global", ord=float("inf"))
      >>> tx = oc.make_clipper(spec, oc.fixed_threshold(1.0))
      >>> out, state = tx.update([jnp.array([4.0, -2.0])], tx.init(None))
      >>> out[0].tolist(), float(oc.stats(state)["clip_by_max_entry/norm"])
      ([1.0, -0.5], 4.0)
    """
    if not isinstance(spec, ClipSpec):
        raise TypeError(f"spec must be an optaxclip.ClipSpec; got {type(spec).__name__}.")
    if not isinstance(rule, ThresholdRule):
        raise TypeError(
            f"rule must be an optaxclip.ThresholdRule (e.g. optaxclip.fixed_threshold(1.0)); "
            f"got {type(rule).__name__}."
        )
    expected = ("count", "stats", *rule.fields)
    if state_cls is None:
        state_cls = _generated_state_class(spec.name, tuple(rule.fields))
    elif tuple(getattr(state_cls, "_fields", ())) != expected:
        raise ValueError(
            f"state_cls {getattr(state_cls, '__name__', state_cls)!r} must be a NamedTuple with "
            f"fields {expected}; got {getattr(state_cls, '_fields', None)}."
        )
    _spec.register_spec(state_cls, spec)

    def init_fn(params: Any) -> Any:
        norm = _initial_norm(spec, params)
        fields = rule.init(params)
        _check_fields(spec, rule, fields)
        placeholder = state_cls(
            count=jnp.zeros([], jnp.int32),
            stats=ClipStats(norm=norm, threshold=jnp.zeros([], jnp.float32)),
            **fields,
        )
        if rule.initial is not None:
            threshold = rule.initial(norm, params)
        elif rule.uses_parts:
            zero_parts = [(n, jnp.ones_like(n)) for n in jax.tree.leaves(norm)]
            threshold, _ = rule.threshold(norm, placeholder, params, zero_parts)
        else:
            threshold, _ = rule.threshold(norm, placeholder, params)
        threshold = _clamped(threshold)
        state = placeholder._replace(stats=_initial_stats(spec, norm, threshold))
        # Every field its own buffer, so that the whole state can be donated.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        del extra_args
        if rule.needs_params and params is None:
            raise ValueError(
                f"{spec.name} needs the parameters: its threshold depends on them. "
                f"Call tx.update(grads, state, params)."
            )
        if rule.needs_params:
            _check_params_match(spec.name, updates, params)
        # Restored checkpoints hold numpy arrays; everything below wants jax arrays.
        state = jax.tree.map(jnp.asarray, state)
        if spec.scope == "element" and spec.role != "monitor" and not rule.uses_norm:
            # The threshold does not need the norm: the clamp's own pass over the
            # gradients measures it (one read instead of two; see _clip_entries).
            threshold, fields = rule.threshold(None, state, params)
            _check_fields(spec, rule, fields)
            out, record = _clip_entries(spec, updates, None, _clamped(threshold))
        else:
            norm, parts = measure_parts(spec, updates)
            if rule.uses_parts:
                threshold, fields = rule.threshold(norm, state, params, parts)
            else:
                threshold, fields = rule.threshold(norm, state, params)
            _check_fields(spec, rule, fields)
            out, record = _clip(spec, updates, norm, parts, _clamped(threshold))
        new_state = state._replace(
            count=optax.safe_increment(state.count), stats=record, **fields
        )
        return out, _keep_dtypes(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, _spec.attach(update_fn, spec))


def _clamped(threshold: Any) -> Any:
    """A rule's threshold(s) as floats of at least float32, clamped at 0 (NaN stays).

    The built-in rules clamp their own; a user's rule may return a Python number or
    a negative value, which would otherwise flip the gradients' signs.
    """
    def clamp(t: Any) -> Array:
        t = jnp.asarray(t)
        dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
        return jnp.maximum(t.astype(jnp.promote_types(dtype, jnp.float32)), 0)

    return jax.tree.map(clamp, threshold)


def _check_params_match(name: str, updates: Any, params: Any) -> None:
    """Raise a ValueError naming ``params`` when it is not shaped like the gradients."""
    grad_leaves, treedef = jax.tree.flatten(updates)
    try:
        param_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{name}: params must have the same tree structure as the gradients; "
            f"gradients are {treedef}, params are {jax.tree.structure(params)} ({error}). "
            f"Pass the parameters the gradients were taken of."
        ) from None
    for i, (g, p) in enumerate(zip(grad_leaves, param_leaves)):
        if not is_float_leaf(g):
            continue
        if p is None or not is_float_leaf(p):
            path = _leaf_paths(updates)[i]  # only for the message
            raise ValueError(
                f"{name}: params{path} is {p!r:.60}, but its gradient is a float array: "
                f"the threshold needs a float parameter there. Pass the parameters the "
                f"gradients were taken of."
            )
        g_shape, p_shape = tuple(jnp.shape(g)), tuple(jnp.shape(p))
        if p_shape != g_shape:
            path = _leaf_paths(updates)[i]  # only for the message
            raise ValueError(
                f"{name}: params{path} has shape {p_shape} but its gradient has "
                f"shape {g_shape}. Pass the parameters the gradients were taken of."
            )


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_fields(spec: ClipSpec, rule: ThresholdRule, fields: Any) -> None:
    if not isinstance(fields, dict) or set(fields) - set(rule.fields):
        raise ValueError(
            f"{spec.name}: the threshold rule must return a dict with keys among "
            f"{rule.fields}; got {fields!r}."
        )


def _keep_dtypes(new: Any, old: Any) -> Any:
    """``new`` with every leaf cast to the dtype ``old`` had (the layout init made)."""
    new_leaves, treedef = jax.tree.flatten(new)
    old_leaves, old_treedef = jax.tree.flatten(old)
    if treedef != old_treedef:
        return new
    return treedef.unflatten(
        n.astype(o.dtype) if n.dtype != o.dtype else n for n, o in zip(new_leaves, old_leaves)
    )


# ---------------------------------------------------------------- scopes


@dataclasses.dataclass(frozen=True)
class StackedSpec(ClipSpec):
    """The spec of a per-leaf or unit-wise clipper whose leaves stack layers on axis 0.

    Each index along every leaf's leading axis is a layer (``nn.scan``,
    ``lax.scan`` over a layer stack), measured as the unstacked clipper would
    measure a leaf of the remaining shape: a ``[L, d]`` leaf has one norm per
    layer, a ``[L, in, out]`` kernel under AGC one per layer and output unit, a
    ``[L]`` leaf one per entry. Scalars are one layer.
    """

    stacked_layers: ClassVar[bool] = True


def stacked_spec(spec: ClipSpec, stacked: Any) -> ClipSpec:
    """``spec`` as a ``StackedSpec`` when ``stacked`` is True; validates ``stacked``."""
    if not isinstance(stacked, bool):
        raise ValueError(
            f"stacked must be True (every leaf's leading axis indexes stacked layers, as "
            f"flax's nn.scan and jax.lax.scan lay them out) or False; got {stacked!r}."
        )
    if not stacked:
        return spec
    if spec.scope not in ("leaf", "unit"):
        raise ValueError(
            f"{spec.name}: stacked applies to per-leaf and unit-wise clippers; its scope is "
            f"{spec.scope!r}."
        )
    return StackedSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})


def reduced_axes(spec: ClipSpec, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes one norm of ``spec`` reduces over in a leaf of ``shape`` (None: all)."""
    if isinstance(spec, StackedSpec) and len(shape) >= 1:
        per_layer = _unstacked_reduced_axes(spec, tuple(shape[1:]))
        per_layer = range(len(shape) - 1) if per_layer is None else per_layer
        return tuple(axis + 1 for axis in per_layer)  # the layer axis 0 is kept
    return _unstacked_reduced_axes(spec, shape)


def _unstacked_reduced_axes(spec: ClipSpec, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if spec.scope != "unit" or len(shape) <= 1:
        return None
    ndim = len(shape)
    kept = set()
    for axis in spec.unit_axes:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{spec.name}: unit axis {axis} is out of range for a leaf of shape {shape}. "
                f"Pass an output axis that every >1-D leaf has, e.g. axis=-1."
            )
        kept.add(axis % ndim)
    return tuple(i for i in range(ndim) if i not in kept)


def _unit_shape(spec: ClipSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = reduced_axes(spec, shape)
    if axes is None:
        return ()
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _per_leaf(spec: ClipSpec) -> bool:
    return spec.scope in ("leaf", "unit")


def _initial_norm(spec: ClipSpec, params: Any) -> Any:
    if not _per_leaf(spec):
        return jnp.zeros([], _history.dtype_for(params))

    def zeros(x: Any) -> Array:
        if not is_float_leaf(x):
            return jnp.zeros([0], jnp.float32)  # no entries to measure (see measure_parts)
        return unit_zeros(spec, x, _norms.accumulation_dtype(jnp.result_type(x)))

    return jax.tree.map(zeros, params)


def unit_zeros(spec: ClipSpec, x: Any, dtype: Any) -> Array:
    """Zeros shaped (and, under Explicit mesh axes, sharded) like ``spec``'s norms of ``x``."""
    shape = tuple(jnp.shape(x))
    unit_shape = _unit_shape(spec, shape)
    sharding = _kept_sharding(x, reduced_axes(spec, shape))
    if sharding is None:
        return jnp.zeros(unit_shape, dtype)
    return jnp.zeros(unit_shape, dtype, out_sharding=sharding)


def _kept_sharding(x: Any, axes: tuple[int, ...] | None) -> Any:
    """The sharding type a per-unit norm of ``x`` over ``axes`` has, or None.

    Under Explicit mesh axes a reduction keeps the kept axes' sharding in its
    type (a ``P("data", "model")`` kernel has per-column norms ``P("model")``),
    so the zeros ``init`` records must carry it too, or the state's type would
    change after the first update. None (a plain replicated array) when the
    type names no mesh axis: unsharded, or Auto axes the partitioner decides.
    """
    if axes is None:
        return None
    try:
        sharding: Any = getattr(jax.typeof(x), "sharding", None)
    except TypeError:  # not an array or a ShapeDtypeStruct (a Python float)
        return None
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    spec = tuple(spec) + (None,) * (jnp.ndim(x) - len(spec))
    kept = tuple(entry for i, entry in enumerate(spec) if i not in axes)
    if all(entry is None for entry in kept):
        return None
    concrete = getattr(x, "sharding", None)
    if isinstance(concrete, jax.sharding.NamedSharding) and not _validate.is_traced(x):
        # A concrete array or struct, maybe outside any ``jax.set_mesh``: its own mesh.
        return jax.sharding.NamedSharding(concrete.mesh, jax.sharding.PartitionSpec(*kept))
    return sharding.update(spec=jax.sharding.PartitionSpec(*kept))


def _initial_stats(spec: ClipSpec, norm: Any, threshold: Any) -> ClipStats:
    if spec.scope == "element":
        return ClipStats(norm=norm, threshold=threshold, clipped=jnp.zeros([], bool))
    return ClipStats(norm=norm, threshold=threshold, scale=jax.tree.map(jnp.ones_like, norm))


def _float_positions(leaves: list[Any]) -> list[int]:
    return [i for i, x in enumerate(leaves) if is_float_leaf(x)]


def _root_count(counts: list[tuple[int, Any]], axis_name: Any, dtype: Any) -> Array:
    """The square root of how many entries a norm covers, across ``axis_name`` shards too.

    In ``dtype``, the norm's own: under x64 a float32 root of 2 would put the RMS of
    float64 ones 2e-8 above 1, and clip them at threshold 1.

    ``counts`` holds ``(entries on this shard, the array they are in)`` pairs:
    each array's entries are counted once per shard along the axes it varies
    along (all of ``axis_name`` without replication checking; see ``_norms``).
    """
    total = 0
    for count, x in counts:
        axes = _shards.reduction_axes(x, axis_name)
        total = total + (lax.psum(count, axes) if axes is not None else count)
    return jnp.sqrt(jnp.maximum(jnp.asarray(total, dtype), 1))


def measure(spec: ClipSpec, updates: Any) -> Any:
    """The norm(s) ``spec`` clips by: a scalar, or a tree of per-leaf/unit arrays."""
    return measure_parts(spec, updates)[0]


def measure_parts(spec: ClipSpec, updates: Any) -> tuple[Any, Any]:
    """``(norm, parts)``: the norm(s) and their ``(root, multiplier)`` parts.

    ``norm = root * multiplier``; both parts are finite for finite gradients even
    where the norm overflows the accumulation dtype (see ``_norms._norm``). For
    the global and element scopes ``parts`` is one pair; for per-leaf scopes a
    list aligned with the tree's leaves (None for leaves that are not floats).
    """
    if spec.scope == "element":
        return _norms.global_norm(updates, math.inf, axis_name=spec.axis_name), None
    if spec.scope == "global":
        leaves = _norms._float_leaves(updates)
        root, multiplier = _norms.global_norm_parts(leaves, spec.ord, spec.axis_name)
        if spec.rms:
            counts = [(x.size, x) for x in leaves]
            root = root / _root_count(counts, spec.axis_name, root.dtype)
        return _norms._norm(root, multiplier), (root, multiplier)
    leaves, treedef = jax.tree.flatten(updates)
    positions = _float_positions(leaves)
    arrays = [jnp.asarray(leaves[i]) for i in positions]
    axes = [reduced_axes(spec, tuple(x.shape)) for x in arrays]
    found = _norms.unit_norm_parts(arrays, spec.ord, axes, spec.axis_name)
    # A leaf that is not a float has no entries to measure: its record holds none, so
    # the summaries (largest norm, clipped_fraction) leave it out, as the norms do.
    out: list[Any] = [jnp.zeros([0], jnp.float32) for _ in leaves]
    parts: list[Any] = [None for _ in leaves]
    for i, x, a, (root, multiplier) in zip(positions, arrays, axes, found):
        if spec.rms:
            count = math.prod(x.shape[d] for d in a) if a is not None else x.size
            root = root / _root_count([(count, x)], spec.axis_name, root.dtype)
        out[i], parts[i] = _norms._norm(root, multiplier), (root, multiplier)
    return treedef.unflatten(out), parts


def _clip(spec: ClipSpec, updates: Any, norm: Any, parts: Any,
          threshold: Any) -> tuple[Any, ClipStats]:
    if spec.role == "monitor":
        # Measured only: the updates go out as they came in, bit for bit.
        return updates, ClipStats(
            norm=norm, threshold=threshold, scale=jax.tree.map(jnp.ones_like, norm)
        )
    if spec.scope == "element":
        return _clip_entries(spec, updates, norm, threshold)
    if spec.scope == "global":
        shared = sum(is_float_leaf(g) for g in jax.tree.leaves(updates)) >= _SHARED_FROM
        scale, low = _scale(spec, norm, parts, threshold, shared=shared)
        out = jax.tree.map(lambda g: _scaling.apply_scale(g, scale, low), updates)
        return out, ClipStats(norm=norm, threshold=threshold, scale=scale * low)
    leaves, treedef = jax.tree.flatten(updates)
    norm_leaves = treedef.flatten_up_to(norm)
    # One scalar threshold serves every leaf; otherwise it is shaped like ``norm``.
    shared = hasattr(threshold, "dtype") and jnp.ndim(threshold) == 0
    limits = [threshold] * len(leaves) if shared else treedef.flatten_up_to(threshold)
    scales = [jnp.ones_like(n) for n in norm_leaves]
    out = list(leaves)
    positions = _float_positions(leaves)
    pairs = _leaf_scales(spec, [norm_leaves[i] for i in positions],
                         [parts[i] for i in positions], [limits[i] for i in positions],
                         [jnp.size(leaves[i]) for i in positions])
    for i, (s, low) in zip(positions, pairs):
        scales[i] = s * low
        axes = reduced_axes(spec, tuple(jnp.shape(leaves[i])))
        if axes is not None:
            s, low = jnp.expand_dims(s, axes), jnp.expand_dims(low, axes)
        out[i] = _scaling.apply_scale(leaves[i], s, low)
    return treedef.unflatten(out), ClipStats(
        norm=norm, threshold=threshold, scale=treedef.unflatten(scales)
    )


def _leaf_scales(spec: ClipSpec, norms: list, parts: list, thresholds: list,
                 sizes: list[int]) -> list[tuple[Array, Array]]:
    """``_scale`` for each leaf's norm (a scalar, or one per unit); ``sizes``: the
    leaves' entry counts.

    Where a leaf of ``_UNIT_SCALES_FROM`` entries or more has units (its norm is a
    vector), the scales of all such leaves are computed behind one conditional
    (``_scales_behind_a_cond``), so that each unit's scale is computed once rather
    than once per entry of its leaf. A scalar norm's logic costs nothing per entry
    (XLA hoists it), and in small leaves the recomputation costs less than the
    conditional's extra compile time: those keep the select form.
    """
    if spec.ord == math.inf:
        return [_scale(spec, n, p, t) for n, p, t in zip(norms, parts, thresholds)]
    shared = [i for i, (n, size) in enumerate(zip(norms, sizes))
              if jnp.ndim(n) and size >= _UNIT_SCALES_FROM]
    behind = dict(zip(shared, _scales_behind_a_cond(
        spec, [norms[i] for i in shared], [parts[i] for i in shared],
        [thresholds[i] for i in shared]) if shared else []))
    return [behind[i] if i in behind else _scale(spec, n, p, t)
            for i, (n, p, t) in enumerate(zip(norms, parts, thresholds))]


# From this many entries, a leaf whose norm has units gets its scales from the
# conditional of ``_leaf_scales``. The tests patch it (0: every such leaf; a huge
# value: the select form) to compare the two forms bit for bit.
_UNIT_SCALES_FROM = 2**12


# From this many float leaves the global scale is computed behind a conditional
# (see _scale). Below it the copies are cheap to compile, and a GPU would pay for
# the conditional's predicate read on every step.
_SHARED_FROM = 32


def _scale(spec: ClipSpec, norm: Array, parts: tuple[Array, Array],
           threshold: Any, *, shared: bool = False) -> tuple[Array, Array]:
    """``min(1, threshold / (norm + eps))`` with the library's edge cases, as the
    pair ``(scale, low)`` of ``_scaling.split_tiny``: their product is the scale.

    A norm of finite gradients can exceed the accumulation dtype's range (float32
    entries near 3.4e38): it is recorded as ``inf``, and its scale is computed
    from the norm's parts, ``threshold / multiplier / root``, so finite input
    still gives finite output inside the ball. No extra pass is needed. A scale
    below the normal range (threshold 1, norm 1e38) is kept as a normal number
    times a power of two, so finite entries are scaled, not flushed to zero.

    ``shared``: the scale is applied to many leaves (``_SHARED_FROM``). Then the
    overflowed norm's case is a ``lax.cond`` rather than a select. The values are
    bit for bit the same; what changes is that the conditional's outputs are
    computed once. Without it XLA copies the scalar edge-case logic (about 40
    instructions) into every leaf's scaling kernel. At 2,000 leaves that made the
    optimized HLO 2.6x larger and the compile about 25% slower.
    """
    if not shared:
        return _rescued_scale(spec.eps, spec.strict_nonfinite, norm, parts,
                              jnp.asarray(threshold))
    (pair,) = _scales_behind_a_cond(spec, [norm], [parts], [threshold])
    return pair


def _plain_scale(eps: float, strict_nonfinite: bool, norm: Array,
                 threshold: Array) -> tuple[Array, Array]:
    """``_scale`` for norms that did not overflow (or ``ord=inf``)."""
    scale, _ = _scaling.scale_factor(norm, threshold, eps, strict_nonfinite=strict_nonfinite)
    t = threshold.astype(scale.dtype)
    return _scaling.split_tiny(scale, t, norm.astype(scale.dtype) + eps)


def _rescued_scale(eps: float, strict_nonfinite: bool, norm: Array,
                   parts: tuple[Array, Array], threshold: Array) -> tuple[Array, Array]:
    """``_scale`` for any norm: where it overflowed, the exact scale from its parts.

    Where no norm overflowed this is bit for bit ``_plain_scale``.
    """
    scale, low = _plain_scale(eps, strict_nonfinite, norm, threshold)
    root, multiplier = parts
    wide = jnp.promote_types(threshold.dtype, root.dtype)
    return _scaling.rescale_overflowed(scale, low, jnp.isposinf(norm), threshold.astype(wide),
                                       multiplier.astype(wide), root.astype(wide))


@functools.cache
def _scale_branches(eps: float, strict_nonfinite: bool) -> tuple[Callable, Callable]:
    """The two branches of ``_scales_behind_a_cond``, cached: eager calls then find
    the compiled conditional in ``lax.cond``'s cache (it keys on the functions)."""

    def plain(norms: list, parts: list, thresholds: list) -> list:
        del parts
        return [_plain_scale(eps, strict_nonfinite, n, t) for n, t in zip(norms, thresholds)]

    def rescued(norms: list, parts: list, thresholds: list) -> list:
        return [_rescued_scale(eps, strict_nonfinite, n, p, t)
                for n, p, t in zip(norms, parts, thresholds)]

    return plain, rescued


def _scales_behind_a_cond(spec: ClipSpec, norms: list, parts: list,
                          thresholds: list) -> list[tuple[Array, Array]]:
    """``_scale`` of each norm, with the overflowed case behind one ``lax.cond``.

    The pairs are bit for bit those of ``_scale``: with no overflowed norm the
    rescue changes nothing. The conditional's outputs are materialised, which is the
    point: XLA fuses a select form's edge-case logic into every consumer, and for
    per-unit scales (a vector broadcast over a kernel's rows) that consumer is the
    elementwise update itself, so the logic (about 60 operations per unit) ran once
    per *entry*: given the gradients, AGC's update in the MLP benchmark took 4.4 ms
    against optax's 2.5 ms (2.2-2.5 ms with the conditional). Under ``jax.vmap`` a
    batched predicate turns the conditional into a select of both branches.
    """
    thresholds = [jnp.asarray(t) for t in thresholds]
    overflowed = jnp.any(jnp.stack([jnp.any(jnp.isposinf(n)) for n in norms]))
    # A traced eps (optax.inject_hyperparams) cannot key the cache: fresh branches.
    branches = _scale_branches.__wrapped__ if _validate.is_traced(spec.eps) else _scale_branches
    plain, rescued = branches(spec.eps, spec.strict_nonfinite)
    return lax.cond(overflowed, rescued, plain, norms, parts, thresholds)


def _clip_entries(spec: ClipSpec, updates: Any, norm: Array | None, threshold: Array):
    """Element-wise clipping to ``[-threshold, threshold]``; complex entries by modulus.

    Each leaf is read once for its statistics: one variadic reduction gives the
    largest magnitude (NaN if an entry is NaN) and whether a non-NaN entry is
    outside, and the clamp is selected by that flag. The select is also what
    keeps donated gradients from being copied: the clamp writes each leaf in
    place, and with a data dependency on the leaf's own reduction XLA knows the
    reduction has read the leaf first (without one it copied every donated leaf,
    13-17x ``optax.clip``'s time standalone). ``norm`` given: it is recorded
    as is; None: the largest magnitude over the leaves is.
    """
    maxima, flags = [], []

    def clip_leaf(g: Any) -> Any:
        if not is_float_leaf(g):
            return g
        g = jnp.asarray(g)
        acc = _norms.accumulation_dtype(g.dtype)
        if jnp.iscomplexobj(g):
            modulus = _norms._magnitude(g, acc)
            over = ~(modulus <= threshold)
            # Unit phase first, then the radius: threshold / modulus itself can be
            # subnormal (threshold 1, modulus 1e38) and XLA flushes it to 0. The
            # modulus, the division and the product each round: aiming two eps
            # inside the threshold keeps the output's modulus at or under it.
            # A finite entry's modulus can overflow (3e38 + 2e38j), and an infinite
            # entry's phase is that of its infinite parts: see _scaling.unit_phase.
            radius = threshold.astype(modulus.dtype) * (1 - 2 * float(jnp.finfo(modulus.dtype).eps))
            unit = _scaling.unit_phase(g, modulus, over)
            wide = unit.dtype
            # Threshold 0 zeroes every entry, subnormal ones (modulus 0) too; NaN
            # entries stay NaN, as in the real case.
            zero = (threshold == 0) & ~jnp.isnan(modulus)
            largest, changed = _largest_and_changed(modulus, (over & ~jnp.isnan(modulus)) | zero)
            scaled = jnp.where(zero, 0, unit * radius.astype(wide)).astype(g.dtype)
            clipped = jnp.where(over | zero, scaled, g)
        else:
            limit = round_down(threshold, g.dtype)
            # Written as "not inside" so that a NaN limit (a broken schedule) clips
            # every entry to NaN instead of passing the gradients through; at limit
            # 0 every entry goes to 0, subnormal ones too (XLA flushes them in
            # compares).
            outside = ~(jnp.abs(g) <= limit) | (limit == 0)
            largest, changed = _largest_and_changed(
                _norms._magnitude(g, acc), outside & ~jnp.isnan(g)
            )
            # The selects hand back the input's own bits where nothing is clipped,
            # and signed zeros at limit 0 (NaN stays NaN, as torch's clamp gives):
            # XLA on CPU flushes subnormals in min/max, which would leave a
            # subnormal in place.
            zero = jnp.where(jnp.isnan(g), g, jnp.copysign(jnp.zeros_like(g), g))
            clamped = jnp.where(limit == 0, zero, jnp.clip(g, -limit, limit))
            clipped = jnp.where(outside, clamped, g)
        maxima.append(largest)
        flags.append(changed)
        # Where no non-NaN entry is outside, the clamp would hand back the leaf
        # (NaN entries stay NaN either way).
        return jnp.where(changed | jnp.isnan(largest), clipped, g)

    out = jax.tree.map(clip_leaf, updates)
    clipped = jnp.any(jnp.stack(flags)) if flags else jnp.zeros([], bool)
    if norm is None:
        widest = _norms._widest([jnp.asarray(x) for x in _norms._float_leaves(updates)])
        norm = _reductions.max_keeping_nan(
            jnp.stack([m.astype(widest) for m in maxima]), initial=0) if maxima \
            else jnp.zeros([], widest)
        norm = _shards._pmax(norm, spec.axis_name)
    if spec.axis_name is not None:
        clipped = _shards._pmax(clipped.astype(jnp.int32), spec.axis_name) > 0
    return out, ClipStats(norm=norm, threshold=threshold, clipped=clipped)


def _largest_and_changed(magnitude: Array, changed: Array) -> tuple[Array, Array]:
    """``(max(magnitude), any(changed))`` in one pass (one variadic reduction).

    The maximum propagates NaN. The flag rides as a float (XLA:CPU reduces
    floats much faster than booleans). Statistics only: no gradient flows
    through them (``lax.reduce`` with a custom reducer has no derivative).
    """
    magnitude = lax.stop_gradient(magnitude)
    flag = jnp.where(lax.stop_gradient(changed), 1, 0).astype(magnitude.dtype)
    largest, any_changed = lax.reduce(
        (magnitude, flag),
        (jnp.zeros([], magnitude.dtype), jnp.zeros([], magnitude.dtype)),
        lambda a, b: (lax.max(a[0], b[0]), lax.max(a[1], b[1])),
        tuple(range(magnitude.ndim)),
    )
    return largest, any_changed > 0


def round_down(threshold: Array, dtype: Any) -> Array:
    """The largest value of ``dtype`` that is <= ``threshold`` (``inf`` stays ``inf``).

    A threshold at or above the dtype's largest finite value gives that value,
    so an fp16 leaf clipped at 1e5 keeps its finite entries and maps ``inf`` to
    65504, instead of computing ``inf - inf``.
    """
    real = jnp.finfo(dtype)
    wide = threshold.astype(jnp.promote_types(threshold.dtype, jnp.float32))
    capped = jnp.where(wide >= float(real.max), float(real.max), wide)
    rounded = capped.astype(real.dtype)
    too_big = rounded.astype(wide.dtype) > capped
    # nextafter has no derivative: the one-step correction is a constant to jax.grad.
    constant = lax.stop_gradient(rounded)
    step = constant - jnp.nextafter(constant, jnp.zeros_like(constant))
    limit = jnp.where(too_big, rounded - step, rounded)
    return jnp.where(wide == math.inf, jnp.asarray(math.inf, real.dtype), limit)
