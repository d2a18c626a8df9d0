"""A clipper written outside the package gets stats, check_order, checked and the
contract checks through the public extension API (examples/custom_clipper.py)."""

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
