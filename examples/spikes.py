"""Spike-injection study: fixed, adaptive and step-skipping clipping side by side.

Part 1, *injected spikes*: a small MLP learns a regression task with Adam.
About 2% of the training batches (from step 50 on) have their targets
multiplied by 300, a stand-in for corrupt data or a numerical fault. Each
method trains from the same initialisations and batches over several seeds.
Reported per method:

* median final validation loss over seeds;
* worst post-spike excursion: the largest ratio, over every spike of every
  seed, of the validation loss in the 25 steps after the spike to the value
  just before it (1.0 means the spike left no trace); once over all spikes,
  and once over the spikes after step 100, when every method's warmup is over.

Part 2, *exploding gradients*: full-batch linear regression with plain SGD at
1.1x the stable learning rate, so the gradient norm grows about 20% per step.
Nothing is a spike here: the growth is smooth. Methods whose threshold only
follows recent norms follow the explosion; an absolute cap stops it.

Run ``python examples/spikes.py`` (about a minute on a laptop CPU) or with
``--tiny`` for a smoke test. ``main()`` returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import make_regression

import optaxclip as oc

LEARNING_RATE = 1e-2
SPIKE_FACTOR = 300.0
SPIKE_RATE = 0.02
FIRST_SPIKE = 50
HORIZON = 25
LATE = 100  # every method's warmup (zclip 25, skip_on_spike 64, adagc 100) is over


def spike_methods(full: bool) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Each entry builds the whole optimizer; clippers sit ahead of Adam."""
    adam = lambda: optax.adam(LEARNING_RATE)
    clipped = lambda clip: lambda: optax.chain(clip(), adam())
    methods = {"no clipping": adam}
    if full:
        for threshold in (0.1, 1.0, 10.0):
            methods[f"clip_by_global_norm({threshold:g})"] = clipped(
                lambda threshold=threshold: oc.clip_by_global_norm(threshold)
            )
    methods["autoclip(10)"] = clipped(lambda: oc.autoclip(10.0))
    methods["zclip(max_norm=None)"] = clipped(lambda: oc.zclip(max_norm=None))
    if full:
        methods["zclip() (max_norm=1.0)"] = clipped(lambda: oc.zclip())
    methods["adagc()"] = clipped(lambda: oc.adagc())
    methods["skip_on_spike(adam)"] = lambda: oc.skip_on_spike(adam())
    return methods


def make_data(n_train: int, n_val: int):
    features, targets = make_regression(
        n_samples=n_train + n_val, n_features=10, n_informative=8, noise=10.0,
        random_state=0,
    )
    targets = np.tanh(targets / np.std(targets)) + 0.1 * np.sin(3 * features[:, 0])
    features = (features - features.mean(0)) / features.std(0)
    targets = (targets - targets.mean()) / targets.std()
    as_f32 = lambda a: jnp.asarray(a, jnp.float32)
    return (
        as_f32(features[:n_train]), as_f32(targets[:n_train, None]),
        as_f32(features[n_train:]), as_f32(targets[n_train:, None]),
    )


def init_mlp(key: jax.Array, hidden: int = 32) -> dict:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (10, hidden)) / math.sqrt(10.0),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 1)) / math.sqrt(hidden),
        "b2": jnp.zeros(1),
    }


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def spike_study(seeds: int, steps: int, batch: int, full: bool) -> dict:
    x_train, y_train, x_val, y_val = make_data(2000, 500)
    rng = np.random.default_rng(0)
    batches = jnp.asarray(rng.integers(0, x_train.shape[0], size=(seeds, steps, batch)))
    spikes = np.zeros((seeds, steps), bool)
    for s in range(seeds):
        count = max(1, round(SPIKE_RATE * steps))
        spikes[s, rng.choice(np.arange(FIRST_SPIKE, steps), count, replace=False)] = True
    keys = jax.random.split(jax.random.key(0), seeds)

    def train(tx: optax.GradientTransformation):
        def one_seed(key, batch_ids, spike_flags):
            params = init_mlp(key)

            def step(carry, inputs):
                params, opt_state = carry
                ids, spike = inputs
                targets = y_train[ids] * jnp.where(spike, SPIKE_FACTOR, 1.0)
                loss, grads = jax.value_and_grad(mlp_loss)(params, x_train[ids], targets)
                updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
                params = optax.apply_updates(params, updates)
                return (params, opt_state), mlp_loss(params, x_val, y_val)

            _, val = jax.lax.scan(step, (params, tx.init(params)), (batch_ids, spike_flags))
            return val

        # One compile per method, reused for every seed (cheaper to compile than vmap).
        run_seed = jax.jit(one_seed)
        return jnp.stack([
            run_seed(keys[s], batches[s], jnp.asarray(spikes[s])) for s in range(seeds)
        ])

    results = {}
    for name, make in spike_methods(full).items():
        val = np.asarray(train(optax.with_extra_args_support(make())), np.float64)  # (seeds, steps)
        final = val[:, -1]
        early, late = [1.0], [1.0]
        for s in range(seeds):
            for t in np.flatnonzero(spikes[s]):
                excursion = np.max(val[s, t : t + HORIZON]) / val[s, t - 1]
                (late if t >= LATE else early).append(excursion)
        results[name] = {
            "median_final_val_loss": float(np.median(final)),
            "worst_excursion": float(max(max(early), max(late))),
            "worst_excursion_late": float(max(late)),
            "diverged": int(np.sum(~np.isfinite(final))),
        }
    return results


def exploding_study(steps: int, full: bool) -> dict:
    x, y, _, _ = make_data(500, 1)
    curvature = float(np.max(np.linalg.eigvalsh(np.asarray(2 * x.T @ x / x.shape[0]))))
    learning_rate = 1.1 * 2.0 / curvature  # |1 - lr * curvature| = 1.2 per step
    loss_fn = lambda w: jnp.mean((x @ w - y) ** 2)
    sgd = lambda: optax.sgd(learning_rate)
    methods = {
        "no clipping": sgd,
        "clip_by_global_norm(1.0)": lambda: optax.chain(oc.clip_by_global_norm(1.0), sgd()),
        "autoclip(10)": lambda: optax.chain(oc.autoclip(10.0), sgd()),
        "autoclip(10, max_norm=1.0)": lambda: optax.chain(
            oc.autoclip(10.0, max_norm=1.0), sgd()
        ),
        "zclip(max_norm=None)": lambda: optax.chain(oc.zclip(max_norm=None), sgd()),
        "zclip() (max_norm=1.0)": lambda: optax.chain(oc.zclip(), sgd()),
        "adagc()": lambda: optax.chain(oc.adagc(), sgd()),
        "skip_on_spike(sgd)": lambda: oc.skip_on_spike(sgd()),
    }
    if not full:
        methods = {k: methods[k] for k in ("no clipping", "zclip() (max_norm=1.0)")}
    results = {}
    for name, make in methods.items():
        tx = optax.with_extra_args_support(make())

        def step(carry, _, tx=tx):
            w, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(w)
            updates, opt_state = tx.update(grads, opt_state, w, loss=loss)
            return (w + updates, opt_state), loss

        w0 = jnp.zeros((x.shape[1], 1))
        run = jax.jit(lambda w0, tx=tx, step=step: jax.lax.scan(
            step, (w0, tx.init(w0)), None, length=steps)[1])
        losses = np.asarray(run(w0), np.float64)
        final = losses[-1]
        results[name] = {
            "final_train_loss": float(final),
            "diverged": bool(not np.isfinite(final) or final > 1e3 * losses[0]),
        }
    return results


def print_tables(spike_results: dict, explode_results: dict, seeds: int, steps: int) -> None:
    print(f"Injected spikes: {seeds} seeds x {steps} Adam steps, "
          f"{SPIKE_RATE:.0%} of batches with targets x{SPIKE_FACTOR:g}")
    print(f"{'method':<28} {'median final val':>17} {'worst excursion':>16} "
          f"{'after step ' + str(LATE):>15} {'diverged':>9}")
    for name, row in spike_results.items():
        print(f"{name:<28} {row['median_final_val_loss']:>17.4f} "
              f"{row['worst_excursion']:>15.1f}x {row['worst_excursion_late']:>14.1f}x "
              f"{row['diverged']:>9d}")
    print()
    print("Exploding gradients: full-batch linear regression, SGD at 1.1x the stable rate")
    print(f"{'method':<28} {'final train loss':>17} {'diverged':>9}")
    for name, row in explode_results.items():
        print(f"{name:<28} {row['final_train_loss']:>17.4g} {str(row['diverged']):>9}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-test size")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or (2 if args.tiny else 5)
    steps = args.steps or (80 if args.tiny else 600)
    start = time.perf_counter()
    spike_results = spike_study(seeds, steps, batch=32, full=not args.tiny)
    explode_results = exploding_study(60 if args.tiny else 200, full=not args.tiny)
    print_tables(spike_results, explode_results, seeds, steps)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return {**spike_results, "exploding": explode_results}


if __name__ == "__main__":
    main()
