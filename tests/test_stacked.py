"""Stacked (scanned) layers: per-leaf clippers with ``stacked=True``.

A leaf ``[L, ...]`` holding ``L`` layers must be clipped exactly as the unstacked
clipper clips the ``L`` layers given as separate leaves; the reference here is
that unstacked run (itself tested against numpy elsewhere), plus float64 numpy
norms per layer.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import optaxclip.testing as contracts

LAYERS = 3
CLIPPERS = {
    "clip_by_norm": lambda stacked: oc.clip_by_norm(1.0, stacked=stacked),
    "clip_by_block_rms": lambda stacked: oc.clip_by_block_rms(0.3, stacked=stacked),
    "adaptive_grad_clip": lambda stacked: oc.adaptive_grad_clip(0.05, stacked=stacked),
    "adagc": lambda stacked: oc.adagc(warmup_steps=2, stacked=stacked),
}


def stacked_tree(scale: float, seed: int) -> dict:
    """A scanned block: kernels [L, in, out], biases [L, d], one gate per layer [L]."""
    rng = np.random.default_rng(seed)
    layer_scales = np.array([0.1, 1.0, 10.0])[:, None]  # layers far apart in size
    kernel = rng.normal(size=(LAYERS, 4, 3)) * layer_scales[:, :, None]
    bias = rng.normal(size=(LAYERS, 3)) * layer_scales
    gate = rng.normal(size=(LAYERS,)) * layer_scales[:, 0]
    return jax.tree.map(lambda x: jnp.asarray(x * scale, jnp.float32),
                        {"kernel": kernel, "bias": bias, "gate": gate})


def unstack(tree: dict) -> dict:
    return {key: [x[i] for i in range(LAYERS)] for key, x in tree.items()}


def restack(tree: dict) -> dict:
    return {key: jnp.stack(parts) for key, parts in tree.items()}


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_stacked_equals_the_layers_as_separate_leaves(name):
    stacked, plain = CLIPPERS[name](True), CLIPPERS[name](False)
    params = stacked_tree(1.0, seed=0)
    state_s, state_p = stacked.init(params), plain.init(unstack(params))
    update_s, update_p = jax.jit(stacked.update), jax.jit(plain.update)
    layer_scales = []
    for step, scale in enumerate((0.2, 0.5, 1.0, 30.0)):
        grads = stacked_tree(scale, seed=step + 1)
        out_s, state_s = update_s(grads, state_s, params)
        out_p, state_p = update_p(unstack(grads), state_p, unstack(params))
        chex.assert_trees_all_equal(out_s, restack(out_p))
        chex.assert_trees_all_equal_shapes_and_dtypes(out_s, grads)
        for field in ("norm", "scale", "threshold"):
            got = getattr(state_s.stats, field)
            want = getattr(state_p.stats, field)
            if not isinstance(want, dict):  # one threshold shared by every leaf
                chex.assert_trees_all_equal(got, want)
            else:
                chex.assert_trees_all_equal(got, restack(want))
        layer_scales.append(np.asarray(state_s.stats.scale["bias"]).reshape(LAYERS, -1))
    # The layers were clipped apart: on some step the bias's layers got different
    # scales, some below 1.
    assert any(np.any(s < 1) and np.ptp(s) > 0 for s in layer_scales), layer_scales


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_block_rms", "adagc"])
def test_stats_per_leaf_reports_per_layer_norms(name):
    tx = CLIPPERS[name](True)
    grads = stacked_tree(3.0, seed=5)
    _, state = tx.update(grads, tx.init(grads), grads)
    stats = oc.stats(state, per_leaf=True)
    rms = name == "clip_by_block_rms"
    for key, x in grads.items():
        x = np.asarray(x, np.float64)
        for layer in range(LAYERS):
            entries = x[layer].ravel()
            want = np.sqrt(np.sum(entries**2) / (entries.size if rms else 1))
            got = float(stats[f"{name}/leaves/{key}/layers/{layer}/norm"])
            assert got == pytest.approx(want, rel=1e-5), (key, layer)
            scale = float(stats[f"{name}/leaves/{key}/layers/{layer}/scale"])
            assert bool(stats[f"{name}/leaves/{key}/layers/{layer}/clipped"]) == (scale != 1)
        # The leaf's summary is the largest of its layers.
        assert float(stats[f"{name}/leaves/{key}/norm"]) == pytest.approx(
            max(float(stats[f"{name}/leaves/{key}/layers/{i}/norm"]) for i in range(LAYERS)))
    # Without per_leaf, the keys are the usual summaries.
    assert not any("/layers/" in key for key in oc.stats(state))
    # Unstacked clippers report no layers.
    plain = CLIPPERS[name](False)
    _, plain_state = plain.update(grads, plain.init(grads), grads)
    assert not any("/layers/" in key for key in oc.stats(plain_state, per_leaf=True))


@pytest.mark.parametrize("name", sorted(CLIPPERS))
@pytest.mark.parametrize("scale", [0.0, 0.3, 50.0])
def test_stacked_clippers_keep_the_contracts_per_layer(name, scale):
    """optaxclip.testing measures each layer by the spec's own reduced axes."""
    tx = CLIPPERS[name](True)
    grads = stacked_tree(scale, seed=9)
    params = stacked_tree(1.0, seed=0)
    state = tx.init(params)
    for mode in ("eager", "jit"):
        out, state = contracts.assert_clip_contracts(tx, grads, state, params, mode=mode)
    for key in grads:  # and directly: every layer inside its own ball
        if name == "clip_by_norm" and scale:
            norms = np.sqrt(np.sum(np.asarray(out[key], np.float64).reshape(LAYERS, -1) ** 2, 1))
            assert np.all(norms <= 1.0 * (1 + 1e-6)), (key, norms)


def test_checked_and_check_order_accept_stacked_clippers():
    grads = stacked_tree(20.0, seed=2)
    tx = oc.checked(optax.chain(oc.clip_by_norm(1.0, stacked=True), optax.sgd(0.1)))
    out, _ = tx.update(grads, tx.init(grads), grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    stages = oc.check_order(optax.chain(oc.adaptive_grad_clip(0.01, stacked=True),
                                        optax.adam(1e-3)), grads)
    assert stages[0].kind == "clipper" and stages[0].scope == "unit"


def test_stacked_subtree_under_masked():
    """The usual layout: only the scanned block stacks layers; mask the rest out."""
    block = stacked_tree(5.0, seed=3)
    grads = {"block": block, "embed": jnp.full((4, 2), 2.0)}
    is_block = {"block": jax.tree.map(lambda _: True, block), "embed": False}
    tx = optax.chain(
        optax.masked(oc.clip_by_norm(1.0, stacked=True), is_block),
        optax.masked(oc.clip_by_norm(1.0), jax.tree.map(lambda m: not m, is_block)),
    )
    out, _ = tx.update(grads, tx.init(grads))
    want, _ = oc.clip_by_norm(1.0).update(unstack(block), oc.clip_by_norm(1.0).init(
        unstack(block)))
    chex.assert_trees_all_equal(out["block"], restack(want))
    assert float(jnp.linalg.norm(out["embed"])) == pytest.approx(1.0, rel=1e-6)


def test_bad_stacked_argument_is_named():
    with pytest.raises(ValueError, match="stacked must be True"):
        oc.clip_by_norm(1.0, stacked="yes")
    with pytest.raises(ValueError, match="stacked must be True"):
        oc.adagc(stacked=1)


def test_flax_scanned_block():
    """Parameters of a flax ``nn.scan`` over layers: the scanned subtree is stacked."""
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(4)(x)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="embed")(x)
            scanned = nn.scan(Block, variable_axes={"params": 0},
                              split_rngs={"params": True}, length=LAYERS)
            x, _ = scanned(name="layers")(x, None)
            return jnp.sum(x**2)

    model = Model()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)) * 30, jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    grads = jax.grad(lambda p: model.apply({"params": p}, x))(params)
    kernel = grads["layers"]["Dense_0"]["kernel"]
    assert kernel.shape == (LAYERS, 4, 4)
    in_layers = jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == "layers", grads)
    tx = optax.chain(optax.masked(oc.clip_by_norm(0.1, stacked=True), in_layers),
                     optax.masked(oc.clip_by_norm(0.1), jax.tree.map(lambda m: not m, in_layers)))
    out, state = jax.jit(tx.update)(grads, tx.init(params))
    got = np.asarray(out["layers"]["Dense_0"]["kernel"], np.float64)
    want = np.asarray(kernel, np.float64)
    norms = [np.linalg.norm(want[layer]) for layer in range(LAYERS)]
    assert max(norms) > 0.1 and np.ptp(norms) > 0  # clipped, by different factors
    for layer, norm in enumerate(norms):
        expected = want[layer] * min(1.0, 0.1 / norm)
        np.testing.assert_allclose(got[layer], expected, rtol=1e-5, atol=1e-9)
    stats = oc.stats(state, per_leaf=True)
    assert any("layers/Dense_0/kernel/layers/2/norm" in key for key in stats), sorted(stats)


def test_stats_per_leaf_reports_per_layer_unit_norms_for_agc():
    """AGC's per-unit stats are summarised per layer: its largest unit norm, smallest scale."""
    tx = CLIPPERS["adaptive_grad_clip"](True)
    grads = stacked_tree(3.0, seed=7)
    params = stacked_tree(1.0, seed=8)
    _, state = tx.update(grads, tx.init(params), params)
    stats = oc.stats(state, per_leaf=True)
    for key, x in grads.items():
        x = np.asarray(x, np.float64)
        for layer in range(LAYERS):
            entries = x[layer]
            # Kernels: one unit per output column; vectors and scalars are one unit.
            unit_norms = (np.sqrt(np.sum(entries**2, axis=0)) if entries.ndim == 2
                          else np.sqrt(np.sum(entries**2)))
            got = float(stats[f"adaptive_grad_clip/leaves/{key}/layers/{layer}/norm"])
            assert got == pytest.approx(float(np.max(unit_norms)), rel=1e-5), (key, layer)
            scale = float(stats[f"adaptive_grad_clip/leaves/{key}/layers/{layer}/scale"])
            assert 0 <= scale <= 1
            assert bool(stats[f"adaptive_grad_clip/leaves/{key}/layers/{layer}/clipped"]) == (
                scale < 1)
        assert float(stats[f"adaptive_grad_clip/leaves/{key}/norm"]) == pytest.approx(max(
            float(stats[f"adaptive_grad_clip/leaves/{key}/layers/{i}/norm"])
            for i in range(LAYERS)))
    plain = CLIPPERS["adaptive_grad_clip"](False)
    _, plain_state = plain.update(grads, plain.init(params), params)
    assert not any("/layers/" in key for key in oc.stats(plain_state, per_leaf=True))
