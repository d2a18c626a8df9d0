"""AdaGC: per-tensor clipping relative to an EMA of each tensor's clipped norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _history, _norms, _scaling
from optaxclip._clipper import ThresholdRule, make_clipper, stacked_spec, unit_zeros
from optaxclip._registry import register_factory
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats
from optaxclip._validate import (
    AxisName,
    validate_axis_name,
    validate_int,
    validate_real,
    validate_threshold,
)

Array = jax.Array

__all__ = ["AdaGCState", "adagc"]


class AdaGCState(NamedTuple):
    """State of ``adagc``.

    Attributes:
      count: number of updates so far (int32).
      stats: per-tensor ``ClipStats`` of the last update; ``threshold`` holds
        each tensor's limit (its share of ``lambda_abs`` during warmup,
        ``lambda_rel * gamma_i`` after it).
      gamma: per-tensor EMA of clipped norms, a tree of scalars; ``inf`` until
        the tensor has had a finite non-zero gradient.
      num_warmup: finite warmup steps so far; warmup ends at ``warmup_steps``.
    """

    count: Array
    stats: ClipStats
    gamma: Any
    num_warmup: Array


@register_factory(threshold="lambda_abs", test_kwargs={"warmup_steps": 2})
def adagc(
    *,
    lambda_rel: float = 1.05,
    lambda_abs: float = 1.0,
    beta: float = 0.98,
    warmup_steps: int = 100,
    axis_name: AxisName = None,
    stacked: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdaGC: clips each tensor relative to an EMA of its own clipped norms.

    After warmup, for every tensor ``i``:
    ``h_i = min(1, lambda_rel * gamma_i / ||g_i||)``, ``g_i <- h_i g_i`` and
    ``gamma_i <- beta gamma_i + (1 - beta) ||h_i g_i||``. During the warmup
    (the first ``warmup_steps`` finite steps) the whole tree is clipped to the
    absolute global threshold, ``g <- g min(1, lambda_abs / ||g||)``, and
    ``gamma_i`` tracks the running minimum of the clipped tensor norms. The
    global clip is recorded per tensor: tensor ``i``'s limit is its share
    ``lambda_abs ||g_i|| / ||g||`` of the global budget when the tree is over
    it (``lambda_abs`` otherwise), so the ``threshold`` stat always holds the
    limit each tensor was clipped to.

    Deviations from the paper, all at its edges (documented decisions):

    * the warmup minimum skips zero and non-finite norms, so a tensor that got
      no gradient in one warmup step (an unused MoE expert, a frozen layer) does
      not get ``gamma_i = 0`` and stay frozen forever; a tensor with no usable
      warmup norm keeps the warmup rule until it has one;
    * non-finite steps do not count towards warmup; a non-finite tensor after
      warmup does not update its ``gamma_i`` (its output is NaN, library policy).

    After warmup the threshold is purely relative: it can grow by at most
    ``beta + (1 - beta) lambda_rel`` (1.001 with the defaults) per step, so it
    stops spikes but lets a slow exponential growth through with no ceiling.

    Equivalents: the AdaGC optimizer of ``pytorch_optimizer`` (fused with Adam).
    No Keras, PyTorch or optax built-in.

    Formal guarantees:
      * for finite input: during warmup ``||out|| <= lambda_abs (1 + 1e-6)``;
        after it ``||out_i|| <= lambda_rel gamma_i (1 + 1e-6)`` per tensor;
        always, every tensor is under its ``threshold`` stat;
      * tensors at or under their limit come back bit-identical; rescaling only;
      * per-tensor norms in float32 or wider, overflow-safe, one read; with
        ``axis_name`` they (and the warmup global norm) cover all shards.

    Edge cases:

      =============================  =========================================
      input                          output
      =============================  =========================================
      zero gradients                 zeros; during warmup ``gamma`` untouched,
                                     after it ``gamma`` decays (paper rule)
      NaN / inf in warmup            every entry NaN; step not counted
                                     (also with ``lambda_abs = inf``)
      NaN / inf tensor after warmup  that tensor NaN, its ``gamma`` kept
      ``lambda_rel = inf``           identity after warmup
      invalid static argument        ``ValueError`` naming it
      =============================  =========================================

    Args:
      lambda_rel: relative threshold factor (paper: 1.05).
      lambda_abs: absolute global threshold during warmup (paper: 1.0).
      beta: EMA coefficient in [0, 1) (paper: 0.98).
      warmup_steps: number of finite steps clipped globally (>= 1; paper: 100).
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are
        sharded over. With ``stacked=True`` it must not split the layer axis
        (the shards' layers differ; not detected).
      stacked: every leaf's leading axis indexes stacked layers: each layer is
        a tensor of its own, with its own ``gamma``, norm, limit and scale.

    Returns:
      The clipper; its state is ``AdaGCState(count, stats, gamma, num_warmup)``
      with one norm, limit and scale per tensor (per layer when ``stacked``).

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.adagc(warmup_steps=1)
      >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
      >>> _, state = tx.update({"a": jnp.array([0.6]), "b": jnp.array([0.8])}, state)
      >>> out, state = tx.update({"a": jnp.array([6.0]), "b": jnp.array([0.8])}, state)
      >>> [round(float(x[0]), 4) for x in (out["a"], out["b"])]
      [0.63, 0.8]

    References:
      Wang, Li, Chen, Zeng, Yang, Sun, Ma, Yu and Shen, "AdaGC: Improving
      Training Stability for Large Language Model Pretraining", 2025.
    """
    validate_threshold(lambda_rel, "lambda_rel")
    validate_threshold(lambda_abs, "lambda_abs")
    beta = validate_real(beta, "beta", low=0.0, high=1.0, high_open=True, hint="Try 0.98.")
    warmup_steps = validate_int(warmup_steps, "warmup_steps")
    spec = stacked_spec(ClipSpec(
        "adagc",
        scope="leaf",
        axis_name=validate_axis_name(axis_name),
        stat_fields=("num_warmup",),
        strict_nonfinite=True,
    ), stacked)

    def no_history(x: Any, dtype: Any) -> Array:
        # inf per tensor (per layer when stacked), laid out as its norm is.
        if not _norms.is_float_leaf(x):
            return jnp.full([], jnp.inf, dtype)
        return unit_zeros(spec, x, dtype) + jnp.asarray(jnp.inf, dtype)

    def init(params: Any) -> dict[str, Any]:
        dtype = _history.dtype_for(params)
        return {
            "gamma": jax.tree.map(lambda x: no_history(x, dtype), params),
            "num_warmup": jnp.zeros([], jnp.int32),
        }

    def threshold(norm: Any, state: AdaGCState, params: Any, parts: list) -> tuple[Any, dict]:
        del params
        leaves, treedef = jax.tree.flatten(norm)
        try:
            gammas = treedef.flatten_up_to(state.gamma)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"adagc: state.gamma does not match the gradients' tree ({error}). The state "
                f"was made for another model (a checkpoint restored into a different tree?); "
                f"build it with tx.init(params) of this model."
            ) from None
        # Only the float leaves' norms: a non-float leaf's placeholder is a constant
        # 0, and XLA reassociates the rescue's (0 * 2^640)^2 into 0 * (2^640)^2 =
        # NaN under jit (float64 trees with an integer leaf: eager 0, jit NaN).
        total = _norms.global_norm([n for n, pair in zip(leaves, parts) if pair is not None])
        fractions = _fractions(leaves, total, parts)
        in_warmup = state.num_warmup < warmup_steps
        absolute = _scaling.threshold_at(lambda_abs, state.count)
        relative = _scaling.threshold_at(lambda_rel, state.count)
        over = total > absolute
        limits, new_gammas = [], []
        for norm_i, gamma, fraction, pair in zip(leaves, gammas, fractions, parts):
            if pair is None:  # not a float: no entries, no limit, its gamma kept
                limits.append(jnp.full_like(norm_i, jnp.inf))
                new_gammas.append(gamma)
                continue
            dtype = jnp.promote_types(norm_i.dtype, gamma.dtype)
            norm_i, gamma = norm_i.astype(dtype), gamma.astype(dtype)
            # The global warmup clip, as each tensor's share of the budget; a
            # non-finite total poisons every tensor, as a global clip does.
            share = absolute * fraction
            share = jnp.where(over & (norm_i > 0), share, absolute)
            share = jnp.where(jnp.isnan(fraction), jnp.nan, share)
            use_relative = ~in_warmup & jnp.isfinite(gamma)
            # lambda_rel = inf is no limit, also where gamma has decayed to 0 (inf * 0).
            relative_limit = jnp.where(relative == jnp.inf, jnp.inf, relative * gamma)
            limit = jnp.where(use_relative, relative_limit, share).astype(dtype)
            scale, _ = _scaling.scale_factor(norm_i, limit, strict_nonfinite=True)
            clipped_norm = norm_i * scale
            observed = jnp.isfinite(clipped_norm) & (clipped_norm > 0)
            ema = beta * gamma + (1 - beta) * clipped_norm
            running_min = jnp.where(observed, jnp.minimum(gamma, clipped_norm), gamma)
            new_gammas.append(jnp.where(
                # A step whose clipped norm is not finite (a NaN limit from a schedule,
                # NaN or inf entries) leaves gamma as it was.
                use_relative, jnp.where(jnp.isfinite(clipped_norm), ema, gamma), running_min
            ))
            limits.append(limit)
        fields = {
            "gamma": treedef.unflatten(new_gammas),
            "num_warmup": state.num_warmup + (in_warmup & jnp.isfinite(total)).astype(jnp.int32),
        }
        return treedef.unflatten(limits), fields

    rule = ThresholdRule(
        threshold=threshold, init=init, fields=("gamma", "num_warmup"), uses_parts=True
    )
    return make_clipper(spec, rule, state_cls=AdaGCState)


def _fractions(norms: list, total: Array, parts: list) -> list:
    """``norm_i / total`` per tensor; NaN for every tensor when an entry is not finite.

    When the total (or a tensor's norm) overflows float32 although every entry is
    finite, the fractions come from the norms' finite parts instead.
    """
    # Each tensor's parts are scalars, or one per layer of a stacked leaf.
    pairs = [pair for pair in parts if pair is not None]
    finite_input = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(r) & jnp.isfinite(m)) for r, m in pairs] or [jnp.bool_(True)]
    ))
    largest = jnp.max(jnp.stack([jnp.max(m, initial=0) for _, m in pairs] or [jnp.ones([])]))
    largest = jnp.where(largest > 0, largest, 1)
    sizes = [
        jnp.zeros([]) if pair is None else pair[0] * _norms.quotient(pair[1], largest)
        for pair in parts
    ]
    whole = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in sizes))
    overflowed = jnp.isposinf(total) & finite_input
    safe_total = jnp.where(total > 0, total, 1)
    out = []
    for n, size in zip(norms, sizes):
        direct = n / safe_total
        from_parts = (size / jnp.where(whole > 0, whole, 1)).astype(direct.dtype)
        fraction = jnp.where(overflowed, from_parts, direct)
        out.append(jnp.where(finite_input, fraction, jnp.nan))
    return out
