"""Packing small leaves into chunks for the global and per-example norms.

XLA compiles and launches one kernel per reduction, so a tree of thousands of
leaves costs thousands of kernels per pass; on CPU each takes about a
millisecond to compile. For the global and per-example norms (one result for
the whole tree) leaves are therefore joined, raveled and concatenated, and
reduced together: leaves under _PACK_BELOW entries (8 KiB of float32), at most
_PACK_LEAVES per chunk. On XLA:CPU the join is a copy (its reduction kernels
read materialised buffers only), so packing pays only where a leaf's own
kernel would be launch-bound. The first _PACK_TOTAL entries (4 MiB) of a dtype
go to free chunks, which XLA may fill all at once; the chunks after them are
chained, each joined only once the one before is reduced (see
_reduced_packed). The leaves past the cap used to be reduced one by one, and
thousands of separate reductions compile in superlinear time: 20,000 leaves
of 8x8 took over 14 minutes, chained 5. A fused concatenation (GPU)
looks up each entry's source per entry, a cost that grows with the leaves in
a chunk: hence the chunks. The rescue branch joins the same way.

The joins happen where the sums are taken, never on the cond's operands (an
operand would be materialised on every step). Per-leaf and unit-wise norms
are not joined (see _norms._unit_guarded). Measurements: benchmarks/RESULTS.md
("packing").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optaxclip._shards import _varying

Array = jax.Array

_PACK_BELOW = 2**11
_PACK_LEAVES = 256
_PACK_TOTAL = 2**20


def _unsharded(x: Array) -> bool:
    """False for leaves whose type carries a sharding (Explicit mesh axes).

    Concatenating leaves sharded in different ways would force a reshard, so
    those are reduced one by one.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return spec is None or all(axis is None for axis in spec)


def _layout(
    xs: Sequence[Array], key: Callable[[int], Any]
) -> tuple[list[list[int]], list[list[int]]]:
    """Indices of ``xs`` reduced together, as ``(free, chained)`` lists of chunks.

    Arrays under ``_PACK_BELOW`` entries with equal ``key(index)`` fill chunks of
    at most ``_PACK_LEAVES`` in order. While fewer than ``_PACK_TOTAL`` entries of
    a key are packed, its chunks are free: XLA may join them all at once. Past
    that, its chunks are chained: each is joined only after the previous chunk of
    its key is reduced, so they need not be live together. The other arrays are
    alone (free).
    """
    packed: dict[Any, list[int]] = {}
    queued: dict[Any, list[int]] = {}
    packed_entries: dict[Any, int] = {}
    free: list[list[int]] = []
    for i, x in enumerate(xs):
        if not (0 < x.size < _PACK_BELOW and _unsharded(x)):
            free.append([i])
            continue
        k = key(i)
        if packed_entries.get(k, 0) + x.size <= _PACK_TOTAL:
            packed.setdefault(k, []).append(i)
            packed_entries[k] = packed_entries.get(k, 0) + x.size
        else:
            queued.setdefault(k, []).append(i)

    def chunks(groups: dict[Any, list[int]]) -> list[list[int]]:
        return [ix[i:i + _PACK_LEAVES] for ix in groups.values()
                for i in range(0, len(ix), _PACK_LEAVES)]

    return free + chunks(packed), chunks(queued)


def _pack_key(x: Array) -> Any:
    """Leaves joined in one chunk share a dtype and how they vary across shards.

    Joining a replicated leaf with a sharded one would make the chunk vary along
    the sharded leaf's axes, and its entries would be counted once per shard.
    """
    return x.dtype, _varying(x)


def _joined(xs: Sequence[Array]) -> Array:
    """One global chunk: the arrays raveled and concatenated."""
    return jnp.concatenate([jnp.ravel(x) for x in xs])


def _joined_rows(xs: Sequence[Array]) -> Array:
    """One per-example chunk: ``[B, ...]`` arrays joined as ``[B, n]`` rows."""
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)


def _reduced_packed(
    leaves: Sequence[Array], reduce: Callable[[Array], Any], join: Callable = _joined
) -> list[Any]:
    """``reduce`` of every chunk of ``leaves`` (see ``_layout``), one result per chunk.

    A chained chunk is joined behind an optimization barrier with the previous
    result of its key (see ``_pack_key``), so no schedule has to hold the joins of
    all chained chunks at once. XLA:CPU's buffer plan does not show that bound
    (its temporaries measured the same within the chained leaves' size either way:
    benchmarks/RESULTS.md, sections 3 and 6); what the chunks buy there is compile
    time. Under ``jax.vmap``, ``jax.grad`` and ``shard_map`` the barrier only
    orders; it changes no value.
    """
    free, chained = _layout(leaves, lambda i: _pack_key(leaves[i]))
    results = []
    # The barrier pairs chunks of one key: under shard_map its outputs vary along
    # every axis any operand varies along, so a replicated chunk ordered after a
    # sharded one would be counted once per shard.
    last: dict[Any, Any] = {}
    for is_chained, c in [(False, c) for c in free] + [(True, c) for c in chained]:
        xs, key = [leaves[i] for i in c], _pack_key(leaves[c[0]])
        if is_chained and key in last:
            xs, _ = lax.optimization_barrier((xs, last[key]))
        last[key] = reduce(xs[0] if len(xs) == 1 else join(xs))
        results.append(last[key])
    return results
