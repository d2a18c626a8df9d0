"""The two models of the train-step benchmark: a small GPT-style transformer and an MLP (Flax).

Both are sized to run a jitted train step on two CPU cores in tens of
milliseconds; ``param_dtype`` sets the parameters' (hence the gradients' and
Adam moments') dtype, and the model computes in that dtype too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 512
    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 64
    batch: int = 8

    @property
    def label(self) -> str:
        return (f"GPT {self.layers} layers, width {self.width}, {self.heads} heads, "
                f"vocab {self.vocab}, {self.batch}x{self.context} tokens")


@dataclass(frozen=True)
class MLPConfig:
    inputs: int = 784
    hidden: int = 1024
    layers: int = 3
    outputs: int = 10
    batch: int = 128

    @property
    def label(self) -> str:
        return (f"MLP {self.inputs}-{'-'.join([str(self.hidden)] * self.layers)}-"
                f"{self.outputs}, batch {self.batch}")


class _Block(nn.Module):
    width: int
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.dtype}
        h = nn.LayerNorm(**kw)(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True, **kw)(
            h, h, mask=mask)
        x = x + h
        h = nn.LayerNorm(**kw)(x)
        h = nn.Dense(4 * self.width, **kw)(h)
        h = nn.Dense(self.width, **kw)(nn.gelu(h))
        return x + h


class GPT(nn.Module):
    """Pre-norm decoder: token and position embeddings, blocks, final norm, tied logits."""

    config: GPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        embed = nn.Embed(c.vocab, c.width, dtype=self.dtype, param_dtype=self.dtype)
        positions = self.param("position", nn.initializers.normal(0.02), (c.context, c.width),
                               self.dtype)
        x = embed(tokens) + positions[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(c.layers):
            x = _Block(c.width, c.heads, self.dtype)(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
        return embed.attend(x)


class MLP(nn.Module):
    config: MLPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.dtype}
        for _ in range(self.config.layers):
            x = nn.relu(nn.Dense(self.config.hidden, **kw)(x))
        return nn.Dense(self.config.outputs, **kw)(x)


@dataclass
class Problem:
    """A model's parameters, one fixed batch, and its loss ``loss(params, batch)``."""

    label: str
    params: Any
    batch: Any
    loss: Callable[[Any, Any], jax.Array]

    @property
    def parameter_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    @property
    def leaf_count(self) -> int:
        return len(jax.tree.leaves(self.params))


def gpt_problem(config: GPTConfig, dtype: Any = jnp.float32, seed: int = 0) -> Problem:
    model = GPT(config, dtype)
    key_params, key_data = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(key_data, (config.batch, config.context + 1), 0, config.vocab)
    params = model.init(key_params, tokens[:, :-1])["params"]

    def loss(params: Any, tokens: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return Problem(config.label, params, tokens, loss)


def mlp_problem(config: MLPConfig, dtype: Any = jnp.float32, seed: int = 0) -> Problem:
    model = MLP(config, dtype)
    key_params, key_x, key_y = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(key_x, (config.batch, config.inputs), dtype)
    y = jax.random.randint(key_y, (config.batch,), 0, config.outputs)
    params = model.init(key_params, x)["params"]

    def loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        inputs, labels = batch
        logits = model.apply({"params": params}, inputs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return Problem(config.label, params, (x, y), loss)
