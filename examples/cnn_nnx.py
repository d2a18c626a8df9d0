"""Example 3: a CNN in Flax NNX, SGD with momentum 0.9 and ``clip_by_value(1.0)``.

The classic PyTorch loop, ``optim.SGD(lr, momentum=0.9)`` with
``nn.utils.clip_grad_value_(net.parameters(), clip_value=1.0)`` before
``optimizer.step()``, written with ``nnx.Optimizer``: the clipper is chained
ahead of SGD, ``optax.chain(optaxclip.clip_by_value(1.0), optax.sgd(lr,
momentum=0.9))``, so the momentum buffer only ever sees clipped gradients, as in
PyTorch. The data are scikit-learn's bundled 8x8 digits as 1-channel images (no
download), left as raw pixel values 0..16: unnormalised inputs, one of the
usual causes of large gradients. The network is two 3x3 conv +
average-pool blocks and a linear head.

Two runs, with and without the clipper, and the test accuracy of each.
``optaxclip.stats`` reads the clipper's state from ``optimizer.opt_state``
(unwrapped with ``nnx.as_pure``): the largest gradient entry before clipping,
and whether the step was clipped.

Run ``python examples/cnn_nnx.py`` (10 epochs), ``--full`` (30) or ``--tiny`` (3).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _common import format_table, parse_args, save_figure
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optaxclip as oc

SIZES = {"tiny": 3, "default": 10, "full": 30}  # epochs
BATCH_SIZE = 32
LEARNING_RATE = 0.05
RUNS = {
    "SGD(momentum=0.9)": None,
    "clip_by_value(1.0) + SGD(momentum=0.9)": lambda: oc.clip_by_value(1.0),
}


class CNN(nnx.Module):
    """conv3x3(16) -> relu -> avgpool2 -> conv3x3(32) -> relu -> avgpool2 -> linear(10)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(2 * 2 * 32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def load_data(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Digits as (N, 8, 8, 1) images of raw values 0..16, split 80/20 (stratified)."""
    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]
    return tuple(train_test_split(images, digits.target.astype(np.int32), test_size=0.2,
                                  random_state=seed, stratify=digits.target))


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> dict:
    """One step: gradients, clip + SGD through ``optimizer.update``, and the clip stats."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return {"loss": loss} | oc.stats(nnx.as_pure(optimizer.opt_state))


@nnx.jit
def accuracy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def make_tx(run: str) -> optax.GradientTransformation:
    """SGD with momentum 0.9, with the run's clipper chained ahead of it."""
    sgd = optax.sgd(LEARNING_RATE, momentum=0.9)
    make_clip = RUNS[run]
    return sgd if make_clip is None else optax.chain(make_clip(), sgd)


def train(run: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Trains one run; returns per-epoch loss and test accuracy and the clip statistics."""
    x_train, x_test, y_train, y_test = load_data(seed)
    model = CNN(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, make_tx(run), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(x_train) // BATCH_SIZE
    epoch_loss, test_accuracy, max_entry, clipped = [], [], [], []
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        metrics = []
        for step in range(steps_per_epoch):
            batch = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            metrics.append(train_step(model, optimizer, x_train[batch], y_train[batch]))
        metrics = jax.device_get(metrics)
        epoch_loss.append(float(np.mean([m["loss"] for m in metrics])))
        max_entry += [float(m["clip_by_value/norm"]) for m in metrics if len(m) > 1]
        clipped += [bool(m["clip_by_value/clipped"]) for m in metrics if len(m) > 1]
        test_accuracy.append(float(accuracy(model, x_test, y_test)))
    return {
        "train_loss": epoch_loss,
        "test_accuracy": test_accuracy,
        "final_train_loss": epoch_loss[-1],
        "final_test_accuracy": test_accuracy[-1],
        "max_gradient_entry": max(max_entry) if max_entry else None,
        "clipped_fraction": float(np.mean(clipped)) if clipped else 0.0,
    }


def plot(results: dict[str, dict[str, Any]], out_dir: Any) -> Any:
    """Training loss and test accuracy per epoch; saves a PNG and returns its path."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in results.items():
        epochs = np.arange(1, len(run["train_loss"]) + 1)
        left.plot(epochs, run["train_loss"], marker=".", label=name)
        right.plot(epochs, run["test_accuracy"], marker=".", label=name)
    left.set(title=f"digits CNN, SGD({LEARNING_RATE:g}, momentum 0.9): training loss",
             xlabel="epoch", ylabel="cross-entropy", yscale="log")
    right.set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return save_figure(fig, out_dir, "cnn_nnx.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example; prints the table and the plot path; returns the results."""
    args = parse_args(__doc__.splitlines()[0], argv)
    start = time.perf_counter()
    epochs = SIZES[args.size]
    print(f"devices: {jax.devices()}  size: {args.size}  epochs: {epochs}")
    results = {run: train(run, epochs, args.seed) for run in RUNS}
    print(format_table(
        ["run", "final train loss", "test accuracy", "largest grad entry", "clipped steps"],
        [[name, r["final_train_loss"], r["final_test_accuracy"],
          "-" if r["max_gradient_entry"] is None else r["max_gradient_entry"],
          f"{100 * r['clipped_fraction']:.0f}%"] for name, r in results.items()],
    ))
    path = plot(results, args.out)
    print(f"plot: {path}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return {"size": args.size, "runs": results, "plot": path}


if __name__ == "__main__":
    main(sys.argv[1:])
