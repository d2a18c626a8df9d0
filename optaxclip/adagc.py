"""AdaGC: per-tensor clipping relative to an EMA of each tensor's clipped norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _norms, _scaling, _state, _validate
from optaxclip._norms import AxisName, is_float_leaf
from optaxclip._state import ClipStats

Array = jax.Array

__all__ = ["AdaGCState", "adagc"]


class AdaGCState(NamedTuple):
    """State of ``adagc``.

    Attributes:
      count: number of updates so far (int32).
      stats: per-leaf ``ClipStats`` of the last update; ``threshold`` is
        ``lambda_abs`` during warmup and the largest per-tensor limit
        ``lambda_rel * gamma_i`` after it.
      gamma: per-tensor EMA of clipped norms, a tree of float32 scalars; ``inf``
        until the tensor has had a finite non-zero gradient.
      num_warmup: finite warmup steps so far; warmup ends at ``warmup_steps``.
      global_norm: the pre-clip global norm of the last update.
    """

    count: Array
    stats: ClipStats
    gamma: Any
    num_warmup: Array
    global_norm: Array


_state.register_state(AdaGCState, "adagc", extra_fields=("global_norm",))


def adagc(
    *,
    lambda_rel: float = 1.05,
    lambda_abs: float = 1.0,
    beta: float = 0.98,
    warmup_steps: int = 100,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """AdaGC: clips each tensor relative to an EMA of its own clipped norms.

    After warmup, for every tensor ``i``:
    ``h_i = min(1, lambda_rel * gamma_i / ||g_i||)``, ``g_i <- h_i g_i`` and
    ``gamma_i <- beta gamma_i + (1 - beta) ||h_i g_i||``. During the warmup
    (the first ``warmup_steps`` finite steps) the whole tree is clipped to the
    absolute global threshold, ``g <- g min(1, lambda_abs / ||g||)``, and
    ``gamma_i`` tracks the running minimum of the clipped tensor norms.

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
        after it ``||out_i|| <= lambda_rel gamma_i (1 + 1e-6)`` per tensor, so
        every tensor is under the ``threshold`` stat;
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
        sharded over.

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
    _validate.validate_threshold(lambda_rel, "lambda_rel")
    _validate.validate_threshold(lambda_abs, "lambda_abs")
    beta = _validate.validate_real(
        beta, "beta", low=0.0, high=1.0, high_open=True, hint="Try 0.98."
    )
    warmup_steps = _validate.validate_int(warmup_steps, "warmup_steps")
    axis_name = _validate.validate_axis_name(axis_name)

    def init_fn(params: Any) -> AdaGCState:
        zero = jnp.zeros([], jnp.int32)
        per_leaf = jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)
        return AdaGCState(
            count=zero,
            stats=_state.initial_stats(per_leaf, _scaling.threshold_at(lambda_abs, zero)),
            gamma=jax.tree.map(lambda _: jnp.full([], jnp.inf, jnp.float32), params),
            num_warmup=zero,
            global_norm=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates: Any, state: AdaGCState, params: Any = None, **extra):
        del params, extra
        leaves, treedef = jax.tree.flatten(updates)
        gammas = treedef.flatten_up_to(state.gamma)
        positions = [i for i, g in enumerate(leaves) if is_float_leaf(g)]
        norms = _norms.unit_norms([leaves[i] for i in positions], 2, axis_name=axis_name)
        norms = [n.astype(jnp.float32) for n in norms]
        global_norm = _norms.global_norm(norms)
        in_warmup = state.num_warmup < warmup_steps
        absolute = _scaling.threshold_at(lambda_abs, state.count).astype(jnp.float32)
        relative = _scaling.threshold_at(lambda_rel, state.count).astype(jnp.float32)
        global_scale, _ = _scaling.scale_factor(global_norm, absolute)

        out = list(leaves)
        leaf_norms = [jnp.zeros([], jnp.float32)] * len(leaves)
        scales = [jnp.ones([], jnp.float32)] * len(leaves)
        new_gammas = list(gammas)
        limits = []
        for i, norm in zip(positions, norms):
            gamma = gammas[i]
            use_relative = ~in_warmup & jnp.isfinite(gamma)
            limit = relative * gamma
            relative_scale, _ = _scaling.scale_factor(norm, limit)
            scale = jnp.where(use_relative, relative_scale, global_scale)
            clipped_norm = norm * scale
            observed = jnp.isfinite(clipped_norm) & (clipped_norm > 0)
            ema = beta * gamma + (1 - beta) * clipped_norm
            running_min = jnp.where(observed, jnp.minimum(gamma, clipped_norm), gamma)
            new_gammas[i] = jnp.where(
                use_relative, jnp.where(jnp.isfinite(norm), ema, gamma), running_min
            )
            out[i] = _scaling.apply_scale(leaves[i], scale)
            leaf_norms[i], scales[i] = norm, scale
            # A tensor under the global rule is bounded by the global threshold.
            limits.append(jnp.where(use_relative, limit, absolute))

        threshold = jnp.max(jnp.stack(limits)) if limits else absolute
        rebuild = lambda xs: jax.tree.unflatten(treedef, xs)
        clipped = jax.tree.map(lambda s: s != 1, rebuild(scales))
        finite_step = jnp.isfinite(global_norm)
        return rebuild(out), AdaGCState(
            count=optax.safe_increment(state.count),
            stats=_state.make_stats(rebuild(leaf_norms), threshold, rebuild(scales), clipped),
            gamma=rebuild(new_gammas),
            num_warmup=state.num_warmup + (in_warmup & finite_step).astype(jnp.int32),
            global_norm=global_norm,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
