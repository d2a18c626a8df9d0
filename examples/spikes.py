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

Part 3, *a small transformer language model*: a 2-layer pre-LN decoder
(d_model 32, 2 heads) learns next-token prediction on text the example
generates (a seeded second-order Markov chain over 24 tokens), with Adam at a
high learning rate (4e-2, ``b2=0.95``, no warmup, 2,000 steps), where the
raw gradient norm spikes to 100x its median and training stalls; a last row
runs Adam at a quarter of the rate as the stable reference. Reported per
method over several seeds: median final training loss (mean of the last 20
steps), median final loss on a fixed held-out batch, the worst excursion (the
largest ratio, after step 20, of the held-out loss after a step to the lowest
held-out loss before it) and the worst gradient spike (the largest raw
gradient norm after step 20 over the run's median).

Part 1 and part 3 also run the update clippers (``clip_update_rms``,
``clip_update_norm``, between Adam's preconditioner and the learning rate) and
the SPAM spike clipper (``spam(adam)``, which clips each coordinate against
Adam's own second moment).

Run ``python examples/spikes.py`` (about 3 minutes on a 2-core machine) or with
``--tiny`` for a smoke test. ``main()``
returns the numbers as a dict.
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
    methods.update(moment_aware_methods(LEARNING_RATE, full))
    return methods


def moment_aware_methods(
    learning_rate: float, full: bool, b2: float = 0.999
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Update clippers (after Adam's preconditioner, before the learning rate) and SPAM."""

    def after_adam(clip: Callable[[], optax.GradientTransformation]):
        return lambda: optax.chain(optax.scale_by_adam(b2=b2), clip(),
                                   optax.scale(-learning_rate))

    methods = {"clip_update_rms(1.0)": after_adam(lambda: oc.clip_update_rms(1.0))}
    if full:
        methods["clip_update_norm()"] = after_adam(lambda: oc.clip_update_norm())
    methods["spam(adam)"] = lambda: oc.spam(optax.adam(learning_rate, b2=b2))
    if full:
        methods["spam(adam, reset_interval=100)"] = lambda: oc.spam(
            optax.adam(learning_rate, b2=b2), reset_interval=100, warmup_steps=20)
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


# ---------------------------------------------------------------- part 3: a tiny language model

LM_VOCAB, LM_CONTEXT, LM_WIDTH, LM_HEADS, LM_LAYERS = 24, 16, 32, 2, 2
LM_LEARNING_RATE = 4e-2
LM_B2 = 0.95  # the second-moment decay of large-model recipes; 0.999 spikes less here
LM_BURN_IN = 20


def markov_text(length: int, seed: int = 0) -> np.ndarray:
    """Tokens of a seeded second-order Markov chain: a likely next token per pair, else noise.

    With probability 0.9 the token after ``(a, b)`` is ``rule[a, b]``, else a
    uniformly random token; the best achievable loss is about 0.6 nats.
    """
    rng = np.random.default_rng(seed)
    rule = rng.integers(0, LM_VOCAB, size=(LM_VOCAB, LM_VOCAB))
    noise = rng.random(length) < 0.1
    random_tokens = rng.integers(0, LM_VOCAB, length)
    text = np.zeros(length, np.int32)
    text[:2] = random_tokens[:2]
    for t in range(2, length):
        text[t] = random_tokens[t] if noise[t] else rule[text[t - 2], text[t - 1]]
    return text


def init_lm(key: jax.Array) -> dict:
    keys = iter(jax.random.split(key, 4 + 4 * LM_LAYERS))
    dense = lambda shape: jax.random.normal(next(keys), shape) / math.sqrt(shape[0])
    params = {
        "embed": jax.random.normal(next(keys), (LM_VOCAB, LM_WIDTH)) * 0.5,
        "position": jax.random.normal(next(keys), (LM_CONTEXT, LM_WIDTH)) * 0.1,
        "final_scale": jnp.ones(LM_WIDTH),
    }
    for layer in range(LM_LAYERS):
        params[f"block{layer}"] = {
            "attn_scale": jnp.ones(LM_WIDTH), "mlp_scale": jnp.ones(LM_WIDTH),
            "qkv": dense((LM_WIDTH, 3 * LM_WIDTH)), "proj": dense((LM_WIDTH, LM_WIDTH)),
            "up": dense((LM_WIDTH, 4 * LM_WIDTH)), "down": dense((4 * LM_WIDTH, LM_WIDTH)),
        }
    return params


def _norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * scale


def lm_loss(params: dict, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of a pre-norm causal transformer on ``[B, T+1]`` tokens."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    x = params["embed"][inputs] + params["position"]
    t = inputs.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    head = LM_WIDTH // LM_HEADS
    for layer in range(LM_LAYERS):
        p = params[f"block{layer}"]
        q, k, v = jnp.split(_norm(x, p["attn_scale"]) @ p["qkv"], 3, axis=-1)
        split = lambda a: a.reshape(a.shape[0], t, LM_HEADS, head)
        scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(head)
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(x.shape)
        x = x + attended @ p["proj"]
        x = x + jax.nn.gelu(_norm(x, p["mlp_scale"]) @ p["up"]) @ p["down"]
    logits = _norm(x, params["final_scale"]) @ params["embed"].T
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def lm_methods(full: bool) -> dict[str, Callable[[], optax.GradientTransformation]]:
    adam = lambda: optax.adam(LM_LEARNING_RATE, b2=LM_B2)
    methods = {
        "no clipping": adam,
        "clip_by_global_norm(1.0)": lambda: optax.chain(oc.clip_by_global_norm(1.0), adam()),
        "zclip()": lambda: optax.chain(oc.zclip(), adam()),
    }
    methods.update(moment_aware_methods(LM_LEARNING_RATE, full, b2=LM_B2))
    if full:  # what a stable run reaches: Adam at a quarter of the learning rate
        methods[f"reference: adam at lr {LM_LEARNING_RATE / 4:g}"] = lambda: optax.adam(
            LM_LEARNING_RATE / 4, b2=LM_B2)
    return methods


def lm_study(seeds: int, steps: int, batch: int, full: bool) -> dict:
    text = markov_text(22000)
    train_text, val_text = jnp.asarray(text[:20000]), jnp.asarray(text[20000:])
    rng = np.random.default_rng(1)
    starts = rng.integers(0, train_text.shape[0] - LM_CONTEXT - 1, size=(seeds, steps, batch))
    windows = jnp.asarray(starts)[..., None] + jnp.arange(LM_CONTEXT + 1)
    val_starts = np.arange(0, val_text.shape[0] - LM_CONTEXT - 1, 61)[:32]
    val_tokens = val_text[jnp.asarray(val_starts)[:, None] + jnp.arange(LM_CONTEXT + 1)]
    keys = jax.random.split(jax.random.key(1), seeds)

    def train(tx: optax.GradientTransformation):
        def one_seed(key, seed_windows):
            params = init_lm(key)

            def step(carry, window):
                params, opt_state = carry
                loss, grads = jax.value_and_grad(lm_loss)(params, train_text[window])
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
                return (params, opt_state), (loss, lm_loss(params, val_tokens),
                                             optax.global_norm(grads))

            return jax.lax.scan(step, (params, tx.init(params)), seed_windows)[1]

        run_seed = jax.jit(one_seed)
        runs = [run_seed(keys[s], windows[s]) for s in range(seeds)]
        return tuple(np.stack([np.asarray(r[k]) for r in runs]) for k in range(3))

    results = {}
    for name, make in lm_methods(full).items():
        train_loss, val_loss, grad_norms = train(optax.with_extra_args_support(make()))
        finals = np.mean(train_loss[:, -20:].astype(np.float64), axis=1)
        val = val_loss.astype(np.float64)
        # The held-out loss after each step against the lowest one before it.
        excursions = [np.max(val[s, LM_BURN_IN:] / np.minimum.accumulate(val[s])[
            LM_BURN_IN - 1:-1]) for s in range(seeds)]
        results[name] = {
            "median_final_loss": float(np.median(finals)),
            "median_final_val_loss": float(np.median(val[:, -1])),
            "worst_excursion": float(np.max(excursions)),
            # The largest raw gradient norm after burn-in over the run's median.
            "worst_grad_spike": float(np.max([
                np.max(grad_norms[s, LM_BURN_IN:]) / np.median(grad_norms[s])
                for s in range(seeds)])),
            "diverged": int(np.sum(~np.isfinite(finals))),
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
    lm_seeds, lm_steps = (1, 30) if args.tiny else (3, 2000)
    lm_results = lm_study(lm_seeds, lm_steps, batch=16, full=not args.tiny)
    print_lm_table(lm_results, lm_seeds, lm_steps)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return {**spike_results, "exploding": explode_results, "language_model": lm_results}


def print_lm_table(results: dict, seeds: int, steps: int) -> None:
    print()
    print(f"Tiny transformer LM: {seeds} seeds x {steps} Adam steps at lr {LM_LEARNING_RATE:g}, "
          f"b2 {LM_B2:g}, loss of a uniform guess {math.log(LM_VOCAB):.2f}")
    print(f"{'method':<32} {'final train loss':>17} {'final val loss':>15} "
          f"{'worst excursion':>16} {'worst grad spike':>17} {'diverged':>9}")
    for name, row in results.items():
        print(f"{name:<32} {row['median_final_loss']:>17.4f} "
              f"{row['median_final_val_loss']:>15.4f} "
              f"{row['worst_excursion']:>15.2f}x {row['worst_grad_spike']:>16.0f}x "
              f"{row['diverged']:>9d}")


if __name__ == "__main__":
    main()
