"""The benchmark harness on the tiny model: a complete, self-consistent report (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TOL
from gemma3_vision.model.config import PRESETS, VisionConfig
from gemma3_vision.tools.bench import (
    command_line,
    format_report,
    gflop_per_image,
    measure_memory,
    run_benchmark,
)


def test_gflop_count_of_the_full_tower():
    # 5.46 TFLOP per image for the Gemma 3 tower (REFERENCE.md section 8): 3.37 linear + 2.09 attention.
    assert gflop_per_image(VisionConfig()) == pytest.approx(5460, rel=0.01)


def test_report_on_tiny():
    pytest.importorskip("transformers")
    report = run_benchmark(preset="tiny", dtypes=["float32", "bfloat16"], batches=[2], threads=1, device="cpu",
                           layers=1, repeats=2, compile=False)
    assert report.machine["threads"] == 1 and report.machine["transformers"]
    assert [(c.dtype, c.batch, c.layers, c.full_layers) for c in report.configs] == [
        ("float32", 2, 1, 2), ("bfloat16", 2, 1, 2)]
    for c in report.configs:
        assert [r.name for r in c.runners] == ["ours", "transformers"]
        assert c.gemm_peak_tflops > 0 and c.gflop_per_image > 0
        ours, theirs = c.runners
        for r in c.runners:
            assert len(r.seconds_per_image) == 2 and r.min_s <= r.median_s <= r.max_s
            assert r.tflops > 0 and r.peak_memory_mb > 0 and r.compile_s is None
        assert ours.max_abs_diff is None and ours.cosine is None
        assert theirs.cosine is not None and theirs.max_abs_diff is not None
        if c.dtype == "float32":
            assert c.compute_dtype == "float32"
            assert theirs.max_abs_diff <= TOL["fp32_max_abs"], f"max abs diff {theirs.max_abs_diff:.3g}"
        else:
            assert theirs.cosine >= TOL["bf16_cosine"], f"cosine {theirs.cosine:.6f}"
        assert c.ratios["ours vs transformers"] == pytest.approx(theirs.median_s / ours.median_s)
    text = format_report(report)
    assert "TRUNCATED" in text and "ours vs transformers" in text and "bfloat16 (our matmuls in" in text
    recorded = json.loads(report.to_json())
    assert recorded["configs"][1]["dtype"] == "bfloat16"
    meta = recorded["meta"]  # what every result file records: machine, versions, command line
    assert meta["machine"]["cpu"] and meta["machine"]["logical_cpus"] >= 1, meta["machine"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["transformers"], meta["versions"]
    assert meta["versions"]["gemma3-vision"] and meta["command"], meta


@pytest.mark.parametrize(("argv", "line"), [
    (["/home/me/.venv/bin/gemma3-vision", "bench", "--json", "a b.json"], "gemma3-vision bench --json 'a b.json'"),
    (["/src/gemma3_vision/__main__.py", "bench", "--layers", "2"], "python -m gemma3_vision bench --layers 2"),
    (["benchmarks/load_bench.py", "--dir", "/tmp"], "python benchmarks/load_bench.py --dir /tmp"),
])
def test_results_record_the_command_as_a_shell_line(argv, line):
    assert command_line(argv) == line


def test_memory_probe_in_a_fresh_process():
    mem = measure_memory("random:tiny", "float32", batch=2)
    assert mem["tower_weights_mb"] > 0
    assert mem["torch_import_rss_mb"] > 0 and mem["peak_rss_mb"] >= mem["rss_after_load_mb"] - 1
    assert mem["activation_peak_mb_per_image"] >= 0
    assert mem["image_size"] == PRESETS["tiny"][0].image_size


def test_cli_attention_choices_are_the_bench_variants():
    """The CLI lists --attention's choices by hand (it imports no torch at start-up): they must be the bench's."""
    from gemma3_vision.cli import main
    from gemma3_vision.tools.bench import ATTENTION_VARIANTS

    option = next(p for p in main.commands["bench"].params if p.name == "attention")
    assert list(option.type.choices) == list(ATTENTION_VARIANTS)


def test_cli_runner_choices_are_the_bench_runners():
    from gemma3_vision.cli import main
    from gemma3_vision.tools.bench import RUNNERS

    option = next(p for p in main.commands["bench"].params if p.name == "runners")
    assert sorted(option.type.choices) == sorted(RUNNERS)


def test_runners_times_only_those_named_and_diffs_against_ours():
    """``runners=`` leaves ``ours`` untimed but still its reference: transformers' difference is reported."""
    report = run_benchmark(preset="tiny", dtypes=["float32"], repeats=1, compile=False, runners=["transformers"],
                           device="cpu")
    [config] = report.configs
    [only] = config.runners
    assert only.name == "transformers" and len(only.seconds_per_image) == 1
    assert only.max_abs_diff is not None and only.max_abs_diff <= TOL["fp32_max_abs"], (
        f"transformers vs ours: max abs diff {only.max_abs_diff:.3g} > {TOL['fp32_max_abs']}")
    assert config.ratios == {}  # no timed ours to set it against


def test_runners_unknown_or_not_built_is_an_option_error():
    from gemma3_vision.errors import OptionError

    with pytest.raises(OptionError, match="runner must be one of"):
        run_benchmark(preset="tiny", runners=["theirs"], device="cpu")
    with pytest.raises(OptionError, match=r"ours\[openvino\] is not built.*--openvino"):
        run_benchmark(preset="tiny", compile=False, runners=["ours[openvino]"], device="cpu")


def test_the_benchmark_restores_the_threads_and_freezing_it_sets(monkeypatch):
    # run_benchmark sets torch's (process-wide) thread count and inductor's freezing; a test or notebook that runs
    # it must find both as they were. torch.compile is stubbed out: what is checked is the setting, not compilation.
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(torch, "compile", lambda module, mode: module)
    before, freezing = torch.get_num_threads(), inductor_config.freezing
    torch.set_num_threads(3)
    try:
        report = run_benchmark(preset="tiny", threads=1, device="cpu", layers=1, repeats=1, compile=True,
                               reference=False)
        assert [r.name for r in report.configs[0].runners] == ["ours", "ours+compile"]
        assert report.configs[0].threads == 1
        assert torch.get_num_threads() == 3, f"thread count left at {torch.get_num_threads()}, expected 3"
        assert inductor_config.freezing == freezing, f"freezing left at {inductor_config.freezing}"
    finally:
        torch.set_num_threads(before)
        inductor_config.freezing = freezing


def test_without_transformers_the_report_says_so_and_times_ours(monkeypatch):
    import gemma3_vision.tools.bench as bench

    monkeypatch.setattr(bench, "build_transformers", lambda *args: None)  # as when it is not installed
    said: list[str] = []
    report = run_benchmark(preset="tiny", threads=1, device="cpu", layers=1, repeats=1, compile=False,
                           progress=said.append)
    assert [r.name for r in report.configs[0].runners] == ["ours"]
    assert any(line.startswith("transformers is not installed") for line in said), said
    assert "e-0" in format_report(report)  # a millisecond forward keeps its digits, not 0.001
