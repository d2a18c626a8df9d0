"""Test-wide set-up, loaded before jax initialises anywhere in the suite.

Multi-device behaviour is tested on 8 virtual CPU devices, and Keras runs on its
JAX backend; both must be configured before the first import of jax or keras.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
