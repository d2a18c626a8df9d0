"""Contract checks for clippers and guards, against float64 numpy references.

``assert_clip_contracts`` runs one update of a clipper (eagerly, under ``jit``,
``vmap``, with donated state, or on state restored as numpy arrays) and asserts
every contract of DESIGN.md for that case: structure and dtypes, finite in gives
finite out, the bound, identity at or below the threshold, direction (the
recorded scale is the one applied), the non-finite policy, truthful stats and a
stable, NaN-free state. ``assert_guard_contracts`` does the same for
``skip_nonfinite``/``skip_on_spike``. Everything a check needs to know about a
clipper comes from its ``ClipSpec``, so a clipper built with ``make_clipper``
outside this package is checked like a built-in one; ``check_factory`` runs a
small grid of cases over a registered factory.

The suite's contract matrix (``tests/test_contracts.py``) generates cases for
every registered factory and calls these functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _clipper, _combinators, _spec
from optaxclip._registry import FactoryInfo, registered_factories
from optaxclip._spec import ClipSpec
from optaxclip._state import ClipStats

__all__ = [
    "MODES",
    "assert_clip_contracts",
    "assert_guard_contracts",
    "assert_moment_clip_contracts",
    "check_factory",
    "clipper_spec",
    "moment_probe",
    "run_update",
]

Mode = Literal["eager", "jit", "vmap", "donated", "restored"]
MODES: tuple[str, ...] = ("eager", "jit", "vmap", "donated", "restored")

# Relative slack of the bound, as DESIGN.md states it.
BOUND_RTOL = 1e-6
# Recorded norms against the float64 reference (float32 accumulation).
NORM_RTOL = 2e-5


# ---------------------------------------------------------------- running


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def run_update(tx: Any, grads: Any, state: Any, params: Any = None, mode: str = "jit",
               **extra_args: Any) -> tuple[Any, Any]:
    """One ``tx.update`` in the given execution mode; returns ``(updates, new_state)``.

    ``"vmap"`` runs a batch of two copies of the case and returns the first;
    ``"donated"`` donates the state (a copy of it) to a jitted update;
    ``"restored"`` first round-trips the state through ``jax.device_get`` (numpy
    leaves, as a checkpoint restore gives) and updates eagerly.
    """
    if mode == "eager":
        return tx.update(grads, state, params, **extra_args)
    if mode == "jit":
        return jax.jit(tx.update)(grads, state, params, **extra_args)
    if mode == "donated":
        update = jax.jit(tx.update, donate_argnums=(1,))
        return update(grads, _copy(state), params, **extra_args)
    if mode == "restored":
        return tx.update(grads, jax.device_get(state), params, **extra_args)
    if mode == "vmap":
        stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)
        out, new_state = jax.vmap(lambda g, s: tx.update(g, s, params, **extra_args))(
            stack(grads), stack(state)
        )
        return jax.tree.map(lambda x: x[0], out), jax.tree.map(lambda x: x[0], new_state)
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")


def _find_clipper(tx: Any) -> tuple[ClipSpec | None, tuple[Any, ...]]:
    """The clipper in ``tx`` (itself, the first step of a chain, or inside
    ``inject_hyperparams``), and the key path of its state."""
    update = _combinators.unwrap(tx.update)
    spec = _spec.spec_of(update)
    if spec is not None:
        return spec, ()
    entry = _combinators.combinator(update)
    if entry is not None and entry.name == "chain":
        first = _combinators.closure(update)["update_fns"][0]
        # Only .update is read; there is no init to give.
        inner = optax.GradientTransformationExtraArgs(cast(Any, None), first)
        spec, path = _find_clipper(inner)
        return spec, (0, *path)
    inner = _spec.inner_of(update)
    if inner is not None and inner[1] is None:  # checked and its taps: the same state
        return _find_clipper(inner[0])
    if entry is not None and entry.name == "inject_hyperparams":
        inner = _combinators._rebuild_injected(tx.init, update)
        if inner is not None:
            spec, path = _find_clipper(inner)
            return spec, ("inner_state", *path)
    return None, ()


def clipper_spec(tx: Any) -> ClipSpec | None:
    """The spec of a clipper, of the first step of a chain (``clipped(...)``), or of the
    clipper inside ``inject_hyperparams``."""
    return _find_clipper(tx)[0]


def _clipper_state(tx: Any, state: Any) -> Any:
    for key in _find_clipper(tx)[1]:
        state = getattr(state, key) if isinstance(key, str) else state[key]
    return state


# ---------------------------------------------------------------- references


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _wide(x: np.ndarray) -> np.ndarray:
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


_SHIFT = 2.0**-64  # scales a float64 group so its norm cannot overflow


def _tiny(dtype: Any) -> float:
    """Below this, XLA on CPU flushes the accumulation dtype's values to zero."""
    acc = jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)
    return float(jnp.finfo(acc).tiny)


def _magnitudes(x: np.ndarray, dtype: Any) -> np.ndarray:
    """``|x|`` in float64, with what XLA flushes to zero (each part of a complex) at 0."""
    tiny = _tiny(dtype)
    x = _wide(x)
    if np.iscomplexobj(x):
        flush = lambda part: np.where(np.abs(part) < tiny, 0.0, part)
        return np.abs(flush(np.real(x)) + 1j * flush(np.imag(x)))
    m = np.abs(x)
    return np.where(m < tiny, 0.0, m)


def _pnorm(m: np.ndarray, p: float, axis: Any = None) -> np.ndarray:
    """The p-norm of magnitudes ``m``, scaled so float64 cannot overflow or underflow."""
    if m.size == 0:
        shape = np.sum(m, axis=axis, keepdims=True).shape
        return np.zeros(shape)
    largest = np.max(m, axis=axis, keepdims=True)
    if p == math.inf:
        return largest
    usable = (largest > 0) & np.isfinite(largest)
    safe = np.where(usable, largest, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.sum((m / safe) ** p, axis=axis, keepdims=True) ** (1.0 / p)
        return np.where(usable, largest * scaled, largest)


def _group_norms(spec: ClipSpec, leaves: list[np.ndarray], dtypes: list[Any],
                 shift: float = 1.0) -> list[np.ndarray]:
    """For each leaf, the float64 norm of the group each entry belongs to (broadcastable).

    ``shift`` (a power of two) multiplies the magnitudes after the flush to zero: with
    ``2**-64`` the norm of finite float64 entries cannot overflow, so a group whose
    norm is beyond float64's range still has a usable reference direction.
    """
    mags = [_magnitudes(x, d) * shift for x, d in zip(leaves, dtypes)]
    if spec.scope == "element":
        return mags
    if spec.scope == "global":
        flat = np.concatenate([m.ravel() for m in mags]) if mags else np.zeros(0)
        # An RMS divides before it sums: finite float64 entries can have a finite RMS
        # whose norm overflows.
        divisor = math.sqrt(max(flat.size, 1)) if spec.rms else 1.0
        total = _pnorm(flat / divisor, spec.ord).reshape(())
        return [np.broadcast_to(total, m.shape) for m in mags]
    out = []
    for m in mags:
        axes = _clipper.reduced_axes(spec, m.shape)
        divisor = 1.0
        if spec.rms:
            count = math.prod(m.shape[a] for a in axes) if axes is not None else m.size
            divisor = math.sqrt(max(count, 1))
        norm = _pnorm(m / divisor, spec.ord, axis=axes)
        out.append(np.broadcast_to(norm, m.shape))
    return out


def _recorded(spec: ClipSpec, values: Any, treedef: Any, positions: list[int],
              shapes: list[tuple]) -> list[np.ndarray]:
    """A recorded stat broadcast to each float leaf's shape."""
    if spec.scope in ("global", "element") or (hasattr(values, "dtype") and np.ndim(values) == 0):
        if values is None:
            return [np.full(shape, np.nan) for shape in shapes]
        value = np.asarray(values, np.float64)
        return [np.broadcast_to(value, shape) for shape in shapes]
    per_leaf = treedef.flatten_up_to(values)
    out = []
    for i, shape in zip(positions, shapes):
        value = np.asarray(per_leaf[i], np.float64)
        axes = _clipper.reduced_axes(spec, shape)
        if axes is not None:
            value = np.expand_dims(value, axes)
        out.append(np.broadcast_to(value, shape))
    return out


def _bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return np.stack([_bits(np.real(x)), _bits(np.imag(x))])
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        return x.view(np.dtype(f"u{x.dtype.itemsize}"))
    return x


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Entry-wise: bit-identical, or both NaN."""
    a, b = np.asarray(a), np.asarray(b)
    nan_a, nan_b = np.isnan(_wide(a)), np.isnan(_wide(b))
    if np.iscomplexobj(a):
        equal = np.all(_bits(a) == _bits(b), axis=0)
    else:
        equal = _bits(a) == _bits(b)
    return equal | (nan_a & nan_b)


def _eps(dtype: Any) -> float:
    return float(jnp.finfo(dtype).eps)


def _fail(name: str, where: str, message: str) -> None:
    raise AssertionError(f"{name}: {message} (at {where})")


# ---------------------------------------------------------------- clippers


def assert_clip_contracts(
    tx: Any,
    grads: Any,
    state: Any = None,
    params: Any = None,
    *,
    mode: str = "jit",
    limit: float | None = None,
) -> tuple[Any, Any]:
    """Runs one update of clipper ``tx`` and asserts every contract for this case.

    Args:
      tx: a clipper built by ``make_clipper`` (or ``optax.chain(clipper, ...)``
        whose later parts do nothing, as ``clipped(optax.identity(), ...)``).
      grads: the gradients of this case.
      state: the state to update from (default: ``tx.init(params or grads)``).
      params: passed to ``update`` (AGC needs them).
      mode: one of ``MODES``.
      limit: the threshold ``tx`` was built with when it is the threshold itself
        (fixed clippers); the recorded threshold must then equal it.

    Returns:
      ``(updates, new_state)``, for chaining cases (history).

    Raises:
      AssertionError naming the contract, the leaf and the values.
    """
    spec = clipper_spec(tx)
    if spec is None:
        raise TypeError("assert_clip_contracts needs a clipper built by optaxclip.make_clipper.")
    name = spec.name
    if state is None:
        state = tx.init(grads if params is None else params)
    out, new_state = run_update(tx, grads, state, params, mode)
    _check_structure(name, grads, out)
    _check_state(name, _clipper_state(tx, state), _clipper_state(tx, new_state))
    record: ClipStats = _clipper_state(tx, new_state).stats

    leaves, treedef = jax.tree.flatten(grads)
    out_leaves = treedef.flatten_up_to(out)
    positions = [i for i, x in enumerate(leaves) if _is_float(x)]
    paths = [jax.tree_util.keystr(p) or "(root)" for p, _ in
             jax.tree_util.tree_flatten_with_path(grads)[0]]
    g = [np.asarray(leaves[i]) for i in positions]
    o = [np.asarray(out_leaves[i]) for i in positions]
    dtypes = [leaves[i].dtype for i in positions]
    shapes = [x.shape for x in g]
    n_in = _group_norms(spec, g, dtypes)
    n_out = _group_norms(spec, o, dtypes)
    rec_norm = _recorded(spec, record.norm, treedef, positions, shapes)
    threshold = _recorded(spec, record.threshold, treedef, positions, shapes)
    if limit is not None:
        _check_limit(name, record.threshold, limit)
    if spec.scope == "element":
        _check_elements(name, [paths[i] for i in positions], g, o, dtypes, threshold, record)
        _check_norms(name, "all leaves", [np.max(n, initial=0) for n in n_in],
                     np.asarray(record.norm, np.float64), element=True)
        return out, new_state
    scale = _recorded(spec, record.scale, treedef, positions, shapes)
    flags = _recorded(spec, record.was_clipped(), treedef, positions, shapes)
    # Whether each group's entries are finite: its max-norm is. (Its norm can overflow
    # even float64 for finite float64 entries, so the norm itself cannot say.)
    group_max = _group_norms(dataclasses.replace(spec, ord=math.inf, rms=False), g, dtypes)
    # Finite float64 entries whose norm overflows float64 (entries near its max): the
    # expected output is computed from their norm at 2**-64 of the scale.
    n_small = _group_norms(spec, g, dtypes, shift=_SHIFT)
    for k, i in enumerate(positions):
        _check_scaled_leaf(spec, paths[i], g[k], o[k], dtypes[k], n_in[k], n_out[k],
                           rec_norm[k], threshold[k], scale[k], flags[k],
                           np.isfinite(group_max[k]), n_small[k])
    return out, new_state


def _check_structure(name: str, grads: Any, out: Any) -> None:
    if jax.tree.structure(grads) != jax.tree.structure(out):
        _fail(name, "the tree", f"output structure {jax.tree.structure(out)} differs from "
              f"the input's {jax.tree.structure(grads)}")
    for path, (a, b) in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]],
        zip(jax.tree.leaves(grads), jax.tree.leaves(out)),
    ):
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            _fail(name, path, f"output {jnp.result_type(b)}{np.shape(b)} differs from input "
                  f"{jnp.result_type(a)}{np.shape(a)}")
        if not _is_float(a) and not np.array_equal(np.asarray(a), np.asarray(b)):
            _fail(name, path, "a non-float leaf was changed")


def _check_state(name: str, old: Any, new: Any) -> None:
    old_leaves, old_def = jax.tree.flatten(old)
    new_leaves, new_def = jax.tree.flatten(new)
    if old_def != new_def:
        _fail(name, "the state", f"structure changed from {old_def} to {new_def}")
    for a, b in zip(old_leaves, new_leaves):
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            _fail(name, "the state", f"a leaf changed from {jnp.result_type(a)}{np.shape(a)} "
                  f"to {jnp.result_type(b)}{np.shape(b)}")
    for field in type(new)._fields:
        if field in ("count", "stats"):
            continue
        for leaf in jax.tree.leaves(getattr(new, field)):
            if _is_float(leaf) and np.any(np.isnan(np.asarray(leaf, np.float64))):
                _fail(name, f"state.{field}", "NaN entered the clipper's own state")


def _check_limit(name: str, recorded: Any, limit: float) -> None:
    value = float(np.asarray(recorded, np.float64))
    # The threshold in the dtype it is kept in: above float32's range a float32
    # threshold is inf, which clips nothing, as the value asked.
    want = float(np.asarray(max(float(limit), 0.0)).astype(np.asarray(recorded).dtype))
    want = math.nan if math.isnan(limit) else want
    if not (value == want or (math.isnan(value) and math.isnan(want))
            or math.isclose(value, want, rel_tol=1e-6)):
        _fail(name, "stats.threshold", f"recorded threshold {value!r}, but it was built "
              f"with {limit!r}")


def _check_norms(name: str, where: str, want: Any, got: Any, *, element: bool = False) -> None:
    if element:
        want = np.max(np.asarray(want, np.float64), initial=0.0)
    want = np.asarray(want, np.float64)
    got = np.asarray(got, np.float64)
    both_nan = np.isnan(want) & np.isnan(got)
    both_inf = np.isinf(want) & np.isinf(got)
    # A norm beyond float32's range is recorded as inf (the scale stays exact).
    both_inf |= np.isposinf(got) & (want >= float(jnp.finfo(jnp.float32).max) * (1 - 1e-6))
    close = np.isclose(got, want, rtol=NORM_RTOL, atol=0) | both_nan | both_inf
    if not np.all(close):
        _fail(name, where, f"recorded norm {got!r} but the float64 reference is {want!r}")


def _check_scaled_leaf(spec: ClipSpec, where: str, g: np.ndarray, o: np.ndarray, dtype: Any,
                       n_in: np.ndarray, n_out: np.ndarray, rec_norm: np.ndarray,
                       threshold: np.ndarray, scale: np.ndarray, flags: np.ndarray,
                       finite_group: np.ndarray, n_small: np.ndarray) -> None:
    name = spec.name
    if g.size == 0:
        return
    g64, o64 = _wide(g), _wide(o)
    nan_threshold = np.isnan(threshold)
    # Stats: the recorded norm is the input's norm, in the clipper's own norm.
    _check_norms(name, where, n_in, rec_norm)
    # Finite in, finite out (a NaN threshold poisons on purpose).
    bad = finite_group & ~nan_threshold & ~np.isfinite(o64)
    if np.any(bad):
        _fail(name, where, f"finite input {g64[bad][:3]} came out non-finite {o64[bad][:3]}")
    # The bound, for finite input.
    check = finite_group & ~nan_threshold
    over = check & (n_out > threshold * (1 + BOUND_RTOL))
    if np.any(over):
        _fail(name, where, f"output norm {n_out[over].max()!r} is above its threshold "
              f"{threshold[over].max()!r}")
    # Identity at or below the threshold (with eps > 0: norm + eps at or below it).
    # Threshold 0 zeroes everything, also entries too small (subnormal) to count
    # in the norm: that rule comes first.
    inside = check & (threshold > 0) & (rec_norm + spec.eps <= threshold) & (
        n_in <= threshold * (1 - NORM_RTOL)
    )
    changed = ~_same(g, o)
    if np.any(inside & changed):
        _fail(name, where, f"input with norm {n_in[inside & changed].max()!r} at or under the "
              f"threshold {threshold[inside & changed].max()!r} was changed")
    # Direction: the output is the input times the recorded scale.
    scale_ok = np.isfinite(scale)
    if np.any(check & scale_ok & ((scale < 0) | (scale > 1))):
        _fail(name, where, f"recorded scale {scale[check].min()!r} is outside [0, 1]")
    # A scale below float32's normal range (threshold 1, norm 1e38) reads as 0 where
    # XLA flushes subnormals, but the clipper applies it exactly (a normal number
    # times a power of two): there the expected output comes from the recorded
    # threshold and norm (the float64 input norm where the recorded one overflowed).
    applied = np.where(scale_ok, scale, 0)
    denominator = np.where(np.isfinite(rec_norm), rec_norm, n_in) + spec.eps
    below = scale_ok & (scale < _tiny(dtype)) & (threshold > 0) & np.isfinite(threshold) & (
        denominator > threshold)
    # A denominator beyond float64's range (finite float64 entries near its max): the
    # same quotient from the input and its norm both taken at 2**-64 of the scale.
    overflowed = below & ~np.isfinite(denominator)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # (g / norm) * threshold: threshold / norm alone can underflow float64 too.
        direction = np.where(overflowed, g64 * _SHIFT / np.where(overflowed, n_small, 1),
                             g64 / np.where(below, denominator, 1))
        expected = np.where(below, direction * threshold, g64 * applied)
    floor = 2 * max(float(jnp.finfo(dtype).smallest_subnormal), _tiny(dtype))
    # Two normal factors reach scales down to tiny**2 (2^-252 for float32); below
    # that, the only normal clipped values are under 4 * tiny, and they may flush.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        deepest = below & (threshold / np.where(below, denominator, 1) < _tiny(dtype) ** 2)
    floor = np.where(deepest, 2 * floor, floor)
    slack = 2 * (_eps(dtype) + _eps(np.float32)) * np.abs(expected) + floor
    wrong = check & scale_ok & (np.abs(o64 - expected) > slack)
    if np.any(wrong):
        _fail(name, where, f"output {o64[wrong][:3]} is not input {g64[wrong][:3]} times "
              f"the recorded scale {scale[wrong][:3]}")
    # clipped: an output that changed says so.
    if np.any(changed & ~flags.astype(bool)):
        _fail(name, where, "the output changed but the stats say it was not clipped")
    # The non-finite policy.
    poisoned = ~finite_group & ((threshold != math.inf) | spec.strict_nonfinite)
    if np.any(poisoned & ~np.isnan(o64)):
        _fail(name, where, "a non-finite norm must turn its whole scope NaN, but some "
              "entries are not NaN (finite entries are never silently zeroed)")
    if np.any(poisoned & ~np.isnan(scale)):
        _fail(name, where, "a non-finite norm must record a NaN scale")
    passed = ~finite_group & ~poisoned
    if np.any(passed & changed):
        _fail(name, where, "with threshold inf the input must come back unchanged")
    if np.any(nan_threshold & ~np.isnan(o64)):
        _fail(name, where, "a NaN threshold must poison the output")


def _check_elements(name: str, paths: list[str], g: list[np.ndarray], o: list[np.ndarray],
                    dtypes: list[Any], threshold: list[np.ndarray], record: ClipStats) -> None:
    any_changed = False
    for where, gi, oi, dtype, thr in zip(paths, g, o, dtypes, threshold):
        if gi.size == 0:
            continue
        t = float(np.asarray(thr).reshape(-1)[0])
        g64, o64 = _wide(gi), _wide(oi)
        changed = ~_same(gi, oi)
        any_changed |= bool(np.any(changed & ~np.isnan(g64)))
        if math.isnan(t):
            if not np.all(np.isnan(o64)):
                _fail(name, where, "a NaN threshold must poison the output")
            continue
        magnitude = np.abs(g64)
        out_magnitude = np.abs(o64)
        nan_in = np.isnan(magnitude)
        if np.any(nan_in & ~np.isnan(o64)):
            _fail(name, where, "a NaN entry must stay NaN")
        if np.any(~nan_in & (out_magnitude > t)):
            _fail(name, where, f"entry {out_magnitude[~nan_in].max()!r} is above {t!r}")
        inside = ~nan_in & (magnitude <= t) & (t > 0)
        if np.any(inside & changed):
            _fail(name, where, "an entry at or under the threshold was changed")
        outside = ~nan_in & (magnitude > t)
        if np.iscomplexobj(g64):
            want = np.where(outside, _np_unit_phase(g64, outside) * t, g64)
            # The clipper aims two eps inside the threshold (see _clip_entries).
            wrong = outside & (np.abs(o64 - want) > 6 * _eps(dtype) * t + 1e-30)
        else:
            level = _largest_at_or_under(t, dtype)
            wrong = outside & (o64 != np.sign(g64) * level)
        if np.any(wrong):
            _fail(name, where, f"entries {g64[wrong][:3]} were clipped to {o64[wrong][:3]}, "
                  f"not to the largest value at or under {t!r} with their sign")
    if any_changed and not bool(np.asarray(record.was_clipped())):
        _fail(name, "all leaves", "entries changed but the stats say nothing was clipped")


def _largest_at_or_under(value: float, dtype: Any) -> float:
    """The largest finite value of ``dtype`` that is <= ``value`` (``value >= 0``)."""
    if value == math.inf:
        return math.inf
    largest = float(jnp.finfo(dtype).max)
    if value >= largest:
        return largest
    nearest = jnp.asarray(value, dtype)
    if float(nearest) > value:
        nearest = jnp.nextafter(nearest, jnp.zeros_like(nearest))
    return float(nearest)


# ---------------------------------------------------------------- guards


def assert_guard_contracts(
    tx: Any, grads: Any, state: Any, params: Any = None, *, mode: str = "jit", **extra: Any
) -> tuple[Any, Any]:
    """Runs one update of a guard (``skip_nonfinite``/``skip_on_spike``) and checks it.

    A skipped step returns exact zeros and keeps the inner state bit-identical; a
    non-finite step is always skipped (unless a release valve was asked for); an
    applied step is exactly the inner transformation's update.
    """
    inner = _spec.inner_of(_combinators.unwrap(tx.update))
    if inner is None:
        raise TypeError("assert_guard_contracts needs an optaxclip guard.")
    inner_tx, field, _ = inner
    if field is None:
        raise TypeError("assert_guard_contracts needs a guard that keeps its inner state.")
    name = _spec.wrapper_name(_combinators.unwrap(tx.update))
    out, new_state = run_update(tx, grads, state, params, mode, **extra)
    want_out, want_inner = jax.jit(inner_tx.update)(
        grads, getattr(state, field), params, **extra
    )
    _check_structure(name, want_out, out)  # the inner step may change dtypes (optax.sgd)
    guard, old_guard = new_state.guard, state.guard
    skipped = bool(guard.skipped)
    float_leaves = [x for x in jax.tree.leaves(grads) if _is_float(x)]
    floats = [_wide(np.asarray(x)) for x in float_leaves]
    finite = all(np.all(np.isfinite(x)) for x in floats)
    loss = extra.get("loss")
    finite = finite and (loss is None or math.isfinite(float(loss)))
    if not finite and not skipped:
        _fail(name, "the step", "a non-finite step was applied")
    count = int(old_guard.num_skipped) + int(skipped)
    if int(guard.num_skipped) != count:
        _fail(name, "stats.num_skipped", f"{int(guard.num_skipped)} but {count} were skipped")
    new_inner, old_inner = getattr(new_state, field), getattr(state, field)
    if skipped:
        for x in jax.tree.leaves(out):
            if _is_float(x) and np.any(np.asarray(x) != 0):
                _fail(name, "the updates", "a skipped step must return exact zeros")
        for a, b in zip(jax.tree.leaves(old_inner), jax.tree.leaves(new_inner)):
            if not np.all(_same(np.asarray(a), np.asarray(b))):
                _fail(name, "inner_state", "a skipped step changed the inner state")
    else:
        for a, b in zip(jax.tree.leaves(want_out), jax.tree.leaves(out)):
            if not np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=1e-6, atol=0, equal_nan=True):
                _fail(name, "the updates", "an applied step differs from the inner update")
        for a, b in zip(jax.tree.leaves(want_inner), jax.tree.leaves(new_inner)):
            if not np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=1e-6, atol=0, equal_nan=True):
                _fail(name, "inner_state", "an applied step's inner state differs")
    magnitudes = [_magnitudes(np.asarray(x), x.dtype).ravel() for x in float_leaves]
    norm = _pnorm(np.concatenate(magnitudes) if magnitudes else np.zeros(0), 2.0).reshape(())
    _check_norms(name, "stats.norm", norm, np.asarray(guard.norm, np.float64))
    return out, new_state


# ---------------------------------------------------------------- a grid for users


def _grid_trees(seed: int) -> Iterable[tuple[str, Any]]:
    rng = np.random.default_rng(seed)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for scale in (0.0, 1e-3, 1.0, 300.0):
            tree = {
                "w": jnp.asarray(rng.normal(size=(3, 4)) * scale, dtype),
                "b": jnp.asarray(rng.normal(size=(4,)) * scale, dtype),
            }
            yield f"{jnp.dtype(dtype).name} x{scale}", tree
    bad = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.array([1.0, np.nan])}
    yield "one NaN entry", bad


def check_factory(
    factory: FactoryInfo | Callable[..., Any] | str,
    *,
    thresholds: Iterable[float] = (0.0, 0.5, 1.0, math.inf),
    modes: Iterable[str] = ("eager", "jit"),
    steps: int = 4,
    seed: int = 0,
) -> int:
    """Checks a clipper factory's contracts over a small grid; returns the case count.

    For each threshold, tree (float32, bfloat16, float16; zero, small, unit and
    large gradients; one NaN entry) and mode, it runs ``steps`` updates from a
    fresh state, checking every update with ``assert_clip_contracts``.

    Args:
      factory: a ``FactoryInfo``, a registered factory's name, or a factory
        registered with ``optaxclip.register_factory``.
      thresholds: values passed to the factory's threshold argument (ignored
        when it has none).
      modes: execution modes, from ``MODES``.
      steps: updates per case, so adaptive clippers build up history.
      seed: seed of the gradients.

    Example:
      >>> import optaxclip as oc, optaxclip.testing
      >>> optaxclip.testing.check_factory("clip_by_rms", thresholds=(1.0,), modes=("jit",))
      13
    """
    info = _as_info(factory)
    if info.kind != "clipper":
        raise ValueError(f"check_factory checks clippers; {info.name} is a {info.kind}.")
    cases = 0
    limits = list(thresholds) if info.threshold is not None else [None]
    for limit in limits:
        for _, tree in _grid_trees(seed):
            tx = info.build(limit)
            params = tree if info.needs_params else None
            for mode in modes:
                state = tx.init(tree)
                for _ in range(steps):
                    _, state = assert_clip_contracts(
                        tx, tree, state, params, mode=mode,
                        limit=limit if info.limit_is_threshold else None,
                    )
            cases += 1
    return cases


def _as_info(factory: Any) -> FactoryInfo:
    if isinstance(factory, FactoryInfo):
        return factory
    registry = registered_factories()
    name = factory if isinstance(factory, str) else getattr(factory, "__name__", "")
    if name not in registry:
        raise ValueError(
            f"{name!r} is not a registered factory; decorate it with "
            f"@optaxclip.register_factory(threshold='...') first."
        )
    info = registry[name]
    if not isinstance(factory, str) and info.factory is not factory:
        # Another function of that name is registered: checking it instead would
        # report on the wrong code.
        raise ValueError(
            f"{getattr(factory, '__module__', '?')}.{name} is not registered: the factory "
            f"registered as {name!r} is {info.factory.__module__}.{name}. Decorate yours with "
            f"@optaxclip.register_factory(threshold='...') under a name of its own."
        )
    return info


# ---------------------------------------------------------------- moment clippers (spam)


def moment_probe(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """An Adam-like transformation whose update is its input.

    Its state is an ``optax.ScaleByAdamState`` whose ``mu`` and ``nu`` follow
    Adam's recursions; its update returns the gradients it received unchanged.
    Wrapped in ``spam``, the output *is* the clipped gradient, so
    ``assert_moment_clip_contracts`` checks the bound, the identity and the
    signs on it directly.
    """

    def floats(fn: Callable[..., Any], *trees: Any) -> Any:
        return jax.tree.map(lambda x, *rest: fn(x, *rest) if _is_float(x) else x, *trees)

    def init_fn(params: Any) -> Any:
        zeros = floats(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                      nu=floats(jnp.zeros_like, params))

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        mu = floats(lambda g, m: (b1 * m + (1 - b1) * g).astype(m.dtype), updates, state.mu)
        nu = floats(lambda g, v: (b2 * v + (1 - b2) * jnp.abs(g).astype(v.real.dtype) ** 2)
                    .astype(v.dtype), updates, state.nu)
        return updates, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

    setattr(update_fn, "optaxclip_passes_updates", True)  # noqa: B010 (pyright: unknown attribute)
    return optax.GradientTransformation(init_fn, update_fn)


def _np_moment_node(node: Any) -> bool:
    return hasattr(node, "_fields") and "nu" in node._fields


def _np_reset(inner_state: Any) -> Any:
    """Every moment node's fields but ``count`` as zeros (what a reset step starts from)."""

    def reset(node: Any) -> Any:
        if not _np_moment_node(node):
            return node
        return node._replace(**{
            f: jax.tree.map(lambda x: np.zeros_like(x) if _is_float(np.asarray(x)) else x,
                            getattr(node, f))
            for f in node._fields if f != "count"
        })

    return jax.tree.map(reset, inner_state, is_leaf=_np_moment_node)


def _np_second_moments(inner_state: Any, grads: Any) -> list[Any]:
    leaves, treedef = jax.tree.flatten(grads)
    found: list[Any] = [None] * len(leaves)
    nodes = [n for n in jax.tree.leaves(inner_state, is_leaf=_np_moment_node)
             if _np_moment_node(n)]
    for node in nodes:
        try:
            nus = treedef.flatten_up_to(node.nu)
        except (ValueError, TypeError):
            continue
        for i, (g, v) in enumerate(zip(leaves, nus)):
            if found[i] is None and _is_float(g) and hasattr(v, "shape") and (
                    np.shape(v) == np.shape(g)):
                found[i] = np.asarray(v)
    return found


def _np_warmup(since: int, steps: int) -> float:
    if since >= steps:
        return 1.0
    return float(1 - 0.99 * (1 + np.cos(np.pi * np.float32(since) / (steps + 1))) / 2)


def _spike_reference(theta: float, g: np.ndarray, v: Any, dtype: Any):
    """(clipped float64 gradient, definitely clipped, ambiguous, limit) for one leaf."""
    g64 = _wide(g)
    magnitude = _magnitudes(g, dtype)
    magnitude = np.where(np.isnan(g64), np.nan, np.where(np.isinf(np.abs(g64)), np.inf,
                                                         magnitude))
    if v is None:
        none = np.zeros(g.shape, bool)
        return g64, none, none, np.full(g.shape, np.inf)
    second = np.abs(np.real(np.asarray(v, np.complex128)))
    second = np.where(second < _tiny(np.asarray(v).dtype), 0.0, second)
    with np.errstate(invalid="ignore"):
        limit = np.where(second > 0, math.sqrt(theta) * np.sqrt(second), np.inf)
    over = (second > 0) & (magnitude > limit * (1 + BOUND_RTOL))
    ambiguous = (second > 0) & ~over & (magnitude > limit * (1 - BOUND_RTOL))
    with np.errstate(invalid="ignore", divide="ignore"):
        if np.iscomplexobj(g64):
            capped = _np_unit_phase(g64, over) * limit
        else:
            capped = np.sign(g64) * _round_down_np(np.where(over, limit, 0.0), dtype)
    return np.where(over, capped, g64), over, ambiguous, limit


def _np_unit_phase(g64: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``g / |g|`` in complex128 where ``where`` holds; an entry with an infinite (and
    no NaN) component takes the phase of its infinite parts, as inf goes to +limit."""
    re, im = np.real(g64), np.imag(g64)
    infinite = (np.isinf(re) | np.isinf(im)) & ~np.isnan(re) & ~np.isnan(im)
    direction = np.where(np.isinf(re), np.sign(re), 0) + 1j * np.where(np.isinf(im),
                                                                         np.sign(im), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        finite = g64 / np.where(where & ~infinite, np.abs(g64), 1)
        return np.where(infinite, direction / np.where(infinite, np.abs(direction), 1), finite)


def _round_down_np(limit: np.ndarray, dtype: Any) -> np.ndarray:
    """Entry-wise, the largest value of ``dtype`` at or under ``limit`` (>= 0), as float64."""
    capped = np.minimum(limit, float(jnp.finfo(dtype).max))
    rounded = jnp.asarray(capped, dtype)
    too_big = np.asarray(rounded, np.float64) > capped
    lowered = jnp.nextafter(rounded, jnp.zeros_like(rounded))
    return np.where(too_big, np.asarray(lowered, np.float64), np.asarray(rounded, np.float64))


def assert_moment_clip_contracts(
    tx: Any, grads: Any, state: Any, params: Any = None, *, mode: str = "jit", **extra: Any
) -> tuple[Any, Any]:
    """Runs one update of a moment clipper (``spam``) and checks it against float64 numpy.

    The reference reads the inner state's second moment ``nu`` (zeroed on a
    reset step), clips every coordinate with ``g^2 > theta v`` and ``v > 0`` to
    ``sign(g) sqrt(theta v)`` in float64, runs the inner optimizer on that, and
    multiplies by the cosine warmup factor. The update and the new inner state
    must match it (the inner optimizer must act coordinate-wise, as the Adam
    family does; coordinates within 1e-6 of their limit are not compared), and
    the stats must count what was clipped and what was not finite. With a
    pass-through inner optimizer (``moment_probe``) the output is the clipped
    gradient: then ``|out| <= sqrt(theta v)``, coordinates under the limit (or
    with ``v = 0``) bit-identical, signs kept, NaN kept, inf clipped where
    ``v > 0`` are asserted on it directly.
    """
    update = _combinators.unwrap(tx.update)
    spec = getattr(update, "optaxclip_moment_clip", None)
    inner = _spec.inner_of(update)
    if spec is None or inner is None:
        raise TypeError("assert_moment_clip_contracts needs a moment clipper (optaxclip.spam).")
    inner_tx, name = optax.with_extra_args_support(inner[0]), _spec.wrapper_name(update)
    out, new_state = run_update(tx, grads, state, params, mode, **extra)
    host = jax.device_get(state)
    count = int(host.count)
    # The reset steps T, 2T, ...; past a saturated int32 count, every T steps since
    # the last reset.
    position = count if count < 2**31 - 1 else int(host.spam.steps_since_reset)
    reset = spec.reset_interval is not None and position % spec.reset_interval == (
        spec.reset_interval - 1)
    before = _np_reset(host.inner_state) if reset else host.inner_state
    leaves, treedef = jax.tree.flatten(grads)
    moments = _np_second_moments(before, grads)
    clipped_in, masks, definite, ambiguous, nonfinite, total = list(leaves), [], 0, 0, 0, 0
    for i, (g, v) in enumerate(zip(leaves, moments)):
        if not _is_float(g):
            continue
        g_np = np.asarray(g)
        want, over, unsure, limit = _spike_reference(spec.theta, g_np, v, g.dtype)
        clipped_in[i] = jnp.asarray(want.astype(g_np.dtype))
        definite, ambiguous = definite + int(over.sum()), ambiguous + int(unsure.sum())
        nonfinite += int((~np.isfinite(_wide(g_np))).sum())
        total += g_np.size
        masks.append((i, over, unsure, limit))
    clipped_in = treedef.unflatten(clipped_in)
    want_out, want_inner = inner_tx.update(clipped_in, jax.tree.map(jnp.asarray, before),
                                           params, **extra)
    old = host.spam
    if spec.reset_interval is not None:
        since = 0 if reset or count == 0 else int(old.steps_since_reset) + 1
        resets = int(old.num_resets) + int(reset)
    else:
        since, resets = (int(old.steps_since_reset) + 1 if count > 0 else 0), int(old.num_resets)
    scale = _np_warmup(since, spec.warmup_steps) if resets > 0 else 1.0
    stats = jax.device_get(new_state.spam)
    if not definite <= int(stats.num_clipped) <= definite + ambiguous:
        _fail(name, "stats.num_clipped", f"{int(stats.num_clipped)} clipped, but the float64 "
              f"reference clips {definite} (+{ambiguous} at the limit)")
    if int(stats.num_nonfinite) != nonfinite:
        _fail(name, "stats.num_nonfinite", f"{int(stats.num_nonfinite)}, expected {nonfinite}")
    if (int(stats.steps_since_reset), int(stats.num_resets)) != (since, resets):
        _fail(name, "stats", f"steps_since_reset/num_resets {int(stats.steps_since_reset)}/"
              f"{int(stats.num_resets)}, expected {since}/{resets}")
    if not math.isclose(float(stats.warmup_scale), scale, rel_tol=1e-6):
        _fail(name, "stats.warmup_scale", f"{float(stats.warmup_scale)}, expected {scale}")
    fraction = int(stats.num_clipped) / max(total, 1)
    if not math.isclose(float(stats.clipped_fraction), fraction, rel_tol=1e-6, abs_tol=1e-12):
        _fail(name, "stats.clipped_fraction", f"{float(stats.clipped_fraction)} != {fraction}")
    if int(new_state.count) != min(count + 1, 2**31 - 1):
        _fail(name, "state.count", "the step count did not advance by one")
    _check_structure(name, want_out, out)
    _compare_to_inner(name, out, want_out, scale, treedef, masks)
    if ambiguous == 0:
        _compare_trees(name, "inner_state", new_state.inner_state, want_inner)
    if getattr(_combinators.unwrap(inner[0].update), "optaxclip_passes_updates", False):
        _check_clipped_gradient(name, leaves, treedef.flatten_up_to(out), masks, scale)
    return out, new_state


def _tolerance(dtype: Any) -> float:
    return 16 * _eps(jnp.finfo(dtype).dtype)


def _compare_to_inner(name: str, out: Any, want_out: Any, scale: float, treedef: Any,
                      masks: list) -> None:
    out_leaves = jax.tree.leaves(out)
    want_leaves = jax.tree.leaves(want_out)
    unsure_at = {i: unsure for i, _, unsure, _ in masks}
    grad_positions = [i for i, _, _, _ in masks]
    float_outs = [k for k, x in enumerate(out_leaves) if _is_float(x)]
    for k, (a, b) in enumerate(zip(out_leaves, want_leaves)):
        if not _is_float(a):
            continue
        a64, b64 = _wide(np.asarray(a)), _wide(np.asarray(b))
        b64 = b64 * scale if scale != 1 else b64  # (inf + 0j) * 1.0 is inf + nan j
        tol = _tolerance(np.asarray(a).dtype)
        # The output is stored in its own dtype: near zero its resolution is the
        # smallest subnormal (fp16: 6e-8; a warmup-scaled fp16 entry of 1e-9 is 0).
        floor = max(1e-30, float(jnp.finfo(np.asarray(a).dtype).smallest_subnormal))
        near = np.isclose(a64, b64, rtol=tol, atol=tol * np.max(np.abs(b64[np.isfinite(b64)]),
                          initial=0) + floor, equal_nan=True) | (np.isinf(a64) & (a64 == b64))
        if len(float_outs) == len(grad_positions):  # leaves line up with the gradients
            unsure = unsure_at[grad_positions[float_outs.index(k)]]
            if unsure.shape == near.shape:
                near |= unsure
        if not np.all(near):
            _fail(name, "the updates", f"{a64[~near][:3]} differ from the inner optimizer's "
                  f"update of the reference-clipped gradients {b64[~near][:3]}")


def _compare_trees(name: str, where: str, got: Any, want: Any) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a_np, b_np = np.asarray(a), np.asarray(b)
        if np.shape(a_np) != np.shape(b_np):
            _fail(name, where, f"shape {np.shape(a_np)} differs from {np.shape(b_np)}")
        if not _is_float(a_np):
            if not np.array_equal(a_np, b_np):
                _fail(name, where, f"{a_np} differs from the reference {b_np}")
            continue
        a64, b64 = _wide(a_np), _wide(b_np)
        tol = _tolerance(a_np.dtype)
        scale = np.max(np.abs(b64[np.isfinite(b64)]), initial=0)
        if not np.allclose(a64, b64, rtol=tol, atol=tol * scale + 1e-30, equal_nan=True):
            _fail(name, where, "the inner state differs from the inner optimizer run on the "
                  "reference-clipped gradients")


def _check_clipped_gradient(name: str, leaves: list, out_leaves: list, masks: list,
                            scale: float) -> None:
    """Direct checks on the clipped gradient (a pass-through inner optimizer)."""
    for i, over, unsure, limit in masks:
        g, o = np.asarray(leaves[i]), np.asarray(out_leaves[i])
        g64, o64 = _wide(g), _wide(o)
        if np.any(np.isnan(g64) & ~np.isnan(o64)):
            _fail(name, f"leaf {i}", "a NaN coordinate must stay NaN")
        bounded = ~np.isnan(g64) & np.isfinite(limit)
        if np.any(bounded & (np.abs(o64) > limit * (1 + BOUND_RTOL))):
            _fail(name, f"leaf {i}", f"|out| {np.abs(o64)[bounded].max()!r} is above "
                  f"sqrt(theta v) {limit[bounded].max()!r}")
        kept = ~over & ~unsure
        if scale == 1.0 and np.any(kept & ~_same(g, o)):
            _fail(name, f"leaf {i}", "a coordinate with g^2 <= theta v (or v = 0) was changed")
        if not np.iscomplexobj(g64):
            signed = ~np.isnan(g64) & (g64 != 0) & (o64 != 0)
            if np.any(signed & (np.sign(o64) != np.sign(g64))):
                _fail(name, f"leaf {i}", "clipping changed a coordinate's sign")
        else:
            turned = over & (np.abs(o64) > 0) & np.isfinite(g64)
            cosine = np.real(o64 * np.conj(g64)) / np.where(turned, np.abs(o64 * g64), 1)
            if np.any(turned & (cosine < 1 - 1e-3)):
                _fail(name, f"leaf {i}", "clipping changed a complex coordinate's phase")
        if np.any(over & np.isinf(g64) & ~np.isfinite(o64)):
            _fail(name, f"leaf {i}", "an inf coordinate with v > 0 must be clipped to a "
                  "finite value")
