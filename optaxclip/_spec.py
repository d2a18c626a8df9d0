"""What a clipper is, declared as data: ``ClipSpec``, and where to find it.

Every optaxclip clipper is built by ``make_clipper`` from a ``ClipSpec``. The
spec travels with the transformation (``spec_of(tx)``) and, by its state class,
with the state, so ``stats()``, ``check_order`` and ``checked`` read facts
instead of guessing them from closures, key paths or field names:

* ``scope``: what one norm covers. ``"element"`` (each entry on its own, as
  ``clip_by_value``), ``"leaf"`` (each leaf, or each layer of a stacked leaf),
  ``"unit"`` (each output unit of a weight, as AGC) or ``"global"`` (the whole
  tree).
* ``role``: where it belongs in a chain. A ``"gradient"`` clipper goes before
  the moment accumulators; an ``"update"`` clipper (update RMS, update norm)
  goes after the preconditioner by design; a ``"monitor"`` only measures, so it
  may sit anywhere.
* ``ord``, ``rms``, ``eps``, ``axis_name``: how the norm is measured and reduced
  across shards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

from optaxclip import _validate
from optaxclip._validate import AxisName

__all__ = ["ClipSpec", "Role", "Scope", "register_spec", "spec_of", "spec_for_state"]

Scope = Literal["element", "leaf", "unit", "global"]
Role = Literal["gradient", "update", "monitor"]

SCOPES: tuple[str, ...] = get_args(Scope)
ROLES: tuple[str, ...] = get_args(Role)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """A clipper's static description.

    Attributes:
      name: the clipper's name, the prefix of its ``stats()`` keys, e.g.
        ``"clip_by_global_norm"``. Letters, digits and underscores.
      scope: ``"element"``, ``"leaf"``, ``"unit"`` or ``"global"``: what one
        norm covers (see the module docstring).
      role: ``"gradient"`` (before the moments), ``"update"`` (after the
        preconditioner) or ``"monitor"`` (measures the norm and never changes the
        updates, so it is legal anywhere in a chain).
      ord: the norm's order: 1, 2, ``inf`` or any p > 0 (element scope: ``inf``).
      rms: divide the 2-norm by the square root of the number of entries it
        covers, counted across ``axis_name`` shards (RMS clipping).
      eps: added to the norm in the scale's denominator (torch's ``1e-6``).
      axis_name: under ``shard_map``/``pmap``, the mesh axis (or axes) the
        gradients are sharded over; norms then cover every shard.
      unit_axes: for ``"unit"`` scope, the output axes kept as separate units in
        leaves of more than one dimension (AGC: ``(-1,)``); vectors and scalars
        are one unit each.
      stat_fields: extra state fields ``stats()`` reports next to the norm,
        threshold, scale and clipped flag, as attribute paths of the state
        (``"ema_mean"``, ``"history.num_recorded"``); the key is the last name.
      strict_nonfinite: a non-finite norm always poisons the output with NaN,
        even when the threshold is ``inf``. Adaptive clippers set it: their
        ``inf`` threshold means "no history yet", not "never clip".
    """

    name: str
    scope: Scope
    role: Role = "gradient"
    ord: float = 2.0
    rms: bool = False
    eps: float = 0.0
    axis_name: AxisName = None
    unit_axes: tuple[int, ...] = ()
    stat_fields: tuple[str, ...] = ()
    strict_nonfinite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(
                f"ClipSpec.name must be an identifier such as 'clip_by_rms' (it prefixes the "
                f"stats keys); got {self.name!r}."
            )
        if self.scope not in SCOPES:
            raise ValueError(f"ClipSpec.scope must be one of {SCOPES}; got {self.scope!r}.")
        if self.role not in ROLES:
            raise ValueError(f"ClipSpec.role must be one of {ROLES}; got {self.role!r}.")
        if self.role == "monitor" and self.scope == "element":
            raise ValueError(
                "ClipSpec.role 'monitor' measures a norm: use scope 'leaf', 'unit' or 'global'."
            )
        p = _validate.validate_ord(self.ord, name="ClipSpec.ord")
        if self.scope == "element" and p != math.inf:
            raise ValueError("ClipSpec.ord must be inf for scope 'element' (entries are clipped).")
        if self.rms and p != 2:
            raise ValueError(f"ClipSpec.rms needs ord=2 (a root mean square); got ord={p}.")
        if self.rms and self.scope not in ("leaf", "global"):
            raise ValueError(
                f"ClipSpec.rms applies to scope 'leaf' or 'global'; got {self.scope!r}."
            )
        object.__setattr__(self, "ord", p)
        object.__setattr__(self, "eps", _validate.validate_eps(self.eps, "ClipSpec.eps"))
        axis_name = _validate.validate_axis_name(self.axis_name, name="ClipSpec.axis_name")
        object.__setattr__(self, "axis_name", axis_name)
        object.__setattr__(self, "unit_axes", tuple(int(a) for a in self.unit_axes))
        object.__setattr__(self, "stat_fields", tuple(self.stat_fields))
        if self.scope == "unit" and not self.unit_axes:
            raise ValueError("ClipSpec.unit_axes must name the kept output axes for scope 'unit'.")


# The attribute of an update function that carries its spec. optax's combinators
# keep update functions, not GradientTransformation objects, so this is what
# survives inside a chain.
_SPEC_ATTRIBUTE = "optaxclip_spec"

# state class -> the spec its clipper was built from (name, scope and stat fields
# are the same for every instance; ord or axis_name may differ).
_STATE_SPECS: dict[type, ClipSpec] = {}


def register_spec(state_cls: type, spec: ClipSpec) -> None:
    """Records that states of ``state_cls`` belong to clippers described by ``spec``."""
    known = _STATE_SPECS.get(state_cls)
    if known is not None and (known.name, known.scope, known.stat_fields) != (
        spec.name, spec.scope, spec.stat_fields
    ):
        raise ValueError(
            f"{state_cls.__name__} is already the state of clipper {known.name!r} "
            f"(scope {known.scope!r}); give {spec.name!r} a state class of its own."
        )
    _STATE_SPECS[state_cls] = spec


def spec_for_state(node: Any) -> ClipSpec | None:
    """The spec of the clipper whose state ``node`` is, or None."""
    return _STATE_SPECS.get(type(node))


def attach(update_fn: Any, spec: ClipSpec) -> Any:
    setattr(update_fn, _SPEC_ATTRIBUTE, spec)
    return update_fn


# The attribute of a gradient clipper that has no ClipSpec (its output is not shaped
# like its input, as per-example clipping's): check_order still places it as one.
_GRADIENT_STAGE_ATTRIBUTE = "optaxclip_gradient_stage"


# The attribute of clip_per_example's update function: ``(reduce, per_layer)``.
PER_EXAMPLE_ATTRIBUTE = "optaxclip_per_example"


def mark_gradient_stage(update_fn: Any) -> Any:
    """Marks ``update_fn`` as a gradient clipper for ``check_order`` (no spec attached)."""
    setattr(update_fn, _GRADIENT_STAGE_ATTRIBUTE, True)
    return update_fn


def is_gradient_stage(update_fn: Any) -> bool:
    return bool(getattr(update_fn, _GRADIENT_STAGE_ATTRIBUTE, False))


# The attribute of a wrapper's update function naming the transformation it runs,
# where that one's state sits in the wrapper's state (None: the same state), and
# how to build the same wrapper around another inner transformation.
_INNER_ATTRIBUTE = "optaxclip_inner"


def attach_inner(
    update_fn: Any, inner: Any, state_field: str | None, *, name: str, remake: Any = None
) -> Any:
    """Declares that ``update_fn`` (the wrapper ``name``) runs ``inner`` on ``state.<field>``."""
    setattr(update_fn, _INNER_ATTRIBUTE, (inner, state_field, remake))
    update_fn.optaxclip_wrapper_name = name
    return update_fn


def inner_of(update_fn: Any) -> tuple[Any, str | None, Any] | None:
    """``(inner transformation, state field, remake)`` of an optaxclip wrapper, or None."""
    return getattr(update_fn, _INNER_ATTRIBUTE, None)


def wrapper_name(update_fn: Any) -> str:
    return getattr(update_fn, "optaxclip_wrapper_name", "wrapper")


def is_stacked(spec: ClipSpec) -> bool:
    """Whether ``spec`` treats every leaf's leading axis as stacked layers."""
    return bool(getattr(spec, "stacked_layers", False))


def spec_of(tx: Any) -> ClipSpec | None:
    """The ``ClipSpec`` of an optaxclip clipper (a transformation or its update function).

    Returns None for anything that is not a clipper built by ``make_clipper``,
    e.g. ``optax.adam(...)`` or a chain.

    Example:
      >>> import optaxclip as oc
      >>> spec = oc.spec_of(oc.clip_by_global_norm(1.0))
      >>> spec.name, spec.scope, spec.role, spec.ord
      ('clip_by_global_norm', 'global', 'gradient', 2.0)
    """
    update = getattr(tx, "update", tx)
    return getattr(update, _SPEC_ATTRIBUTE, None)
