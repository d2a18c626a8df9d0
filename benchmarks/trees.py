"""Gradient trees the benchmarks run on: GPT-2-small shapes and many small leaves."""

from __future__ import annotations

import numpy as np

Shapes = dict[str, tuple[int, ...]]

_BLOCK = (
    ("ln_1.weight", "d"), ("ln_1.bias", "d"),
    ("attn.c_attn.weight", "d,3d"), ("attn.c_attn.bias", "3d"),
    ("attn.c_proj.weight", "d,d"), ("attn.c_proj.bias", "d"),
    ("ln_2.weight", "d"), ("ln_2.bias", "d"),
    ("mlp.c_fc.weight", "d,4d"), ("mlp.c_fc.bias", "4d"),
    ("mlp.c_proj.weight", "4d,d"), ("mlp.c_proj.bias", "d"),
)


def gpt2_small_shapes(shrink: int = 1) -> Shapes:
    """The 148 parameter shapes of GPT-2 small (124,439,808 f32 entries at ``shrink=1``).

    Token and position embeddings, 12 blocks of (layer norm, attention, layer
    norm, MLP) and a final layer norm, named as in the Hugging Face checkpoint.
    ``shrink`` divides the width, vocabulary and context, keeping all 148 leaves:
    ``shrink=4`` has about 7.8M entries.
    """
    d, vocab, context = 768 // shrink, 50257 // shrink, 1024 // shrink
    sizes = {"d": d, "3d": 3 * d, "4d": 4 * d}
    shapes: Shapes = {"wte": (vocab, d), "wpe": (context, d)}
    for block in range(12):
        for name, dims in _BLOCK:
            shapes[f"h.{block}.{name}"] = tuple(sizes[k] for k in dims.split(","))
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def many_leaves_shapes(count: int = 2000, shape: tuple[int, ...] = (64, 64)) -> Shapes:
    """``count`` leaves of one small shape: stresses per-leaf overhead, not bandwidth."""
    return {f"p{i:04d}": shape for i in range(count)}


def entries(shapes: Shapes) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


def make_tree(shapes: Shapes, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 normal values; the global norm is about ``sqrt(entries)``, far above 1."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def describe(shapes: Shapes) -> str:
    n = entries(shapes)
    return f"{len(shapes)} leaves, {n:,} f32 entries ({n * 4 / 2**20:,.1f} MiB)"


def global_norm(values: dict[str, np.ndarray]) -> float:
    """The float64 global L2 norm of a tree of numpy arrays."""
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in values.values())))
