"""The one table of what optaxclip knows about optax's combinators and leaves.

``check_order`` (through ``_structure``) walks a transformation and ``checked``
rebuilds one with taps; both read this table. A combinator entry says how to
find its children (their transformation, where their state sits, which
parameters they see) and, where possible, how to rebuild the combinator
around replaced children. Leaf transformations of optax are classified by the
``_LEAVES`` table and by their state type.

optax's combinators keep update *functions* in closures; this module is the only
place that reads those closures, and it reads optax's, never optaxclip's: an
optaxclip clipper declares itself with a ``ClipSpec`` and a wrapper declares its
inner transformation (``_spec.attach_inner``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import optax

from optaxclip import _spec

__all__ = [
    "Child",
    "Kind",
    "children",
    "closure",
    "leaf_kind",
    "rebuild",
    "short_name",
    "unwrap",
]

Kind = Literal["clipper", "update_clipper", "moment", "accumulation", "other", "unknown"]
KINDS: tuple[str, ...] = get_args(Kind)


def closure(fn: Any) -> dict[str, Any]:
    """The free variables of a function's closure, by name."""
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


def _qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", "") or ""


def _from_optax(fn: Any) -> bool:
    return (getattr(fn, "__module__", "") or "").startswith("optax")


def unwrap(update: Any) -> Any:
    """Strips optax's ``with_extra_args_support`` shim."""
    while _from_optax(update) and _qualname(update) == "with_extra_args_support.<locals>.update":
        update = closure(update)["tx"].update
    return update


def short_name(fn: Any) -> str:
    """``scale_by_adam`` for ``scale_by_adam.<locals>.update_fn``; a class for methods."""
    if inspect.ismethod(fn):
        return type(fn.__self__).__name__
    return _qualname(fn).split(".<locals>")[0] or type(fn).__name__


@dataclasses.dataclass(frozen=True)
class Child:
    """One inner transformation of a combinator.

    Attributes:
      tx: the inner transformation (``init`` may be None when unknown).
      label: how a message names it, e.g. ``"chain[1]"``.
      state: its state, taken out of the combinator's state.
      path: its state's key path inside the combinator's state, as keystr parts.
      params: the (masked) parameters it acts on.
    """

    tx: Any
    label: str
    state: Any
    path: tuple[str, ...]
    params: Any


def _mask(params: Any, mask_tree: Any) -> Any:
    return jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask_tree, params)


def _transformation(init: Any, update: Any) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------- combinators
# Each entry: (does this update function belong to it?, its children,
# how to rebuild it around wrapped children or None).

ChildrenFn = Callable[[Any, Any, Any, Any], list[Child]]
RebuildFn = Callable[[Any, Any, Callable[[Any], Any]], Any]


def _optax_qualname(name: str) -> Callable[[Any], bool]:
    return lambda update: _from_optax(update) and _qualname(update) == name


def _wrapped(update: Any) -> tuple[Any, str | None, Any]:
    found = _spec.inner_of(update)
    if found is None:  # the table matched it as a wrapper, so it carries one
        raise TypeError(f"{short_name(update)} is not an optaxclip wrapper")
    return found


def _optaxclip_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    inner, field, _ = _wrapped(update)
    sub_state = state if field is None else getattr(state, field)
    path = () if field is None else (f".{field}",)
    return [Child(inner, _spec.wrapper_name(update), sub_state, path, params)]


def _optaxclip_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    del init
    inner, _, remake = _wrapped(update)
    return None if remake is None else remake(wrap(inner))


def _is_multisteps(update: Any) -> bool:
    return inspect.ismethod(update) and isinstance(update.__self__, optax.MultiSteps)


def _multisteps_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    inner = update.__self__.inner_opt
    return [Child(inner, "MultiSteps", state.inner_opt_state, (".inner_opt_state",), params)]


def _multisteps_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    del init
    steps = update.__self__
    return optax.MultiSteps(
        wrap(steps.inner_opt), steps._every_k_schedule, steps._use_grad_mean,
        steps._should_skip_update_fn, steps._accumulator_dtype,
    ).gradient_transformation()


def _chain_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    updates = closure(update)["update_fns"]
    inits = closure(init).get("init_fns", [None] * len(updates))
    return [
        Child(_transformation(i, u), f"chain[{k}]", state[k], (f"[{k}]",), params)
        for k, (i, u) in enumerate(zip(inits, updates))
    ]


def _chain_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    inits = closure(init)["init_fns"]
    return optax.chain(*[wrap(_transformation(i, u)) for i, u in zip(
        inits, closure(update)["update_fns"]
    )])


def _named_chain_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    return [
        Child(tx, f"named_chain[{name!r}]", state[name], (f"[{name!r}]",), params)
        for name, tx in closure(update)["transforms"]
    ]


def _named_chain_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    del init
    return optax.named_chain(*[(name, wrap(tx)) for name, tx in closure(update)["transforms"]])


def _partition_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    cells = closure(update)
    labels = cells["param_labels"]
    labels = labels(params) if callable(labels) else labels
    return [
        Child(
            tx, f"partition[{group!r}]", state.inner_states[group].inner_state,
            (".inner_states", f"[{group!r}]", ".inner_state"),
            _mask(params, jax.tree.map(lambda label, g=group: label == g, labels)),
        )
        for group, tx in cells["transforms"].items()
    ]


def _partition_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    del init
    cells = closure(update)
    return optax.partition(
        {group: wrap(tx) for group, tx in cells["transforms"].items()},
        cells["param_labels"],
        mask_compatible_extra_args=cells.get("mask_compatible_extra_args", False),
    )


def _masked_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    cells = closure(update)
    mask = cells["mask"]
    callable_leaves = jax.tree.leaves(jax.tree.map(callable, mask))
    mask_tree = mask(params) if callable_leaves and all(callable_leaves) else mask
    return [Child(cells["inner"], "masked", state.inner_state, (".inner_state",),
                  _mask(params, mask_tree))]


def _masked_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    del init
    cells = closure(update)
    extra = closure(cells["maybe_mask_values"])
    return optax.masked(
        wrap(cells["inner"]), cells["mask"],
        mask_compatible_extra_args=extra.get("mask_compatible_extra_args", False),
    )


def _is_injected(update: Any) -> bool:
    return _from_optax(update) and _qualname(update).endswith(
        "inject_hyperparams.<locals>.wrapped_transform.<locals>.update_fn"
    )


def _injected_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    inner = _rebuild_injected(init, update)
    if inner is None:
        raise ValueError("the wrapped factory could not be called with its initial values")
    return [Child(inner, "inject_hyperparams", state.inner_state, (".inner_state",), params)]


def _rebuild_injected(init: Any, update: Any) -> Any:
    """The transformation ``inject_hyperparams`` builds, from its initial hyperparameters."""
    init_cells, update_cells = closure(init), closure(update)
    factory = update_cells.get("inner_factory")
    if factory is None:
        return None
    kwargs = dict(update_cells.get("other_hps", {}))
    kwargs.update(init_cells.get("numeric_hps", {}))
    for key, schedule in update_cells.get("sched_hps", {}).items():
        plain = getattr(schedule, "schedule_fn", None)
        kwargs[key] = plain if plain is not None else schedule(schedule.init())
    try:
        return factory(**kwargs)
    except Exception:  # noqa: BLE001 - any failure means we cannot see inside
        return None


def _inner_field(field: str, label: str) -> ChildrenFn:
    """Children of a wrapper whose closure holds ``inner`` and whose state has ``field``."""

    def children_fn(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
        del init
        return [Child(closure(update)["inner"], label, getattr(state, field), (f".{field}",),
                      params)]

    return children_fn


def _apply_if_finite_rebuild(update: Any, init: Any, wrap: Callable[[Any], Any]) -> Any:
    del init
    cells = closure(update)
    return optax.apply_if_finite(wrap(cells["inner"]), cells["max_consecutive_errors"])


def _flatten_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    return [Child(closure(update)["inner"], "flatten", state, (), params)]


def _schedule_free_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    base = closure(update)["base_optimizer"]
    return [Child(base, "schedule_free", state.base_optimizer_state,
                  (".base_optimizer_state",), params)]


def _lookahead_children(update: Any, init: Any, state: Any, params: Any) -> list[Child]:
    del init
    fast = closure(update)["fast_optimizer"]
    return [Child(fast, "lookahead", state.fast_state, (".fast_state",), params)]


@dataclasses.dataclass(frozen=True)
class _Combinator:
    name: str
    matches: Callable[[Any], bool]
    children: ChildrenFn
    rebuild: RebuildFn | None = None
    # The combinator's own step, applied after its children, when it has one
    # that matters for ordering (schedule-free iterate averaging, lookahead).
    own_kind: Kind | None = None


COMBINATORS: tuple[_Combinator, ...] = (
    _Combinator("optaxclip wrapper", lambda u: _spec.inner_of(u) is not None,
                _optaxclip_children, _optaxclip_rebuild),
    _Combinator("MultiSteps", _is_multisteps, _multisteps_children, _multisteps_rebuild),
    _Combinator("chain", _optax_qualname("chain.<locals>.update_fn"),
                _chain_children, _chain_rebuild),
    _Combinator("named_chain", _optax_qualname("named_chain.<locals>.update_fn"),
                _named_chain_children, _named_chain_rebuild),
    _Combinator("partition", _optax_qualname("partition.<locals>.update_fn"),
                _partition_children, _partition_rebuild),
    _Combinator("masked", _optax_qualname("masked.<locals>.update_fn"),
                _masked_children, _masked_rebuild),
    _Combinator("inject_hyperparams", _is_injected, _injected_children),
    _Combinator("apply_if_finite", _optax_qualname("apply_if_finite.<locals>.update"),
                _inner_field("inner_state", "apply_if_finite"), _apply_if_finite_rebuild),
    _Combinator("conditionally_mask", _optax_qualname("conditionally_mask.<locals>.update_fn"),
                _inner_field("inner_state", "conditionally_mask")),
    _Combinator("conditionally_transform",
                _optax_qualname("conditionally_transform.<locals>.update_fn"),
                _inner_field("inner_state", "conditionally_transform")),
    _Combinator("flatten", _optax_qualname("flatten.<locals>.update_fn"), _flatten_children),
    _Combinator("schedule_free", _optax_qualname("schedule_free.<locals>.update_fn"),
                _schedule_free_children, own_kind="other"),
    _Combinator("lookahead", _optax_qualname("lookahead.<locals>.update_fn"),
                _lookahead_children, own_kind="other"),
)


def combinator(update: Any) -> _Combinator | None:
    """The table entry for ``update``, or None for a leaf transformation."""
    for entry in COMBINATORS:
        if entry.matches(update):
            return entry
    return None


def children(update: Any, init: Any, state: Any, params: Any) -> list[Child] | None:
    """The children of a combinator, or None when ``update`` is a leaf."""
    entry = combinator(update)
    return None if entry is None else entry.children(update, init, state, params)


def rebuild(tx: Any, wrap: Callable[[Any], Any]) -> Any:
    """``tx`` rebuilt with every child replaced by ``wrap(child)``; None if it can't be."""
    update = unwrap(tx.update)
    entry = combinator(update)
    if entry is None or entry.rebuild is None:
        return None
    return entry.rebuild(update, tx.init, wrap)


# ---------------------------------------------------------------- leaves

# optax leaf transformations by the name their update function is defined in.
# Clippers whose role is fixed, and stateless steps known to be harmless for the
# order (they scale, add or mask; none of them clips or accumulates).
_OPTAX_GRADIENT_CLIPPERS = frozenset({
    "clip", "clip_by_global_norm", "adaptive_grad_clip", "differentially_private_aggregate",
    "unitwise_clip", "per_example_global_norm_clip", "per_example_layer_norm_clip",
})
_OPTAX_HARMLESS = frozenset({
    "scale", "scale_by_learning_rate", "scale_by_schedule", "add_decayed_weights",
    "add_noise", "identity", "set_to_zero", "zero_nans", "keep_params_nonnegative",
    "centralize", "scale_by_trust_ratio", "scale_by_param_block_norm",
    "scale_by_param_block_rms", "scale_by_sign", "normalize_by_update_norm",
    "scale_by_polyak", "freeze", "snapshot", "monitor", "skip_not_finite",
    "skip_large_updates", "selective_transform", "scale_by_shape",
})
# Wrappers of a user's function: optaxclip cannot tell what the function does.
_OPTAX_USER_FUNCTIONS = frozenset({"stateless", "stateless_with_tree_map"})
_OPTAX_ACCUMULATION_STATES = ("ApplyEvery",)
_OPTAX_MOMENT_STATES = (
    "ScaleByAdamState", "ScaleByAmsgradState", "ScaleByLionState", "ScaleByRmsState",
    "ScaleByRStdDevState", "ScaleByBeliefState", "FactoredState", "TraceState", "EmaState",
    "ScaleByRssState", "ScaleByAdanState", "ScaleByNovogradState", "ScaleBySM3State",
    "ScaleByAdaDeltaState", "ScaleByRpropState", "ScaleByLBFGSState", "ScaleByAdemamixState",
    "MuonState", "ScaleByAdamaxState", "ScaleByYogiState", "ScaleBySophiaState",
    "ScaleByMuonState", "ScaleByLaPropState",
)
# An optax clip_by_block_rms right after Adafactor's preconditioner clips the
# preconditioned update, as optax.adafactor builds it: an update clipper there.
_UPDATE_CLIPPER_AFTER = {"clip_by_block_rms": frozenset({"scale_by_factored_rms"})}


def _inner_transformations(fn: Any) -> list[Any]:
    """GradientTransformations held by ``fn``'s closure (directly or in containers)."""
    found = []
    for value in closure(fn).values():
        if _is_transformation(value):
            found.append(value)
            continue
        items = value.values() if isinstance(value, dict) else value
        items = items if isinstance(items, (list, tuple)) else [items]
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and _is_transformation(item[1]):
                item = item[1]
            if _is_transformation(item):
                found.append(item)
    return found


def _is_transformation(value: Any) -> bool:
    return isinstance(value, (optax.GradientTransformation, optax.MultiSteps))


def _is_optax_state(state: Any, names: tuple[str, ...]) -> bool:
    name = type(state).__name__
    return name in names and (type(state).__module__ or "").startswith("optax")


def leaf_kind(update: Any, state: Any, previous: str | None) -> tuple[Kind | None, str]:
    """``(kind, note)`` of a leaf transformation; ``previous`` is the step before it.

    ``note`` says why a leaf is ``"unknown"`` or why a clipper is an update
    clipper. The kind is None for a stateful optax transformation the table does
    not name: ``_structure`` then decides by its state (a float tree shaped like
    the parameters is a moment accumulator).
    """
    if _spec.is_gradient_stage(update):
        return "clipper", ""
    spec = _spec.spec_of(update)
    if spec is not None:
        if spec.role == "monitor":
            return "other", ""  # it never changes an update
        return ("update_clipper" if spec.role == "update" else "clipper"), ""
    name = short_name(update)
    if _is_optax_state(state, _OPTAX_ACCUMULATION_STATES):
        return "accumulation", ""
    if _is_optax_state(state, _OPTAX_MOMENT_STATES):
        return "moment", ""
    if not _from_optax(update):
        inners = _inner_transformations(update)
        if inners:
            return "unknown", (
                f"it wraps {len(inners)} inner transformation(s) in a way check_order "
                f"does not know"
            )
        module = getattr(update, "__module__", "") or ""
        if module.startswith("optaxclip"):
            return "other", ""
        return None, f"custom transformation with state {type(state).__name__}"
    if name in _OPTAX_USER_FUNCTIONS:
        return "unknown", f"optax.{name} wraps a function check_order cannot read"
    if name in _UPDATE_CLIPPER_AFTER and previous in _UPDATE_CLIPPER_AFTER[name]:
        return "update_clipper", f"clips the update of {previous}, as optax.adafactor does"
    if name in _OPTAX_GRADIENT_CLIPPERS or name in _UPDATE_CLIPPER_AFTER:
        return "clipper", ""
    if name in _OPTAX_HARMLESS:
        return "other", ""
    if jax.tree.leaves(state):
        return None, ""
    return "unknown", f"optax.{name} is not in optaxclip's table of optax transformations"
