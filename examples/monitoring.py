"""Example 5: catching exploding gradients: per-step logs and a spike alarm.

The usual advice, "log the loss, and set a trigger that tells you about sudden
jumps", for a jitted optax loop. Every step logs the loss, the pre-clip
gradient norm and the clipped fraction (read from ``optaxclip.stats``, never
recomputed for the clipper) to

* TensorBoard event files, with ``tensorboardX`` (``tensorboard --logdir OUT/tensorboard``);
* a CSV file, ``OUT/monitoring.csv``.

``SpikeDetector`` is the trigger: it keeps a running window of each watched
metric and raises an alert when a value is not finite or exceeds ``factor``
times the window's median. The run trains an MLP regressor with
``clip_by_norm(1.0)`` (Keras ``clipnorm``: per variable, so ``clipped_fraction``
is the share of variables clipped) ahead of Adam, and injects one corrupted
batch (targets multiplied by 1000) at a known step. The alarm fires at that
step, not before; clipping keeps the corrupted batch's update bounded, and
training carries on.

Run ``python examples/monitoring.py`` (600 steps, spike at 400), ``--full``
(3000 steps, spike at 2000) or ``--tiny`` (120 steps, spike at 80).
"""

from __future__ import annotations

import collections
import csv
import math
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _common import finite_or_nan, format_table, parse_args, save_figure
from sklearn.datasets import make_regression
from tensorboardX import SummaryWriter

import optaxclip as oc

SIZES = {
    "tiny": {"steps": 120, "spike_step": 80},
    "default": {"steps": 600, "spike_step": 400},
    "full": {"steps": 3000, "spike_step": 2000},
}
BATCH_SIZE = 32
SPIKE_FACTOR = 1000.0  # the corrupted batch's targets are multiplied by this
CSV_COLUMNS = ("step", "loss", "pre_clip_norm", "max_leaf_norm", "clipped_fraction", "alert")
WATCHED = ("loss", "pre_clip_norm")


class Alert(NamedTuple):
    """One trigger: at ``step``, ``metric`` was ``value``, against a running median."""

    step: int
    metric: str
    value: float
    median: float

    def __str__(self) -> str:
        ratio = self.value / self.median if self.median > 0 else math.inf
        return (f"step {self.step}: {self.metric} = {self.value:.4g}, "
                f"{ratio:.3g}x the running median {self.median:.4g}")


class SpikeDetector:
    """Alerts when a metric jumps above ``factor`` x its running median, or is not finite.

    Args:
      factor: how many times the median counts as a jump.
      window: how many recent values the median is taken over.
      min_history: values seen before any alert can fire (the warm-up).
      metrics: the names watched in the ``metrics`` dicts passed to ``update``.
    """

    def __init__(self, factor: float = 10.0, window: int = 50, min_history: int = 20,
                 metrics: Iterable[str] = WATCHED):
        if factor <= 1:
            raise ValueError(f"factor must be > 1 to detect a jump; got {factor!r}.")
        if not 1 <= min_history <= window:
            raise ValueError(f"need 1 <= min_history <= window; got {min_history}, {window}.")
        self.factor, self.min_history = factor, min_history
        self.history = {name: collections.deque(maxlen=window) for name in metrics}

    def update(self, step: int, metrics: dict[str, float]) -> list[Alert]:
        """Checks this step's values against the history, then adds them to it."""
        alerts = []
        for name, history in self.history.items():
            value = float(metrics[name])
            if len(history) >= self.min_history:
                median = float(np.median(history))
                if not math.isfinite(value) or value > self.factor * median:
                    alerts.append(Alert(step, name, value, median))
            if math.isfinite(value):
                history.append(value)
        return alerts


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(1)(nn.relu(nn.Dense(35)(x)))[:, 0]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation) -> Any:
    """A jitted step returning the loss, the pre-clip global norm and the clip stats."""

    @jax.jit
    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        def loss_fn(params: Any) -> jax.Array:
            return jnp.mean((model.apply(params, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "pre_clip_norm": oc.global_norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics | oc.stats(opt_state)

    return train_step


def run(steps: int, spike_step: int | None, out_dir: Any, seed: int = 0,
        detector: SpikeDetector | None = None) -> dict[str, Any]:
    """Trains with per-step logging; injects a corrupted batch at ``spike_step``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features, targets = make_regression(n_samples=4000, n_features=30, noise=10.0,
                                        random_state=65)
    features = features.astype(np.float32)
    targets = (targets / targets.std()).astype(np.float32)
    model = MLP()
    params = model.init(jax.random.key(seed), features[:1])
    tx = optax.chain(oc.clip_by_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    train_step = make_train_step(model, tx)
    detector = detector or SpikeDetector()
    rng = np.random.default_rng(seed)

    csv_path = out_dir / "monitoring.csv"
    tb_dir = out_dir / "tensorboard"
    rows, alerts = [], []
    with SummaryWriter(logdir=str(tb_dir)) as writer, open(csv_path, "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        table.writeheader()
        for step in range(1, steps + 1):
            batch = rng.integers(0, len(features), BATCH_SIZE)
            x, y = features[batch], targets[batch]
            if step == spike_step:
                y = y * SPIKE_FACTOR  # a corrupted batch: the kind of input that spikes
            params, opt_state, metrics = train_step(params, opt_state, x, y)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row = {
                "step": step,
                "loss": metrics["loss"],
                "pre_clip_norm": metrics["pre_clip_norm"],
                "max_leaf_norm": metrics["clip_by_norm/norm"],
                "clipped_fraction": metrics["clip_by_norm/clipped_fraction"],
            }
            new_alerts = detector.update(step, row)
            row["alert"] = ";".join(a.metric for a in new_alerts)
            for alert in new_alerts:
                print(f"ALERT {alert}")
                writer.add_text("alerts", str(alert), step)
            for name in ("loss", "pre_clip_norm", "clipped_fraction"):
                writer.add_scalar(f"train/{name}", row[name], step)
            for name, value in metrics.items():
                if name.startswith("clip_by_norm/"):
                    writer.add_scalar(name, value, step)
            table.writerow(row)
            rows.append(row)
            alerts += new_alerts
    event_files = sorted(str(p) for p in tb_dir.glob("events.out.tfevents.*"))
    return {"rows": rows, "alerts": alerts, "csv": csv_path, "tensorboard_dir": tb_dir,
            "event_files": event_files, "spike_step": spike_step}


def plot(result: dict[str, Any], out_dir: Any) -> Any:
    """Loss, pre-clip norm and clipped fraction per step, with the alerts marked."""
    rows = result["rows"]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    panels = (("loss", "MSE (batch)", "log"), ("pre_clip_norm", "pre-clip global norm", "log"),
              ("clipped_fraction", "clipped fraction", "linear"))
    for axis, (name, label, scale) in zip(axes, panels):
        values = [r[name] for r in rows]
        axis.plot(steps, finite_or_nan(values) if scale == "log" else values, linewidth=0.8)
        axis.set(ylabel=label, yscale=scale)
        if result["spike_step"] is not None:
            axis.axvline(result["spike_step"], color="gray", linestyle=":",
                         label="corrupted batch")
        hits = [a for a in result["alerts"] if a.metric == name]
        if hits:
            axis.plot([a.step for a in hits], [a.value for a in hits], "rv", label="alert")
        axis.legend(fontsize=8, loc="upper left")
    axes[0].set_title("Adam with clip_by_norm(1.0): per-step monitoring")
    axes[-1].set_xlabel("step")
    return save_figure(fig, out_dir, "monitoring.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example; prints the alerts, a summary table and the paths; returns results."""
    args = parse_args(__doc__.splitlines()[0], argv)
    start = time.perf_counter()
    config = SIZES[args.size]
    print(f"devices: {jax.devices()}  size: {args.size}  steps: {config['steps']}  "
          f"corrupted batch at step {config['spike_step']}")
    result = run(config["steps"], config["spike_step"], args.out, args.seed)
    rows, spike = result["rows"], config["spike_step"]
    before = rows[spike - 11:spike - 1]
    after = rows[-10:]
    print(format_table(
        ["steps", "mean loss", "mean pre-clip norm", "mean clipped fraction"],
        [[label, np.mean([r["loss"] for r in part]),
          np.mean([r["pre_clip_norm"] for r in part]),
          np.mean([r["clipped_fraction"] for r in part])]
         for label, part in ((f"{spike - 10}-{spike - 1} (before)", before),
                             (f"{spike} (corrupted batch)", [rows[spike - 1]]),
                             (f"{len(rows) - 9}-{len(rows)} (end)", after))],
    ))
    print(f"alerts: {len(result['alerts'])}, first at step "
          f"{result['alerts'][0].step if result['alerts'] else '-'}")
    print(f"csv: {result['csv']}")
    print(f"tensorboard: {result['tensorboard_dir']}")
    path = plot(result, args.out)
    print(f"plot: {path}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return {"size": args.size, **result, "plot": path}


if __name__ == "__main__":
    main(sys.argv[1:])
