"""``ClipStats``, and the ``stats()`` reader that walks any optax state.

Every clipper's state is a ``NamedTuple`` of arrays (so checkpoints round-trip
it) holding a ``ClipStats``: what the clipper did on its last update. The state
class is registered with the clipper's ``ClipSpec``, so ``stats()`` knows each
clipper's name, scope and extra fields without guessing. It finds clippers
anywhere in an optax state (chains, ``named_chain``, ``inject_hyperparams``,
``masked``, ``multi_transform``, ``MultiSteps``, ``nnx.Optimizer`` ...) and
returns a flat ``dict[str, Array]`` for TensorBoard or W&B. It never recomputes
a norm: it only reads what the update stored.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optaxclip import _spec
from optaxclip._reductions import max_keeping_nan, min_keeping_nan

Array = jax.Array

__all__ = ["ClipStats", "register_report", "stats"]


class ClipStats(NamedTuple):
    """What a clipper did on its last update.

    For a global clipper every field is a scalar. For per-leaf and unit-wise
    clippers ``norm`` and ``scale`` are trees shaped like the gradients (one
    array per leaf: a scalar, or one value per unit or layer), and
    ``threshold`` is either one scalar shared by all of them or a tree of the
    same shape as ``norm`` (AGC's per-unit limits, AdaGC's per-tensor limits).

    Attributes:
      norm: the pre-clip norm(s) in the clipper's own norm, accumulated in
        float32 or wider (float64 for float64 gradients). NaN or inf when the
        gradients were not finite.
      threshold: the limit(s) the norm was compared with on this step.
      scale: the factor each scope was multiplied by, in [0, 1]; NaN when a
        non-finite norm poisoned the output. ``None`` for element-wise clipping,
        which applies no common factor.
      clipped: ``None`` for scaling clippers, where it is derived:
        ``scale != 1`` (``stats()`` reports it). For element-wise clipping it
        is stored: whether any entry was changed.
    """

    norm: Any
    threshold: Any
    scale: Any = None
    clipped: Any = None

    def was_clipped(self) -> Any:
        """Whether the update was changed: a tree of bools shaped like ``norm``."""
        if self.clipped is not None:
            return self.clipped
        return jax.tree.map(lambda s: jnp.asarray(s) != 1, self.scale)


# state class -> (name, fields reported as they are), for stats classes that are
# not clippers (the guards' records).
_REPORTS: dict[type, tuple[str, tuple[str, ...]]] = {}


def register_report(cls: type, name: str, fields: tuple[str, ...]) -> type:
    """Makes ``stats()`` report the scalar ``fields`` of every ``cls`` node under ``name``."""
    _REPORTS[cls] = (name, tuple(fields))
    return cls


def _is_reported(node: Any) -> bool:
    return _spec.spec_for_state(node) is not None or type(node) in _REPORTS


def _path_label(entry: Any) -> tuple[str, bool]:
    """A key-path entry as text, and whether a reader would find it meaningful."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key), True  # named_chain names, multi_transform labels
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx), False
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return str(entry.name), False
    return str(getattr(entry, "key", entry)), False


# Attribute names of array wrappers (nnx variables) that say nothing about a leaf.
_WRAPPER_ATTRIBUTES = ("value", "raw_value")


def _leaf_key(path: tuple) -> str:
    labels = [_path_label(p)[0] for p in path]
    while labels and isinstance(path[len(labels) - 1], jax.tree_util.GetAttrKey) and (
        labels[-1] in _WRAPPER_ATTRIBUTES
    ):
        labels.pop()
    return "/".join(labels) or "0"


def _leaves(tree: Any) -> list[Array]:
    # Reading through tree.leaves also unwraps array containers such as the
    # variables nnx.Optimizer keeps its state in.
    return [jnp.asarray(x) for x in jax.tree.leaves(tree)]


def _reduce(reduce: Any, values: list[Array], empty: Any) -> Array:
    """``reduce`` over every entry of ``values``, leaf by leaf, then across leaves.

    Not by concatenating: per-unit stats of leaves sharded in different ways
    (Explicit mesh axes) cannot be joined without a reshard, but each leaf's own
    reduction is replicated and those stack. With no entries at all (only leaves
    that are not floats, or a ``(5, 0)`` kernel's units) the result is ``empty``,
    what a leaf without entries reports.
    """
    nonempty = [x for x in values if x.size]
    if not nonempty:
        return jnp.asarray(empty, values[0].dtype if values else jnp.float32)
    return reduce(jnp.stack([reduce(x) for x in nonempty]))


def _fraction(flags: list[Array]) -> Array:
    count = sum(x.size for x in flags)
    hits = jnp.sum(jnp.stack([jnp.sum(x.astype(jnp.float32)) for x in flags]))
    return hits / max(count, 1)


def _summaries(record: ClipStats, scope: str, per_leaf: bool,
               stacked: bool = False) -> dict[str, Array]:
    """Scalars for one ClipStats; per-leaf and unit-wise stats are summarised."""
    norms = _leaves(record.norm)
    thresholds = _leaves(record.threshold)
    clipped = _leaves(record.was_clipped())
    scales = None if record.scale is None else _leaves(record.scale)
    if scope in ("global", "element"):
        out = {"norm": norms[0], "threshold": thresholds[0]}
        if scales is not None:
            out["scale"] = scales[0]
        out["clipped"] = clipped[0]
        return out
    out: dict[str, Array] = {}
    if norms:
        # max propagates NaN, so a single non-finite leaf shows in the summary.
        out["norm"] = _reduce(max_keeping_nan, norms, 0)
    if _is_shared(record.threshold):
        out["threshold"] = thresholds[0]
    elif thresholds:
        out["threshold_min"] = _reduce(min_keeping_nan, thresholds, jnp.inf)
        out["threshold_max"] = _reduce(max_keeping_nan, thresholds, jnp.inf)
    if norms and scales is not None:
        out["scale"] = _reduce(min_keeping_nan, scales, 1)
        out["clipped"] = _reduce(jnp.any, clipped, False)
        out["clipped_fraction"] = _fraction(clipped)
    if per_leaf:
        out.update(_per_leaf(record, scales is not None, layered=scope == "leaf" or stacked))
    return out


def _is_shared(threshold: Any) -> bool:
    """Whether ``threshold`` is one scalar (possibly in an array wrapper), not a tree."""
    entries = jax.tree_util.tree_flatten_with_path(threshold)[0]
    containers = (jax.tree_util.DictKey, jax.tree_util.SequenceKey)
    return len(entries) == 1 and jnp.ndim(entries[0][1]) == 0 and not any(
        isinstance(key, containers) for key in entries[0][0]
    )


def _per_leaf(record: ClipStats, has_scale: bool, layered: bool = False) -> dict[str, Array]:
    """``leaves/<leaf path>/<field>`` entries; per-unit values are summarised per leaf.

    With ``layered`` (a per-leaf clipper, or a stacked unit-wise one), a leaf
    whose norm has a leading axis holds stacked layers (``stacked=True``): each
    layer also gets ``leaves/<leaf path>/layers/<index>/<field>`` entries, its
    per-unit values summarised per layer as the leaf's are.
    """
    out = {}
    norm_entries = jax.tree_util.tree_flatten_with_path(record.norm)[0]
    thresholds = None if _is_shared(record.threshold) else jax.tree.leaves(record.threshold)
    scales = jax.tree.leaves(record.scale) if has_scale else None
    flags = jax.tree.leaves(record.was_clipped())
    for index, (path, norm) in enumerate(norm_entries):
        key = f"leaves/{_leaf_key(path)}"
        # A leaf without entries (a (5, 0) kernel's units; a leaf that is not a
        # float) reports norm 0, no limit, scale 1, not clipped.
        out[f"{key}/norm"] = max_keeping_nan(norm, initial=0)
        if thresholds is not None:
            out[f"{key}/threshold"] = min_keeping_nan(thresholds[index], initial=jnp.inf)
        if scales is not None:
            out[f"{key}/scale"] = min_keeping_nan(scales[index], initial=1)
        out[f"{key}/clipped"] = jnp.any(jnp.asarray(flags[index]))
        if layered and jnp.ndim(norm) >= 1:
            out.update(_per_layer(key, index, norm, thresholds, scales, flags))
    return out


def _per_layer(key: str, index: int, norm: Any, thresholds: Any, scales: Any,
               flags: Any) -> dict[str, Array]:
    out = {}
    for layer in range(jnp.shape(norm)[0]):
        prefix = f"{key}/layers/{layer}"
        out[f"{prefix}/norm"] = max_keeping_nan(jnp.asarray(norm)[layer], initial=0)
        if thresholds is not None:
            limit = jnp.asarray(thresholds[index])
            out[f"{prefix}/threshold"] = min_keeping_nan(limit[layer], initial=jnp.inf) \
                if limit.ndim else limit
        if scales is not None:
            out[f"{prefix}/scale"] = min_keeping_nan(jnp.asarray(scales[index])[layer],
                                                     initial=1)
        out[f"{prefix}/clipped"] = jnp.any(jnp.asarray(flags[index])[layer])
    return out


def _values(node: Any, per_leaf: bool) -> tuple[str, dict[str, Array]]:
    spec = _spec.spec_for_state(node)
    if spec is not None:
        values = _summaries(node.stats, spec.scope, per_leaf, _spec.is_stacked(spec))
        values.update(_stat_fields(node, spec.stat_fields))
        return spec.name, values
    name, fields = _REPORTS[type(node)]
    return name, {field: _leaves(getattr(node, field))[0] for field in fields}


def _warn_once(key: str, message: str) -> None:
    # Python's default warning filter shows it once per calling line.
    del key
    warnings.warn(message, UserWarning, stacklevel=3)


def stats(opt_state: Any, *, per_leaf: bool = False) -> dict[str, Array]:
    """A flat ``{name/field: array}`` dict of every clipper's stats in ``opt_state``.

    Keys are ``<clipper>/<field>``, e.g. ``clip_by_global_norm/norm``, prefixed
    by ``named_chain`` names and ``multi_transform`` labels when present. When two
    clippers would share a key, both get their full path in the state instead
    (``0/clip_by_global_norm/norm`` and ``2/clip_by_global_norm/norm``), so keys
    are always unique.

    Fields: ``norm`` (pre-clip), ``threshold``, ``scale`` (the factor applied;
    not for ``clip_by_value``, which applies none) and ``clipped``. Per-leaf and
    unit-wise clippers report the largest norm as ``norm``, the smallest scale,
    ``clipped`` (any) and ``clipped_fraction`` (of the float leaves, or of the
    units; leaves that are not floats are left out, as they are from the norms);
    their limits as ``threshold`` when one limit serves every leaf, else as
    ``threshold_min`` and ``threshold_max``. ``per_leaf=True`` adds ``leaves/<leaf path>/<field>``
    entries (no key is both a value and a prefix of another key, so
    ``flax.traverse_util.unflatten_dict(stats, sep="/")`` works).

    Works eagerly and inside ``jit``; it reads stored values and never recomputes
    a norm. The values are copies, so a metrics dict outlives a later step that
    donates the state. States restored without a target, or taken with ``nnx.state``, are
    plain dicts: they are still read (see ``Edge cases``).

    Edge cases:

      ===========================================  ================================
      ``opt_state``                                result
      ===========================================  ================================
      no optaxclip clipper in it                   ``{}`` and a ``UserWarning``
                                                   (once) naming likely causes
      a dict from an untargeted restore or         read by the shape of the
      ``nnx.state(optimizer)``                     clipper states and of the guards'
                                                   and ``spam``'s records; a clipper
                                                   whose layout others share is
                                                   named ``clipper`` (a
                                                   ``UserWarning`` says so once)
      not a pytree of arrays (a string, a model)   ``TypeError``
      ===========================================  ================================

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> for key, value in oc.stats(state).items():
      ...     print(key, float(value))
      clip_by_global_norm/norm 5.0
      clip_by_global_norm/threshold 1.0
      clip_by_global_norm/scale 0.2
      clip_by_global_norm/clipped 1.0
    """
    _check_state_type(opt_state)
    found = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda n: _is_reported(n) or _raw_report(n) is not None
        or _raw_clipper(n) is not None
    )[0]
    entries = []
    raw_found = False
    for path, node in found:
        if _is_reported(node):
            name, values = _values(node, per_leaf)
        elif (report := _raw_report(node)) is not None:
            name, values = _values(report, per_leaf)
            raw_found = True
        else:
            raw = _raw_clipper(node)
            if raw is None:
                continue
            name, values = raw[0], _summaries(raw[1], raw[2], per_leaf)
            values.update(_stat_fields(node, raw[3]))
            raw_found = True
        labels = [_path_label(p) for p in path if not _is_wrapper_key(p)]
        if not _is_reported(node):  # a plain dict: so, most likely, is the whole state
            labels = [(text, kept and not _is_layout_key(text)) for text, kept in labels]
        short = "/".join([text for text, meaningful in labels if meaningful] + [name])
        full = "/".join([text for text, _ in labels] + [name])
        entries.append((short, full, values))
    if raw_found:
        _warn_once("raw", (
            "optaxclip.stats read clipper states from plain dicts (a checkpoint restored "
            "without a target, or nnx.state(...)); their names were guessed from the state "
            "layout. For exact names, read the state as the optimizer builds it: "
            "restore with target=tx.init(params), or pass optimizer.opt_state."
        ))
    if not entries:
        _warn_once("empty", (
            "optaxclip.stats found no optaxclip clipper in this state, so it returned {}. "
            "Likely causes: the chain uses optax's own clipper (optax.clip_by_global_norm "
            "keeps no stats: use optaxclip.clip_by_global_norm), or this is not the "
            "optimizer state (pass opt_state, or optimizer.opt_state for nnx.Optimizer)."
        ))
    # A value that is one of the state's own buffers is copied: the next donated step
    # would delete it from a metrics dict kept for logging. (Summaries are new arrays
    # already, and under jit a copy is free.)
    own = {id(x) for x in jax.tree.leaves(opt_state)}
    out: dict[str, Array] = {}
    for prefix, (_, _, values) in zip(_unique_prefixes(entries), entries):
        for field, value in values.items():
            out[f"{prefix}/{field}"] = jnp.array(value, copy=True) if id(value) in own \
                else value
    return out


def _unique_prefixes(entries: list[tuple[str, str, Any]]) -> list[str]:
    """Each entry's short name, or its full path where a name is taken twice.

    Repeated until no two entries share a prefix: a short name can equal another
    clipper's full path (a ``named_chain`` entry called "0" inside a chain). Full
    paths that still coincide (a list index and a dict key both written "0") get
    the entry's position appended.
    """
    prefixes = [short for short, _, _ in entries]
    for _ in range(2):
        counts: dict[str, int] = {}
        for prefix in prefixes:
            counts[prefix] = counts.get(prefix, 0) + 1
        if all(counts[p] == 1 for p in prefixes):
            return prefixes
        prefixes = [full if counts[p] > 1 else p
                    for p, (_, full, _) in zip(prefixes, entries)]
    counts = {}
    for prefix in prefixes:
        counts[prefix] = counts.get(prefix, 0) + 1
    return [f"{p}#{i}" if counts[p] > 1 else p for i, p in enumerate(prefixes)]


# In a state that became plain dicts (an untargeted restore), the field names of
# optaxclip's wrapper states and the indices of chains turn into dict keys; they
# name the layout, not a group, so they are left out of the short names.
_LAYOUT_KEYS = frozenset({"inner_state", "inner_states", "inner_opt_state", "guard", "spam"})


def _is_layout_key(text: str) -> bool:
    return text in _LAYOUT_KEYS or text.isdigit()


def _is_wrapper_key(entry: Any) -> bool:
    return isinstance(entry, jax.tree_util.GetAttrKey) and entry.name in _WRAPPER_ATTRIBUTES


def _check_state_type(opt_state: Any) -> None:
    bad = [
        type(x).__name__ for x in jax.tree.leaves(opt_state)
        if not (hasattr(x, "dtype") or isinstance(x, (int, float, complex, bool)))
    ]
    if bad:
        raise TypeError(
            f"opt_state must be an optax state (a pytree of arrays, as returned by tx.init "
            f"and tx.update); it has leaves of type {sorted(set(bad))}."
        )


def _raw_report(node: Any) -> Any:
    """A reported record (a guard's or ``spam``'s) that became a plain dict, rebuilt.

    Matched by its field names, which no two reported classes share; None if none
    matches.
    """
    if not _is_mapping(node):
        return None
    keys = frozenset(node)
    matches = [cls for cls in _REPORTS if frozenset(getattr(cls, "_fields", ())) == keys]
    return matches[0](**node) if len(matches) == 1 else None


def _stat_fields(node: Any, stat_fields: tuple[str, ...]) -> dict[str, Array]:
    """The extra stat fields a spec declares (zclip's EMAs, ``history.num_recorded``),
    read by attribute from a state, or by key from one that became a plain dict."""
    values = {}
    for field in stat_fields:
        value: Any = node
        for attribute in field.split("."):
            if value is None:
                break
            value = value.get(attribute) if _is_mapping(value) else getattr(value, attribute, None)
        if value is not None:
            values[field.rsplit(".", 1)[-1]] = _leaves(value)[0]
    return values


def _raw_clipper(node: Any) -> tuple[str, ClipStats, str, tuple[str, ...]] | None:
    """``(name, stats, scope, stat_fields)`` of a clipper state that became a plain dict.

    None if ``node`` is not one. The name is the clipper's when its layout names one
    clipper, else "clipper".
    """
    if not _is_mapping(node) or "count" not in node or not _is_mapping(node.get("stats")):
        return None
    record = node["stats"]
    if "norm" not in record or "threshold" not in record:
        return None
    fields = frozenset(k for k in node if k not in ("count", "stats"))
    candidates = [
        spec for cls, spec in _spec._STATE_SPECS.items()
        if frozenset(cls._fields) - {"count", "stats"} == fields
    ]
    scalar = len(jax.tree.leaves(record["norm"])) == 1 and not _is_mapping(record["norm"])
    if scalar:
        candidates = [s for s in candidates if s.scope in ("global", "element")]
    else:
        candidates = [s for s in candidates if s.scope in ("leaf", "unit")]
    element = record.get("scale") is None and record.get("clipped") is not None
    candidates = [s for s in candidates if (s.scope == "element") == element]
    names = sorted({s.name for s in candidates})
    name = names[0] if len(names) == 1 else "clipper"
    scope = candidates[0].scope if candidates else ("global" if scalar else "leaf")
    clip_stats = ClipStats(
        norm=record["norm"], threshold=record["threshold"],
        scale=record.get("scale"), clipped=record.get("clipped"),
    )
    # Extra stat fields, when every clipper with this layout declares the same ones.
    declared = {tuple(s.stat_fields) for s in candidates}
    return name, clip_stats, scope, declared.pop() if len(declared) == 1 else ()


def _is_mapping(node: Any) -> bool:
    return hasattr(node, "keys") and hasattr(node, "__getitem__") and hasattr(node, "get")
