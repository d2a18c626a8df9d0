"""The five benchmarks: standalone clip, clip in an Adam step, compile time, stats, memory."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip
from benchmarks import designs, timing, trees

ADAPTIVE = ("autoclip", "zclip", "adagc", "adaptive_grad_clip", "skip_on_spike")


@dataclass(frozen=True)
class Sizes:
    """How big the trees are and how often each contender runs."""

    label: str
    gpt2_shrink: int  # 1 = the real GPT-2 small shapes
    many_count: int
    many_shape: tuple[int, ...]
    repeats: int  # standalone rounds
    step_repeats: int  # Adam step rounds
    compile_repeats: int
    max_norm: float = 1.0
    gpt2_leaves: int = 148  # fewer keeps only the first ones (smoke tests)

    def trees(self) -> dict[str, trees.Shapes]:
        gpt2 = "gpt2_small" if self.gpt2_shrink == 1 else f"gpt2_small/{self.gpt2_shrink}"
        if self.gpt2_leaves < 148:
            gpt2 += f"[:{self.gpt2_leaves}]"
        many = f"{self.many_count}x{'x'.join(map(str, self.many_shape))}"
        gpt2_shapes = list(trees.gpt2_small_shapes(self.gpt2_shrink).items())
        return {
            gpt2: dict(gpt2_shapes[: self.gpt2_leaves]),
            many: trees.many_leaves_shapes(self.many_count, self.many_shape),
        }


FULL = Sizes("full", 1, 2000, (64, 64), repeats=21, step_repeats=11, compile_repeats=2)
QUICK = Sizes("quick", 8, 200, (64, 64), repeats=9, step_repeats=7, compile_repeats=1)
TINY = Sizes("tiny", 64, 2, (4, 4), repeats=2, step_repeats=2, compile_repeats=1, gpt2_leaves=3)


def adaptive_clippers() -> dict[str, optax.GradientTransformation]:
    """The adaptive clippers optaxclip exports, built with their defaults where possible."""
    out = {}
    for name in ADAPTIVE:
        factory = getattr(optaxclip, name, None)
        if factory is None:
            continue
        if name == "skip_on_spike":
            attempts = [lambda f=factory: f(optaxclip.clip_by_global_norm(1.0)), factory]
        elif name == "adaptive_grad_clip":
            attempts = [lambda f=factory: f(0.01), factory]
        else:
            attempts = [factory]
        for attempt in attempts:
            try:
                out[name] = attempt()
                break
            except TypeError:
                continue
    return out


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.array, tree)


class _Clip:
    """One jitted, donated clip update owning its gradients.

    With ``refresh``, ``prepare`` (untimed) hands it a fresh copy of the source
    before each call, so every timed call clips; without, the output is fed back
    as the next input.
    """

    def __init__(self, tx: optax.GradientTransformation, source: Any, refresh: bool,
                 params: Any = None):
        self.source, self.refresh, self.params = source, refresh, params
        self.grads = _copy(source)
        self.state = _copy(tx.init(self.grads))  # distinct buffers, all donatable
        update = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(0, 1))
        self.compiled = update.lower(self.grads, self.state, params).compile()

    def prepare(self) -> None:
        if self.refresh:
            self.grads = _copy(self.source)
            jax.block_until_ready(self.grads)

    def __call__(self) -> None:
        self.grads, self.state = self.compiled(self.grads, self.state, self.params)
        jax.block_until_ready(self.grads)


class _TorchClip:
    """``torch.nn.utils.clip_grad_norm_(foreach=True)`` on ``.grad`` tensors, in place."""

    def __init__(self, torch: Any, values: dict, max_norm: float, refresh: bool):
        self.torch, self.max_norm, self.refresh = torch, max_norm, refresh
        # On a GPU machine (jax on GPU and a CUDA torch), torch runs on the GPU too.
        on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.sources = [torch.from_numpy(v).to(self.device) for v in values.values()]
        self.params = []
        for source in self.sources:
            p = torch.nn.Parameter(torch.empty(source.shape, device=self.device))
            p.grad = source.clone()
            self.params.append(p)
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def prepare(self) -> None:
        if self.refresh:
            for p, source in zip(self.params, self.sources):
                p.grad.copy_(source)
            self._sync()

    def __call__(self) -> Any:
        norm = self.torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self._sync()
        return norm


REGIMES = ("clip", "noclip")


def designs_to_run(with_designs: bool | str) -> list[str]:
    """All alternative designs (True), none (False), or only ``"hybrid"``."""
    if with_designs == "hybrid":
        return ["hybrid"]
    return [n for n in designs.DESIGNS if n != "library"] if with_designs else []


def standalone(sizes: Sizes, shapes: trees.Shapes, regime: str = "clip",
               with_designs: bool | str = True, with_adaptive: bool = True) -> dict:
    """Benchmarks a and d: one jitted clip update per call, donated, interleaved.

    ``clip``: threshold 1, far below the norm, and fresh input every call, so
    every call rescales. ``noclip``: threshold twice the norm, output fed back.
    """
    values = trees.make_tree(shapes)
    source = _copy(values)
    refresh = regime == "clip"
    t = sizes.max_norm if refresh else 2.0 * trees.global_norm(values)
    txs: dict[str, optax.GradientTransformation] = {
        "optaxclip": optaxclip.clip_by_global_norm(t),
        "optax": optax.clip_by_global_norm(t),
        "floor_read_write": optax.stateless(lambda g, p: designs.floor_read_write(g, t)),
    }
    if refresh:
        txs["nostats"] = designs.clip_by_global_norm_nostats(t)
    for name in designs_to_run(with_designs):
        if refresh or name == "no_select":
            txs[f"design:{name}"] = designs.DESIGNS[name](t)
    contenders: dict[str, Callable[[], Any]] = {
        name: _Clip(tx, source, refresh) for name, tx in txs.items()
    }
    if refresh and with_adaptive:
        for name, tx in adaptive_clippers().items():
            contenders[f"adaptive:{name}"] = _Clip(tx, source, refresh, params=source)
    try:
        import torch

        contenders["torch_foreach"] = _TorchClip(torch, values, t, refresh)
    except ImportError:
        pass
    floor_read = jax.jit(designs.floor_read).lower(source).compile()
    contenders["floor_read"] = lambda: floor_read(source).block_until_ready()
    hlo = {name: timing.hlo_counts(c.compiled) for name, c in contenders.items()
           if isinstance(c, _Clip)}
    samples = timing.interleaved(contenders, sizes.repeats)
    del contenders
    gc.collect()
    return {"times": {name: timing.summary(s) for name, s in samples.items()}, "hlo": hlo,
            "max_norm": t}


def _step_fn(tx: optax.GradientTransformation) -> Callable:
    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def step_transforms(
    max_norm: float, with_designs: bool | str = True
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Fresh-transformation factories for the Adam step (fresh, so nothing is cached)."""
    adam = lambda: optax.adam(1e-3)
    floor = lambda: optax.stateless(lambda g, p: designs.floor_read_write(g, max_norm))
    out = {
        "adam": adam,
        "floor+adam": lambda: optax.chain(floor(), adam()),
        "optaxclip+adam": lambda: optax.chain(optaxclip.clip_by_global_norm(max_norm), adam()),
        "optax+adam": lambda: optax.chain(optax.clip_by_global_norm(max_norm), adam()),
    }
    in_step = ("concat_rescue", "scaled_rescue", "hybrid")
    for name in in_step if with_designs is True else designs_to_run(with_designs):
        out[f"{name}+adam"] = lambda name=name: optax.chain(
            designs.DESIGNS[name](max_norm), adam()
        )
    return out


def adam_step(sizes: Sizes, shapes: trees.Shapes, compile_repeats: int | None = None,
              with_designs: bool | str = True) -> dict:
    """Benchmarks b, c and e: the jitted Adam step with and without clipping.

    Each step is ``params, opt_state = step(params, opt_state, grads)`` with
    params and state donated and clipping active on every step. ``floor+adam``
    chains the bare floor clip (one norm read, one scale) ahead of Adam: the
    least any clipper can add to the step. Compile time is
    lower + compile from abstract shapes, with new transformations every repeat
    so no trace or compile cache is reused; the last executable is the one timed.
    ``memory_analysis`` is XLA's buffer assignment of that executable.
    """
    values = trees.make_tree(shapes)
    grads = _copy(values)
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), values)
    seconds: dict[str, list[float]] = {}
    compiled: dict[str, tuple[Any, Any]] = {}
    factories = step_transforms(sizes.max_norm, with_designs)
    for _ in range(compile_repeats or sizes.compile_repeats):
        for name, make in factories.items():
            tx = make()
            state = jax.eval_shape(tx.init, abstract)
            start = time.perf_counter()
            lowered = jax.jit(_step_fn(tx), donate_argnums=(0, 1)).lower(abstract, state, abstract)
            executable = lowered.compile()
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            compiled[name] = (tx, executable)
    contenders = {}
    for name, (tx, executable) in compiled.items():
        params = jax.tree.map(lambda v: jnp.array(v) * 0.01, values)
        box = {"params": params, "state": _copy(tx.init(params))}

        def run(box: dict = box, step: Callable = executable) -> None:
            box["params"], box["state"] = step(box["params"], box["state"], grads)
            jax.block_until_ready(box["params"])

        contenders[name] = run
    samples = timing.interleaved(contenders, sizes.step_repeats)
    del contenders
    gc.collect()
    return {
        "times": {name: timing.summary(s) for name, s in samples.items()},
        "compile_s": {k: float(np.median(v)) for k, v in seconds.items()},
        "memory": {k: _memory(c) for k, (_, c) in compiled.items()},
        "hlo": {k: timing.hlo_counts(c) for k, (_, c) in compiled.items()},
    }


def _memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out
