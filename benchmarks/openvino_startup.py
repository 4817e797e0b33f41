"""The OpenVINO backend's first run and next run on the full Gemma 3 tower (docs/openvino.md, "Start-up").

Two fresh processes share one empty cache folder. Each imports gemma3_vision, loads ``random`` (bf16, the full
tower) on the OpenVINO backend, gets the compiled model for 896 px (the first builds the graph, writes the IR and
compiles it, writing OpenVINO's blob; the next reads both back) and encodes one image. Prints and records each
stage's seconds, the peak RSS of each process and the cache entry's size on disk.

    python benchmarks/openvino_startup.py --json benchmarks/results/MACHINE/openvino_startup_full_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model: str, dtype: str) -> None:
    """One run: import, load, compile (or read the cache), encode one image; one JSON line on stdout."""
    start = time.perf_counter()
    import torch

    import gemma3_vision as g3

    imported = time.perf_counter()
    encoder = g3.load(model, dtype=dtype, backend="openvino")
    loaded = time.perf_counter()
    size = encoder.image_size
    encoder.backend.request(size, size, ())  # type: ignore[attr-defined]  # the OpenVINO backend's compiled model
    compiled = time.perf_counter()
    encoder.encode_pixels(torch.zeros(1, size, size, 3))
    encoded = time.perf_counter()
    print(json.dumps({
        "import_s": imported - start, "load_s": loaded - imported, "compile_s": compiled - loaded,
        "cache_hit": encoder.backend.last_cache_hit, "first_image_s": encoded - compiled,  # type: ignore[attr-defined]
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.model, a.dtype)
        return 0
    from gemma3_vision.tools.bench import result_meta

    cache = Path(tempfile.mkdtemp(prefix="gemma3-vision-openvino-"))
    env = dict(os.environ, GEMMA3_VISION_CACHE=str(cache))
    runs = {}
    try:
        for run in ("first", "next"):
            done = subprocess.run([sys.executable, __file__, "--child", "--model", a.model, "--dtype", a.dtype],
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs[run] = json.loads(done.stdout.strip().splitlines()[-1])
            print(run, runs[run])
        cache_gb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e9
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"cache on disk: {cache_gb:.2f} GB")
    if a.json:
        import torch

        result = {"meta": result_meta(torch.device("cpu")), "model": a.model, "dtype": a.dtype, "runs": runs,
                  "cache_gb": cache_gb}
        Path(a.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
