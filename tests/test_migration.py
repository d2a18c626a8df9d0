"""The README's recipe for moving an optax checkpoint to optaxclip runs and loses nothing."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
TITLE = "### Moving an optax checkpoint to optaxclip"


def _block() -> str:
    section = (ROOT / "README.md").read_text().split(TITLE, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section must hold exactly one python block"
    return blocks[0]


def test_migrated_state_continues_the_optax_run_exactly(capsys):
    scope: dict = {}
    exec(compile(_block(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    printed = float(capsys.readouterr().out.split()[-1])
    # What the optax run would have done on its fourth step, uninterrupted.
    want_updates, want_state = scope["old_tx"].update(
        scope["grads"], scope["old_state"], scope["params"]
    )
    got_adam, want_adam = scope["new_state"][1], want_state[1]
    assert jax.tree.structure(got_adam) == jax.tree.structure(want_adam)
    for got, want in zip(jax.tree.leaves(got_adam), jax.tree.leaves(want_adam)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert int(got_adam[0].count) == 4  # the step count carried over, not restarted
    for got, want in zip(jax.tree.leaves(scope["updates"]), jax.tree.leaves(want_updates)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    norm = float(scope["oc"].global_norm(scope["grads"]))
    np.testing.assert_allclose(printed, norm, rtol=1e-6)
    assert norm > 1.0  # so this step was really clipped, by both


def test_restoring_the_old_checkpoint_into_the_new_structure_fails_loudly():
    """Why the recipe exists: a direct restore into the optaxclip chain is refused."""
    scope: dict = {}
    exec(compile(_block(), "README.md", "exec"), scope)  # noqa: S102
    import flax.serialization
    import pytest

    with pytest.raises((ValueError, KeyError, TypeError)):
        flax.serialization.from_bytes(scope["new_tx"].init(scope["params"]), scope["saved"])
