"""Two CPU processes joined by ``jax.distributed`` give the single-process result.

The test starts two copies of ``_multiprocess_worker.py`` on 127.0.0.1 (a free
port, two local CPU devices each, gloo collectives). They build gradient trees
sharded over a ``data`` x ``model`` mesh that spans both processes, and run
``clip_by_global_norm``, ``zclip`` and ``autoclip`` under ``jax.jit`` over
several steps, and ``clip_by_global_norm(axis_name=...)`` under ``shard_map``.
Both processes' results must equal the reference computed here in one process.

The workers are bounded in time and killed on every path out of the test. The
test skips only when the installed jaxlib has no CPU collectives across processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip as oc

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "_multiprocess_worker.py"
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 120


def _load_worker():
    spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _cpu_collectives_missing() -> str | None:
    """Why this jaxlib cannot run CPU collectives across processes, or None."""
    version = getattr(jax.lib, "__version__", "(unknown version)")
    try:
        from jax._src.lib import _jax
    except ImportError:  # an older jaxlib layout: ask for the collectives another way
        _jax = getattr(getattr(jax, "_src", None), "lib", None)
        _jax = getattr(_jax, "xla_extension", None) or getattr(_jax, "xla_client", None)
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return (f"jaxlib {version} has no gloo CPU collectives "
                f"(make_gloo_tcp_collectives is missing)")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # conftest.py asked for 8 devices in this process; each worker gets its own count.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    root = str(pathlib.Path(oc.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _launch(out_dir: pathlib.Path) -> list[tuple[int, str]]:
    """Runs the workers to the end or to the deadline; (return code, log) of each."""
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = open(out_dir / f"worker_{i}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port),
                 str(out_dir)],
                env=_worker_env(), stdout=log, stderr=subprocess.STDOUT,
            ))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            # One failed worker leaves the other waiting at a collective: stop both.
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = [p.wait() for p in procs]
        for log in logs:
            log.close()
    return [(code, (out_dir / f"worker_{i}.log").read_text(errors="replace"))
            for i, code in enumerate(codes)]


def _reference() -> dict[str, np.ndarray]:
    """The same runs in this process, on one device."""
    grads_seq = [jax.tree.map(jnp.asarray, worker.host_grads(s))
                 for s in range(len(worker.STEP_SCALES))]
    out = {}
    for name, tx in worker.cases().items():
        for key, value in worker.run(tx, grads_seq, np.asarray).items():
            out[f"{name}/{key}"] = value
    w = worker.shard_map_grads()
    tx = oc.clip_by_global_norm(1.0)
    clipped, state = tx.update(w, tx.init(w))
    out["shard_map/updates/w"] = np.asarray(clipped["w"])
    out["shard_map/norm"] = np.asarray(state.stats.norm)
    return out


def test_two_processes_match_one(tmp_path):
    missing = _cpu_collectives_missing()
    if missing is not None:
        pytest.skip(f"cannot test several processes on CPU: {missing}")
    runs = _launch(tmp_path)
    for i, (code, log) in enumerate(runs):
        assert code == 0, f"worker {i} exited with {code} (-9: killed at the deadline):\n{log}"

    want = _reference()
    for i in range(NUM_PROCESSES):
        meta = json.loads((tmp_path / f"process_{i}.json").read_text())
        assert meta["process_count"] == NUM_PROCESSES
        assert meta["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
        assert meta["local_device_count"] == LOCAL_DEVICES
        # The gradients really were spread over both processes' devices.
        assert meta["processes_holding_kernel"] == list(range(NUM_PROCESSES))
        with np.load(tmp_path / f"process_{i}.npz") as got:
            assert sorted(got.files) == sorted(want)
            for key in want:
                g, w = got[key], want[key]
                assert g.dtype == w.dtype and g.shape == w.shape, key
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7,
                                           err_msg=f"process {i}: {key}")

    # The steps clip some updates and not others, and zclip left its warmup.
    assert not want["clip_by_global_norm/0/stats/clip_by_global_norm/clipped"]
    assert want["clip_by_global_norm/5/stats/clip_by_global_norm/clipped"]
    assert want["zclip/5/stats/zclip/clipped"] and float(want["zclip/4/stats/zclip/ema_mean"]) > 0
    assert want["autoclip/5/stats/autoclip/clipped"]
    assert float(want["shard_map/norm"]) > 1.0
