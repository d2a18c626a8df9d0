"""Every optaxclip transformation the benchmarks run, enumerated from the package in one place.

``optaxclip_factories()`` lists what ``optaxclip.__all__`` exports that builds a
transformation. A new clipper is benchmarked without editing this file when
its first argument is a threshold (built with ``DEFAULT_THRESHOLD``) or, for a
guard, the inner transformation; ``ARGUMENTS`` holds the few that need other
arguments to clip in a benchmark step. Where a clipper sits relative to the
optimizer comes from its declared role when it has one (an update clipper goes
after the preconditioner, a per-example clipper needs per-example gradients),
else from its name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optax

import optaxclip

# Not transformations: functions of trees or states, and checks.
NOT_TRANSFORMS = frozenset({
    "global_norm", "stats", "check_order", "assert_moments_bounded", "checked", "clipped",
})
# A first parameter with one of these names takes the transformation to guard or wrap.
WRAPPER_PARAMETERS = frozenset({"inner", "tx", "optimizer", "inner_tx"})
DEFAULT_THRESHOLD = 0.1
# Arguments that make each clipper clip on a step of the benchmark models (gradient
# global norms are about 1-10; per-leaf and per-entry thresholds are smaller).
ARGUMENTS: dict[str, tuple[Any, ...]] = {
    "clip_by_value": (1e-4,),
    "clip_by_norm": (1e-2,),
    "clip_by_global_norm": (DEFAULT_THRESHOLD,),
    "clip_by_block_rms": (1e-4,),
    "adaptive_grad_clip": (0.01,),
}


def optaxclip_factories() -> dict[str, Callable[..., Any]]:
    """The public names of ``optaxclip`` that build a transformation, in export order."""
    out = {}
    for name in getattr(optaxclip, "__all__", dir(optaxclip)):
        obj = getattr(optaxclip, name, None)
        if (name in NOT_TRANSFORMS or name.startswith("_") or not callable(obj)
                or inspect.isclass(obj) or not name[:1].islower()):
            continue
        out[name] = obj
    return out


def _first_parameter(factory: Callable[..., Any]) -> str | None:
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    return parameters[0].name if parameters else None


def is_wrapper(name: str, factory: Callable[..., Any]) -> bool:
    return _first_parameter(factory) in WRAPPER_PARAMETERS


def role(name: str, tx: Any = None) -> str:
    """``"gradient"``, ``"update"`` (after the preconditioner) or ``"example"``.

    A declared spec (``tx.spec.role`` / ``.scope``, or ``optaxclip.spec(tx)``) wins;
    otherwise the name decides.
    """
    spec = getattr(tx, "spec", None)
    if spec is None and hasattr(optaxclip, "spec") and tx is not None:
        try:
            spec = optaxclip.spec(tx)
        except Exception:  # noqa: BLE001 - any failure means "no declared spec"
            spec = None
    declared = str(getattr(spec, "role", "") or getattr(spec, "scope", "") or "").lower()
    if "update" in declared or "update" in name:
        return "update"
    if "example" in declared or "example" in name:
        return "example"
    return "gradient"


def build(name: str, factory: Callable[..., Any], inner: Any = None) -> Any:
    """The clipper with benchmark arguments; a wrapper gets ``inner``."""
    if is_wrapper(name, factory):
        return factory(inner)
    if name in ARGUMENTS:
        return factory(*ARGUMENTS[name])
    try:
        return factory(DEFAULT_THRESHOLD)
    except TypeError:
        return factory()


@dataclass
class StepContender:
    """How one contender's transformation is built from a fresh optimizer."""

    name: str
    make: Callable[[], optax.GradientTransformation]
    group: str  # "reference", "fixed", "adaptive", "guard", "preset", "update"


FIXED = frozenset({"clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms"})


def step_contenders(
    optimizer: Callable[[], optax.GradientTransformation] = lambda: optax.adam(1e-3),
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[dict[str, StepContender], dict[str, str]]:
    """All train-step contenders, and the exports left out with the reason.

    ``adam`` alone, ``optax.clip_by_global_norm`` chained ahead of it, every
    optaxclip clipper chained ahead of it (an update clipper after it), every
    guard around ``chain(clip_by_global_norm, adam)``, and
    ``clipped(adam, global_clipnorm=...)``.
    """
    out = {
        "adam": StepContender("adam", optimizer, "reference"),
        "optax.clip_by_global_norm": StepContender(
            "optax.clip_by_global_norm",
            lambda: optax.chain(optax.clip_by_global_norm(threshold), optimizer()), "reference"),
    }
    skipped = {}
    for name, factory in optaxclip_factories().items():
        if is_wrapper(name, factory):
            def make(factory=factory, name=name):
                inner = optax.chain(optaxclip.clip_by_global_norm(threshold), optimizer())
                return build(name, factory, inner)
            label, group = f"{name}(chain(clip_by_global_norm, adam))", "guard"
        else:
            try:
                probe = build(name, factory)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                skipped[name] = f"could not be built with benchmark arguments: {error}"
                continue
            kind = role(name, probe)
            if kind == "example":
                skipped[name] = "per-example clipper: benchmarked on per-example gradients"
                continue
            if kind == "update":
                def make(factory=factory, name=name):
                    return optax.chain(optimizer(), build(name, factory))
                label, group = f"chain(adam, {name})", "update"
            else:
                def make(factory=factory, name=name):
                    return optax.chain(build(name, factory), optimizer())
                label = f"chain({name}, adam)"
                group = "fixed" if name in FIXED else "adaptive"
        out[label] = StepContender(label, make, group)
    out["clipped(adam, global_clipnorm)"] = StepContender(
        "clipped(adam, global_clipnorm)",
        lambda: optaxclip.clipped(optimizer(), global_clipnorm=threshold), "preset")
    return out, skipped
