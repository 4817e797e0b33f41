"""benchmarks/serve_bench.py runs end to end on random:tiny and writes a result with its meta block.

A smoke test of the script, not a timing: the figures in docs/serving.md come from exclusive runs on a named
machine. One client count, one round, a few requests, so the benchmark cannot rot unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_bench_runs_on_tiny_and_records_its_meta(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--model", "random:tiny", "--clients", "2",
           "--rounds", "1", "--requests", "8", "--seconds", "20", "--image-size", "128x96", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"machine", "versions", "command"} <= set(result["meta"]), result["meta"].keys()
    [row] = result["rows"]  # one client count
    assert row["clients"] == 2 and len(row["rounds"]) == 1, row
    assert row["service_images_per_s_median"] > 0 and row["in_process_images_per_s_median"] > 0, row
