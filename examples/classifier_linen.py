"""Example 2: a digits classifier in Flax linen with ``TrainState``, clipped two ways.

The classic Keras MNIST classifier with a clipped Adam, on scikit-learn's
bundled 8x8 digits (no download): Dense(128, relu) -> Dense(10) on the 64
pixels, softmax cross-entropy, batches of 32. Three runs: Adam(1e-3) alone,
``clip_by_value(0.5)`` ahead of it (Keras ``Adam(clipvalue=0.5)``), and
``clip_by_global_norm(1.0)`` ahead of it (Keras ``Adam(global_clipnorm=1.0)``).
``TrainState.apply_gradients`` calls ``tx.update``, so the clipper needs no
special handling; ``optaxclip.stats`` reads what it did from ``state.opt_state``.

On this data no gradient entry reaches 0.5, so ``clip_by_value(0.5)`` never
triggers: it passes the gradients through bit-identical (the
identity-below-threshold contract), and its run matches the unclipped one to
float32 rounding (XLA compiles the two programs differently). The "clipped
steps" column shows it.
``clip_by_global_norm(1.0)`` clips the early, steep steps and then lets go.

Run ``python examples/classifier_linen.py`` (20 epochs), ``--full`` (50 epochs)
or ``--tiny`` (5 epochs).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _common import format_table, parse_args, save_figure
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optaxclip as oc

SIZES = {"tiny": 5, "default": 20, "full": 50}  # epochs
BATCH_SIZE = 32
RUNS = {
    "no clipping": None,
    "clip_by_value(0.5)": lambda: oc.clip_by_value(0.5),
    "clip_by_global_norm(1.0)": lambda: oc.clip_by_global_norm(1.0),
}


class Classifier(nn.Module):
    """Dense(128, relu) -> Dense(10) logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def load_data(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Digits scaled to [0, 1], split 80/20 (stratified): ``(x_tr, x_te, y_tr, y_te)``."""
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    return tuple(train_test_split(features, digits.target.astype(np.int32), test_size=0.2,
                                  random_state=seed, stratify=digits.target))


def make_tx(run: str) -> optax.GradientTransformation:
    """Adam(1e-3) with the run's clipper chained ahead of it."""
    make_clip = RUNS[run]
    adam = optax.adam(1e-3)
    return adam if make_clip is None else optax.chain(make_clip(), adam)


def train_step(state: train_state.TrainState, batch: tuple) -> tuple:
    """One step: loss, gradients, clip + Adam (inside ``apply_gradients``), clip stats."""
    x, y = batch

    def loss_fn(params: Any) -> jax.Array:
        logits = state.apply_fn(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss} | oc.stats(state.opt_state)


@jax.jit
def train_epoch(state: train_state.TrainState, x: jax.Array, y: jax.Array,
                key: jax.Array) -> tuple:
    """One shuffled epoch, compiled as a single ``lax.scan`` over the batches."""
    steps = x.shape[0] // BATCH_SIZE
    order = jax.random.permutation(key, x.shape[0])[: steps * BATCH_SIZE]
    batches = (x[order].reshape(steps, BATCH_SIZE, -1), y[order].reshape(steps, BATCH_SIZE))
    return jax.lax.scan(train_step, state, batches)


@jax.jit
def accuracy(state: train_state.TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(state.apply_fn(state.params, x), -1) == y)


def train(run: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Trains one run; returns per-epoch loss and test accuracy, and the clipped fraction."""
    x_train, x_test, y_train, y_test = load_data(seed)
    model = Classifier()
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(init_key, x_train[:1]), tx=make_tx(run)
    )
    epoch_loss, test_accuracy, clipped = [], [], []
    for key in jax.random.split(shuffle_key, epochs):
        state, metrics = train_epoch(state, x_train, y_train, key)
        epoch_loss.append(float(np.mean(metrics["loss"])))
        test_accuracy.append(float(accuracy(state, x_test, y_test)))
        clipped += [np.asarray(v) for k, v in metrics.items() if k.endswith("/clipped")]
    return {
        "train_loss": epoch_loss,
        "test_accuracy": test_accuracy,
        "final_train_loss": epoch_loss[-1],
        "final_test_accuracy": test_accuracy[-1],
        "clipped_fraction": float(np.mean(np.concatenate(clipped))) if clipped else 0.0,
        "params": state.params,
    }


def plot(results: dict[str, dict[str, Any]], out_dir: Any) -> Any:
    """Training loss and test accuracy per epoch; saves a PNG and returns its path."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in results.items():
        epochs = np.arange(1, len(run["train_loss"]) + 1)
        left.plot(epochs, run["train_loss"], label=name)
        right.plot(epochs, run["test_accuracy"], label=name)
    left.set(title="digits, Adam(1e-3): training loss", xlabel="epoch",
             ylabel="cross-entropy", yscale="log")
    right.set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return save_figure(fig, out_dir, "classifier_linen.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example; prints the table and the plot path; returns the results."""
    args = parse_args(__doc__.splitlines()[0], argv)
    start = time.perf_counter()
    epochs = SIZES[args.size]
    print(f"devices: {jax.devices()}  size: {args.size}  epochs: {epochs}")
    results = {run: train(run, epochs, args.seed) for run in RUNS}
    print(format_table(
        ["run", "final train loss", "test accuracy", "clipped steps"],
        [[name, r["final_train_loss"], r["final_test_accuracy"],
          f"{100 * r['clipped_fraction']:.0f}%"] for name, r in results.items()],
    ))
    path = plot(results, args.out)
    print(f"plot: {path}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return {"size": args.size, "runs": results, "plot": path}


if __name__ == "__main__":
    main(sys.argv[1:])
