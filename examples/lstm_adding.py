"""Example 4: an LSTM on the adding problem, where unclipped SGD explodes.

The adding problem (Hochreiter and Schmidhuber 1997; Pascanu, Mikolov and
Bengio 2013): each input is a sequence of ``T`` pairs ``(value, marker)`` with
values uniform in [0, 1] and exactly two markers, one in each half. The target
is the sum of the two marked values. Predicting the mean (1.0) scores an MSE of
1/6 ~= 0.167; anything well below that means the network carries information
across the sequence.

Model: a Flax linen LSTM with 32 units (forget-gate bias 1, as Keras' default)
read out by a Dense layer at the last step; fresh batches of 64 every step;
SGD(0.5, momentum 0.9).
Runs:

* ``no clipping``: the chain starts with ``clip_by_global_norm(inf)``, which
  passes the gradients through unchanged (a threshold of inf is the identity)
  but records the pre-clip gradient norm in its state, so ``optaxclip.stats``
  gives the trace for this run too. Within about a hundred steps the gradient
  norm spikes, the weights jump, and the loss overflows to NaN.
* ``clip_by_global_norm(1.0)``: the same optimizer and learning rate. Clipping
  bounds every step, and the LSTM solves the task.
* ``no clipping, lr 0.05``: the usual workaround, a 10x smaller learning rate.
  It does not explode, but it stalls near the 0.167 baseline in this budget.

The plot shows the training loss and the pre-clip gradient norm per step, read
from ``optaxclip.stats``.

Run ``python examples/lstm_adding.py`` (T=50, 1000 steps), ``--full`` (T=100,
3000 steps) or ``--tiny`` (T=20, 300 steps).
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

import optaxclip as oc

SIZES = {
    "tiny": {"length": 20, "steps": 300},
    "default": {"length": 50, "steps": 1000},
    "full": {"length": 100, "steps": 3000},
}
HIDDEN = 32
BATCH_SIZE = 64
CHUNK = 50  # steps per compiled lax.scan
BASELINE_MSE = 1.0 / 6.0  # predicting the mean target, 1.0
RUNS = {
    # name: (max global norm, learning rate)
    "no clipping": (math.inf, 0.5),
    "clip_by_global_norm(1.0)": (1.0, 0.5),
    "no clipping, lr 0.05": (math.inf, 0.05),
}


def adding_batch(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """``batch`` adding-problem sequences of ``length``: inputs (B, T, 2), targets (B,)."""
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (batch, length))
    half = length // 2
    first = jax.random.randint(first_key, (batch,), 0, half)
    second = jax.random.randint(second_key, (batch,), half, length)
    rows = jnp.arange(batch)
    markers = jnp.zeros((batch, length)).at[rows, first].set(1.0).at[rows, second].set(1.0)
    return jnp.stack([values, markers], axis=-1), jnp.sum(values * markers, axis=1)


def recurrent_init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    """One orthogonal (hidden x hidden) block per gate, side by side."""
    hidden = shape[0]
    blocks = [jax.random.orthogonal(k, hidden, dtype=dtype) for k in jax.random.split(key, 4)]
    return jnp.concatenate(blocks, axis=1)


def gate_bias_init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    """Zero biases, except 1 for the forget gate (Keras' ``unit_forget_bias=True``)."""
    del key
    hidden = shape[0] // 4
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(1.0)


class LSTMRegressor(nn.Module):
    """An LSTM (gates i, f, g, o) over the sequence; a Dense layer reads the last state.

    Written out with ``lax.scan`` so the initialisation is explicit: LeCun-normal
    input kernel, orthogonal recurrent blocks, forget-gate bias 1.
    """

    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.hidden
        w_in = self.param("w_in", nn.initializers.lecun_normal(), (x.shape[-1], 4 * hidden))
        w_rec = self.param("w_rec", recurrent_init, (hidden, 4 * hidden))
        bias = self.param("bias", gate_bias_init, (4 * hidden,))

        def step(carry: tuple, x_t: jax.Array) -> tuple:
            h, c = carry
            i, f, g, o = jnp.split(x_t @ w_in + h @ w_rec + bias, 4, axis=-1)
            c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
            h = nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), None

        zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
        (h, _), _ = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
        return nn.Dense(1)(h)[:, 0]


def train(max_norm: float, learning_rate: float, length: int, steps: int,
          seed: int = 0) -> dict[str, Any]:
    """Trains one run; returns per-step loss and pre-clip norm, and the final eval MSE."""
    model = LSTMRegressor()
    init_key, data_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    params = model.init(init_key, jnp.zeros((1, length, 2)))
    tx = optax.chain(oc.clip_by_global_norm(max_norm), optax.sgd(learning_rate, momentum=0.9))
    opt_state = tx.init(params)
    x_eval, y_eval = adding_batch(eval_key, 1000, length)

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def train_step(carry: tuple, key: jax.Array) -> tuple:
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *adding_batch(key, BATCH_SIZE, length))
        updates, opt_state = tx.update(grads, opt_state, params)
        clip_stats = oc.stats(opt_state)
        trace = (loss, clip_stats["clip_by_global_norm/norm"],
                 clip_stats["clip_by_global_norm/clipped"])
        return (optax.apply_updates(params, updates), opt_state), trace

    @jax.jit
    def run_chunk(params: Any, opt_state: Any, key: jax.Array) -> tuple:
        keys = jax.random.split(key, CHUNK)
        (params, opt_state), trace = jax.lax.scan(train_step, (params, opt_state), keys)
        return params, opt_state, trace

    losses, norms, clipped = [], [], []
    for key in jax.random.split(data_key, max(1, steps // CHUNK)):
        params, opt_state, (loss, norm, was_clipped) = run_chunk(params, opt_state, key)
        losses += np.asarray(loss, np.float64).tolist()
        norms += np.asarray(norm, np.float64).tolist()
        clipped += np.asarray(was_clipped, bool).tolist()
    nonfinite = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "loss": losses,
        "pre_clip_norm": norms,
        "eval_mse": float(jax.jit(loss_fn)(params, x_eval, y_eval)),
        "final_train_loss": float(np.mean(tail)),  # mean of the last 10% of steps
        # the largest finite norm: the one that threw the weights, before NaN took over
        "max_pre_clip_norm": float(max((n for n in norms if math.isfinite(n)), default=math.nan)),
        "clipped_fraction": float(np.mean(clipped)),
        "first_nonfinite_step": nonfinite[0] + 1 if nonfinite else None,  # 1-based
    }


def plot(results: dict[str, dict[str, Any]], length: int, out_dir: Any) -> Any:
    """Training loss and pre-clip gradient norm per step; saves a PNG and returns its path."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, run in results.items():
        steps = np.arange(1, len(run["loss"]) + 1)
        (line,) = top.plot(steps, finite_or_nan(run["loss"]), label=name, linewidth=0.8)
        bottom.plot(steps, finite_or_nan(run["pre_clip_norm"]), label=name, linewidth=0.8,
                    color=line.get_color())
        first = run["first_nonfinite_step"]
        if first is not None:
            top.axvline(first, color=line.get_color(), linestyle=":",
                        label=f"{name}: NaN from step {first}")
    top.axhline(BASELINE_MSE, color="gray", linestyle="--", label="predict the mean (1/6)")
    top.set(title=f"adding problem, T={length}, LSTM({HIDDEN}), SGD + momentum 0.9",
            ylabel="MSE (batch)", yscale="log")
    top.set_ylim(top=1e3)  # the exploding run leaves the top; its norm panel shows how far
    bottom.set(title="pre-clip gradient norm, from optaxclip.stats", xlabel="step",
               ylabel="global norm", yscale="log")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    return save_figure(fig, out_dir, "lstm_adding.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example; prints the table and the plot path; returns the results."""
    args = parse_args(__doc__.splitlines()[0], argv)
    start = time.perf_counter()
    config = SIZES[args.size]
    print(f"devices: {jax.devices()}  size: {args.size}  T={config['length']}  "
          f"steps: {config['steps']}")
    results = {
        name: train(max_norm, lr, config["length"], config["steps"], args.seed)
        for name, (max_norm, lr) in RUNS.items()
    }
    print(format_table(
        ["run", "eval MSE", "final train loss", "max finite pre-clip norm", "clipped steps",
         "first NaN step"],
        [[name, r["eval_mse"], r["final_train_loss"], r["max_pre_clip_norm"],
          f"{100 * r['clipped_fraction']:.0f}%",
          "-" if r["first_nonfinite_step"] is None else str(r["first_nonfinite_step"])]
         for name, r in results.items()],
    ))
    print(f"(predicting the mean scores an MSE of {BASELINE_MSE:.3f})")
    path = plot(results, config["length"], args.out)
    print(f"plot: {path}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return {"size": args.size, "length": config["length"], "runs": results, "plot": path}


if __name__ == "__main__":
    main(sys.argv[1:])
