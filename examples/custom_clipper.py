"""Writing your own clipper: a threshold that follows an EMA of past norms.

The clipper below is written outside the package with optaxclip's public
extension API only. Because it is built by ``make_clipper`` from a ``ClipSpec``,
``stats()``, ``check_order``, ``checked`` and the contract checks of
``optaxclip.testing`` handle it like a built-in clipper. The README's section
"Writing your own clipper" shows this file's code.
"""

import jax.numpy as jnp
import optax

import optaxclip as oc


@oc.register_factory(threshold="factor", test_kwargs={"decay": 0.9})
def clip_to_ema(factor: float, *, decay: float = 0.99) -> optax.GradientTransformationExtraArgs:
    """Clips the global norm to ``factor`` times an EMA of the past clipped norms."""
    spec = oc.ClipSpec("clip_to_ema", scope="global", stat_fields=("ema",),
                       strict_nonfinite=True)  # no history yet must not mean "pass NaN"

    def init(params):
        return {"ema": jnp.zeros([], jnp.float32)}

    def threshold(norm, state, params):
        # No history yet: no limit on the first step (the EMA starts at its norm).
        limit = jnp.where(state.count == 0, jnp.inf, factor * state.ema)
        clipped = jnp.minimum(norm, limit)
        ema = jnp.where(state.count == 0, clipped, decay * state.ema + (1 - decay) * clipped)
        # A non-finite step is poisoned by the skeleton; keep it out of the EMA.
        return limit, {"ema": jnp.where(jnp.isfinite(norm), ema, state.ema)}

    rule = oc.ThresholdRule(threshold=threshold, init=init, fields=("ema",))
    return oc.make_clipper(spec, rule)


def main() -> None:
    params = {"w": jnp.zeros(3)}
    tx = optax.chain(clip_to_ema(2.0), optax.adam(1e-2))
    oc.check_order(tx, params)  # it is a gradient clipper, before Adam: fine
    state = tx.init(params)
    for norm in [1.0, 1.2, 0.9, 30.0]:
        grads = {"w": jnp.array([norm, 0.0, 0.0])}
        updates, state = tx.update(grads, state, params)
    print({k: round(float(v), 3) for k, v in oc.stats(state).items()})
    import optaxclip.testing

    cases = optaxclip.testing.check_factory(clip_to_ema, thresholds=(2.0,), modes=("jit",))
    print(f"contract checks passed on {cases} cases")


if __name__ == "__main__":
    main()
