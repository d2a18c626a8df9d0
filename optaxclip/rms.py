"""``clip_by_rms``: rescales the whole tree so its root-mean-square is bounded."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from optaxclip._clipper import fixed_threshold, make_clipper
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import AxisName, validate_axis_name

__all__ = ["ClipByRmsState", "clip_by_rms"]


class ClipByRmsState(NamedTuple):
    """State of ``clip_by_rms``: step count and the last update's stats."""

    count: jax.Array
    stats: ClipStats


@register_factory(threshold="max_rms", limit_is_threshold=True)
def clip_by_rms(
    max_rms: Threshold, *, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """Rescales all gradients together so their global RMS is at most ``max_rms``.

    ``rms = ||g||_2 / sqrt(n)`` with ``n`` the number of floating-point entries
    of the whole tree (across every ``axis_name`` shard);
    ``out = g * min(1, max_rms / rms)``. Unlike a global-norm threshold, an RMS
    threshold does not have to change when the model grows.

    Equivalents: none in Keras, PyTorch or optax (``optax.clip_by_block_rms``
    is per leaf; this is ``clip_by_global_norm(max_rms * sqrt(n))``).

    Formal guarantees:
      * for finite input, ``rms(out) <= max_rms * (1 + 1e-6)``;
      * input at or under ``max_rms`` comes back bit-identical;
      * rescaling only: direction and signs are kept;
      * one float32 (or wider) overflow-safe norm, read once; with
        ``axis_name`` both the norm and ``n`` cover every shard.

    Edge cases:

      =========================  ==============================================
      input                      output
      =========================  ==============================================
      zero gradients / empty     zeros (unchanged); finite ``jax.grad``
      RMS ``<= max_rms``         untouched, as computed: ``sqrt(sum x^2) /
                                 sqrt(n)`` in float32 can round 1 ulp above
                                 an exact RMS (``[0.1, 0.1]`` at ``0.1``),
                                 and then scales by ``1 - 2^-24``
      ``max_rms = 0``            zeros
      ``max_rms = inf``          identity, also for non-finite gradients
      NaN / inf anywhere         every entry NaN; ``norm`` stat NaN / inf
      negative static value      ``ValueError`` at construction
      integer / ``float0`` leaf  passed through, not counted in ``n``
      =========================  ==============================================

    Args:
      max_rms: the largest RMS allowed: a float, a scalar array or a schedule.
      axis_name: under ``shard_map``/``pmap``, the axis (or axes) the gradients
        are sharded over.

    Returns:
      The clipper; its state is ``ClipByRmsState(count, stats)``, and its
      ``norm`` stat is the pre-clip RMS.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_rms(1.0)
      >>> out, state = tx.update([jnp.array([4.0, 0.0, 0.0, 0.0])], tx.init(None))
      >>> out[0].tolist(), float(oc.stats(state)["clip_by_rms/norm"])
      ([2.0, 0.0, 0.0, 0.0], 2.0)

    References:
      Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost", ICML 2018 (RMS as a scale-free size of an update).
    """
    axis_name = validate_axis_name(axis_name)
    spec = ClipSpec("clip_by_rms", scope="global", rms=True, axis_name=axis_name)
    return make_clipper(spec, fixed_threshold(max_rms, "max_rms"), state_cls=ClipByRmsState)
