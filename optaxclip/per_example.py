"""Per-example clipping (DP-SGD): clip each example's gradient, then reduce the batch.

``clip_per_example`` takes gradients with a leading example axis (``[B, ...]``
leaves, as ``jax.vmap(jax.grad(loss), in_axes=(None, 0))`` gives), clips each
example to ``max_norm`` by its global norm (or each of its layers to an equal
share of it), and returns their mean or sum in the parameters' shapes, with
optional Gaussian noise for DP-SGD. Chain it ahead of the optimizer like any
gradient clipper::

    tx = optax.chain(oc.clip_per_example(1.0, noise_multiplier=1.1), optax.adam(1e-3))
    per_example_grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    updates, state = tx.update(per_example_grads, state, params)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optaxclip import _history, _norms, _reductions, _scaling, _spec, _state
from optaxclip._registry import register_factory
from optaxclip._validate import (
    AxisName,
    is_traced,
    validate_axis_name,
    validate_int,
    validate_real,
    validate_threshold,
)

Array = jax.Array

__all__ = ["ClipPerExampleState", "PerExampleStats", "clip_per_example"]


class PerExampleStats(NamedTuple):
    """What ``clip_per_example`` did on its last update; ``optaxclip.stats`` reports it.

    Attributes:
      norm_max: the largest pre-clip per-example global norm (float32; float64
        under x64 when the parameters are, or none were given to ``init``).
      norm_median: the median pre-clip per-example global norm (as ``norm_max``).
      clipped_fraction: the fraction of examples whose gradient was changed
        (scale != 1; with ``per_layer``, any of its layers).
      threshold: ``max_norm`` as used (a traced value after clamping at 0).
      noise_std: the standard deviation of the noise added to each coordinate
        of the *sum* (``noise_multiplier * max_norm``; 0 without noise).
    """

    norm_max: Array
    norm_median: Array
    clipped_fraction: Array
    threshold: Array
    noise_std: Array


class ClipPerExampleState(NamedTuple):
    """State of ``clip_per_example``.

    Attributes:
      count: number of updates so far (int32).
      key: the noise PRNG key as raw ``uint32`` key data (``jax.random.key_data``),
        so a checkpoint restores it as a plain array; split once per update.
      stats: ``PerExampleStats`` of the last update.
    """

    count: Array
    key: Array
    stats: PerExampleStats


_state.register_report(PerExampleStats, "clip_per_example", PerExampleStats._fields)

Reduce = Literal["mean", "sum"]


# ---------------------------------------------------------------- norms and scales


def _example_scales(
    leaves: list[Array], threshold: Array, per_layer: bool, axis_name: AxisName = None
) -> tuple[Array, list[tuple[Array, Array]], Array]:
    """``(global norms [B], per-leaf (high, low) scales [B] each, example clipped [B])``."""
    if not per_layer:
        norms = _norms.batched_global_norm(leaves, axis_name=axis_name)
        # The threshold in the gradients' accumulation dtype (float64 for float64).
        threshold = threshold.astype(norms.dtype)
        scale, _ = _scaling.scale_factor(norms, threshold)
        scale, low = _scaling.split_tiny(scale, threshold, norms.astype(scale.dtype))
        # A norm past float32's range from finite entries (near 3.4e38) is inf; its
        # exact scale comes from the example's largest entry. The cond keeps that
        # second read off the usual path.
        overflowed = jnp.isposinf(norms)
        scale, low = lax.cond(jnp.any(overflowed),
                              functools.partial(_rescued_scales, axis_name=axis_name),
                              lambda *a: (a[0], a[1]), scale, low, leaves, threshold,
                              overflowed)
        pair: tuple[Array, Array] = (scale, low)
        return norms, [pair] * len(leaves), scale != 1
    rows = [x.reshape(x.shape[0], -1) for x in leaves]  # a reshape, not a copy
    parts = _norms.unit_norm_parts(rows, 2.0, [(1,)] * len(rows), axis_name)
    # One [L, B] computation for every layer's scale instead of L small ones.
    acc = jnp.result_type(*[root.dtype for root, _ in parts])
    share = threshold.astype(acc) / math.sqrt(len(leaves))
    roots = jnp.stack([root.astype(acc) for root, _ in parts])
    multipliers = jnp.stack([multiplier.astype(acc) for _, multiplier in parts])
    layer_norms = _norms._norm(roots, multipliers)
    table, lows = _parts_scale(layer_norms, roots, multipliers, share)
    # Each example's global norm from its layers' norms: squares of layer norms
    # above 1.8e19 overflow float32 (a global norm of 1.2e38 came out inf), so an
    # example with a layer norm above a quarter of the dtype's exponent range is
    # scaled by the norms' rescue factor (2^-80 for float32, 2^-640 for float64)
    # first. A power of two keeps it exact and its inverse normal (dividing by the
    # largest norm is not: XLA turns it into a product with 1 / 1e38, a subnormal
    # that XLA:CPU flushes to 0).
    wide = layer_norms.astype(jnp.promote_types(layer_norms.dtype, jnp.float32))
    exponent = _norms._rescue_exponent(wide.dtype)
    big = jnp.max(wide, axis=0) > 2.0 ** (jnp.finfo(wide.dtype).maxexp // 4)
    down = jnp.where(big, 2.0**-exponent, 1.0).astype(wide.dtype)
    up = jnp.where(big, 2.0**exponent, 1.0).astype(wide.dtype)
    norms = jnp.sqrt(jnp.sum(jnp.square(wide * down), axis=0)) * up
    clipped = jnp.any(table != 1, axis=0)
    return norms, [(table[i], lows[i]) for i in range(len(leaves))], clipped


def _parts_scale(norm: Array, root: Array, multiplier: Array,
                 threshold: Array) -> tuple[Array, Array]:
    """``min(1, threshold / norm)`` as ``_scaling.split_tiny``'s ``(high, low)``,
    exact from the parts where ``norm`` overflowed."""
    threshold = threshold.astype(norm.dtype)
    scale, _ = _scaling.scale_factor(norm, threshold)
    scale, low = _scaling.split_tiny(scale, threshold, norm)
    return _scaling.rescale_overflowed(scale, low, jnp.isposinf(norm), threshold, multiplier,
                                       root)


def _rescued_scales(scale: Array, low: Array, leaves: list[Array], threshold: Array,
                    overflowed: Array, axis_name: AxisName = None) -> tuple[Array, Array]:
    """Scales of overflowed examples from ``norm = 2^k ||g 2^-k||``.

    A norm that overflows from finite entries has every entry below 2^128, so
    scaled by 2^-80 (exact, and not subnormal as ``1 / largest`` can be, which
    XLA:CPU flushes to zero) their squares sum without overflow.
    """
    acc = _norms._widest(leaves)
    multiplier = jnp.asarray(2.0 ** _norms._rescue_exponent(acc), acc)
    root = _norms.batched_global_norm([_norms._multiplied(x, 1 / multiplier, acc)
                                       for x in leaves], axis_name=axis_name)
    return _scaling.rescale_overflowed(scale, low, overflowed, threshold.astype(acc),
                                       multiplier, root)


def _median(norms: Array) -> Array:
    """``jnp.median`` without its overflow: the middle two of an even count are
    averaged as ``low + (high - low) / 2``, not ``(low + high) / 2`` (inf for two
    norms above 1.7e38). NaN if any norm is NaN, as ``jnp.median``."""
    ordered = jnp.sort(norms)
    middle = norms.shape[0] // 2
    high = ordered[middle]
    if norms.shape[0] % 2:
        value = high
    else:
        low = ordered[middle - 1]
        value = jnp.where(low == high, high, low + (high - low) / 2)
    return jnp.where(jnp.any(jnp.isnan(norms)), jnp.nan, value)


# ---------------------------------------------------------------- reducing


def _weighted_sums(leaves: list[Array], scales: list[tuple[Array, Array]]) -> list[Array]:
    """``sum_b high_b low_b x_b`` for each leaf, in float32 or wider.

    ``scales`` are ``_scaling.split_tiny``'s ``(high, low)`` per example. One
    ``lax.cond`` for the whole tree (not one per leaf: 148 of them were 440 extra
    kernels on a GPT-2-shaped tree) keeps the split sums off the usual path,
    where every ``low`` is 1. A pair wider than its leaf (float64 scales over a
    float32 leaf, under x64) is narrowed to the leaf's precision first
    (``_scaling.narrowed``), so a scale normal in float64 is not flushed there.
    """
    if not leaves:
        return []
    scales = [_scaling.narrowed(high, low, _real(x)) for x, (high, low) in zip(leaves, scales)]
    any_tiny = jnp.any(jnp.stack([jnp.any(low != 1) for _, low in scales]))

    def usual() -> list[Array]:
        return [_contract(high, x) for x, (high, _) in zip(leaves, scales)]

    def split() -> list[Array]:
        return [_split_sum(x, high, low) for x, (high, low) in zip(leaves, scales)]

    return lax.cond(any_tiny, split, usual)


def _real(x: Array) -> Any:
    return _norms.accumulation_dtype(jnp.promote_types(x.dtype,
                                                       _norms.accumulation_dtype(x.dtype)))


def _contract(weights: Array, x: Array) -> Array:
    # A contraction, not jnp.sum(x * scale, axis=0): XLA:CPU reduces over the
    # major axis about 100x slower than it runs the dot (measured in
    # benchmarks/per_example.py).
    acc = jnp.promote_types(x.dtype, _norms.accumulation_dtype(x.dtype))
    return jnp.tensordot(weights.astype(_real(x)), x.astype(acc), axes=1,
                         precision=lax.Precision.HIGHEST)


def _split_sum(x: Array, high: Array, low: Array) -> Array:
    # Examples whose scale is below the normal range (high * low, low = 2^-k, see
    # split_tiny) are summed apart with weights high / 2^m, 2^m >= B, then times
    # 2^m low: high |x_b| is below |x_b| (below the dtype's largest), so the B
    # products sum without overflow and the weights stay normal. ``high`` and ``low``
    # are already in x's real precision (_weighted_sums narrows them).
    tiny = low != 1
    spread = 2.0 ** max(math.ceil(math.log2(max(x.shape[0], 1))), 0)
    usual = _contract(jnp.where(tiny, 0, high), x)
    rest = _contract(jnp.where(tiny, high / spread, 0), x)
    return usual + rest * (jnp.min(low, initial=1) * spread)


def _finish(total: Array, x: Array, noise: Array | None, divisor: int) -> Array:
    """``(total + noise) / divisor`` in ``x``'s dtype; narrow dtypes are rounded
    toward zero, so rounding never pushes the result past the bound that holds in
    float32."""
    acc = total.dtype
    if noise is not None:
        total = total + noise.astype(acc)
    if divisor != 1:
        total = total / divisor
    if acc != x.dtype and not jnp.iscomplexobj(x):
        return _scaling._toward_zero(total, x.dtype)
    return total.astype(x.dtype)


def _noise(key: Array, leaves: list[Array], std: Array) -> list[Array]:
    """Gaussian noise of each leaf's example shape, times ``std``.

    One draw per real dtype for the whole tree, sliced into the leaves (a complex
    leaf takes two slices, its real and imaginary parts): a draw per leaf was 148
    generators and 1,800 kernels on a GPT-2-shaped tree, 3.4x the noiseless clip.
    """
    real = [jnp.finfo(_norms.accumulation_dtype(x.dtype)).dtype for x in leaves]
    sizes = [math.prod(x.shape[1:]) * (2 if jnp.iscomplexobj(x) else 1) for x in leaves]
    dtypes = sorted(set(real), key=str)
    keys = dict(zip(dtypes, jax.random.split(key, max(len(dtypes), 1))))
    draws = {d: jax.random.normal(keys[d], (sum(n for n, r in zip(sizes, real) if r == d),), d)
             * std.astype(d) for d in dtypes}
    offsets = dict.fromkeys(dtypes, 0)
    out = []
    for x, d, n in zip(leaves, real, sizes):
        flat = draws[d][offsets[d]:offsets[d] + n]
        offsets[d] += n
        shape = x.shape[1:]
        if jnp.iscomplexobj(x):
            re, im = flat.reshape((2,) + shape)
            out.append(lax.complex(re, im))
        else:
            out.append(flat.reshape(shape))
    return out


def _as_key(key: Any) -> Array:
    """A typed PRNG key from a typed key or raw ``uint32`` key data (as checkpoints hold)."""
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def _first_example(x: Any) -> Any:
    """A non-float leaf without its example axis: its first example (zeros if none)."""
    if not hasattr(x, "shape") or len(x.shape) == 0:
        return x
    if x.shape[0] == 0:
        return np.zeros(x.shape[1:], x.dtype)
    return x[0]


# ---------------------------------------------------------------- the transformation


def _key_from_seed(seed: int) -> Array:
    """A PRNG key for a 64-bit ``seed``, distinct for every seed, with or without x64.

    ``jax.random.key`` keeps the low 32 bits without x64 (2^32 and 0 gave the same
    noise, and so did -1 and 2^32 - 1). Seeds in ``[0, 2^32)`` keep that key; any
    other seed folds its high 32 bits into the key of its low 32 bits.
    """
    low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    key = jax.random.key(low)
    return key if 0 <= seed < 2**32 else jax.random.fold_in(key, high)


@register_factory(kind="per_example", threshold="max_norm")
def clip_per_example(
    max_norm: float | Array,
    *,
    reduce: Reduce = "mean",
    per_layer: bool = False,
    noise_multiplier: float = 0.0,
    seed: int = 0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips each example's gradient to ``max_norm``, then returns the batch mean or sum.

    ``out = (sum_b g_b * min(1, C / ||g_b||) + N(0, (sigma C)^2 I)) / B`` for
    ``reduce="mean"`` (no ``/ B`` for ``"sum"``), with ``g_b`` example ``b``'s
    gradients (index ``b`` of the leading axis of every leaf), ``||.||`` their
    global 2-norm, ``C = max_norm`` and ``sigma = noise_multiplier``. With
    ``per_layer=True`` each of the ``L`` float leaves of an example is clipped
    on its own to ``C / sqrt(L)``, so the example's global norm is still at most
    ``C``. Norms come from ``batched_global_norm``: one read of the gradients on
    the usual path, float32 accumulation, overflow-safe; the weighted sum is a
    second read.

    Equivalents: ``optax.per_example_global_norm_clip`` (sum only, returns a
    clip count instead of a transformation) and, with ``per_layer=True``,
    ``optax.per_example_layer_norm_clip(uniform=True)``; Opacus' flat (and
    per-layer) clipping; jax_privacy's ``clip_pytree`` with a sum. No Keras
    built-in.

    **Sensitivity** (for DP accounting): the clipped sum ``sum_b clip(g_b)``
    has L2 sensitivity ``C`` when one example is added or removed (``2C`` when
    one is replaced), also with ``per_layer``. The noise has standard deviation
    ``sigma C`` per coordinate of the sum, so ``sigma`` is the noise multiplier
    of the Gaussian mechanism. ``"mean"`` divides the noisy sum by the batch
    size ``B`` of the call, treated as public; with Poisson sampling use
    ``"sum"`` and divide by the expected batch size yourself. A traced
    ``max_norm`` is used as given (clamped at 0): keep it data-independent.
    Complex leaves get independent noise of that deviation in their real and
    imaginary parts. Privacy accounting itself is not done here.

    Noise key: the state holds a PRNG key (from ``seed``) that is split on
    every update, so a restored checkpoint continues the same noise stream. Or
    pass ``tx.update(grads, state, params, noise_key=key)`` to supply it; the
    state's key is then left unchanged.

    Formal guarantees:
      * for finite input, every clipped example has global norm
        ``<= C * (1 + 1e-6)`` (each layer ``<= C / sqrt(L)`` with
        ``per_layer``), so without noise ``||out|| <= C`` (mean) or ``<= B C``
        (sum), up to float32 rounding of the sum;
      * an example at or under ``C`` enters the sum unscaled (scale exactly 1);
        clipping only rescales an example (each layer with ``per_layer``),
        never changing its direction;
      * the output has the parameters' structure, shapes and dtypes: each
        float leaf ``[B, ...]`` becomes ``[...]``; the sum is taken in float32
        (or wider) and rounded toward zero for bf16/fp16;
      * norms in float32 or wider; a finite example whose norm overflows
        float32 still gets its exact scale (its entries are scaled by 2^-80
        first, a second read only in that case); a scale below float32's
        normal range (an example of norm 1e38 clipped to 1) is applied as a
        normal number times 2^-126, not flushed to 0;
      * no host callback; the state is arrays only (the key as ``uint32``).

    Edge cases:

      ==============================  ==========================================
      input                           output
      ==============================  ==========================================
      zero gradients                  zeros (plus noise); finite ``jax.grad``
      ``max_norm = 0``                zeros (noise std 0)
      ``max_norm = inf``              plain mean / sum of the examples
      NaN / inf in an example         every entry NaN; ``norm_max`` NaN / inf
                                      (at ``max_norm = inf``: the plain mean /
                                      sum, the NaN / inf included); with
                                      ``per_layer``, every entry of that
                                      layer (leaf): the others keep their
                                      clipped finite sums
      ``B = 0`` (no examples)         zeros, plus noise of std ``sigma C``
                                      (not divided: there is no ``B``) for
                                      either ``reduce``
      bf16 / fp16 gradients           norms and sum in float32, rounded down
      float64 gradients (x64)         ``max_norm``, norms and scales in float64
      ``None`` / ``MaskedNode``       passed through
      integer / ``float0`` leaf       its first example, untouched
      negative / NaN static value     ``ValueError`` naming the argument
      noise with ``max_norm = inf``   ``ValueError`` (unbounded sensitivity)
      ==============================  ==========================================

    Args:
      max_norm: ``C``, the largest global L2 norm an example keeps: a float or
        a scalar array (traced values are clamped at 0).
      reduce: ``"mean"`` (default) or ``"sum"`` over the examples.
      per_layer: clip each float leaf of an example to ``C / sqrt(L)`` instead
        of the whole example to ``C``.
      noise_multiplier: ``sigma >= 0``; the Gaussian noise added to the sum
        has standard deviation ``sigma * C``. 0 (default) adds none.
      seed: seeds the noise key kept in the state.
      axis_name: under ``shard_map``/``pmap``, the mesh axis (or axes) that split
        each example's gradient leaves (tensor parallelism): the per-example norms
        then cover every shard, as the sensitivity bound needs. It must not split
        the example axis. Without it, each shard clips by the norm of its own
        slice, and an example's contribution can reach ``C * sqrt(shards)``. Not
        with noise (``ValueError``): every shard would draw the same noise for
        different coordinates.

    Returns:
      The transformation; ``init(params)`` takes the parameters (no example
      axis), ``update(per_example_grads, state, params=None, noise_key=None)``
      returns updates shaped like the parameters. Its state is
      ``ClipPerExampleState(count, key, stats)``; ``oc.stats`` reports
      ``clip_per_example/norm_max``, ``/norm_median``, ``/clipped_fraction``,
      ``/threshold`` and ``/noise_std``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_per_example(1.0, reduce="sum")
      >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
      >>> out, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> out["w"].tolist()
      [0.9000000357627869, 1.2000000476837158]
      >>> float(oc.stats(state)["clip_per_example/clipped_fraction"])
      0.5

    References:
      Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang, "Deep
      Learning with Differential Privacy", CCS 2016 (per-example clipping and
      the Gaussian noise of DP-SGD).
      McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
      Recurrent Language Models", ICLR 2018 (per-layer clipping).
    """
    validate_threshold(max_norm, "max_norm")
    if callable(max_norm) and not hasattr(max_norm, "dtype"):
        raise ValueError("max_norm must be a number or a scalar array, not a schedule.")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}.")
    if not isinstance(per_layer, bool):
        raise ValueError(f"per_layer must be a bool; got {per_layer!r}.")
    noise_multiplier = validate_real(
        noise_multiplier, "noise_multiplier", low=0.0, high=math.inf, high_open=True,
        hint="Use noise_multiplier=0.0 for no noise.",
    )
    if noise_multiplier > 0 and not is_traced(max_norm) and not math.isfinite(
            float(np.asarray(max_norm, np.float64))):
        raise ValueError(
            "noise_multiplier > 0 needs a finite max_norm: the noise is scaled by the "
            f"sensitivity max_norm, and max_norm={max_norm!r} bounds nothing."
        )
    axis_name = validate_axis_name(axis_name)
    if axis_name is not None and noise_multiplier > 0:
        raise ValueError(
            f"clip_per_example: noise_multiplier > 0 with axis_name={axis_name!r} is not "
            f"supported: every shard would draw the same noise for different coordinates "
            f"(correlated noise breaks the Gaussian mechanism). Clip with axis_name and "
            f"noise_multiplier=0.0, then add the noise to the gathered sum."
        )
    seed = validate_int(seed, "seed", minimum=-(2**63))
    if seed >= 2**63:
        raise ValueError(f"seed must be a 64-bit int, below 2**63; got {seed!r}.")

    def init_fn(params: Any) -> ClipPerExampleState:
        # float64 under x64 when the parameters are (or none are given), so a norm
        # past float32's range is recorded, not overflowed to inf.
        zero = jnp.zeros([], _history.dtype_for(params))
        stats = PerExampleStats(zero, zero, zero.astype(jnp.float32), zero, zero)
        key = jax.random.key_data(_key_from_seed(seed))
        return ClipPerExampleState(jnp.zeros([], jnp.int32), key, stats)

    def update_fn(updates: Any, state: Any, params: Any = None,
                  noise_key: Any = None, **extra_args: Any):
        del params, extra_args
        state = jax.tree.map(jnp.asarray, state)
        leaves, treedef = jax.tree.flatten(updates)
        positions = [i for i, x in enumerate(leaves) if _norms.is_float_leaf(x)]
        arrays = [jnp.asarray(leaves[i]) for i in positions]
        sizes = {jnp.shape(x)[0] for x in leaves if jnp.ndim(x) > 0}
        if any(jnp.ndim(x) == 0 for x in arrays) or len(sizes) > 1:
            raise ValueError(
                "clip_per_example expects every leaf to have the same leading example axis "
                f"[B, ...]; got shapes {[jnp.shape(x) for x in leaves]}. Compute per-example "
                "gradients with jax.vmap(jax.grad(loss), in_axes=(None, 0))."
            )
        batch = sizes.pop() if sizes else 0
        # Held in at least float32 (float64 with jax_enable_x64), so float64
        # gradients get float64 scales; the stats keep init's dtype.
        threshold = _scaling.threshold_at(max_norm, state.count)  # clamped at 0; NaN stays
        if arrays and batch > 0:
            norms, scales, clipped = _example_scales(arrays, threshold, per_layer, axis_name)
            norm_max, norm_median = _reductions.max_keeping_nan(norms), _median(norms)
            fraction = jnp.mean(clipped.astype(jnp.float32))
        else:
            ones = jnp.ones([batch], jnp.float32)
            scales = [(ones, ones) for _ in arrays]
            norm_max = norm_median = fraction = jnp.zeros([], jnp.float32)
        key = state.key
        if noise_multiplier > 0:
            if noise_key is None:
                key, sub = jax.random.split(_as_key(key))
                key = jax.random.key_data(key)
            else:
                sub = _as_key(noise_key)
            # In the threshold's own dtype: under x64 a max_norm of 1e40 is finite.
            std = noise_multiplier * threshold
            noises: list[Any] = _noise(sub, arrays, std)
        else:
            std, noises = jnp.zeros([], threshold.dtype), [None] * len(arrays)
        divisor = max(batch, 1) if reduce == "mean" else 1
        out = [_first_example(x) for x in leaves]
        totals = _weighted_sums(arrays, scales)
        for i, x, total, n in zip(positions, arrays, totals, noises):
            out[i] = _finish(total, x, n, divisor)
        dtype = state.stats.norm_max.dtype
        stats = PerExampleStats(norm_max.astype(dtype), norm_median.astype(dtype),
                                fraction.astype(jnp.float32), threshold.astype(dtype),
                                std.astype(dtype))
        return treedef.unflatten(out), ClipPerExampleState(
            jnp.asarray(optax.safe_increment(state.count)), key, stats)

    # It clips gradients, so it goes before the moments: check_order places it so.
    # optaxclip.checked reads how it reduces, to check its output and stats.
    setattr(update_fn, _spec.PER_EXAMPLE_ATTRIBUTE, (reduce, per_layer))  # noqa: B010
    return optax.GradientTransformationExtraArgs(init_fn, _spec.mark_gradient_stage(update_fn))
