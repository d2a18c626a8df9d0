"""The benchmark runner works end to end at a tiny size (a smoke test: no timing asserts)."""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import designs, run, suites, timing, trees


def test_gpt2_small_shapes_are_the_real_model():
    shapes = trees.gpt2_small_shapes()
    assert len(shapes) == 148
    assert trees.entries(shapes) == 124_439_808
    assert shapes["wte"] == (50257, 768) and shapes["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert len(trees.gpt2_small_shapes(8)) == 148


def test_interleaved_times_every_contender_in_rotating_order():
    calls = []

    class Contender:
        def __init__(self, name):
            self.name = name

        def prepare(self):
            calls.append(("prepare", self.name))

        def __call__(self):
            calls.append(("call", self.name))

    samples = timing.interleaved({"a": Contender("a"), "b": Contender("b")}, repeats=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    timed = [name for kind, name in calls if kind == "call"][2:]  # after warm-up
    assert timed == ["a", "b", "b", "a", "a", "b"]
    assert all(calls[i] == ("prepare", calls[i + 1][1]) for i in range(0, len(calls), 2))


def test_designs_match_the_library_and_stay_overflow_safe():
    shapes = dict(list(trees.gpt2_small_shapes(64).items())[:3], large=(256, 256))
    values = trees.make_tree(shapes, seed=1)
    worst = designs.check_designs(jax.tree.map(jnp.asarray, values))
    assert set(worst) == set(designs.DESIGNS)
    assert max(worst.values()) < 1e-5
    big = {"x": np.full((3,), 1e20, np.float32)}
    floor = float(jnp.sqrt(designs.floor_read(big)))
    assert math.isinf(floor)  # the floor is not overflow-safe; the designs are (checked above)


@pytest.fixture(scope="module")
def tiny_results():
    return run.run_all(suites.TINY, with_designs=False, with_adaptive=False, log=lambda _: None)


def test_run_all_reports_every_benchmark(tiny_results):
    r = tiny_results
    assert r["machine"]["cpu"] and r["machine"]["jax"]
    first, second = list(r["trees"].values())
    clip = first["standalone"]["clip"]["times"]
    for name in ["optaxclip", "optax", "floor_read", "floor_read_write", "nostats"]:
        s = clip[name]
        assert s["n"] == 2 and 0 < s["min_ms"] <= s["median_ms"] and math.isfinite(s["q3_ms"])
    assert set(first["standalone"]) == {"clip", "noclip"} and set(second["standalone"]) == {"clip"}
    step = first["step"]
    assert {"adam", "floor+adam", "optaxclip+adam", "optax+adam"} <= set(step["times"])
    assert all(v > 0 for v in step["compile_s"].values())
    mem = step["memory"]["optaxclip+adam"]
    assert mem["peak_bytes"] == (mem["argument_bytes"] + mem["output_bytes"]
                                 - mem["alias_bytes"] + mem["temp_bytes"])
    assert step["hlo"]["optax+adam"]["reduces"] >= 1


def test_targets_are_ratios_of_the_measured_medians(tiny_results):
    r = tiny_results
    gpt2 = next(iter(r["trees"].values()))
    clip = gpt2["standalone"]["clip"]["times"]
    by_name = {t["target"].split(" [")[0]: t for t in r["targets"][:6]}
    t = by_name["standalone / optax"]
    assert t["ratio"] == pytest.approx(clip["optaxclip"]["median_ms"] / clip["optax"]["median_ms"])
    assert t["status"] == ("PASS" if t["ratio"] <= 1.0 else "MISS")
    compile_s = gpt2["step"]["compile_s"]
    compile_target = next(x for x in r["targets"] if x["target"].startswith("compile"))
    assert compile_target["ratio"] == pytest.approx(
        compile_s["optaxclip+adam"] / compile_s["optax+adam"])
    report = run.render(r)
    assert "| standalone / optax" in report and ("PASS" in report or "MISS" in report)


def test_per_example_benchmark_runs_and_agrees_with_optax():
    from benchmarks import per_example

    cases = {"tiny": ({"w": (6, 4), "b": (4,)}, 4)}
    results = per_example.run(cases, repeats=1)
    case = results["cases"]["tiny"]
    # The clipped sums agree with optax's, and with jax_privacy's wherever it is
    # installed: the bench extra installs it, and `make test` (so CI) installs the
    # bench extra, so there it must be compared. Machines without it (a lent GPU
    # machine's own image) compare with optax alone.
    privacy = bool(os.environ.get("CI")) or importlib.util.find_spec("jax_privacy") is not None
    assert set(case["max_rel_diff"]) == {"optax"} | ({"jax_privacy"} if privacy else set())
    assert all(diff < 1e-5 for diff in case["max_rel_diff"].values()), case["max_rel_diff"]
    timings = case["timings"]
    assert {"optaxclip.clip_per_example", "optax.per_example_global_norm_clip"} | (
        {"jax_privacy.clip_pytree"} if privacy else set()) <= set(timings)
    assert all(t["median_ms"] > 0 for t in timings.values())
    assert "| optaxclip.clip_per_example" in per_example.render(results)


def test_train_step_runs_only_the_named_contenders(tmp_path):
    from benchmarks import train_step

    out = tmp_path / "ts.json"
    names = ["adam", "spam(adam)", "chain(clip_by_group_norms(matrices, rest), adam)",
             "optax.adaptive_grad_clip", "optax.apply_if_finite"]
    argv = ["--sizes", "tiny", "--case", "mlp/float32", "--json", str(out)]
    assert train_step.main(argv + [a for n in names for a in ("--contender", n)]) == 0
    case = json.loads(out.read_text())["mlp/float32"]
    assert set(case["times"]) == set(names) and not case["failed"]
    with pytest.raises(SystemExit):  # argparse's error: an unknown name is refused
        train_step.main(argv + ["--contender", "no such contender"])


def test_growth_can_leave_out_optax_and_the_size_sweep(tmp_path, capsys):
    from benchmarks import growth

    out, png = tmp_path / "growth.json", tmp_path / "growth.png"
    assert growth.main(["--sizes", "tiny", "--leaves", "3", "--no-size-sweep",
                        "--optaxclip-only", "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")  # the empty size panels did not fail it
    result = json.loads(out.read_text())
    assert list(result["leaves"]) == ["3"] and result["size"] == {}
    assert set(result["leaves"]["3"]["times"]) == {"optaxclip"}
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |"))
    assert "| not run |" in row and "nan" not in row  # optax's columns read "-", not nan


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_narrow_benchmark_times_the_library_next_to_its_stripped_copies(dtype):
    from benchmarks import bf16

    result = bf16.run(shrink=64, repeats=1, log=lambda message: None, dtype=dtype)
    assert result["dtype"] == dtype
    assert set(result["times"]) == {"optaxclip", "optax", "floor_read_write", "floor_read",
                                    *bf16.STRIPPED}
    conditionals = {name: k["conditionals"] for name, k in result["kernels"].items()}
    # The library has the norm's conditional and the shared scale's; the stripped
    # copies keep the norm's alone, and the unguarded one has none.
    assert conditionals["optaxclip"] == 2
    assert conditionals[bf16.ONE_COND] == conditionals[bf16.PLAIN_SCALE] == 1
    assert conditionals[bf16.UNGUARDED] == 0
    assert abs(result["norms"]["optaxclip"] - result["norms"]["float64 reference"]) <= (
        1e-6 * result["norms"]["float64 reference"])
    title = bf16.render(result)[1]
    assert title.startswith(f"#### {'bf16' if dtype == 'bfloat16' else 'fp16'} standalone")


def test_the_bf16_section_of_make_bench_times_both_narrow_dtypes(monkeypatch):
    from benchmarks import bf16

    real, dtypes = bf16.run, []

    def tiny(shrink, repeats, log, dtype):
        dtypes.append(dtype)
        return real(shrink=64, repeats=1, log=log, dtype=dtype)

    monkeypatch.setattr(bf16, "run", tiny)
    results, report = run.run_sections(("bf16",), quick=True, with_designs=False,
                                       plot_path=None, log=lambda message: None)
    assert dtypes == ["bfloat16", "float16"]
    assert results["bf16"]["dtype"] == "bfloat16" and results["fp16"]["dtype"] == "float16"
    assert "#### bf16 standalone" in report and "#### fp16 standalone" in report


def test_narrow_benchmark_refuses_a_dtype_it_does_not_time():
    from benchmarks import bf16

    with pytest.raises(ValueError, match="dtype must be one of"):
        bf16.run(shrink=64, repeats=1, log=lambda message: None, dtype="float32")


def test_the_unguarded_design_is_the_library_norm_until_a_sum_overflows():
    ordinary = [jnp.linspace(-3.0, 2.0, 50).reshape(5, 10), jnp.arange(7.0)]
    np.testing.assert_allclose(designs.norm_unguarded(ordinary),
                               designs.norm_library(ordinary), rtol=1e-6)
    huge = [jnp.full((4,), 1e20)]
    assert float(designs.norm_unguarded(huge)) == math.inf  # what the rescue is for
    np.testing.assert_allclose(designs.norm_library(huge), 2e20, rtol=1e-6)
