"""Clipper state, ``ClipStats``, and the ``stats()`` reader that walks any optax state.

Every clipper's state is a ``NamedTuple`` of arrays (so checkpoints round-trip it)
holding a ``ClipStats``: what the clipper did on its last update. ``stats()``
finds them anywhere in an optax state (chains, ``named_chain``,
``inject_hyperparams``, ``masked``, ``multi_transform``, ``MultiSteps`` ...) and
returns a flat ``dict[str, Array]`` for TensorBoard or W&B. It never recomputes
a norm: it only reads what the update already stored.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class ClipStats(NamedTuple):
    """What a clipper did on its last update.

    For a global clipper every field is a scalar. For per-leaf clippers each field
    is a tree shaped like the gradients (one scalar per leaf); unit-wise clippers
    hold one value per unit.

    Attributes:
      norm: pre-clip norm(s), float32. NaN or inf when the gradients were not finite.
      threshold: the threshold used this step, float32.
      scale: the factor applied, in [0, 1]; NaN when the norm was not finite.
      clipped: whether the update was changed: the scale was below 1, or NaN
        because the norm was not finite.
    """

    norm: Any
    threshold: Array
    scale: Any
    clipped: Any


# state class -> (readable name, extra scalar fields that stats() reports)
_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}


def register_state(cls: type, name: str, extra_fields: tuple[str, ...] = ()) -> type:
    """Makes ``stats()`` report instances of ``cls`` under ``name``.

    ``cls`` must be a NamedTuple with a ``stats: ClipStats`` field (clippers), or one
    whose ``extra_fields`` are scalar arrays (guards). Returns ``cls`` so it can be
    used as a decorator through ``functools.partial``.
    """
    _REGISTRY[cls] = (name, tuple(extra_fields))
    return cls


def initial_stats(norm_like: Any, threshold: Array) -> ClipStats:
    """Stats before the first update, with the structure later updates produce."""
    zeros = jax.tree.map(lambda n: jnp.zeros_like(n, jnp.float32), norm_like)
    return ClipStats(
        norm=zeros,
        threshold=jnp.asarray(threshold, jnp.float32),
        scale=jax.tree.map(lambda n: jnp.ones_like(n, jnp.float32), norm_like),
        clipped=jax.tree.map(lambda n: jnp.zeros_like(n, jnp.bool_), norm_like),
    )


def make_stats(norm: Any, threshold: Array, scale: Any, clipped: Any) -> ClipStats:
    as_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), t)
    return ClipStats(
        norm=as_f32(norm),
        threshold=jnp.asarray(threshold).astype(jnp.float32),
        scale=as_f32(scale),
        clipped=jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.bool_), clipped),
    )


def _is_registered(node: Any) -> bool:
    return type(node) in _REGISTRY


def _path_label(entry: Any) -> tuple[str, bool]:
    """A key-path entry as text, and whether a reader would find it meaningful."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key), True  # named_chain names, multi_transform labels
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx), False
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return str(entry.name), False
    return str(getattr(entry, "key", entry)), False


def _is_global(norm: Any) -> bool:
    """Whether ``norm`` is one global scalar rather than a tree shaped like the params.

    A bare scalar is global, also inside array wrappers such as nnx variables
    (their key paths hold attribute keys only). A tree with dict or sequence keys
    is per-leaf even when it has a single leaf, so a per-leaf clipper reports the
    same keys whatever the number of leaves.
    """
    entries = jax.tree_util.tree_flatten_with_path(norm)[0]
    if len(entries) != 1:
        return False
    path, value = entries[0]
    containers = (jax.tree_util.DictKey, jax.tree_util.SequenceKey)
    return jnp.ndim(value) == 0 and not any(isinstance(key, containers) for key in path)


def _summaries(stats: ClipStats, per_leaf: bool) -> dict[str, Array]:
    """Scalars for one ClipStats; per-leaf and unit-wise stats are summarised."""
    norms = jax.tree.leaves(stats.norm)
    scales = jax.tree.leaves(stats.scale)
    clipped = jax.tree.leaves(stats.clipped)
    # Reading through tree.leaves also unwraps array containers such as the
    # variables nnx.Optimizer keeps its state in.
    (threshold,) = jax.tree.leaves(stats.threshold)
    single = _is_global(stats.norm)
    if single and len(norms) == 1 and jnp.ndim(norms[0]) == 0:
        return {
            "norm": norms[0],
            "threshold": threshold,
            "scale": scales[0],
            "clipped": clipped[0],
        }
    if not norms:
        return {"threshold": threshold}
    flat = lambda xs: jnp.concatenate([jnp.ravel(x) for x in xs])
    norm_values, clipped_values = flat(norms), flat(clipped)
    # max propagates NaN, so a single non-finite leaf shows in the summary.
    out = {"norm": jnp.max(norm_values), "threshold": threshold}
    out["scale"] = jnp.min(flat(scales))
    out["clipped"] = jnp.any(clipped_values)
    out["clipped_fraction"] = jnp.mean(clipped_values.astype(jnp.float32))
    if per_leaf:
        for path, value in jax.tree_util.tree_flatten_with_path(stats.norm)[0]:
            key = "/".join(_path_label(p)[0] for p in path)
            out[f"norm/{key}"] = value
    return out


def stats(opt_state: Any, *, per_leaf: bool = False) -> dict[str, Array]:
    """A flat ``{name/field: array}`` dict of every clipper's stats in ``opt_state``.

    Keys are ``<clipper>/<field>``, e.g. ``clip_by_global_norm/norm``, prefixed
    by ``named_chain`` names and ``multi_transform`` labels when present. When two
    clippers would share a key, both get their full path in the state instead
    (``0/clip_by_global_norm/norm`` and ``2/clip_by_global_norm/norm``), so keys
    are always unique. Per-leaf clippers report the largest leaf norm as ``norm``,
    the smallest scale, ``clipped`` (any leaf) and ``clipped_fraction``; pass
    ``per_leaf=True`` for ``norm/<leaf path>`` entries too.

    Works eagerly and inside ``jit``; it reads stored values and never recomputes
    a norm.

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
    found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_registered)[0]
    entries = []
    for path, node in found:
        if not _is_registered(node):
            continue
        name, extra_fields = _REGISTRY[type(node)]
        labels = [_path_label(p) for p in path]
        short = "/".join([text for text, meaningful in labels if meaningful] + [name])
        full = "/".join([text for text, _ in labels] + [name])
        values = _summaries(node.stats, per_leaf) if hasattr(node, "stats") else {}
        for field in extra_fields:
            values[field] = getattr(node, field)
        entries.append((short, full, values))
    short_counts: dict[str, int] = {}
    for short, _, _ in entries:
        short_counts[short] = short_counts.get(short, 0) + 1
    out: dict[str, Array] = {}
    for short, full, values in entries:
        prefix = short if short_counts[short] == 1 else full
        for field, value in values.items():
            out[f"{prefix}/{field}"] = value
    return out
