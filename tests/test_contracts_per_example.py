"""The contract matrix for per-example clippers (registered with kind "per_example").

Their input has a leading example axis and their output is the batch's mean or sum,
so the clipper matrix in ``test_contracts.py`` does not apply. Cases are drawn by
hypothesis over dtypes (fp16, bf16, f32, complex64, mixed trees, f64 under x64, f64
next to f32 and bf16 leaves under x64),
gradient scales (0, tiny, 1, large), one NaN/+inf/-inf entry,
thresholds (0, tiny, 1, huge, inf), batch sizes (0 to 5), ``reduce`` and
``per_layer``, and execution modes (eager, jit, donated and numpy-restored state).
Each case is checked against a float64 numpy reference:

* finite in: the output equals the reference's reduced clipped sum (examples within
  rounding of the threshold may go either way), has the parameters' shapes and
  dtypes, and lies inside the ball (``max_norm``, times ``B`` for ``"sum"``);
* stats: ``norm_max`` and ``norm_median`` equal the reference's per-example norms,
  ``clipped_fraction`` the fraction of examples above the threshold;
* non-finite in: the leaf holding the bad entry is all NaN (every leaf, without
  ``per_layer``), and ``norm_max`` is NaN or inf as the entry was; at
  ``max_norm = inf`` the output is the plain mean / sum, the bad entry included.

A per-example transformation registered later is covered without editing this file.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import optaxclip as oc

FACTORIES = oc.registered_factories()
PER_EXAMPLE = sorted(name for name, info in FACTORIES.items() if info.kind == "per_example")
SHAPES = {"a": (3, 4), "b": (4,), "c": ()}
DTYPES = ("float16", "bfloat16", "float32", "complex64", "mixed", "float64", "mixed64")
WIDE = ("float64", "mixed64")  # run under x64: float64 norms, scales and threshold
# "near_max": entries up to a quarter of each dtype's largest value, so norms
# overflow the accumulation dtype and scales fall below its normal range (a norm
# of 1e38 clipped to 1e-3: 1e-41, which XLA flushes to 0 unless split).
SCALES = {"zero": 0.0, "tiny": 1e-6, "one": 1.0, "large": 1e3, "near_max": None}
THRESHOLDS = (0.0, 1e-3, 1.0, 1e10, math.inf)
MODES = ("eager", "jit", "donated", "restored")

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


def test_the_per_example_clippers_are_enumerated():
    assert "clip_per_example" in PER_EXAMPLE


def _dtypes(policy: str) -> list:
    if policy == "mixed":
        return [jnp.dtype(d) for d in ("float32", "bfloat16", "float16")]
    if policy == "mixed64":
        return [jnp.dtype(d) for d in ("float64", "float32", "bfloat16")]
    return [jnp.dtype(policy)] * len(SHAPES)


def _grads(policy: str, scale: str, nonfinite, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for (name, shape), dtype in zip(SHAPES.items(), _dtypes(policy)):
        size = SCALES[scale]
        if size is None:
            size = float(jnp.finfo(dtype).max) / 4
        values = rng.uniform(-1, 1, (batch,) + shape) * size
        if jnp.issubdtype(dtype, jnp.complexfloating):
            values = values + 1j * rng.uniform(-1, 1, (batch,) + shape) * size
        out[name] = np.asarray(values)
    if nonfinite is not None and batch:
        bad = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[nonfinite]
        out["a"] = out["a"].astype(np.complex128 if out["a"].dtype.kind == "c" else np.float64)
        out["a"][rng.integers(batch), 0, 0] = bad
    return {name: jnp.asarray(v, dtype) for (name, v), dtype in zip(out.items(),
                                                                   _dtypes(policy))}


def _row_norms(rows: np.ndarray) -> np.ndarray:
    """Each row's 2-norm in float64 without overflow (entries near float64's max)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        top = np.max(np.abs(rows), axis=1, initial=0)
        safe = np.where((top > 0) & np.isfinite(top), top, 1)
        return np.where(np.isfinite(top), safe * np.sqrt(np.sum(np.abs(rows / safe[:, None])
                                                               ** 2, axis=1)), top)


def _reference(grads: dict, threshold: float, reduce: str, per_layer: bool):
    """float64: (reduced output per leaf, per-example norms, surely/maybe clipped)."""
    rows = {k: np.asarray(v).astype(np.complex128 if np.iscomplexobj(v) else np.float64)
            .reshape(v.shape[0], -1) for k, v in grads.items()}
    batch = next(iter(rows.values())).shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        leaf_norms = {k: _row_norms(r) for k, r in rows.items()}
        norms = _row_norms(np.stack(list(leaf_norms.values()), axis=1))
        if per_layer:
            share = threshold / math.sqrt(len(rows))
            scales = {k: np.where(n > share, share / np.where(n > 0, n, 1), 1.0)
                      for k, n in leaf_norms.items()}
            stacked = np.stack(list(leaf_norms.values()))
            surely = np.any(stacked > share * (1 + 1e-5), axis=0)
            maybe = np.any(stacked > share * (1 - 1e-5), axis=0)
        else:
            scale = np.where(norms > threshold, threshold / np.where(norms > 0, norms, 1), 1.0)
            scales = {k: scale for k in rows}
            surely, maybe = norms > threshold * (1 + 1e-5), norms > threshold * (1 - 1e-5)
        out = {k: (np.sum(r * scales[k][:, None], axis=0) / (batch if reduce == "mean" else 1))
               .reshape(grads[k].shape[1:]) for k, r in rows.items()}
    if threshold == 0:  # every example's scale is 0 ("clipped"), a zero one's too
        surely = maybe = np.ones(batch, bool)
    return out, norms, surely, maybe


def _run(tx, grads, mode):
    state = tx.init(None)
    if mode == "eager":
        return tx.update(grads, state)
    if mode == "jit":
        return jax.jit(tx.update)(grads, state)
    if mode == "donated":
        copy = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
        return jax.jit(tx.update, donate_argnums=(1,))(grads, copy)
    return tx.update(grads, jax.device_get(state))


@pytest.mark.parametrize("name", PER_EXAMPLE)
@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), scale=st.sampled_from(sorted(SCALES)),
       nonfinite=st.sampled_from([None, None, "nan", "inf", "-inf"]),
       threshold=st.sampled_from(THRESHOLDS), batch=st.integers(0, 5),
       reduce=st.sampled_from(["mean", "sum"]), per_layer=st.booleans(),
       mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_per_example_contracts(name, dtype, scale, nonfinite, threshold, batch, reduce,
                               per_layer, mode, seed):
    # Unclipped (max_norm inf), a sum of entries near the max overflows as any sum does.
    assume(not (scale == "near_max" and threshold == math.inf))
    with jax.enable_x64(dtype in WIDE), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = _grads(dtype, scale, nonfinite, batch, seed)
        tx = FACTORIES[name].build(threshold, reduce=reduce, per_layer=per_layer)
        out, state = _run(tx, grads, mode)
        stats = state.stats
        for k, g in grads.items():
            assert out[k].shape == g.shape[1:] and out[k].dtype == g.dtype, k
        if batch == 0:
            assert all(np.all(np.asarray(o) == 0) for o in out.values())
            return
        # The threshold as the transformation holds it: float32, float64 with x64.
        used = threshold if dtype in WIDE else float(np.float32(threshold))
        want, norms, surely, maybe = _reference(grads, used, reduce, per_layer)
        if nonfinite is not None and threshold == math.inf:
            # max_norm = inf is the plain mean / sum: the bad entry passes through
            # as the fixed clippers pass everything at inf.
            for k in grads:
                got = np.asarray(out[k]).astype(want[k].dtype)
                assert np.array_equal(np.isfinite(got), np.isfinite(want[k])), k
                if not np.iscomplexobj(got):  # complex inf * 1 is inf+nan j or nan+nan j
                    assert np.array_equal(np.isnan(got), np.isnan(want[k])), k
            return
        if nonfinite is not None:
            poisoned = ["a"] if per_layer else list(grads)
            for k in poisoned:
                assert np.all(np.isnan(np.asarray(out[k]))), (k, out[k])
            norm_max = float(stats.norm_max)
            assert math.isnan(norm_max) if nonfinite == "nan" else norm_max == math.inf
            return
        _check_finite_case(grads, out, stats, want, norms, surely, maybe, used, reduce,
                           batch)


def _check_finite_case(grads, out, stats, want, norms, surely, maybe, threshold, reduce,
                       batch):
    # Stats: float32 norms of the float64 reference (inf where they overflow float32).
    top = float(np.max(norms))
    recorded = float(stats.norm_max)
    if top > float(jnp.finfo(jnp.float32).max) * (1 - 1e-6):
        assert recorded == math.inf or math.isclose(recorded, top, rel_tol=1e-4)
    else:
        assert math.isclose(recorded, top, rel_tol=1e-4, abs_tol=1e-30), (recorded, top)
        median = float(np.median(norms))
        assert math.isclose(float(stats.norm_median), median, rel_tol=1e-4, abs_tol=1e-30)
    fraction = float(stats.clipped_fraction)
    assert np.mean(surely) - 1e-6 <= fraction <= np.mean(maybe) + 1e-6, (fraction, norms)
    # The output: the reference's reduced sum, up to the leaf dtype's rounding (each
    # example's contribution rounds, so the slack scales with the largest one).
    for k, g in grads.items():
        got = np.asarray(out[k]).astype(np.complex128 if np.iscomplexobj(out[k]) else
                                        np.float64)
        eps = float(jnp.finfo(g.dtype).eps)
        floor = float(jnp.finfo(g.dtype).smallest_subnormal)
        with np.errstate(over="ignore"):
            size = float(np.max(np.abs(np.asarray(g).astype(np.complex128))))
        scale_of_terms = min(size, threshold) if math.isfinite(threshold) else size
        divisor = batch if reduce == "mean" else 1
        slack = 8 * eps * batch * scale_of_terms / divisor + floor
        ambiguous = bool(np.any(maybe & ~surely))
        if ambiguous:  # an example within rounding of the threshold: either scale
            slack += 2e-5 * batch * scale_of_terms / divisor
        err = np.max(np.abs(got - want[k]), initial=0)
        assert err <= slack, (k, err, slack, got, want[k])
    # The ball: max_norm (times B for a sum), with the output dtype's rounding.
    bound = threshold * (batch if reduce == "sum" else 1)
    if math.isfinite(bound):
        wide = [np.asarray(o).astype(np.complex128) for o in out.values()]
        measured = math.sqrt(sum(float(np.sum(np.abs(w) ** 2)) for w in wide))
        eps = max(float(jnp.finfo(g.dtype).eps) for g in grads.values())
        assert measured <= bound * (1 + 8 * eps * batch) + 1e-6 * bound + 1e-30, (
            measured, bound)


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_per_example_reference_catches_a_wrong_output(name):
    """The check above can fail: an output scaled by 2 is caught."""
    grads = _grads("float32", "one", None, 4, 0)
    tx = FACTORIES[name].build(1.0, reduce="mean", per_layer=False)
    out, state = tx.update(grads, tx.init(None))
    want, norms, surely, maybe = _reference(grads, 1.0, "mean", False)
    doubled = {k: v * 2 for k, v in out.items()}
    with pytest.raises(AssertionError):
        _check_finite_case(grads, doubled, state.stats, want, norms, surely, maybe, 1.0,
                           "mean", 4)
