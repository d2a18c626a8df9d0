"""The parity modules' import guard: skip without Keras/PyTorch, but never under CI."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

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
