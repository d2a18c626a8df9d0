"""Type-checked like a user's training script: ``make typecheck`` runs pyright on it.

It uses the public API the way the README does (``optax.chain``, ``clipped``,
``check_order``, a jitted step that logs ``stats``, an adaptive clipper, a guard,
``checked`` and ``global_norm``), and ``assert_type`` pins the types a user relies
on. pyright reports an error when an annotation in optaxclip makes ordinary use of
it look wrong or lose its type. ``python tests/typing/user_script.py`` also runs it.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from typing_extensions import assert_type

import optaxclip as oc

Params = dict[str, jax.Array]


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def make_optimizers() -> list[optax.GradientTransformation]:
    by_chain = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
    keras_style = oc.clipped(optax.adam(1e-3), global_clipnorm=1.0)
    per_variable = oc.clipped(optax.sgd(0.1, momentum=0.9), clipnorm=1.0)
    adaptive = optax.chain(oc.zclip(max_norm=1.0), optax.adam(1e-3))
    guarded = oc.skip_nonfinite(optax.chain(oc.clip_by_value(0.5), optax.sgd(0.1)))
    scheduled = optax.chain(
        oc.clip_by_global_norm(optax.linear_schedule(10.0, 1.0, 100)), optax.adam(1e-3)
    )
    injected = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0)
    assert_type(oc.clip_by_global_norm(1.0), optax.GradientTransformationExtraArgs)
    assert_type(keras_style, optax.GradientTransformation)
    return [by_chain, keras_style, per_variable, adaptive, guarded, scheduled, injected]


def train(tx: optax.GradientTransformation, steps: int = 3) -> dict[str, float]:
    params: Params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    stages = oc.check_order(tx, params, on_unknown="warn")
    assert_type(stages, tuple[oc.Stage, ...])
    opt_state = tx.init(params)

    @jax.jit
    def train_step(
        params: Params, opt_state: optax.OptState, x: jax.Array, y: jax.Array
    ) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss} | oc.stats(opt_state)
        metrics["grad_norm"] = oc.global_norm(grads)
        # optax annotates apply_updates as returning its broad optax.Params
        new_params = cast(Params, optax.apply_updates(params, updates))
        return new_params, opt_state, metrics

    x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    metrics: dict[str, jax.Array] = {}
    for _ in range(steps):
        params, opt_state, metrics = train_step(params, opt_state, x, y)
    recorded: dict[str, jax.Array] = oc.stats(opt_state)
    norm: jax.Array = recorded.get("clip_by_global_norm/norm", jnp.zeros([]))
    summary: dict[str, Any] = {key: float(value) for key, value in metrics.items()}
    summary["recorded norm"] = float(norm)
    return summary


def checked_step() -> dict[str, jax.Array]:
    # checked() raises eagerly; under jit it needs checkify.checkify or chex.chexify.
    tx = oc.checked(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)))
    params: Params = {"w": jnp.zeros(2)}
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    return oc.stats(state)


def check_moments() -> dict[str, float]:
    tx = oc.clipped(optax.adam(1e-2), global_clipnorm=1.0)
    return oc.assert_moments_bounded(tx, {"w": jnp.zeros(4)}, 1.0)


def main() -> None:
    for tx in make_optimizers():
        print(sorted(train(tx)))
    print(sorted(checked_step()))
    print(check_moments())


if __name__ == "__main__":
    main()
