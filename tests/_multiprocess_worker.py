"""One process of the two-process test in test_multiprocess.py.

Run as ``python _multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N local CPU devices.
It joins the others through ``jax.distributed.initialize`` on 127.0.0.1:PORT
(gloo CPU collectives), builds the gradient trees below as global arrays sharded
across every process's devices, runs each transformation of ``CASES`` under
``jax.jit`` (and ``clip_by_global_norm(axis_name=...)`` under ``shard_map``), and
writes the global results to ``OUT_DIR/process_<id>.npz``.

Imported (not run), it only defines the trees and the cases, so that the test
computes its single-process reference from the same definitions.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

# kernel and bias sharded FSDP plus tensor-parallel style, one leaf replicated.
SPECS = {
    "kernel": ((8, 4), ("data", "model")),
    "bias": ((4,), ("model",)),
    "embed": ((8, 2), ("data", None)),
    "norm_scale": ((3,), ()),
}
# Norms below, near and far above the thresholds: the adaptive clippers leave
# their warmup and then clip the last step.
STEP_SCALES = (0.05, 0.1, 0.08, 0.12, 0.1, 20.0)
SHARD_MAP_SHAPE = (8, 3)  # split over ("data", "model") together under shard_map


def host_grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {
        name: (rng.normal(size=shape) * STEP_SCALES[step]).astype(np.float32)
        for name, (shape, _) in SPECS.items()
    }


def shard_map_grads() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"w": (rng.normal(size=SHARD_MAP_SHAPE) * 3).astype(np.float32)}


def cases():
    """name -> transformation; run for every step of ``STEP_SCALES``."""
    import optaxclip as oc

    return {
        "clip_by_global_norm": oc.clip_by_global_norm(1.0),
        "zclip": oc.zclip(warmup_steps=3, max_norm=None),
        "autoclip": oc.autoclip(25.0, history=4),
    }


def run(tx, grads_seq, to_host):
    """Every step's updates and ``stats``, as host numpy arrays keyed by step and path."""
    import jax

    import optaxclip as oc

    update = jax.jit(tx.update)
    state = tx.init(grads_seq[0])
    out = {}
    for step, grads in enumerate(grads_seq):
        updates, state = update(grads, state)
        for name, leaf in updates.items():
            out[f"{step}/updates/{name}"] = to_host(leaf)
        for key, value in oc.stats(state).items():
            out[f"{step}/stats/{key}"] = to_host(value)
    return out


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    import jax

    # gloo is this jax's default CPU collectives implementation; say so explicitly:
    # without cross-process collectives the jitted reductions below cannot run.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        cluster_detection_method="deactivate",
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optaxclip as oc

    assert jax.process_count() == num_processes, jax.process_count()
    mesh = jax.make_mesh((num_processes, jax.device_count() // num_processes),
                         ("data", "model"))

    def global_array(value: np.ndarray, spec: P) -> jax.Array:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def to_host(x: jax.Array) -> np.ndarray:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    grads_seq = [
        {name: global_array(value, P(*SPECS[name][1])) for name, value in host_grads(s).items()}
        for s in range(len(STEP_SCALES))
    ]
    spread = {d.process_index for d in grads_seq[0]["kernel"].sharding.device_set}
    results = {}
    for name, tx in cases().items():
        for key, value in run(tx, grads_seq, to_host).items():
            results[f"{name}/{key}"] = value

    # shard_map: each device holds 1/4 of w; the psum over both axes crosses processes.
    axes = ("data", "model")
    tx = oc.clip_by_global_norm(1.0, axis_name=axes)

    def per_shard(grads):
        updates, state = tx.update(grads, tx.init(grads))
        return updates, state.stats.norm

    w = {"w": global_array(shard_map_grads()["w"], P(axes))}
    clipped, norm = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(axes),
                                          out_specs=(P(axes), P())))(w)
    results["shard_map/updates/w"] = to_host(clipped["w"])
    results["shard_map/norm"] = to_host(norm)

    meta = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "processes_holding_kernel": sorted(spread),
        "collectives": jax.config.jax_cpu_collectives_implementation,
    }
    path = os.path.join(out_dir, f"process_{process_id}")
    np.savez(path + ".npz", **results)
    with open(path + ".json", "w") as f:
        json.dump(meta, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
