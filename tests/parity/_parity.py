"""The parity modules' import guard: skip without Keras/PyTorch, but never under CI."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest


def require(module_name: str) -> ModuleType:
    """Imports a parity library; skips the module without it, but fails under CI."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        hint = "install the test extra: pip install -e '.[test]'"
        if os.environ.get("CI"):
            raise ImportError(
                f"{module_name} is needed by the parity tests, which never skip in CI; {hint}"
            ) from error
        pytest.skip(f"{module_name} is not installed; {hint}", allow_module_level=True)


def clip_once(tx: Any, grads: list, *, jit: bool) -> tuple[list, dict]:
    """One update of an optaxclip transformation on numpy gradients, as numpy.

    Returns the clipped gradients and ``optaxclip.stats`` of the new state.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import optaxclip as oc

    def apply(grads):
        out, state = tx.update(grads, tx.init(grads))
        return out, oc.stats(state)

    out, stats = (jax.jit(apply) if jit else apply)([jnp.asarray(g) for g in grads])
    return [np.asarray(g) for g in out], {k: np.asarray(v) for k, v in stats.items()}
