"""optaxclip: pure-functional optax gradient clipping with checked invariants.

Chain a clipper ahead of the optimizer so moment accumulators only see clipped
gradients::

    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
"""

from optaxclip._norms import global_norm
from optaxclip._state import ClipStats, stats
from optaxclip.adaptive import (
    AdaGCState,
    AdaptiveGradClipState,
    AutoClipState,
    ZClipState,
    adagc,
    adaptive_grad_clip,
    autoclip,
    zclip,
)
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
from optaxclip.guards import SkipNonfiniteState, SkipOnSpikeState, skip_nonfinite, skip_on_spike
from optaxclip.invariants import (
    OrderingError,
    Stage,
    assert_moments_bounded,
    check_order,
    checked,
)
from optaxclip.presets import clipped

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
    "AdaGCState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "zclip",
    "SkipNonfiniteState",
    "SkipOnSpikeState",
    "skip_nonfinite",
    "skip_on_spike",
    "OrderingError",
    "Stage",
    "assert_moments_bounded",
    "check_order",
    "checked",
    "clipped",
]
