"""The examples run at their tiny size and show what they claim.

Each example's ``main(argv)`` runs in-process and returns its results, so these
tests check outcomes (divergence, convergence, accuracy, logs) rather than stdout.
"""

from __future__ import annotations

import csv
import math
import pathlib
import re
import struct
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import classifier_linen  # noqa: E402
import cnn_nnx  # noqa: E402
import demo  # noqa: E402
import exploding_regression  # noqa: E402
import lstm_adding  # noqa: E402
import monitoring  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: pathlib.Path, out_dir: pathlib.Path) -> None:
    path = pathlib.Path(path)
    assert path.parent == out_dir
    assert path.read_bytes()[:8] == PNG_MAGIC


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- helpers


def test_format_table_aligns_and_spells_non_finite():
    table = _common.format_table(["run", "loss"], [["a", math.nan], ["bb", math.inf], ["c", 1.5]])
    lines = table.splitlines()
    assert lines[0].split() == ["run", "loss"]
    assert [line.split()[-1] for line in lines[2:]] == ["nan", "inf", "1.5"]
    assert len({len(line) for line in lines}) == 1  # every row padded to the same width


def test_parse_args_sizes(tmp_path):
    assert _common.parse_args("x", []).size == "default"
    assert _common.parse_args("x", ["--tiny"]).size == "tiny"
    args = _common.parse_args("x", ["--full", "--out", str(tmp_path)])
    assert (args.size, args.out) == ("full", tmp_path)
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--tiny", "--full"])


def test_demo_runs_example_one_at_the_seed_size():
    assert demo.main is exploding_regression.main
    default = exploding_regression.SIZES["default"]
    assert default["epochs"] == 30 and exploding_regression.BATCH_SIZE == 32
    x_train, x_val, _, _ = exploding_regression.load_data()
    assert (x_train.shape, x_val.shape) == ((8000, 30), (2000, 30))


# ---------------------------------------------------------------- examples


@pytest.mark.slow
def test_exploding_regression(tmp_path, capsys):
    result = exploding_regression.main(["--tiny", "--out", str(tmp_path)])
    runs = result["runs"]
    assert len(runs) == 8

    unclipped = runs["exploding: no clipping"]
    assert unclipped["first_nonfinite_step"] is not None
    assert math.isnan(unclipped["final_train_loss"]) and math.isnan(unclipped["final_val_loss"])

    for name, run in runs.items():
        if name == "exploding: no clipping":
            continue
        assert run["first_nonfinite_step"] is None, name
        assert all_finite(run["step_loss"]), name
        # converging, not merely finite: well below the loss at initialisation
        assert run["final_train_loss"] < 0.5 * run["initial_loss"], name
        assert run["final_val_loss"] < 0.5 * run["initial_loss"], name
        if run["experiment"] == "exploding":
            assert run["final_val_loss"] < 0.05 * run["initial_loss"], name
            assert run["clipped_fraction"] > 0.5, name  # the clipper did the work

    assert_png(result["plot"], tmp_path)
    out = capsys.readouterr().out
    assert "exploding: no clipping" in out and "nan" in out
    assert f"plot: {result['plot']}" in out
    # talkative: one line per run as it finishes, in order, then the conclusion
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in progress] == [f"[{i}/8]" for i in range(1, 9)]
    assert all(f"] {name} " in line for line, name in zip(progress, runs))
    assert "non-finite from step" in progress[4]  # exploding: no clipping
    conclusion = out.split("\nconclusion\n", 1)[1]
    assert conclusion.splitlines() == exploding_regression.conclusion(runs) + [
        conclusion.splitlines()[-1]]  # the last line is the time
    assert "Every clipped run stays finite." in conclusion


def fake_run(experiment, clipper, val_loss, first_nonfinite=None, clipped=1.0):
    return {"experiment": experiment, "clipper": clipper, "final_val_loss": val_loss,
            "diverged_seeds": int(first_nonfinite is not None),
            "first_nonfinite_step": first_nonfinite, "clipped_fraction": clipped}


def test_conclusion_says_what_the_numbers_show():
    runs = {
        "adam: no clipping": fake_run("adam", "no clipping", 20.0, clipped=0.0),
        "adam: clip_by_value(3.0)": fake_run("adam", "clip_by_value(3.0)", 2.0),
        "exploding: no clipping": fake_run("exploding", "no clipping", math.nan, 4, 0.0),
        "exploding: clip_by_global_norm(1.0)": fake_run("exploding", "clip_by_global_norm(1.0)",
                                                        30.0),
        "exploding: clip_by_value(3.0)": fake_run("exploding", "clip_by_value(3.0)", 2e4),
    }
    lines = exploding_regression.conclusion(runs)
    assert lines[0] == ("Adam(1e-3) on the data x1: final val loss, best first: "
                        "clip_by_value(3.0) 2, no clipping 20 (10x).")
    assert lines[1] == ("SGD(0.01, momentum 0.9) on the data x10: no clipping goes non-finite "
                        "from step 4; final val loss, best first: clip_by_global_norm(1.0) 30, "
                        "clip_by_value(3.0) 2e+04 (667x).")
    assert lines[2] == "  Every clipped run stays finite."
    assert lines[3].startswith("  clip_by_value(3.0) stays finite but does not converge")
    assert len(lines) == 4
    # a value clip within STALL_FACTOR of the best is not singled out, and a clipped run
    # that diverged takes away the "every clipped run stays finite" line
    runs["exploding: clip_by_value(3.0)"] = fake_run("exploding", "clip_by_value(3.0)", 60.0)
    runs["exploding: clip_by_norm(1.0)"] = fake_run("exploding", "clip_by_norm(1.0)", math.nan, 9)
    lines = exploding_regression.conclusion(runs)
    assert "clip_by_norm(1.0) goes non-finite from step 9" in lines[1]
    assert len(lines) == 2


def test_demo_imports_only_what_the_demo_extra_installs():
    # `make demo` installs optaxclip with its `demo` extra and nothing else: everything
    # the demo's modules import must come from the standard library, optaxclip's
    # runtime dependencies, or that extra.
    import ast
    from importlib import metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["demo"]
    allowed = {re.split(r"[<>=\[ ]", n, maxsplit=1)[0].lower() for n in names}
    allowed |= {"numpy", "scipy", "optaxclip"}  # numpy and scipy come with jax
    for banned in ("torch", "keras", "pytest", "hypothesis", "ruff", "tensorboardx"):
        assert banned not in allowed
    distributions = metadata.packages_distributions()
    local = {"_common", "exploding_regression"}
    for module in ("demo.py", "exploding_regression.py", "_common.py"):
        tree = ast.parse((EXAMPLES / module).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        for name in sorted(imported - local - set(sys.stdlib_module_names)):
            dists = {d.lower() for d in distributions.get(name, [name])}
            assert dists & allowed, (module, name, dists)
    makefile = (EXAMPLES.parent / "Makefile").read_text()
    assert 'pip install -q -e ".[demo]"' in makefile
    assert re.search(r"^demo: \$\(DEMO_STAMP\)$", makefile, flags=re.M)


def test_readme_states_what_the_demo_shows():
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "every clipped run converges" not in readme
    assert "`clip_by_value(3.0)` stalls" in readme


@pytest.mark.slow
def test_classifier_linen(tmp_path):
    result = classifier_linen.main(["--tiny", "--out", str(tmp_path)])
    runs = result["runs"]
    for name, run in runs.items():
        assert run["final_test_accuracy"] > 0.8, name
    # clip_by_value(0.5) never triggers on this data, and then it is the identity:
    # the run matches the unclipped one (to float32 rounding: XLA compiles the two
    # programs differently, so an ulp may differ after hundreds of steps).
    by_value, unclipped = runs["clip_by_value(0.5)"], runs["no clipping"]
    assert by_value["clipped_fraction"] == 0.0
    for a, b in zip(_leaves(by_value["params"]), _leaves(unclipped["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # global-norm clipping did trigger, and changed the trajectory
    by_norm = runs["clip_by_global_norm(1.0)"]
    assert by_norm["clipped_fraction"] > 0
    assert by_norm["train_loss"] != unclipped["train_loss"]
    assert_png(result["plot"], tmp_path)


def _leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_cnn_nnx(tmp_path):
    result = cnn_nnx.main(["--tiny", "--out", str(tmp_path)])
    runs = result["runs"]
    clipped = runs["clip_by_value(1.0) + SGD(momentum=0.9)"]
    for name, run in runs.items():
        assert run["final_test_accuracy"] > 0.7, name
    # the clipper was active: gradient entries above 1 were seen and clipped
    assert clipped["max_gradient_entry"] > 1.0
    assert 0 < clipped["clipped_fraction"] <= 1
    assert runs["SGD(momentum=0.9)"]["train_loss"] != clipped["train_loss"]
    assert_png(result["plot"], tmp_path)


@pytest.mark.slow
def test_lstm_adding(tmp_path):
    result = lstm_adding.main(["--tiny", "--out", str(tmp_path)])
    runs = result["runs"]
    steps = lstm_adding.SIZES["tiny"]["steps"]
    unclipped, clipped = runs["no clipping"], runs["clip_by_global_norm(1.0)"]
    # same optimizer, same learning rate: unclipped explodes, clipped solves the task
    assert unclipped["first_nonfinite_step"] is not None
    assert math.isnan(unclipped["eval_mse"])
    assert unclipped["max_pre_clip_norm"] > 1e3
    assert unclipped["clipped_fraction"] == 0  # clip_by_global_norm(inf) only records
    assert clipped["eval_mse"] < 0.25 * lstm_adding.BASELINE_MSE
    assert clipped["first_nonfinite_step"] is None
    # the norm trace comes from optaxclip.stats: one finite pre-clip norm per step
    assert len(clipped["pre_clip_norm"]) == steps and all_finite(clipped["pre_clip_norm"])
    assert 0 < clipped["clipped_fraction"] < 1
    assert max(clipped["pre_clip_norm"]) > 1.0  # it clipped because the norm exceeded 1
    # the small-learning-rate workaround does not solve it in the same budget
    assert runs["no clipping, lr 0.05"]["eval_mse"] > 4 * clipped["eval_mse"]
    assert_png(result["plot"], tmp_path)


def _read_events(path: pathlib.Path) -> list:
    """Parses a TensorBoard event file (TFRecord framing) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12  # length (8 bytes) + its CRC (4 bytes)
        events.append(event_pb2.Event.FromString(data[start:start + length]))
        offset = start + length + 4  # payload + its CRC
    return events


@pytest.mark.slow
def test_monitoring(tmp_path):
    result = monitoring.main(["--tiny", "--out", str(tmp_path)])
    config = monitoring.SIZES["tiny"]
    spike = config["spike_step"]

    # the trigger fires at the injected spike, on both watched metrics, and not before
    alerts = result["alerts"]
    assert alerts, "no alert for the injected spike"
    assert min(a.step for a in alerts) == spike
    assert {a.metric for a in alerts if a.step == spike} == {"loss", "pre_clip_norm"}

    # CSV: the right columns, one row per step, the alert recorded on the spike's row
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == monitoring.CSV_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, config["steps"] + 1))
    assert "loss" in rows[spike - 1]["alert"]
    assert all(r["alert"] == "" for r in rows[: spike - 1])
    assert float(rows[spike - 1]["clipped_fraction"]) == 1.0  # every variable clipped
    assert all_finite(float(r["loss"]) for r in rows)  # clipping kept training finite

    # TensorBoard: an event file holding a scalar per step for each logged metric
    assert result["event_files"]
    events = _read_events(pathlib.Path(result["event_files"][0]))
    scalars: dict[str, list[int]] = {}
    for event in events:
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(event.step)
    for tag in ("train/loss", "train/pre_clip_norm", "train/clipped_fraction",
                "clip_by_norm/norm", "clip_by_norm/clipped_fraction"):
        assert scalars[tag] == list(range(1, config["steps"] + 1)), tag
    assert scalars["alerts/text_summary"] == [spike, spike]  # one text per alert
    assert_png(result["plot"], tmp_path)


# ---------------------------------------------------------------- the trigger


def test_spike_detector_fires_on_jumps_and_non_finite_values():
    detector = monitoring.SpikeDetector(factor=10, window=5, min_history=3, metrics=("loss",))
    fired = [detector.update(step, {"loss": v}) for step, v in enumerate(
        [100.0, 1.0, 1.0, 1.0, 5.0, 50.0, math.nan, 1.0, math.inf])]
    # step 0's 100 is inside the warm-up; 5 is under 10x the median; 50 and NaN/inf fire
    assert [step for step, alerts in enumerate(fired) if alerts] == [5, 6, 8]
    assert fired[5][0].median == 1.0 and fired[5][0].value == 50.0
    assert len(detector.history["loss"]) == 5  # non-finite values stay out of the window


def test_spike_detector_rejects_bad_settings():
    with pytest.raises(ValueError, match="factor"):
        monitoring.SpikeDetector(factor=1.0)
    with pytest.raises(ValueError, match="min_history"):
        monitoring.SpikeDetector(window=5, min_history=10)
