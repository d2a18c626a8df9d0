"""optaxclip: pure-functional optax gradient clipping with checked invariants.

Chain a clipper ahead of the optimizer so moment accumulators only see clipped
gradients::

    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
"""

from optaxclip._clipper import ThresholdRule, fixed_threshold, make_clipper
from optaxclip._norms import global_norm
from optaxclip._registry import FactoryInfo, register_factory, registered_factories
from optaxclip._spec import ClipSpec, spec_of
from optaxclip._state import ClipStats, stats
from optaxclip.adagc import AdaGCState, adagc
from optaxclip.agc import AdaptiveGradClipState, adaptive_grad_clip
from optaxclip.autoclip import AutoClipState, autoclip
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
from optaxclip.functional import (
    MonitorLeafNormsState,
    MonitorNormState,
    clip,
    clip_per_leaf,
    clip_values,
    monitor_norm,
)
from optaxclip.groups import ClipByGroupNormsState, clip_by_group_norms
from optaxclip.guards import SkipNonfiniteState, SkipOnSpikeState, skip_nonfinite, skip_on_spike
from optaxclip.invariants import (
    OrderingError,
    Stage,
    assert_moments_bounded,
    check_order,
    checked,
)
from optaxclip.per_example import ClipPerExampleState, PerExampleStats, clip_per_example
from optaxclip.presets import clipped
from optaxclip.rms import ClipByRmsState, clip_by_rms
from optaxclip.spam import SpamState, SpamStats, spam
from optaxclip.update_clip import (
    ClipUpdateNormState,
    ClipUpdateRmsState,
    clip_update_norm,
    clip_update_rms,
)
from optaxclip.zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = [
    # fixed thresholds
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByNormState",
    "ClipByRmsState",
    "ClipByValueState",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_rms",
    "clip_by_value",
    # parameter groups
    "ClipByGroupNormsState",
    "clip_by_group_norms",
    # adaptive thresholds
    "AdaGCState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "zclip",
    # update clippers (after the preconditioner)
    "ClipUpdateNormState",
    "ClipUpdateRmsState",
    "clip_update_norm",
    "clip_update_rms",
    # per-example clipping (DP-SGD)
    "ClipPerExampleState",
    "PerExampleStats",
    "clip_per_example",
    # moment-aware spike clipping (wraps an Adam-like optimizer)
    "SpamState",
    "SpamStats",
    "spam",
    # guards and presets
    "SkipNonfiniteState",
    "SkipOnSpikeState",
    "clipped",
    "skip_nonfinite",
    "skip_on_spike",
    # norms and stats
    "ClipStats",
    "MonitorLeafNormsState",
    "MonitorNormState",
    "global_norm",
    "monitor_norm",
    "stats",
    # functional forms, for custom loops
    "clip",
    "clip_per_leaf",
    "clip_values",
    # invariants
    "OrderingError",
    "Stage",
    "assert_moments_bounded",
    "check_order",
    "checked",
    # writing your own clipper
    "ClipSpec",
    "FactoryInfo",
    "ThresholdRule",
    "fixed_threshold",
    "make_clipper",
    "register_factory",
    "registered_factories",
    "spec_of",
]
