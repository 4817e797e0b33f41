"""Start-up of ``encode``: the collector pause ends with the command, and the start-up benchmark runs (one launch
of ``random:tiny``) with none of the optional heavy modules imported before the first forward."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from gemma3_vision.cli import EXIT_CANNOT_RUN, EXIT_OK, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[1]


def collector_as_found() -> bool:
    return gc.isenabled() and gc.get_freeze_count() == 0


def test_encode_gives_the_garbage_collector_back_as_found(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(image)
    assert collector_as_found()
    runs = {
        EXIT_OK: ["encode", str(image), "-m", "random:tiny", "-o", str(tmp_path / "ok")],
        EXIT_CANNOT_RUN: ["encode", str(image), "-m", "random:nope", "-o", str(tmp_path / "bad-model")],
        EXIT_USAGE: ["encode", "-m", "random:tiny", "-o", str(tmp_path / "no-inputs")],
    }
    for code, args in runs.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == code, result.output
        assert collector_as_found(), f"{args}: gc enabled {gc.isenabled()}, frozen {gc.get_freeze_count()}"


def test_startup_benchmark_runs_without_optional_imports(tmp_path):
    out = tmp_path / "startup.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup_bench.py"), "--model", "random:tiny",
                    "--repeats", "1", "--warmup", "0", "--json", str(out)], check=True, cwd=tmp_path, timeout=300,
                   capture_output=True)
    report = json.loads(out.read_text())
    (config,) = report["configs"]
    stages = config["median_s"]
    assert all(isinstance(v, float) and v >= 0 for v in stages.values()), stages
    main_thread = ("interpreter", "imports + CLI", "resolve", "between", "weights", "job set-up")
    assert abs(sum(stages[k] for k in main_thread) - stages["first forward"]) < 1e-6, stages
    assert config["optional_modules_loaded"] == [], "random:tiny should not import format or hub libraries"
