"""A clipper written outside the package gets stats, check_order, checked and the
contract checks through the public extension API (examples/custom_clipper.py)."""

import math
import pathlib
import re
import runpy

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optaxclip as oc
import optaxclip.testing

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "custom_clipper.py"
TITLE = "## Writing your own clipper"
MODULE = runpy.run_path(str(EXAMPLE))
clip_to_ema = MODULE["clip_to_ema"]


def test_the_readme_shows_the_example_file_and_it_uses_no_private_name():
    source = EXAMPLE.read_text()
    assert not re.search(r"optaxclip\._|oc\._", source)
    section = (ROOT / "README.md").read_text().split(TITLE, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    function = source[source.index("@oc.register_factory"):source.index("\n\ndef main()")]
    assert block.strip().endswith(function.strip())
    assert len(function.strip().splitlines()) < 40


def test_the_custom_clipper_is_a_first_class_clipper(capsys):
    MODULE["main"]()
    assert "contract checks passed" in capsys.readouterr().out
    params = {"w": jnp.zeros(3)}
    tx = optax.chain(clip_to_ema(2.0), optax.adam(1e-2))
    assert [s.kind for s in oc.check_order(tx, params)][0] == "clipper"
    with pytest.raises(oc.OrderingError, match="clip_to_ema"):
        oc.check_order(optax.chain(optax.adam(1e-2), clip_to_ema(2.0)), params)
    guarded = oc.checked(tx)
    update = chex.chexify(jax.jit(guarded.update), async_check=False)
    state = guarded.init(params)
    for norm in [1.0, 1.5, 40.0]:
        _, state = update({"w": jnp.array([norm, 0.0, 0.0])}, state, params)
    report = oc.stats(state)
    assert set(report) == {f"clip_to_ema/{f}" for f in ("norm", "threshold", "scale",
                                                          "clipped", "ema")}
    assert bool(report["clip_to_ema/clipped"]) and float(report["clip_to_ema/norm"]) == 40.0
    assert "clip_to_ema" in oc.registered_factories()
    assert oc.spec_of(clip_to_ema(1.0)).scope == "global"


def test_contract_checks_catch_a_rule_that_breaks_the_bound():
    # A rule reporting a threshold below the one it applies cannot be built with
    # make_clipper: the skeleton applies the threshold the rule returns. What the
    # checks do catch is a rule that corrupts its own state.
    def threshold(norm, state, params):
        return jnp.float32(1.0), {"ema": jnp.float32(jnp.nan)}

    spec = oc.ClipSpec("nan_state", scope="global")
    rule = oc.ThresholdRule(threshold=threshold, init=lambda p: {"ema": jnp.zeros([])},
                            fields=("ema",))
    tx = oc.make_clipper(spec, rule)
    with pytest.raises(AssertionError, match="NaN entered the clipper's own state"):
        optaxclip.testing.assert_clip_contracts(tx, {"w": jnp.ones(3)})


@pytest.mark.parametrize("scope", ["global", "leaf", "unit", "element"])
@pytest.mark.parametrize("value", [-1.0, -3, 2, 2.5, float("nan"), 0.0])
def test_a_rules_threshold_is_clamped_at_zero_whatever_its_type(scope, value):
    """A user's rule may return a Python number or a negative value.

    A negative threshold flipped the gradients' signs (scale -0.2 for [3, -4] at -1)
    and a Python float raised AttributeError; both now act as the built-in clippers'
    traced thresholds do: clamped at 0 (NaN stays NaN), in float32 or wider.
    """
    grads = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[0.5, 1.0], [2.0, 0.1]])}
    extra = {"unit_axes": (-1,)} if scope == "unit" else (
        {"ord": math.inf} if scope == "element" else {})
    spec = oc.ClipSpec(f"rule_{scope}", scope=scope, **extra)
    custom = oc.make_clipper(spec, oc.ThresholdRule(lambda norm, state, params: (value, {})))
    reference = oc.make_clipper(
        spec, oc.ThresholdRule(lambda norm, state, params: (jnp.float32(max(value, 0)), {})))
    for jit in (False, True):
        update = jax.jit(custom.update) if jit else custom.update
        out, state = update(grads, custom.init(grads))
        want, want_state = reference.update(grads, reference.init(grads))
        chex.assert_trees_all_equal(out, want)
        chex.assert_trees_all_equal(oc.stats(state), oc.stats(want_state))
        for leaf, before in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
            # Never a sign flipped: each entry is 0, NaN, or has its input's sign.
            same_sign = (jnp.sign(leaf) == jnp.sign(before)) | (leaf == 0) | jnp.isnan(leaf)
            assert bool(jnp.all(same_sign)), (scope, value)


def test_the_registry_goes_by_the_function_not_only_its_name():
    """check_factory looked a callable up by __name__ only, so a user's unregistered
    clip_by_rms "passed" on the library's; register_factory silently replaced a
    built-in of the same name in every enumeration."""
    from optaxclip import _registry

    def clip_by_rms(max_rms):  # a user's function, named like the library's
        raise RuntimeError("never called")

    with pytest.raises(ValueError, match=r"clip_by_rms is not registered.*optaxclip\.rms"):
        optaxclip.testing.check_factory(clip_by_rms)
    with pytest.raises(ValueError, match=r"'clip_by_rms' is optaxclip's own.*another name"):
        oc.register_factory(threshold="max_rms")(clip_by_rms)
    assert oc.registered_factories()["clip_by_rms"].factory is oc.clip_by_rms

    # A factory of the user's own, registered twice (a notebook cell run again),
    # is replaced by the second.
    def user_clip_twice(max_rms):
        return oc.clip_by_rms(max_rms)

    first = user_clip_twice
    try:
        oc.register_factory(threshold="max_rms")(first)

        def user_clip_twice(max_rms):  # noqa: F811 -- the cell run again
            return oc.clip_by_rms(max_rms)

        oc.register_factory(threshold="max_rms")(user_clip_twice)
        assert oc.registered_factories()["user_clip_twice"].factory is user_clip_twice
    finally:
        _registry._FACTORIES.pop("user_clip_twice", None)
