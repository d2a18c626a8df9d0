"""Parity with PyTorch's ``clip_grad_norm_``, ``clip_grad_value_`` and ``get_total_norm``.

The real torch (CPU, float32) runs next to optaxclip on the same multi-tensor
gradients, below, at and above the threshold, for ``norm_type`` 1, 2, 3 and inf;
its non-finite behaviour is pinned down and mapped onto optaxclip's; and a
small MLP trained with ``torch.optim.SGD(momentum=0.9)`` after ``clip_grad_norm_``
is reproduced step for step by ``optax.chain(clip_by_global_norm, optax.sgd)``.
"""

from __future__ import annotations

import functools
import math

import pytest
from _parity import clip_once, require  # noqa: E402

torch = require("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import checkify  # noqa: E402

import optaxclip as oc  # noqa: E402

pytestmark = pytest.mark.parity

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]
TORCH_EPS = 1e-6  # torch's clip coefficient is max_norm / (total_norm + 1e-6)


def _grads(seed: int = 0, scale: float = 0.3):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]


def _numpy_norm(grads, p: float) -> float:
    """float64 reference p-norm of all entries together."""
    flat = np.concatenate([np.abs(g.astype(np.float64)).ravel() for g in grads])
    if p == math.inf:
        return float(np.max(flat))
    return float(np.sum(flat**p) ** (1.0 / p))


def _torch_params(grads):
    params = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for param, g in zip(params, grads):
        param.grad = torch.tensor(g)
    return params


def torch_clip_norm(grads, max_norm, norm_type, **kwargs):
    params = _torch_params(grads)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, **kwargs)
    return [p.grad.numpy() for p in params], total


@functools.cache
def _jitted_global_clip(norm_type: float, eps: float):
    """One compiled global clip per order; the threshold is a traced argument."""

    def apply(grads, max_norm):
        tx = oc.clip_by_global_norm(max_norm, ord=norm_type, eps=eps)
        out, state = tx.update(grads, tx.init(grads))
        return out, oc.stats(state)

    return jax.jit(apply)


def optaxclip_global_clip(grads, max_norm, norm_type, *, jit: bool, eps: float = TORCH_EPS):
    """clip_by_global_norm: jitted with a traced threshold, or eagerly with a static one."""
    if not jit:
        tx = oc.clip_by_global_norm(max_norm, ord=norm_type, eps=eps)
        return clip_once(tx, grads, jit=False)
    out, stats = _jitted_global_clip(norm_type, eps)(
        [jnp.asarray(g) for g in grads], jnp.float32(max_norm)
    )
    return [np.asarray(g) for g in out], {k: np.asarray(v) for k, v in stats.items()}


# ------------------------------------------------------------------- clip_grad_norm_


@pytest.mark.parametrize(("foreach", "jit"), [(None, True), (False, False)])
@pytest.mark.parametrize("regime", ["below", "at", "above"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_matches_torch(norm_type, regime, foreach, jit):
    grads = _grads()
    true_norm = _numpy_norm(grads, norm_type)
    max_norm = {"below": 2.0 * true_norm, "at": float(np.float32(true_norm)),
                "above": true_norm / 4.0}[regime]
    theirs, total = torch_clip_norm(grads, max_norm, norm_type, foreach=foreach)
    ours, stats = optaxclip_global_clip(grads, max_norm, norm_type, jit=jit)

    # The total norm torch returns is the pre-clip norm in optaxclip's stats.
    np.testing.assert_allclose(float(total), stats["clip_by_global_norm/norm"], rtol=2e-6)
    np.testing.assert_allclose(stats["clip_by_global_norm/norm"], true_norm, rtol=2e-6)
    if regime == "below":
        # torch multiplies by a coefficient clamped to exactly 1: both are the identity.
        for x, y, g in zip(ours, theirs, grads):
            np.testing.assert_array_equal(x, g)
            np.testing.assert_array_equal(y, g)
        assert not stats["clip_by_global_norm/clipped"]
    else:
        # "at": with eps = 1e-6 both scale by max_norm / (norm + 1e-6) < 1, as torch does.
        assert stats["clip_by_global_norm/clipped"]
        expected_scale = max_norm / (true_norm + TORCH_EPS)
        np.testing.assert_allclose(stats["clip_by_global_norm/scale"], expected_scale, rtol=2e-6)
        for x, y, g in zip(ours, theirs, grads):
            np.testing.assert_allclose(x, y, rtol=4e-6, atol=1e-9)
            np.testing.assert_allclose(x, g.astype(np.float64) * expected_scale, rtol=4e-6)
        clipped_norm = _numpy_norm(ours, norm_type)
        assert clipped_norm <= max_norm * (1 + 1e-6)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("factor", [0.25, 4.0])
def test_functional_clip_returns_what_clip_grad_norm_returns(norm_type, factor):
    """``oc.clip(grads, c, ord=p, eps=1e-6)`` is ``clip_grad_norm_``: same tensors, same norm."""
    grads = _grads(seed=3)
    max_norm = _numpy_norm(grads, norm_type) * factor
    theirs, total = torch_clip_norm(grads, max_norm, norm_type)
    ours, norm = jax.jit(functools.partial(oc.clip, ord=norm_type, eps=TORCH_EPS))(
        [jnp.asarray(g) for g in grads], max_norm
    )
    np.testing.assert_allclose(float(norm), float(total), rtol=2e-6)
    for x, y in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(x), y, rtol=4e-6, atol=1e-9)


def test_clip_grad_norm_without_eps_differs_only_at_the_threshold():
    """eps=0 (the default) keeps input exactly at the threshold; torch's 1e-6 shrinks it."""
    grads = _grads()
    max_norm = float(np.float32(_numpy_norm(grads, 2.0)))
    theirs, _ = torch_clip_norm(grads, max_norm, 2.0)
    ours, stats = clip_once(oc.clip_by_global_norm(max_norm), grads, jit=True)
    assert not stats["clip_by_global_norm/clipped"]
    for x, y, g in zip(ours, theirs, grads):
        np.testing.assert_array_equal(x, g)
        assert np.all(np.abs(y) <= np.abs(g)) and np.any(y != g)


def test_clip_grads_with_norm_is_the_same_coefficient():
    """torch's two-step form (get_total_norm, then clip_grads_with_norm_) equals
    clip_grad_norm_ and optaxclip; optaxclip computes the norm in the same pass."""
    grads = _grads(seed=4)
    params = _torch_params(grads)
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    torch.nn.utils.clip_grads_with_norm_(params, 0.5, total)
    ours, stats = clip_once(oc.clip_by_global_norm(0.5, eps=TORCH_EPS), grads, jit=True)
    np.testing.assert_allclose(stats["clip_by_global_norm/norm"], float(total), rtol=2e-6)
    for x, param in zip(ours, params):
        np.testing.assert_allclose(x, param.grad.numpy(), rtol=4e-6, atol=1e-9)


# ------------------------------------------------------------------- clip_grad_value_


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("clip_value", [0.5, 0.0])
def test_clip_grad_value_matches_torch_exactly(clip_value, jit):
    grads = _grads(seed=1, scale=1.0)
    grads[0][0, :4] = [math.inf, -math.inf, math.nan, 0.5]
    grads[1][:2] = [-0.5, 0.49999997]
    params = _torch_params(grads)
    torch.nn.utils.clip_grad_value_(params, clip_value)
    ours, stats = clip_once(oc.clip_by_value(clip_value), grads, jit=jit)
    for x, param in zip(ours, params):
        np.testing.assert_array_equal(x, param.grad.numpy())  # NaN where torch has NaN
    assert np.isnan(stats["clip_by_value/norm"])  # a NaN entry shows in the stats


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("seed", range(3))
def test_clip_grad_value_in_half_precision_differs_by_the_rounding_of_clip_value(dtype, seed):
    """Where ``clip_value`` is not representable in the dtype, torch rounds it to the
    nearest value (possibly above it) and optaxclip to the largest value at or below
    it, so its bound holds: clipped entries differ by at most one ulp, the rest are
    identical (what the README's torch table says)."""
    rng = np.random.default_rng(seed)
    clip_value = float(rng.uniform(0.05, 3.0))
    values = rng.normal(size=64).astype(np.float32) * 2
    torch_dtype = getattr(torch, dtype)
    grad = torch.tensor(values).to(torch_dtype)
    param = torch.nn.Parameter(torch.zeros(64, dtype=torch_dtype))
    param.grad = grad.clone()
    torch.nn.utils.clip_grad_value_([param], clip_value)
    theirs = param.grad.to(torch.float32).numpy()
    out, _ = oc.clip_by_value(clip_value).update(
        jnp.asarray(grad.to(torch.float32).numpy(), dtype), oc.clip_by_value(clip_value).init(None))
    ours = np.asarray(out, np.float32)
    inside = np.abs(grad.to(torch.float32).numpy()) <= min(np.abs(theirs).max(), clip_value)
    np.testing.assert_array_equal(ours[inside], theirs[inside])
    assert np.all(np.abs(ours) <= clip_value)  # the bound, in the dtype
    ulp = float(jnp.finfo(dtype).eps) * max(clip_value, 1e-3) * 2
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ulp)


# ------------------------------------------------------------------- get_total_norm


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, math.inf])
def test_get_total_norm_matches_torch(norm_type, jit):
    grads = _grads(seed=2)
    total = torch.nn.utils.get_total_norm([torch.tensor(g) for g in grads], norm_type)
    norm_fn = lambda tree: oc.global_norm(tree, norm_type)
    ours = (jax.jit(norm_fn) if jit else norm_fn)([jnp.asarray(g) for g in grads])
    np.testing.assert_allclose(float(ours), float(total), rtol=2e-6)
    np.testing.assert_allclose(float(ours), _numpy_norm(grads, norm_type), rtol=2e-6)


def test_get_total_norm_empty_is_zero_in_both():
    assert float(torch.nn.utils.get_total_norm([], 2.0)) == 0.0
    assert float(oc.global_norm([])) == 0.0


def test_total_norm_overflow_and_underflow_torch_vs_optaxclip():
    """torch's float32 2-norm overflows to inf (and so zeroes every gradient when
    clipping) or underflows to 0; optaxclip's norm is exact in both cases."""
    huge = [np.array([1e20, 1.0], np.float32), np.array([3e19], np.float32)]
    assert float(torch.nn.utils.get_total_norm([torch.tensor(g) for g in huge])) == math.inf
    np.testing.assert_allclose(float(oc.global_norm(huge)), _numpy_norm(huge, 2.0), rtol=1e-6)

    theirs, _ = torch_clip_norm(huge, 1.0, 2.0)
    assert np.all(theirs[0] == 0) and np.all(theirs[1] == 0)  # silently zeroed
    ours, stats = clip_once(oc.clip_by_global_norm(1.0, eps=TORCH_EPS), huge, jit=True)
    np.testing.assert_allclose(_numpy_norm(ours, 2.0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ours[1], [0.3 / math.sqrt(1.09)], rtol=1e-5)
    assert stats["clip_by_global_norm/clipped"]

    tiny = [np.array([1e-30, 1e-30], np.float32)]
    assert float(torch.nn.utils.get_total_norm([torch.tensor(g) for g in tiny])) == 0.0
    np.testing.assert_allclose(float(oc.global_norm(tiny)), math.sqrt(2) * 1e-30, rtol=1e-6)


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -math.inf])
def test_norm_types_torch_accepts_but_optaxclip_rejects(norm_type):
    """torch takes norm_type 0 (counts non-zero tensors) and negative orders;
    optaxclip raises a ValueError that names ``ord``."""
    grads = _grads()
    torch.nn.utils.get_total_norm([torch.tensor(g) for g in grads], norm_type)
    with pytest.raises(ValueError, match="ord"):
        oc.global_norm(grads, norm_type)
    with pytest.raises(ValueError, match="ord"):
        oc.clip_by_global_norm(1.0, ord=norm_type)


# --------------------------------------------------------------------- non-finite input


def _nonfinite_grads(bad: float):
    grads = _grads(seed=3)
    grads[2][1, 2, 0] = bad
    return grads


def raise_if_nonfinite(opt_state, key: str = "clip_by_global_norm/norm") -> None:
    """optaxclip's counterpart of ``error_if_nonfinite=True``, outside the jitted step."""
    norm = oc.stats(opt_state)[key]
    if not bool(jnp.isfinite(norm)):
        raise RuntimeError(f"the total gradient norm is non-finite ({float(norm)}); not clipped")


@pytest.mark.parametrize("bad", [-math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_error_if_nonfinite_maps_to_a_stats_check(bad, norm_type):
    """``error_if_nonfinite=True`` raises before clipping; optaxclip's jitted step
    records the non-finite pre-clip norm, and a host-side check of the stats raises."""
    grads = _nonfinite_grads(bad)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch_clip_norm(grads, 1.0, norm_type, error_if_nonfinite=True)

    tx = oc.clip_by_global_norm(1.0, ord=norm_type, eps=TORCH_EPS)
    update = jax.jit(tx.update)
    _, state = update([jnp.asarray(g) for g in grads], tx.init(grads))
    with pytest.raises(RuntimeError, match="non-finite"):
        raise_if_nonfinite(state)

    # Finite gradients pass both checks, and the norms agree.
    finite = _grads(seed=3)
    _, total = torch_clip_norm(finite, 1.0, norm_type, error_if_nonfinite=True)
    _, state = update([jnp.asarray(g) for g in finite], tx.init(finite))
    raise_if_nonfinite(state)
    np.testing.assert_allclose(
        float(oc.stats(state)["clip_by_global_norm/norm"]), float(total), rtol=2e-6
    )


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_error_if_nonfinite_maps_to_checked(bad):
    """``optaxclip.checked`` raises on the non-finite step: eagerly at the update,
    under jit through ``checkify``. Finite steps pass."""
    grads = [jnp.asarray(g) for g in _nonfinite_grads(bad)]
    finite = [jnp.asarray(g) for g in _grads(seed=3)]
    tx = oc.checked(oc.clip_by_global_norm(1.0, eps=TORCH_EPS))
    with pytest.raises(checkify.JaxRuntimeError, match="not finite"):
        tx.update(grads, tx.init(grads))
    tx.update(finite, tx.init(finite))

    jitted = checkify.checkify(jax.jit(tx.update))
    error, _ = jitted(grads, tx.init(grads))
    with pytest.raises(checkify.JaxRuntimeError, match="not finite"):
        error.throw()
    error, _ = jitted(finite, tx.init(finite))
    error.throw()


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_default_nonfinite_behaviour_torch_vs_optaxclip(bad, norm_type, jit):
    """torch (error_if_nonfinite=False): an inf norm gives coefficient 0, so finite
    gradients are zeroed and inf entries become NaN; a NaN norm makes everything NaN.
    optaxclip: every entry NaN in both cases, stats show the non-finite norm."""
    grads = _nonfinite_grads(bad)
    theirs, total = torch_clip_norm(grads, 1.0, norm_type)
    ours, stats = optaxclip_global_clip(grads, 1.0, norm_type, jit=jit)
    bad_mask = [~np.isfinite(g) for g in grads]
    if math.isnan(bad):
        assert math.isnan(float(total))
        assert all(np.all(np.isnan(y)) for y in theirs)
    else:
        assert float(total) == math.inf
        for y, mask in zip(theirs, bad_mask):
            assert np.all(np.isnan(y[mask]))
            np.testing.assert_array_equal(y[~mask], 0.0)  # finite gradients zeroed
    assert all(np.all(np.isnan(x)) for x in ours)
    norm = stats["clip_by_global_norm/norm"]
    assert math.isnan(norm) if math.isnan(bad) else norm == math.inf
    assert math.isnan(stats["clip_by_global_norm/scale"])


@pytest.mark.parametrize("guard", ["skip_nonfinite", "apply_if_finite"])
def test_nonfinite_step_can_be_skipped_instead(guard):
    """Where torch users raise on a non-finite norm, a guard skips the step in-graph."""
    inner = optax.chain(oc.clip_by_global_norm(1.0, eps=TORCH_EPS), optax.sgd(0.1, momentum=0.9))
    if guard == "skip_nonfinite":
        tx = oc.skip_nonfinite(inner)
    else:
        tx = optax.apply_if_finite(inner, 3)
    params = [jnp.ones(s) for s in SHAPES]
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(
        [jnp.asarray(g) for g in _nonfinite_grads(math.inf)], state, params
    )
    assert all(np.all(np.asarray(u) == 0) for u in updates)
    for old, new in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state)):
        np.testing.assert_array_equal(old, new)  # the momentum never saw the bad step


# ---------------------------------------------------- training trajectory, SGD momentum


def _blob_batches(steps: int, batch: int = 30):
    """Three Gaussian classes in 4-d, generated (nothing is downloaded)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 4)) * 2.0
    y = rng.integers(0, 3, size=steps * batch)
    x = (centers[y] + rng.normal(size=(steps * batch, 4))).astype(np.float32)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(steps)]


def _jax_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"].T + params["b1"])
    logits = hidden @ params["w2"].T + params["b2"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def test_sgd_momentum_training_with_clip_grad_norm_matches_torch():
    steps, max_norm, lr = 25, 0.6, 0.2
    batches = _blob_batches(steps)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    # A deliberately large output layer makes the early gradients exceed max_norm.
    with torch.no_grad():
        model[2].weight.mul_(8.0)
    names = {"w1": model[0].weight, "b1": model[0].bias, "w2": model[2].weight,
             "b2": model[2].bias}
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in names.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    tx = optax.chain(oc.clip_by_global_norm(max_norm, eps=TORCH_EPS), optax.sgd(lr, momentum=0.9))
    state = tx.init(params)

    @jax.jit
    def jax_step(params, state, x, y):
        grads = jax.grad(_jax_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, oc.stats(state)

    torch_norms, our_stats = [], []
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.tensor(x)), torch.tensor(y))
        loss.backward()
        torch_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        optimizer.step()
        params, state, stats = jax_step(params, state, jnp.asarray(x), jnp.asarray(y))
        our_stats.append(stats)
        for name, tensor in names.items():
            np.testing.assert_allclose(
                np.asarray(params[name]), tensor.detach().numpy(), rtol=1e-4, atol=2e-5,
                err_msg=f"step {len(torch_norms)}, {name}",
            )

    our_norms = np.array([float(s["clip_by_global_norm/norm"]) for s in our_stats])
    np.testing.assert_allclose(our_norms, torch_norms, rtol=1e-4)
    clipped = np.array([bool(s["clip_by_global_norm/clipped"]) for s in our_stats])
    np.testing.assert_array_equal(clipped, np.array(torch_norms) + TORCH_EPS > max_norm)
    assert 3 <= clipped.sum() <= steps - 3, clipped
