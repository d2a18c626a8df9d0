"""optaxclip: pure-functional optax gradient clipping with checked invariants.

Chain a clipper ahead of the optimizer so moment accumulators only see clipped
gradients::

    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
"""

from optaxclip._norms import global_norm
from optaxclip._state import ClipStats, stats
from optaxclip.fixed import (
    ClipByBlockRmsState,
    ClipByGlobalNormState,
    ClipByNormState,
    ClipByValueState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
)

__version__ = "0.1.0"

__all__ = [
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByNormState",
    "ClipByValueState",
    "ClipStats",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "stats",
]
