"""How small a leaf must be for packing to pay: the packing limit and chunk size, measured.

``optaxclip._packing`` packs leaves under ``_PACK_BELOW`` entries into chunks of at
most ``_PACK_LEAVES`` leaves and reduces each chunk as one array. On XLA:CPU
(jax 0.10) every packed chunk is a copy (the reduction kernels read only
materialised buffers), so packing trades a copy of the small leaves for fewer
kernels; on GPU the concatenation fuses into the reduction. This sweep measures
the standalone ``clip_by_global_norm`` update and its compile time for several
(limit, chunk) settings on trees of many leaves, next to ``optax``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import optax

import optaxclip
from benchmarks import suites, timing, trees
from optaxclip import _packing

# (label, pack limit in entries, leaves per chunk, most entries packed per dtype);
# limit 0 turns packing off (the rescue branch packs the same way as the fast path).
UNCAPPED = 1 << 62
SETTINGS = (
    ("unpacked", 0, 1, UNCAPPED),
    ("<2^16, one chunk (previous)", 2**16, 1 << 30, UNCAPPED),
    ("<2^13, chunks of 256", 2**13, 256, UNCAPPED),
    ("<2^11, chunks of 256, cap 2^20 (library)", 2**11, 256, 2**20),
    ("<2^11, chunks of 64, cap 2^20", 2**11, 64, 2**20),
)


@contextlib.contextmanager
def packing(limit: int, chunk: int, total: int = UNCAPPED) -> Iterator[None]:
    """Temporarily sets the norm core's packing parameters (read at trace time)."""
    saved = _packing._PACK_BELOW, _packing._PACK_LEAVES, _packing._PACK_TOTAL
    _packing._PACK_BELOW, _packing._PACK_LEAVES, _packing._PACK_TOTAL = limit, chunk, total
    try:
        yield
    finally:
        _packing._PACK_BELOW, _packing._PACK_LEAVES, _packing._PACK_TOTAL = saved


def sweep(tree_shapes: dict[str, trees.Shapes], repeats: int,
          settings: tuple = SETTINGS, log: Any = print) -> dict:
    """Per tree: step medians and compile seconds for optax and each packing setting."""
    out = {}
    for tree_name, shapes in tree_shapes.items():
        log(f"  packing sweep: {tree_name} ({trees.describe(shapes)})")
        source = jax.tree.map(jax.numpy.asarray, trees.make_tree(shapes))
        contenders, compile_s, memory = {}, {}, {}
        builds = [("optax", None, None, None)] + list(settings)
        for label, limit, chunk, total in builds:
            ctx = contextlib.nullcontext() if limit is None else packing(limit, chunk, total)
            with ctx:
                tx = (optax.clip_by_global_norm(1.0) if limit is None
                      else optaxclip.clip_by_global_norm(1.0))
                start = time.perf_counter()
                contenders[label] = suites._Clip(tx, source, refresh=True)
                compile_s[label] = time.perf_counter() - start
                memory[label] = suites._memory(contenders[label].compiled)
        samples = timing.interleaved(contenders, repeats)
        out[tree_name] = {
            "description": trees.describe(shapes),
            "times": {k: timing.summary(v) for k, v in samples.items()},
            "compile_s": compile_s,
            "memory": memory,
        }
        del contenders
    return out
