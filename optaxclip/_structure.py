"""Reads the structure of an optax transformation without running it.

``find_stages(tx, params)`` lists the leaf transformations of ``tx`` in the order
they are applied, each with its kind (clipper, moment accumulator, other or
unknown), the parameters it acts on and where its state sits. It recovers the
components of optax's combinators from their closures and recognises leaves by
their state type (``jax.eval_shape(tx.init, params)``, which runs nothing) and,
for stateless optax clippers, by the name of their update function.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import optax

from optaxclip import _state

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
      kind: ``"clipper"``, ``"moment"``, ``"other"`` or ``"unknown"``.
      location: where it sits, e.g. ``"chain[1] > chain[0]"``.
      state_path: ``jax.tree_util.keystr`` of its state within the whole state.
      coverage: the parameter paths (keystr) it acts on.
      params: the (masked) abstract parameters it receives.
      decay: the decay of ``optax.trace`` when known, else ``None``.
      note: why an ``"unknown"`` stage could not be read, or an exemption.
      stateful: whether its state holds anything.
    """

    name: str
    kind: str
    location: str
    state_path: str
    coverage: frozenset
    params: Any
    decay: Any = None
    note: str = ""
    stateful: bool = True


_OPTAX_CLIPPERS = {"clip", "clip_by_global_norm", "clip_by_block_rms", "adaptive_grad_clip",
                   "differentially_private_aggregate"}
_MOMENT_STATES = (
    "ScaleByAdamState", "ScaleByAmsgradState", "ScaleByLionState", "ScaleByRmsState",
    "ScaleByRStdDevState", "ScaleByBeliefState", "FactoredState", "TraceState", "EmaState",
    "ScaleByRssState", "ScaleByAdanState", "ScaleByNovogradState", "ScaleBySM3State",
    "ScaleByAdaDeltaState", "ScaleByRpropState", "ScaleByLBFGSState",
)


def _closure(fn: Any) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    values = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return values


def _unwrap(update: Any) -> Any:
    """Strips optax's ``with_extra_args_support`` shim."""
    while getattr(update, "__qualname__", "") == "with_extra_args_support.<locals>.update":
        update = _closure(update)["tx"].update
    return update


def _short_name(fn: Any) -> str:
    if inspect.ismethod(fn):
        return type(fn.__self__).__name__
    return getattr(fn, "__qualname__", type(fn).__name__).split(".<locals>")[0]


def _keystr(path: list) -> str:
    """A state path built by the walker, in ``jax.tree_util.keystr`` format."""
    return "".join(path)


def _coverage(params: Any) -> frozenset:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return frozenset(jax.tree_util.keystr(path) for path, _ in leaves)


def _mask(params: Any, mask_tree: Any) -> Any:
    return jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask_tree, params)


def _is_transformation(value: Any) -> bool:
    return isinstance(value, (optax.GradientTransformation, optax.MultiSteps))


def _inner_transformations(fn: Any) -> list[Any]:
    """GradientTransformations held by ``fn``'s closure (directly or in containers)."""
    found = []
    for value in _closure(fn).values():
        items = value.values() if isinstance(value, dict) else value
        items = items if isinstance(items, (list, tuple)) else [items]
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and _is_transformation(item[1]):
                item = item[1]
            if _is_transformation(item):
                found.append(item)
            elif callable(item) and getattr(item, "__qualname__", "").endswith(
                ("update", "update_fn")
            ):
                found.append(item)
    return found


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
            jax.numpy.issubdtype(getattr(x, "dtype", None) or int, jax.numpy.inexact)
            for x in leaves
        ):
            hits.append(node)
            return True
        return False

    jax.tree_util.tree_flatten(state, is_leaf=is_match)
    return bool(hits)


class _Walker:
    def __init__(self) -> None:
        self.stages: list[Stage] = []

    def add(self, stage: Stage) -> None:
        self.stages.append(stage)

    def walk(self, init: Any, update: Any, state: Any, params: Any, where: list, path: list):
        try:
            return self._walk(init, update, state, params, where, path)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as error:
            # A combinator whose closure or state is not laid out as expected (another
            # optax version, a mask function that needs concrete arrays ...).
            return self.add(Stage(
                _short_name(update), "unknown", " > ".join(where) or "(top level)",
                _keystr(path), _coverage(params), params,
                note=f"it wraps inner transformations whose structure could not be read "
                f"({type(error).__name__}: {error})",
            ))

    def _walk(self, init: Any, update: Any, state: Any, params: Any, where: list, path: list):
        update = _unwrap(update)
        location = " > ".join(where) if where else "(top level)"
        closure = _closure(update)
        qualname = getattr(update, "__qualname__", "")
        module = getattr(update, "__module__", "") or ""

        same_state = getattr(update, "passes_state_to", None)  # optaxclip.checked's guard
        if same_state is not None:
            return self.walk(same_state.init, same_state.update, state, params, where, path)
        if inspect.ismethod(update) and isinstance(update.__self__, optax.MultiSteps):
            inner = update.__self__.inner_opt
            return self.walk(inner.init, inner.update, state.inner_opt_state, params,
                             where + ["MultiSteps"], path + [".inner_opt_state"])
        if qualname == "chain.<locals>.update_fn" and module.startswith("optax"):
            inits = _closure(init).get("init_fns", [None] * len(closure["update_fns"]))
            for index, (sub_init, sub_update) in enumerate(zip(inits, closure["update_fns"])):
                self.walk(sub_init, sub_update, state[index], params,
                          where + [f"chain[{index}]"], path + [f"[{index}]"])
            return None
        if qualname == "named_chain.<locals>.update_fn" and module.startswith("optax"):
            for name, sub in closure["transforms"]:
                self.walk(sub.init, sub.update, state[name], params,
                          where + [f"named_chain[{name!r}]"], path + [f"[{name!r}]"])
            return None
        if qualname == "partition.<locals>.update_fn" and module.startswith("optax"):
            labels = closure["param_labels"]
            labels = labels(params) if callable(labels) else labels
            for group, sub in closure["transforms"].items():
                subset = _mask(params, jax.tree.map(lambda label, g=group: label == g, labels))
                self.walk(sub.init, sub.update, state.inner_states[group].inner_state, subset,
                          where + [f"partition[{group!r}]"],
                          path + [".inner_states", f"[{group!r}]", ".inner_state"])
            return None
        if qualname == "masked.<locals>.update_fn" and module.startswith("optax"):
            mask = closure["mask"]
            callable_mask = jax.tree.leaves(jax.tree.map(callable, mask))
            mask_tree = mask(params) if callable_mask and all(callable_mask) else mask
            inner = closure["inner"]
            return self.walk(inner.init, inner.update, state.inner_state,
                             _mask(params, mask_tree), where + ["masked"],
                             path + [".inner_state"])
        if qualname.endswith("inject_hyperparams.<locals>.wrapped_transform.<locals>.update_fn"):
            inner = _rebuild_injected(init, update)
            if inner is not None:
                return self.walk(inner.init, inner.update, state.inner_state, params,
                                 where + ["inject_hyperparams"], path + [".inner_state"])
        registered = _state._REGISTRY.get(type(state))
        if registered is not None and hasattr(state, "stats"):
            return self.add(Stage(registered[0], "clipper", location, _keystr(path),
                                  _coverage(params), params))
        inners = _inner_transformations(update)
        if hasattr(state, "_fields") and "inner_state" in state._fields and len(inners) == 1:
            inner = inners[0]
            inner_init = getattr(inner, "init", None)
            inner_update = getattr(inner, "update", inner)
            label = registered[0] if registered else _short_name(update)
            return self.walk(inner_init, inner_update, state.inner_state, params,
                             where + [label], path + [".inner_state"])
        name = _short_name(update)
        stateful = bool(jax.tree.leaves(state))
        common = dict(location=location, state_path=_keystr(path), coverage=_coverage(params),
                      params=params, stateful=stateful)
        if module.startswith("optax") and name in _OPTAX_CLIPPERS:
            previous = self.stages[-1] if self.stages else None
            if (name == "clip_by_block_rms" and previous is not None
                    and previous.name == "scale_by_factored_rms"
                    and previous.location.rsplit("[", 1)[0] == location.rsplit("[", 1)[0]):
                return self.add(Stage(name, "other", note="Adafactor update clipping", **common))
            return self.add(Stage(name, "clipper", **common))
        if inners:
            return self.add(Stage(name, "unknown", note=(
                f"it wraps {len(inners)} inner transformation(s) in a way check_order "
                f"does not know"), **common))
        state_type = type(state).__name__
        known_moment = state_type in _MOMENT_STATES and getattr(optax, state_type, None) is type(
            state)
        if known_moment or (stateful and _param_shaped(state, params)):
            decay = closure.get("decay") if name == "trace" else None
            return self.add(Stage(name, "moment", decay=_as_float(decay), **common))
        if module.startswith("optax") or module.startswith("optaxclip"):
            return self.add(Stage(name, "other", **common))
        return self.add(Stage(name, "unknown", note=(
            f"custom transformation with state {state_type}"), **common))


def _as_float(value: Any) -> Any:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def _rebuild_injected(init: Any, update: Any) -> Any:
    """The transformation ``inject_hyperparams`` builds, from its initial hyperparameters."""
    init_closure, update_closure = _closure(init), _closure(update)
    factory = update_closure.get("inner_factory")
    if factory is None:
        return None
    kwargs = dict(update_closure.get("other_hps", {}))
    kwargs.update(init_closure.get("numeric_hps", {}))
    for key, schedule in update_closure.get("sched_hps", {}).items():
        plain = getattr(schedule, "schedule_fn", None)
        kwargs[key] = plain if plain is not None else schedule(schedule.init())
    try:
        return factory(**kwargs)
    except Exception:  # noqa: BLE001 - any failure means we cannot see inside
        return None


def find_stages(tx: Any, params: Any) -> list[Stage]:
    """The leaf transformations of ``tx`` in application order (see module doc)."""
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    if not hasattr(tx, "init") or not hasattr(tx, "update"):
        raise TypeError(
            f"expected an optax.GradientTransformation (or optax.MultiSteps); got "
            f"{type(tx).__name__}."
        )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)), params
    )
    try:
        state = jax.eval_shape(tx.init, abstract)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError):
        # An init (e.g. a mask function) that needs concrete values: initialise on
        # zeros instead. Still no update runs.
        abstract = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), abstract)
        state = tx.init(abstract)
    walker = _Walker()
    walker.walk(tx.init, tx.update, state, abstract, [], [])
    return walker.stages


def _overlap(a: Stage, b: Stage) -> bool:
    return bool(a.coverage & b.coverage) or not (a.coverage or b.coverage)


def raise_on_wrong_order(stages: list[Stage]) -> None:
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
                    f"with optaxclip.clipped(optimizer, global_clipnorm=...)."
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

