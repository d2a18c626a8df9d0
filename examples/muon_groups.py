"""Muon for the hidden matrices, AdamW for the rest, and clipping by group.

Muon orthogonalises each matrix's momentum, so the size of its step does not
depend on the gradient's norm: clipping the matrices' gradients would only
change the momentum's mix, and their norms would dominate a global norm that
the AdamW parameters (embedding, head, biases) are then clipped by. So the
matrices form their own group, left out of clipping and out of every norm
(threshold ``None``), and the AdamW group is clipped by its own norm::

    labels = {"embed": "adamw", "hidden": "muon", "head": "adamw", ...}
    tx = optax.chain(
        oc.clip_by_group_norms({"muon": None, "adamw": 1.0}, labels),
        optax.partition({"muon": optax.contrib.muon(lr), "adamw": optax.adamw(lr)}, labels),
    )

A small MLP learns a regression task; a few batches have their targets scaled
by 300 (a stand-in for corrupt data). The script trains with and without the
clip on the AdamW group and reports the final validation loss and the AdamW
group's largest pre-clip norm. ``main()`` returns the numbers as a dict.

Run ``python examples/muon_groups.py`` (seconds) or with ``--tiny``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

try:  # run as a script from the repository, or imported by the tests
    from _common import format_table, parse_args
except ImportError:  # pragma: no cover
    from examples._common import format_table, parse_args

LEARNING_RATE = 2e-2
SPIKE_FACTOR = 300.0
SIZES = {"tiny": (60, 32), "default": (300, 64), "full": (2000, 128)}  # steps, width


def labels_of(params: dict) -> dict:
    """Hidden matrices go to Muon; everything else (embedding, head, biases) to AdamW."""
    return {name: {"w": "muon" if name == "hidden" else "adamw", "b": "adamw"}
            for name in params}


def init_params(key: jax.Array, inputs: int, width: int) -> dict:
    keys = jax.random.split(key, 3)
    shapes = {"embed": (inputs, width), "hidden": (width, width), "head": (width, 1)}
    return {
        name: {"w": jax.random.normal(k, shape) / np.sqrt(shape[0]), "b": jnp.zeros(shape[1])}
        for k, (name, shape) in zip(keys, shapes.items())
    }


def predict(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["embed"]["w"] + params["embed"]["b"])
    h = jnp.tanh(h @ params["hidden"]["w"] + params["hidden"]["b"])
    return (h @ params["head"]["w"] + params["head"]["b"])[:, 0]


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((predict(params, x) - y) ** 2)


def optimizer(params: dict, clip_adamw: float | None) -> optax.GradientTransformation:
    """Muon on the matrices, AdamW on the rest; the AdamW group clipped by its norm."""
    labels = labels_of(params)
    step = optax.partition(
        {"muon": optax.contrib.muon(LEARNING_RATE), "adamw": optax.adamw(LEARNING_RATE)},
        labels,
    )
    clip = oc.clip_by_group_norms({"muon": None, "adamw": clip_adamw}, labels)
    return optax.chain(clip, step)


def data(seed: int, steps: int, inputs: int = 8):
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=inputs)
    x = rng.normal(size=(steps, 32, inputs)).astype(np.float32)
    y = np.sin(x @ true_w).astype(np.float32)
    spiked = np.zeros(steps, bool)
    spiked[steps // 3::max(steps // 4, 1)] = True  # a few corrupt batches after warm-up
    y[spiked] *= SPIKE_FACTOR
    x_val = rng.normal(size=(256, inputs)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y), spiked, jnp.asarray(x_val), jnp.asarray(
        np.sin(x_val @ true_w).astype(np.float32))


def train(clip_adamw: float | None, steps: int, width: int, seed: int) -> dict:
    x, y, spiked, x_val, y_val = data(seed, steps)
    params = init_params(jax.random.key(seed), x.shape[-1], width)
    tx = optimizer(params, clip_adamw)
    # The clip runs before Muon's and AdamW's moments.
    stages = oc.check_order(tx, params)
    assert [s.name for s in stages if s.kind == "clipper"] == ["clip_by_group_norms"]
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, oc.stats(state)

    norms, clipped = [], []
    for i in range(steps):
        params, state, stats = step(params, state, x[i], y[i])
        norms.append(float(stats["adamw/clip_by_group_norms/norm"]))
        clipped.append(bool(stats["adamw/clip_by_group_norms/clipped"]))
    return {
        "val_loss": float(loss_fn(params, x_val, y_val)),
        "max_adamw_norm": max(norms),
        "spiked_steps": np.flatnonzero(spiked).tolist(),
        "clipped_steps": np.flatnonzero(clipped).tolist(),
        "stats_keys": sorted(stats),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    steps, width = SIZES[args.size]
    results = {
        "AdamW group clipped at 1": train(1.0, steps, width, args.seed),
        "not clipped (inf)": train(float("inf"), steps, width, args.seed),
    }
    rows = [(name, r["val_loss"], r["max_adamw_norm"]) for name, r in results.items()]
    print(format_table(("AdamW group", "final val loss", "largest AdamW-group norm"), rows))
    return results


if __name__ == "__main__":
    main()
