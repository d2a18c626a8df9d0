"""``clipped``: Keras-style ``clipnorm`` / ``clipvalue`` / ``global_clipnorm`` for optax.

``clipped(tx, global_clipnorm=1.0)`` is ``optax.chain(clip_by_global_norm(1.0), tx)``:
the raw gradients are clipped first and ``tx`` (Adam, SGD with momentum ...) only
ever sees clipped gradients, which is what Keras 3 does in
``BaseOptimizer._clip_gradients`` before it updates any moment.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _validate, fixed
from optaxclip._registry import register_factory
from optaxclip._scaling import Threshold

Array = jax.Array

__all__ = ["clipped"]

_BUILDERS = {
    "clipnorm": fixed.clip_by_norm,
    "clipvalue": fixed.clip_by_value,
    "global_clipnorm": fixed.clip_by_global_norm,
}


def _static_value(value: Any) -> float | None:
    """The value as a float when it is a concrete scalar, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and not isinstance(
        value, jax.core.Tracer
    ) and np.shape(value) == ():
        return float(np.asarray(value, dtype=np.float64))
    return None


@register_factory(kind="preset")
def clipped(
    tx: optax.GradientTransformation,
    *,
    clipnorm: Threshold | None = None,
    clipvalue: Threshold | None = None,
    global_clipnorm: Threshold | None = None,
) -> optax.GradientTransformation:
    """Clips the raw gradients, then runs ``tx``: Keras ``clipnorm`` semantics.

    ``clipped(tx, **{option: c}) = optax.chain(clipper(c), tx)`` with

    * ``clipnorm``: each variable (leaf) separately to L2 norm ``c``
      (``optaxclip.clip_by_norm``), as Keras ``clipnorm``;
    * ``clipvalue``: each entry to ``[-c, c]`` (``optaxclip.clip_by_value``);
    * ``global_clipnorm``: all gradients together to global L2 norm ``c``
      (``optaxclip.clip_by_global_norm``).

    Equivalents: ``keras.optimizers.Adam(clipnorm=c)`` and its siblings;
    ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` called before
    ``optimizer.step()``.

    Formal guarantees:
      * every moment accumulator in ``tx`` only sees clipped gradients
        (``optaxclip.check_order`` passes on the result);
      * with every option ``None`` the result *is* ``tx`` (same object);
      * the state is ``(clipper_state, tx_state)``, so ``optaxclip.stats`` reports
        the clip.

    Edge cases (Keras 3 in brackets where it differs):

      ===========================  ==============================================
      argument                     result
      ===========================  ==============================================
      all ``None``                 ``tx`` itself
      more than one option set     ``ValueError`` naming the options set (as
                                   Keras, which also counts a 0 as set)
      ``0`` (or ``0.0``)           no clipping: ``tx`` itself, as Keras, which
                                   treats 0 as "off" (note: the clippers
                                   themselves treat a threshold 0 as "zero the
                                   gradients")
      negative number              ``ValueError`` naming the option (Keras
                                   silently disables clipping)
      ``inf``                      a clipper that never clips
      jax array, tracer or         the clipper, always (``inject_hyperparams``
      schedule                     traces the value, so whether it is 0 is not
                                   known when building): where the value is 0
                                   it does not clip (threshold ``inf``); a
                                   traced negative value is clamped to 0
      ===========================  ==============================================

    Args:
      tx: any optax transformation or optimizer, e.g. ``optax.adam(1e-3)``.
      clipnorm: per-variable L2 norm limit.
      clipvalue: per-entry absolute value limit.
      global_clipnorm: global L2 norm limit over all variables.

    Returns:
      ``optax.chain(clipper, tx)``, or ``tx`` when no clipping is asked for.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = oc.clipped(optax.sgd(1.0), global_clipnorm=1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> updates, _ = tx.update(grads, tx.init(grads))
      >>> updates["w"].tolist()
      [-0.6000000238418579, -0.800000011920929]
      >>> base = optax.adam(1e-3)
      >>> oc.clipped(base) is base, oc.clipped(base, clipnorm=0.0) is base
      (True, True)

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
      neural networks", ICML 2013; Chollet et al., Keras 3 ``BaseOptimizer``
      (``clipnorm``, ``clipvalue``, ``global_clipnorm``), 2023.
    """
    options = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
    given = {name: value for name, value in options.items() if value is not None}
    if len(given) > 1:
        listed = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise ValueError(
            f"Only one of clipnorm, clipvalue and global_clipnorm can be set; got {listed}. "
            f"To combine clippers, chain them: optax.chain(optaxclip.clip_by_value(...), "
            f"optaxclip.clip_by_global_norm(...), tx)."
        )
    if not hasattr(tx, "init") or not hasattr(tx, "update"):
        hint = " It looks like a factory: call it, e.g. optax.adam(1e-3)." if callable(tx) else ""
        raise TypeError(
            f"tx must be an optax.GradientTransformation, e.g. optax.adam(1e-3); got "
            f"{type(tx).__name__}.{hint}"
        )
    if not given:
        return tx
    (name, value), = given.items()
    number = _static_value(value)
    if number is not None and (math.isnan(number) or number < 0):
        raise ValueError(
            f"{name} must be >= 0 (0 turns clipping off, as in Keras); got {value!r}."
        )
    _validate.validate_threshold(value, name)
    if isinstance(value, jax.Array) or callable(value):
        # A jax array may be traced (optax.inject_hyperparams traces every number it
        # is given), so whether it is 0 is not known here: the clipper is always
        # built, and 0 means "off" inside it, so the state never changes layout.
        return optax.chain(_BUILDERS[name](_zero_is_off(value)), tx)
    if number == 0:
        return tx
    return optax.chain(_BUILDERS[name](value), tx)


def _zero_is_off(value: Any) -> Any:
    """``value`` (an array or a schedule) with 0 read as no clipping (threshold inf)."""
    def off_at_zero(threshold: Any) -> Array:
        threshold = jnp.asarray(threshold)
        return jnp.where(threshold == 0, jnp.inf, threshold)

    if callable(value):
        return lambda count: off_at_zero(value(count))
    return off_at_zero(value)
