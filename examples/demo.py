"""Short demo: one small regression model trained three ways.

Trains an MLP with Adam on regression data whose targets are scaled up, so raw
gradients are huge: with no clipping, with ``clip_by_global_norm(1.0)`` and with
``clip_by_value(1.0)``. Prints one row per run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import make_regression

import optaxclip as oc


def main(steps: int = 300) -> None:
    features, targets = make_regression(
        n_samples=2000, n_features=20, noise=1.0, random_state=0
    )
    features = jnp.asarray(features * 10.0, jnp.float32)
    targets = jnp.asarray(targets[:, None] * 10.0, jnp.float32)

    def init(key: jax.Array) -> dict:
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (20, 32)) / jnp.sqrt(20.0),
            "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 1)) / jnp.sqrt(32.0),
            "b2": jnp.zeros(1),
        }

    def loss_fn(params: dict) -> jax.Array:
        hidden = jax.nn.relu(features @ params["w1"] + params["b1"])
        return jnp.mean((hidden @ params["w2"] + params["b2"] - targets) ** 2)

    runs = {
        "no clipping": optax.adam(0.05),
        "clip_by_global_norm(1.0)": optax.chain(oc.clip_by_global_norm(1.0), optax.adam(0.05)),
        "clip_by_value(1.0)": optax.chain(oc.clip_by_value(1.0), optax.adam(0.05)),
    }
    print(f"{'run':<28} {'first loss':>12} {'final loss':>12} {'max pre-clip norm':>18}")
    def make_step(tx: optax.GradientTransformation):
        @jax.jit
        def step(params, opt_state):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, oc.global_norm(grads)

        return step

    for name, tx in runs.items():
        params = init(jax.random.key(0))
        opt_state = tx.init(params)
        step = make_step(tx)

        losses, norms = [], []
        for _ in range(steps):
            params, opt_state, loss, norm = step(params, opt_state)
            losses.append(float(loss))
            norms.append(float(norm))
        print(f"{name:<28} {losses[0]:>12.4g} {losses[-1]:>12.4g} {np.max(norms):>18.4g}")


if __name__ == "__main__":
    main()
