"""Every optaxclip transformation the benchmarks run, enumerated from the package in one place.

``optaxclip_factories()`` is ``optaxclip.registered_factories()``: every factory
the library (or a user) registered with ``register_factory``. A new clipper is
benchmarked without editing this file: a ``"clipper"`` is built with its
threshold argument set to ``ARGUMENTS.get(name, DEFAULT_THRESHOLD)``, a
``"guard"`` around ``chain(clip_by_global_norm, adam)`` (``"wrapper"``s, i.e.
``checked``, need ``chex.chexify`` outside the jit and are listed as skipped), the
``"preset"`` as ``clipped(adam, global_clipnorm=...)``. Where a clipper sits
relative to the optimizer comes from its declared role (``optaxclip.spec_of``):
a gradient clipper before Adam, an update clipper after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip

DEFAULT_THRESHOLD = 0.1
# Thresholds that make each clipper clip on a step of the benchmark models (gradient
# global norms are about 1-10; per-leaf, per-entry and RMS thresholds are smaller).
ARGUMENTS: dict[str, float] = {
    "clip_by_value": 1e-4,
    "clip_by_norm": 1e-2,
    "clip_by_global_norm": DEFAULT_THRESHOLD,
    "clip_by_block_rms": 1e-4,
    "clip_by_rms": 1e-4,
    "adaptive_grad_clip": 0.01,
}


def optaxclip_factories() -> dict[str, Any]:
    """``optaxclip.registered_factories()``: name -> ``FactoryInfo``."""
    return optaxclip.registered_factories()


def role(tx: Any) -> str:
    """``"gradient"`` or ``"update"`` from the clipper's declared spec."""
    spec = optaxclip.spec_of(tx)
    return getattr(spec, "role", "gradient") or "gradient"


def build(info: Any, threshold: float | None = None) -> Any:
    """A clipper built with its benchmark threshold (and its quick test arguments)."""
    value = ARGUMENTS.get(info.name, DEFAULT_THRESHOLD) if threshold is None else threshold
    try:
        return info.build(value)
    except TypeError:
        return info.factory(value)


def _matrix_or_other(params: Any) -> Any:
    """Group labels for ``clip_by_group_norms``: "matrix" for leaves of rank 2 or more."""
    return jax.tree.map(lambda x: "matrix" if jnp.ndim(x) >= 2 else "other", params)


@dataclass
class StepContender:
    """How one contender's transformation is built from a fresh optimizer."""

    name: str
    make: Callable[[], optax.GradientTransformation]
    group: str  # "reference", "fixed", "adaptive", "guard", "preset", "wrapper", "update"


# Registry kinds the train step cannot run, with the reason reported in its table.
SKIPPED_KINDS = {
    "wrapper": ("runtime checks (checkify) need chex.chexify around the jitted step; "
                "opt-in debugging, not a training configuration"),
    "per_example": ("per-example clipper: needs per-example gradients, not the batch "
                    "gradient of this step (benchmarks/per_example.py)"),
}

FIXED = frozenset({"clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms",
                   "clip_by_rms"})


def step_contenders(
    optimizer: Callable[[], optax.GradientTransformation] = lambda: optax.adam(1e-3),
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[dict[str, StepContender], dict[str, str]]:
    """All train-step contenders, and the registered factories left out with the reason.

    ``adam`` alone, ``optax.clip_by_global_norm`` and ``optax.adaptive_grad_clip``
    chained ahead of it, ``optax.apply_if_finite`` around optax's chain, every
    registered clipper chained ahead of it (an update clipper after it), every guard
    around ``chain(clip_by_global_norm, adam)``, and ``clipped(adam, global_clipnorm=...)``.
    """
    out = {
        "adam": StepContender("adam", optimizer, "reference"),
        # The same step compiled twice: its ratio to "adam" is the noise of the table.
        "adam (again)": StepContender("adam (again)", optimizer, "reference"),
        "optax.clip_by_global_norm": StepContender(
            "optax.clip_by_global_norm",
            lambda: optax.chain(optax.clip_by_global_norm(threshold), optimizer()), "reference"),
        # optax's unit-wise clipper at optaxclip's benchmark ratio: the reference for the
        # per-unit clippers (each unit's norm of the gradient and of the weight).
        "optax.adaptive_grad_clip": StepContender(
            "optax.adaptive_grad_clip",
            lambda: optax.chain(optax.adaptive_grad_clip(ARGUMENTS["adaptive_grad_clip"]),
                                optimizer()), "reference"),
        # optax's own guard around optax's chain: the reference for the guards. It
        # selects between the old and the new state as skip_nonfinite does, and lets a
        # non-finite step through after max_consecutive_errors (here optax's example
        # value, 5) in a row.
        "optax.apply_if_finite": StepContender(
            "optax.apply_if_finite",
            lambda: optax.apply_if_finite(
                optax.chain(optax.clip_by_global_norm(threshold), optimizer()), 5),
            "reference"),
    }
    skipped: dict[str, str] = {}
    inner = lambda: optax.chain(optaxclip.clip_by_global_norm(threshold), optimizer())
    for name, info in optaxclip_factories().items():
        if info.kind in SKIPPED_KINDS:
            skipped[name] = SKIPPED_KINDS[info.kind]
            continue
        if info.kind == "guard":
            # Guards with their defaults (the library's, not the quick-test ones).
            make = lambda info=info: info.factory(inner())
            label, group = f"{name}(chain(clip_by_global_norm, adam))", info.kind
        elif info.kind == "moment_clipper":
            # It wraps the optimizer (it reads Adam's second moment): SPAM's defaults.
            make = lambda info=info: info.factory(optimizer())
            label, group = f"{name}(adam)", "adaptive"
        elif name == "clip_by_group_norms":
            # Two groups, matrices and the rest, each with the benchmark threshold.
            make = lambda info=info: optax.chain(info.factory(
                {"matrix": threshold, "other": threshold}, _matrix_or_other), optimizer())
            label, group = f"chain({name}(matrices, rest), adam)", "preset"
        elif info.kind == "preset":
            make = lambda info=info: info.factory(optimizer(), global_clipnorm=threshold)
            label, group = f"{name}(adam, global_clipnorm)", "preset"
        else:
            try:
                probe = build(info)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                skipped[name] = f"could not be built with benchmark arguments: {error}"
                continue
            if role(probe) == "update":
                make = lambda info=info: optax.chain(optimizer(), build(info))
                label, group = f"chain(adam, {name})", "update"
            else:
                make = lambda info=info: optax.chain(build(info), optimizer())
                label = f"chain({name}, adam)"
                group = "fixed" if name in FIXED else "adaptive"
        out[label] = StepContender(label, make, group)
    return out, skipped
