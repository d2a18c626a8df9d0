"""The registry of public transformation factories, for enumerating them.

``register_factory`` records how a factory is called: which argument is its
limit, whether it wraps an inner transformation, which keyword arguments keep
a quick test quick. The contract matrix (``tests/test_contracts.py``), the
checks in ``optaxclip.testing`` and the benchmarks enumerate this registry, so a
clipper registered here is covered by all of them without editing any list.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

__all__ = ["FactoryInfo", "register_factory", "registered_factories"]

Kind = Literal["clipper", "guard", "preset", "wrapper", "moment_clipper",
               "per_example"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class FactoryInfo:
    """How to build one public transformation.

    Attributes:
      name: the factory's name, e.g. ``"clip_by_global_norm"``.
      factory: the callable itself.
      kind: ``"clipper"`` (called with its limit), ``"guard"`` (called with an
        inner transformation), ``"preset"`` (``clipped(tx, **option)``) or
        ``"wrapper"`` (``checked(tx)``: same state and updates as ``tx``) or
        ``"moment_clipper"`` (called with an inner Adam-like optimizer, whose
        second moment it clips against, and its limit: ``spam(inner, theta=...)``) or
        ``"per_example"`` (called with its limit; takes ``[B, ...]`` gradients and
        returns them reduced over the example axis: ``clip_per_example``).
      threshold: the argument that sets the limit, or None when the limit is
        adaptive and has no such argument.
      test_kwargs: keyword arguments that keep a short test meaningful (e.g. a
        warmup of 2 steps instead of 100).
      needs_params: whether ``update`` needs the parameters (AGC).
      limit_is_threshold: whether the threshold argument is the threshold
        itself (fixed clippers), not a cap or a ratio; contract checks then
        assert that the recorded threshold equals it.
    """

    name: str
    factory: Callable[..., Any]
    kind: Kind = "clipper"
    threshold: str | None = None
    test_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_params: bool = False
    limit_is_threshold: bool = False

    def build(self, threshold: Any = None, **kwargs: Any) -> Any:
        """The factory called with ``threshold`` (when it has a limit) and ``test_kwargs``."""
        arguments = {**self.test_kwargs, **kwargs}
        if threshold is not None and self.threshold is not None:
            arguments[self.threshold] = threshold
        return self.factory(**arguments)


_FACTORIES: dict[str, FactoryInfo] = {}


def register_factory(
    *,
    kind: Kind = "clipper",
    threshold: str | None = None,
    test_kwargs: Mapping[str, Any] | None = None,
    needs_params: bool = False,
    limit_is_threshold: bool = False,
) -> Callable[[F], F]:
    """Decorator: records a public factory so it is enumerated with the built-in ones.

    Example:
      >>> import optaxclip as oc
      >>> @oc.register_factory(threshold="max_rms")
      ... def clip_by_rms_twice(max_rms):
      ...     return oc.clip_by_rms(max_rms)
      >>> oc.registered_factories()["clip_by_rms_twice"].threshold
      'max_rms'
    """

    def decorate(factory: F) -> F:
        name = factory.__name__
        known = _FACTORIES.get(name)
        if known is not None and known.factory is not factory and _is_builtin(known.factory) \
                and not _is_builtin(factory):
            raise ValueError(
                f"register_factory: {name!r} is optaxclip's own {name}; registering "
                f"{factory.__module__}.{factory.__qualname__} under that name would replace "
                f"it in every enumeration (the contract tests, check_factory). Give your "
                f"factory another name."
            )
        # A factory of yours registered again (a notebook cell run twice) replaces
        # the earlier one.
        _FACTORIES[name] = FactoryInfo(
            name=name,
            factory=factory,
            kind=kind,
            threshold=threshold,
            test_kwargs=types.MappingProxyType(dict(test_kwargs or {})),
            needs_params=needs_params,
            limit_is_threshold=limit_is_threshold,
        )
        return factory

    return decorate


def _is_builtin(factory: Any) -> bool:
    return getattr(factory, "__module__", "").startswith("optaxclip.")


def registered_factories() -> dict[str, FactoryInfo]:
    """Every registered factory by name: the library's and any you registered."""
    return dict(_FACTORIES)
