"""How small a leaf must be for packing to pay: the packing limit and chunk size, measured.

``optaxclip._norms`` packs leaves under ``_PACK_BELOW`` entries into chunks of at
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
from optaxclip import _norms

# (label, fast-path pack limit in entries, leaves per chunk); limit 0 turns the
# fast-path packing off. The rescue branch packs as the library does in all of them.
SETTINGS = (
    ("fast path unpacked", 0, 1),
    ("<2^16, one chunk (previous limit)", 2**16, 1 << 30),
    ("<2^12, chunks of 64", 2**12, 64),
    ("<2^10, chunks of 256", 2**10, 256),
    ("<2^8, chunks of 256", 2**8, 256),
)


@contextlib.contextmanager
def packing(limit: int, chunk: int) -> Iterator[None]:
    """Temporarily sets the norm core's packing limit and chunk size (read at trace time)."""
    saved = _norms._PACK_BELOW, _norms._PACK_LEAVES
    _norms._PACK_BELOW, _norms._PACK_LEAVES = limit, chunk
    try:
        yield
    finally:
        _norms._PACK_BELOW, _norms._PACK_LEAVES = saved


def sweep(tree_shapes: dict[str, trees.Shapes], repeats: int,
          settings: tuple = SETTINGS, log: Any = print) -> dict:
    """Per tree: step medians and compile seconds for optax and each packing setting."""
    out = {}
    for tree_name, shapes in tree_shapes.items():
        log(f"  packing sweep: {tree_name} ({trees.describe(shapes)})")
        source = jax.tree.map(jax.numpy.asarray, trees.make_tree(shapes))
        contenders, compile_s, memory = {}, {}, {}
        builds = [("optax", None, None)] + [(label, lim, ch) for label, lim, ch in settings]
        for label, limit, chunk in builds:
            ctx = contextlib.nullcontext() if limit is None else packing(limit, chunk)
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
