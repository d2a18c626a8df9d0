"""Reads the structure of an optax transformation without running it.

``find_stages(tx, params)`` lists the leaf transformations of ``tx`` in the order
they are applied, each with its kind (gradient clipper, update clipper, moment
accumulator, gradient accumulation, other or unknown), the parameters it acts
on and where its state sits. Combinators are opened through the one table in
``_combinators``; optaxclip clippers are read from their ``ClipSpec``; other
leaves are recognised by their state type (``jax.eval_shape(tx.init, params)``,
which runs nothing) and by optax's own names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp

from optaxclip import _combinators, _spec
from optaxclip._combinators import Kind

__all__ = ["OrderingError", "Stage", "find_stages"]


class OrderingError(ValueError):
    """A moment accumulator runs before a gradient clipper, or the order is unknown.

    A ``ValueError``: the transformation was built with its parts in the wrong
    order, which is a bad argument rather than a failed assertion.
    """


class Stage(NamedTuple):
    """One leaf transformation as ``check_order`` sees it.

    Attributes:
      name: e.g. ``"scale_by_adam"``, ``"clip_by_global_norm"``.
      kind: one of ``"clipper"`` (a gradient clipper: before the moments),
        ``"update_clipper"`` (clips the preconditioned update: after them by
        design), ``"moment"``, ``"accumulation"`` (``apply_every``,
        ``MultiSteps``: sums gradients, neither clips nor is a moment),
        ``"other"`` or ``"unknown"``.
      location: where it sits, e.g. ``"chain[1] > chain[0]"``.
      state_path: ``jax.tree_util.keystr`` of its state within the whole state.
      coverage: the parameter paths (keystr) it acts on.
      params: the (masked) abstract parameters it receives.
      decay: the decay of ``optax.trace`` when known, else ``None``.
      note: why an ``"unknown"`` stage could not be read, or why a clipper is
        an update clipper.
      stateful: whether its state holds anything.
      scope: a clipper's scope (``"global"``, ``"leaf"``, ...), else ``None``.
      enclosing: the combinators around it, outermost first (``("chain",
        "partition")``).
    """

    name: str
    kind: Kind
    location: str
    state_path: str
    coverage: frozenset[str]
    params: Any
    decay: Any = None
    note: str = ""
    stateful: bool = True
    scope: str | None = None
    enclosing: tuple[str, ...] = ()


# Scopes of optax's own clippers, for the group-norm check.
_OPTAX_SCOPES = {
    "clip": "element", "clip_by_global_norm": "global", "clip_by_block_rms": "leaf",
    "adaptive_grad_clip": "unit", "unitwise_clip": "unit",
}


def _coverage(params: Any) -> frozenset:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return frozenset(jax.tree_util.keystr(path) for path, _ in leaves)


def _param_shaped(state: Any, params: Any) -> bool:
    """Whether ``state`` holds a float tree shaped like ``params`` (a moment)."""
    target = jax.tree.structure(params)
    shapes = [getattr(p, "shape", ()) for p in jax.tree.leaves(params)]
    if not shapes:
        return False
    hits = []

    def is_match(node: Any) -> bool:
        if jax.tree.structure(node) != target:
            return False
        leaves = jax.tree.leaves(node)
        if [getattr(x, "shape", None) for x in leaves] == shapes and all(
            jnp.issubdtype(getattr(x, "dtype", None) or int, jnp.inexact) for x in leaves
        ):
            hits.append(node)
            return True
        return False

    jax.tree_util.tree_flatten(state, is_leaf=is_match)
    return bool(hits)


def _as_float(value: Any) -> Any:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


class _Walker:
    def __init__(self) -> None:
        self.stages: list[Stage] = []

    def walk(self, tx: Any, state: Any, params: Any, where: list, path: list,
             enclosing: tuple[str, ...], previous: str | None) -> str | None:
        """Adds the stages of ``tx``; returns the name of the leaf it was, if one."""
        update = _combinators.unwrap(tx.update)
        location = " > ".join(where) if where else "(top level)"
        common = dict(location=location, state_path="".join(path),
                      coverage=_coverage(params), params=params, enclosing=enclosing)
        try:
            kids = _combinators.children(update, tx.init, state, params)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as error:
            # A combinator whose closure or state is not laid out as expected
            # (another optax version, a mask function that needs concrete arrays ...).
            self.stages.append(Stage(
                _combinators.short_name(update), "unknown", note=(
                    f"it wraps inner transformations whose structure could not be read "
                    f"({type(error).__name__}: {error})"), **common))
            return None
        if kids is None:
            return self._leaf(update, state, previous, common)
        entry = _combinators.combinator(update)
        assert entry is not None  # children() found some, so the table knows it
        if entry.name == "MultiSteps":
            self.stages.append(Stage("MultiSteps", "accumulation", stateful=True, **common))
        last = None
        for child in kids:
            # Wrappers that keep the same state (checked and its taps) are transparent.
            label = [child.label] if child.label else []
            last = self.walk(child.tx, child.state, child.params, where + label,
                             path + list(child.path), enclosing + (entry.name,), last)
        if entry.own_kind is not None:
            self.stages.append(Stage(entry.name, entry.own_kind, **common))
        return None

    def _leaf(self, update: Any, state: Any, previous: str | None, common: dict) -> str:
        name = _combinators.short_name(update)
        spec = _spec.spec_of(update)
        if spec is not None:
            name = spec.name
        kind, note = _combinators.leaf_kind(update, state, previous)
        stateful = bool(jax.tree.leaves(state))
        if kind is None:
            if stateful and _param_shaped(state, common["params"]):
                kind, note = "moment", ""
            elif note:  # a user's own transformation that holds no moment
                kind = "unknown"
                note = note if stateful else "custom stateless transformation"
            else:
                kind = "other"
        decay = _combinators.closure(update).get("decay") if name == "trace" else None
        scope = spec.scope if spec is not None else _OPTAX_SCOPES.get(name)
        if kind not in ("clipper", "update_clipper"):
            scope = None
        self.stages.append(Stage(name, kind, decay=_as_float(decay), note=note,
                                 stateful=stateful, scope=scope, **common))
        return name


def find_stages(tx: Any, params: Any) -> list[Stage]:
    """The leaf transformations of ``tx`` in application order (see module doc)."""
    import optax  # local: keeps this module's import graph small

    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    if not hasattr(tx, "init") or not hasattr(tx, "update"):
        hint = " It looks like a factory: call it, e.g. optax.adam(1e-3)." if callable(tx) else ""
        raise TypeError(
            f"expected an optax.GradientTransformation (or optax.MultiSteps); got "
            f"{type(tx).__name__}.{hint}"
        )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params
    )
    try:
        state = jax.eval_shape(tx.init, abstract)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError):
        # An init (e.g. a mask function) that needs concrete values: initialise on
        # the parameters given, when they are concrete (a mask of their values then
        # covers what it will cover in training), else on zeros. No update runs.
        concrete = all(not isinstance(x, (jax.ShapeDtypeStruct, jax.core.Tracer))
                       for x in jax.tree.leaves(params))
        abstract = params if concrete else jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype), abstract)
        state = tx.init(abstract)
    walker = _Walker()
    walker.walk(tx, state, abstract, [], [], (), None)
    return walker.stages


def _overlap(a: Stage, b: Stage) -> bool:
    return bool(a.coverage & b.coverage) or not (a.coverage or b.coverage)


def raise_on_wrong_order(stages: list[Stage]) -> None:
    """Raises ``OrderingError`` when a gradient clipper runs after a moment accumulator."""
    for index, stage in enumerate(stages):
        if stage.kind != "clipper":
            continue
        for earlier in stages[:index]:
            if earlier.kind == "moment" and _overlap(earlier, stage):
                raise OrderingError(
                    f"{stage.name} ({stage.location}) runs after {earlier.name} "
                    f"({earlier.location}).\n{earlier.name} accumulates the unclipped "
                    f"gradients and {stage.name} only clips its output, which is not "
                    f"gradient clipping (Keras clipnorm and torch clip_grad_norm_ clip "
                    f"first).\nFix: put {stage.name} before {earlier.name}, e.g. "
                    f"optax.chain({stage.name}(...), optimizer), or build the optimizer "
                    f"with optaxclip.clipped(optimizer, global_clipnorm=...). To clip the "
                    f"optimizer's update on purpose, use an update clipper."
                )


def unknown_problems(stages: list[Stage]) -> list[str]:
    """Why each unreadable stage could hide a wrong order (empty when none could)."""
    problems = []
    for index, stage in enumerate(stages):
        if stage.kind != "unknown":
            continue
        reasons = []
        if "inner transformation" in stage.note:  # a combinator: anything may hide inside
            reasons.append("what it runs inside is hidden")
        before = [s for s in stages[:index] if s.kind == "moment" and _overlap(s, stage)]
        after = [s for s in stages[index + 1:] if s.kind == "clipper" and _overlap(s, stage)]
        if before:
            reasons.append(f"it may be a clipper running after {before[0].name}")
        if stage.stateful and after:
            reasons.append(f"it may accumulate moments before {after[0].name}")
        if reasons:
            problems.append(f"{stage.name} ({stage.location}, {stage.note}): "
                            + "; ".join(reasons))
    return problems


# The name of clip_by_group_norms's per-group clippers (optaxclip.groups): the
# partition directly around each one is its own, grouping on purpose.
_GROUP_CLIPPER_NAME = "clip_by_group_norms"


def group_norm_problems(stages: list[Stage]) -> list[str]:
    """Global clippers inside ``partition``/``masked``, where they see one group only.

    ``clip_by_group_norms`` is a partition of global clippers by design; only a
    partition or mask *around* it is reported.
    """
    problems = []
    for stage in stages:
        grouped = [e for e in stage.enclosing if e in ("partition", "masked")]
        if stage.name == _GROUP_CLIPPER_NAME and stage.enclosing[-1:] == ("partition",):
            grouped = grouped[:-1]
        if stage.scope == "global" and grouped:
            problems.append(
                f"{stage.name} ({stage.location}) sits inside optax.{grouped[-1]}: its norm "
                f"covers only the {len(stage.coverage)} parameter(s) of that group, not the "
                f"whole tree"
            )
    return problems


def first_moment_paths(stages: list[Stage]) -> dict[str, bool]:
    """``state_path -> True`` for moment stages with no moment before them."""
    out = {}
    for index, stage in enumerate(stages):
        if stage.kind == "moment":
            out[stage.state_path] = not any(
                s.kind in ("moment", "unknown") and s.stateful and _overlap(s, stage)
                for s in stages[:index]
            )
    return out
