"""Interleaved timing, the machine description, and counts of what XLA emits."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import jax


def machine() -> dict[str, str]:
    """The device, CPU, core count, load and library versions, as strings."""
    info = {
        "jax_devices": ", ".join(str(d) for d in jax.devices()),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "load_avg_1_5_15": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
    }
    import optax

    import optaxclip

    info["jax"] = jax.__version__
    info["optax"] = optax.__version__
    info["optaxclip"] = optaxclip.__version__
    try:
        import torch

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        info["torch"] = "not installed"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed round-robin so that load drift hits all.

    Each contender is a no-argument callable that runs one call to completion
    (``block_until_ready``). One with a ``prepare`` method has it called, untimed,
    right before each timed call (to refresh donated inputs). Every round times
    each contender once; the start of the round rotates so no contender always
    follows the same neighbour.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            getattr(contenders[name], "prepare", lambda: None)()
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            getattr(contenders[name], "prepare", lambda: None)()
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def summary(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "min_ms": ms[0],
        "n": len(ms),
    }


def hlo_counts(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Kernels XLA launches (fusions outside fused computations), reductions, branches."""
    text = compiled.as_text()
    kernels = reduces = 0
    fused = False
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            fused = "fused_computation" in line or line.startswith("%fused")
            continue
        if " reduce(" in line:
            reduces += 1
        if not fused and re.search(r"= \S+ fusion\(", line):
            kernels += 1
    return {
        "kernels": kernels,
        "reduces": reduces,
        "conditionals": text.count(" conditional("),
        "hlo_lines": text.count("\n"),
    }
