"""Example 1: gradient clipping on an MLP regression, and exploding gradients.

The classic Keras experiment, in Flax: ``make_regression(n_samples=10000,
n_features=30, random_state=65)``, an 80/20 split, an MLP Dense(35, relu) ->
Dense(1), mean squared error, 30 epochs of batches of 32 (the Keras defaults).

Part 1, "adam": Adam(1e-3) with no clipping,
``clip_by_global_norm(1.0)`` (Keras ``global_clipnorm``), ``clip_by_norm(1.0)``
(Keras ``clipnorm``: per variable) and ``clip_by_value(3.0)`` (Keras
``clipvalue``), each chained ahead of Adam.

Part 2, "exploding": features and targets scaled up by ``SCALE = 10`` (the loss
by 100) and trained with SGD(0.01, momentum 0.9), with the same clippers.
Without clipping the loss overflows to inf and the weights turn NaN within the
first epoch. Every clipped run stays finite. The two norm clippers converge;
``clip_by_value(3.0)`` does not: its validation loss stalls hundreds of times
higher and oscillates (1.8e4 against 35 at the default size).

Why the value clip stalls: at this learning rate on the scaled data, plain SGD
is unstable (each step overshoots by more than the last). A norm clip scales the
whole gradient down whenever its norm is above the threshold, so the effective
learning rate becomes ``learning_rate * threshold / norm`` and shrinks exactly
when the oscillation grows. A value clip caps only the entries above 3.0; the
other entries keep the full, unstable step, so the weights keep oscillating until
their gradient entries reach the cap, and the loss stays at the level where they
are about that size. In a 30-epoch run, 95% of the gradient entries were capped
in the first 10 epochs and 11% in the last 10, while the validation loss went up
and down between about 2e3 and 5e4 from epoch to epoch. A smaller cap lowers
the plateau without removing it (0.1 ends near 200, 1.0 near 1.8e3). The
threshold is kept at 3.0, the one of part 1, so the two parts compare the same
clippers.

Why part 2 uses SGD: Adam divides each update by the root mean square of past
gradients, so its step is about ``learning_rate`` however large the gradient is.
Scaling the data up 10x makes Adam slow (its steps are too small for weights
that must grow) but not unstable, with or without clipping, so Adam does not
show the exploding-gradient feedback. SGD's step is proportional to the
gradient, so one huge gradient throws the weights far enough that the next one
is larger still. That feedback is the exploding-gradient problem, and clipping
cuts it: with ``clip_by_global_norm(1.0)`` no SGD step is longer than
``learning_rate * 1`` (times the momentum gain, at most 10 for momentum 0.9).
``SCALE = 10`` is not needed for the divergence (the unscaled data already
diverge with these SGD settings); it makes the gradients about 100 times larger
and the point plainer.

Run ``python examples/exploding_regression.py`` (30 epochs, one seed, under a minute),
``--full`` (30 epochs, 5 seeds, mean over seeds) or ``--tiny`` (10 epochs).
"""

from __future__ import annotations

import math
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
from _common import finite_or_nan, format_table, parse_args, save_figure
from sklearn.datasets import make_regression
from sklearn.model_selection import train_test_split

import optaxclip as oc

SCALE = 10.0
SIZES = {
    "tiny": {"epochs": 10, "seeds": (0,)},
    "default": {"epochs": 30, "seeds": (0,)},
    "full": {"epochs": 30, "seeds": (0, 1, 2, 3, 4)},
}
BATCH_SIZE = 32
CLIPPERS = {
    "no clipping": None,
    "clip_by_global_norm(1.0)": lambda: oc.clip_by_global_norm(1.0),
    "clip_by_norm(1.0)": lambda: oc.clip_by_norm(1.0),
    "clip_by_value(3.0)": lambda: oc.clip_by_value(3.0),
}
EXPERIMENTS = {
    # name: (data scale, optimizer factory)
    "adam": (1.0, lambda: optax.adam(1e-3)),
    "exploding": (SCALE, lambda: optax.sgd(0.01, momentum=0.9)),
}


class MLP(nn.Module):
    """Dense(35, relu) -> Dense(1), with Keras' default initialisers."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.glorot_uniform()
        x = nn.relu(nn.Dense(35, kernel_init=init)(x))
        return nn.Dense(1, kernel_init=init)(x)[:, 0]


def load_data(seed: int = 0) -> tuple[np.ndarray, ...]:
    """The experiment's data, split 80/20: ``(x_train, x_val, y_train, y_val)``."""
    features, targets = make_regression(n_samples=10000, n_features=30, random_state=65)
    return tuple(
        np.asarray(a, np.float32)
        for a in train_test_split(features, targets, test_size=0.2, random_state=seed)
    )


def make_tx(experiment: str, clipper: str) -> optax.GradientTransformation:
    """The optimizer of ``experiment`` with ``clipper`` chained ahead of it."""
    optimizer = EXPERIMENTS[experiment][1]()
    make_clip = CLIPPERS[clipper]
    return optimizer if make_clip is None else optax.chain(make_clip(), optimizer)


def train(
    tx: optax.GradientTransformation,
    data: tuple[np.ndarray, ...],
    epochs: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Trains the MLP for ``epochs`` shuffled epochs; returns per-epoch and per-step traces."""
    data = tuple(jnp.asarray(a) for a in data)
    x_train = data[0]
    model = MLP()
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, x_train[:1])
    opt_state = tx.init(params)
    steps_per_epoch = x_train.shape[0] // BATCH_SIZE

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def train_step(carry: tuple, batch: tuple) -> tuple:
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        clip_stats = oc.stats(opt_state)
        clipped = next(
            (v for k, v in clip_stats.items() if k.endswith("/clipped")), jnp.bool_(False)
        )
        trace = (loss, oc.global_norm(grads), clipped)
        return (optax.apply_updates(params, updates), opt_state), trace

    @jax.jit
    def run_epoch(params: Any, opt_state: Any, key: jax.Array, data: tuple) -> tuple:
        # the data are arguments, not closed-over constants, so XLA does not fold them
        x_train, x_val, y_train, y_val = data
        order = jax.random.permutation(key, x_train.shape[0])[: steps_per_epoch * BATCH_SIZE]
        batches = (
            x_train[order].reshape(steps_per_epoch, BATCH_SIZE, -1),
            y_train[order].reshape(steps_per_epoch, BATCH_SIZE),
        )
        (params, opt_state), trace = jax.lax.scan(train_step, (params, opt_state), batches)
        return params, opt_state, trace, loss_fn(params, x_val, y_val)

    initial_loss = float(jax.jit(loss_fn)(params, x_train, data[2]))
    step_loss, step_norm, step_clipped, train_loss, val_loss = [], [], [], [], []
    for key in jax.random.split(shuffle_key, epochs):
        params, opt_state, (losses, norms, clipped), val = run_epoch(
            params, opt_state, key, data
        )
        losses = np.asarray(losses, np.float64)
        step_loss += losses.tolist()
        step_norm += np.asarray(norms, np.float64).tolist()
        step_clipped += np.asarray(clipped, bool).tolist()
        train_loss.append(float(losses.mean()))  # as Keras reports: the epoch's mean
        val_loss.append(float(val))
    nonfinite = [i for i, v in enumerate(step_loss) if not math.isfinite(v)]
    return {
        "initial_loss": initial_loss,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "step_loss": step_loss,
        "pre_clip_norm": step_norm,
        "clipped_fraction": float(np.mean(step_clipped)),
        "first_nonfinite_step": nonfinite[0] + 1 if nonfinite else None,  # 1-based
        "final_train_loss": train_loss[-1],
        "final_val_loss": val_loss[-1],
    }


def progress_line(index: int, total: int, name: str, run: dict[str, Any], seconds: float) -> str:
    """One line about a finished run: its final losses, or where it went non-finite."""
    first = run["first_nonfinite_step"]
    outcome = (f"non-finite from step {first}" if first is not None
               else f"final val loss {run['final_val_loss']:.4g}")
    return (f"[{index}/{total}] {name:36s} {outcome:28s} "
            f"clipped {100 * run['clipped_fraction']:3.0f}% of steps  ({seconds:.1f} s)")


def run_all(
    size: str = "default", seed: int = 0, report: Any = None
) -> dict[str, dict[str, Any]]:
    """Every (experiment, clipper) pair at ``size``; keys are ``"<experiment>: <clipper>"``.

    ``report(line)``, when given, is called with one line per run as it finishes.
    """
    config = SIZES[size]
    seeds = [seed + s for s in config["seeds"]]
    total = len(EXPERIMENTS) * len(CLIPPERS)
    results = {}
    for experiment, (scale, _) in EXPERIMENTS.items():
        for clipper in CLIPPERS:
            start = time.perf_counter()
            per_seed = []
            for run_seed in seeds:
                x_train, x_val, y_train, y_val = load_data(run_seed)
                data = (x_train * scale, x_val * scale, y_train * scale, y_val * scale)
                per_seed.append(train(make_tx(experiment, clipper), data, config["epochs"],
                                      seed=run_seed))
            run = dict(per_seed[0])
            for field in ("final_train_loss", "final_val_loss", "clipped_fraction"):
                run[field] = float(np.mean([r[field] for r in per_seed]))
            run["diverged_seeds"] = sum(r["first_nonfinite_step"] is not None for r in per_seed)
            run.update(experiment=experiment, clipper=clipper, scale=scale, seeds=len(seeds))
            name = f"{experiment}: {clipper}"
            results[name] = run
            if report is not None:
                report(progress_line(len(results), total, name, run,
                                     time.perf_counter() - start))
    return results


# A finite run whose final validation loss is more than this many times the best run's
# of the same experiment has not converged with the others.
STALL_FACTOR = 10.0


def is_finite_run(run: dict[str, Any]) -> bool:
    """True when no seed of the run went non-finite."""
    return not run["diverged_seeds"] and math.isfinite(run["final_val_loss"])


def conclusion(results: dict[str, dict[str, Any]]) -> list[str]:
    """A few lines saying what the runs show, every number and verdict from ``results``."""
    lines = []
    for experiment, (scale, _) in EXPERIMENTS.items():
        runs = [r for r in results.values() if r["experiment"] == experiment]
        optimizer = "Adam(1e-3)" if experiment == "adam" else "SGD(0.01, momentum 0.9)"
        diverged = [r for r in runs if not is_finite_run(r)]
        finite = sorted((r for r in runs if is_finite_run(r)), key=lambda r: r["final_val_loss"])
        parts = []
        for run in diverged:
            first = run["first_nonfinite_step"]
            where = f" from step {first}" if first is not None else ""
            parts.append(f"{run['clipper']} goes non-finite{where}")
        if finite:
            best = finite[0]["final_val_loss"]
            ranked = [f"{r['clipper']} {r['final_val_loss']:.3g}"
                      + ("" if r is finite[0] else f" ({r['final_val_loss'] / best:.3g}x)")
                      for r in finite]
            parts.append("final val loss, best first: " + ", ".join(ranked))
        lines.append(f"{optimizer} on the data x{scale:g}: " + "; ".join(parts) + ".")
        clipped_finite = [r for r in runs if r["clipper"] != "no clipping" and is_finite_run(r)]
        if diverged and len(clipped_finite) == len(runs) - 1:
            lines.append("  Every clipped run stays finite.")
        if finite:
            for run in finite:
                if run["clipper"].startswith("clip_by_value") and (
                        run["final_val_loss"] > STALL_FACTOR * finite[0]["final_val_loss"]):
                    lines.append(
                        f"  {run['clipper']} stays finite but does not converge with the "
                        "others: it caps only the largest gradient entries, the others keep "
                        "a step that is unstable at this learning rate, and the weights "
                        "keep oscillating (why, with measurements: the docstring of "
                        "examples/exploding_regression.py).")
    return lines


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a text table: one row per run."""
    header = ["run", "data scale", "initial loss", "final train loss", "final val loss",
              "clipped steps", "first non-finite step"]
    rows = []
    for name, run in results.items():
        first = run["first_nonfinite_step"]
        rows.append([name, run["scale"], run["initial_loss"], run["final_train_loss"],
                     run["final_val_loss"], f"{100 * run['clipped_fraction']:.0f}%",
                     "-" if first is None else str(first)])
    return format_table(header, rows)


def plot(results: dict[str, dict[str, Any]], out_dir: Any, name: str = "exploding_regression.png",
         figsize: tuple[float, float] = (11, 4)) -> Any:
    """Validation loss per epoch (Adam) and training loss per step (exploding); saves a PNG."""
    fig, (left, right) = plt.subplots(1, 2, figsize=figsize)
    for run in results.values():
        if run["experiment"] == "adam":
            epochs = np.arange(1, len(run["val_loss"]) + 1)
            left.plot(epochs, finite_or_nan(run["val_loss"]), label=run["clipper"])
        else:
            steps = np.arange(1, len(run["step_loss"]) + 1)
            (line,) = right.plot(steps, finite_or_nan(run["step_loss"]), label=run["clipper"],
                                 linewidth=0.8)
            first = run["first_nonfinite_step"]
            if first is not None:
                # mark the last finite loss; everything after it is inf or NaN
                last_finite = run["step_loss"][first - 2] if first > 1 else run["initial_loss"]
                mark = max(first - 1, 1)
                right.plot([mark], [last_finite], "x", color=line.get_color(), markersize=10)
                right.annotate(f"inf/NaN from step {first}", (mark, last_finite),
                               textcoords="offset points", xytext=(8, -4), fontsize=8)
    left.set(title="Adam(1e-3): validation loss", xlabel="epoch", ylabel="MSE", yscale="log")
    right.set(title=f"SGD(0.01, momentum 0.9), data x{SCALE:g}: training loss",
              xlabel="step", ylabel="MSE (batch)", xscale="log", yscale="log")
    for axis in (left, right):
        axis.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example; prints the table and the plot path; returns the results."""
    args = parse_args(__doc__.splitlines()[0], argv)
    start = time.perf_counter()
    config = SIZES[args.size]
    print(f"devices: {jax.devices()}  size: {args.size}  epochs: {config['epochs']}  "
          f"seeds: {len(config['seeds'])}")
    print(f"training {len(EXPERIMENTS) * len(CLIPPERS)} runs: {len(CLIPPERS)} clipper settings "
          f"x 2 experiments (Adam on the data, SGD with momentum on the data x{SCALE:g})",
          flush=True)
    results = run_all(args.size, args.seed, report=lambda line: print(line, flush=True))
    print()
    print(results_table(results))
    seeds = len(SIZES[args.size]["seeds"])
    if seeds > 1:
        diverged = {k: f"{r['diverged_seeds']}/{seeds}" for k, r in results.items()}
        print(f"losses and clipped steps are means over {seeds} seeds; the initial loss, "
              f"the first non-finite step and the curves are seed {args.seed}'s.")
        print("seeds that diverged: " + ", ".join(f"{k} {v}" for k, v in diverged.items()))
    path = plot(results, args.out)
    print(f"plot: {path}")
    print()
    print("conclusion")
    print("\n".join(conclusion(results)))
    print(f"time: {time.perf_counter() - start:.1f} s")
    return {"size": args.size, "runs": results, "plot": path}


if __name__ == "__main__":
    main(sys.argv[1:])
