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

# Hypothesis profiles: "ci" (the default, what `make test` runs) keeps the contract
# matrix inside the suite's time budget (8 drawn cases per test, besides each test's
# always-run examples) and is derandomized, so a run is reproducible; "fuzz"
# (`make fuzz`) draws many more cases (OPTAXCLIP_FUZZ_EXAMPLES, 400 by default).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("OPTAXCLIP_CI_EXAMPLES", "8")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("OPTAXCLIP_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
