import jax.numpy as jnp
import optax

import optaxclip as oc

params = {"w": jnp.zeros(2)}
# The same gradients for both orders: small ones, with one spike at step 3.
small, spike = jnp.array([1.0, 0.5]), jnp.array([300.0, -400.0])
grads = [small, small, spike, small, small, small]

# Keras clipnorm order: clip the raw gradient, then momentum.
clip_first = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
# The easy mistake: momentum first, so the clipper only clips the step.
clip_last = optax.chain(optax.sgd(0.1, momentum=0.9), oc.clip_by_global_norm(1.0))

for name, tx in [("clip first", clip_first), ("clip last ", clip_last)]:
    w, state = params, tx.init(params)
    trajectory = []
    for g in grads:
        updates, state = tx.update({"w": g}, state, w)
        w = optax.apply_updates(w, updates)
        trajectory.append([round(float(x), 2) for x in w["w"]])
    print(name, trajectory)

try:
    oc.check_order(clip_last, params)
except oc.OrderingError as error:
    print("check_order:", str(error).splitlines()[0])

print("clip first, moments/bound:", oc.assert_moments_bounded(clip_first, params, max_norm=1.0))
try:
    oc.assert_moments_bounded(clip_last, params, max_norm=1.0)
except AssertionError as error:
    print("clip last:", error)
