"""The adaptive clippers, whose threshold comes from the weights or from past norms.

Each lives in its own module: ``agc`` (``adaptive_grad_clip``), ``autoclip``,
``zclip`` and ``adagc``. This module gathers them for ``from optaxclip.adaptive
import ...``.
"""

from optaxclip.adagc import AdaGCState, adagc
from optaxclip.agc import AdaptiveGradClipState, adaptive_grad_clip
from optaxclip.autoclip import AutoClipState, autoclip
from optaxclip.zclip import ZClipState, zclip

__all__ = [
    "AdaGCState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "zclip",
]
