"""Start-up benchmark: how long after launch does ``gemma3-vision encode one.jpg --model random`` start encoding?

"Starts encoding" is the first entry into ``VisionTower.forward``, timed from just before the process is
launched (``time.monotonic()`` in this process, read by the child too: one clock for both). Each launch is a fresh
interpreter running the real CLI through ``startup_probe.py``, which times the stages on the way and ends the
process at that first forward. The image is a generated 2000x1500 JPEG (a phone photo's size); every launch writes
into a fresh output folder, so nothing is resumed. A warm-up launch of each kind (page cache, byte-code) is not
counted, and the timed launches go in rounds, every configuration once per round, so that a busy spell on a shared
machine hits them all alike. Byte-code is cached as on a user's machine even where PYTHONDONTWRITEBYTECODE is set.

The breakdown follows the main thread: interpreter start, imports and argument parsing (``import torch`` shown on
its own), model resolution, weights (``load_model``, for ``random`` the weight generation), then the job set-up up
to the first forward (output folder, discovery, waiting for the first decoded image). The first image's decode and
preprocess, done on a worker thread, are shown beside it. Issue 4's target: first forward within 3 s of launch.

Examples:
    python benchmarks/startup_bench.py --json benchmarks/results/MACHINE/startup.json
    python benchmarks/startup_bench.py --model random:tiny --repeats 1 --warmup 0   # smoke test
    python benchmarks/startup_bench.py --dtype float32 --dtype bfloat16
    python benchmarks/startup_bench.py --src /tmp/before/src    # beside another checkout (git archive of a commit)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROBE = Path(__file__).with_name("startup_probe.py")


def write_photo(path: Path, width: int = 2000, height: int = 1500) -> None:
    """A seeded JPEG that decodes like a photo: smooth gradients plus noise, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W)
    rgb = np.stack([128 + 100 * np.sin(x / (150 + 40 * c) + y / (230 - 30 * c) + c) for c in range(3)], -1)
    rgb += rng.normal(0, 12, rgb.shape)  # (H, W, 3)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def child_env(src: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment, except that byte-code is cached as on a user's machine (some CI images turn it off,
    and then every launch compiles the package's modules again); ``src`` goes first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def import_torch_s() -> float:
    """Launch to the end of ``import torch`` in a bare interpreter: the floor under any start-up that uses torch
    (to the end of the import, not of the process: tearing torch down at exit takes about a second more)."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "import time, torch; print(time.monotonic())"], env=child_env(),
                         check=True, capture_output=True, text=True).stdout
    return float(out) - t0


def launch(image: Path, model: str, dtype: str | None, full: bool, src: Path | None = None,
           backend: str = "torch") -> dict[str, Any]:
    """One fresh process: ``{mark: [start_s, end_s]}`` since launch, its wall time, and which optional heavy
    modules (gguf, huggingface_hub, ...) it had imported by the first forward."""
    with tempfile.TemporaryDirectory(prefix="g3-startup-") as tmp:
        marks_path = Path(tmp) / "marks.json"
        cli = ["encode", str(image), "--model", model, "--out", str(Path(tmp) / "out"),
               *(["--dtype", dtype] if dtype else []), "--backend", backend]
        cmd = [sys.executable, str(PROBE), str(marks_path), *(["--full"] if full else []), "--", *cli]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=child_env(src, G3_STARTUP_T0=repr(t0)), capture_output=True, text=True)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}")
        marks = json.loads(marks_path.read_text())
    loaded = marks.pop("loaded")
    if "tower.VisionTower.forward" not in marks:
        raise RuntimeError(f"the CLI never entered VisionTower.forward; marks: {sorted(marks)}")
    return {"marks": marks, "wall_s": wall, "optional_modules_loaded": loaded}


def breakdown(marks: dict[str, list[float]]) -> dict[str, float | None]:
    """Main-thread stages in seconds (None where a mark is missing), the first forward's time since launch, and
    the first image's decode + preprocess on its worker thread."""
    def span(start: tuple[str, int], end: tuple[str, int]) -> float | None:
        if start[0] not in marks or end[0] not in marks:
            return None
        return marks[end[0]][end[1]] - marks[start[0]][start[1]]

    resolve, load, forward = "resolve.resolve", "weights.load_model", "tower.VisionTower.forward"
    out = {
        "interpreter": marks["ready"][0],
        "imports + CLI": span(("ready", 0), (resolve, 0)),
        "resolve": span((resolve, 0), (resolve, 1)),
        "between": span((resolve, 1), (load, 0)),
        "weights": span((load, 0), (load, 1)),
        "job set-up": span((load, 1), (forward, 0)),
    }
    out["of which import torch"] = span(("import torch", 0), ("import torch", 1))
    decode = [marks[m] for m in ("preprocessing.decode_image", "preprocessing.pil_to_input") if m in marks]
    out["decode + preprocess (worker thread)"] = sum(e - s for s, e in decode) if decode else None
    out["first forward"] = marks[forward][0]
    return out


def machine() -> dict[str, Any]:
    import torch  # here only: this process is not timed

    from gemma3_vision.tools.bench import machine_info

    return {**machine_info(torch.device("cpu")), "platform": platform.platform()}


def meta() -> dict[str, Any]:
    import torch

    from gemma3_vision.tools.bench import result_meta

    return result_meta(torch.device("cpu"))


def median_of(runs: list[dict[str, float | None]]) -> dict[str, float | None]:
    keys = runs[0].keys()
    return {k: (statistics.median(v) if (v := [r[k] for r in runs if r[k] is not None and not math.isnan(r[k])])
                else None) for k in keys}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random")
    p.add_argument("--dtype", action="append", default=None,
                   help="Repeatable; default: the CLI's own default (bfloat16 where fast, else float32).")
    p.add_argument("--src", action="append", type=Path, default=None,
                   help="Repeatable: also time the package found in this folder (another checkout's src/, put "
                        "first on PYTHONPATH), e.g. a worktree of the previous commit for before/after figures.")
    p.add_argument("--repeats", type=int, default=5, help="Timed launches per configuration (median reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed launches of each kind first (page cache, .pyc).")
    p.add_argument("--image", type=Path, default=None, help="Default: a generated 2000x1500 JPEG.")
    p.add_argument("--full", action="store_true", help="Let the encode finish (not needed for start-up).")
    p.add_argument("--backend", default="torch",
                   help="encode --backend: torch (default), whose first VisionTower.forward is the mark; the OpenVINO "
                        "backend's start-up is measured in docs/openvino.md")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    configs = [(src, dtype) for src in [None, *(a.src or [])] for dtype in a.dtype or [None]]
    with tempfile.TemporaryDirectory(prefix="g3-startup-image-") as tmp:
        image = a.image
        if image is None:
            image = Path(tmp) / "one.jpg"
            write_photo(image)
        for _ in range(a.warmup):
            import_torch_s()
            for src, dtype in configs:
                launch(image, a.model, dtype, a.full, src, a.backend)
        # Rounds, each launching every configuration once: a busy spell on a shared machine hits all of them.
        floors: list[float] = []
        runs: dict[tuple[Path | None, str | None], list[dict[str, Any]]] = {c: [] for c in configs}
        for _ in range(a.repeats):
            floors.append(import_torch_s())
            for src, dtype in configs:
                runs[src, dtype].append(launch(image, a.model, dtype, a.full, src, a.backend))

    floor = statistics.median(floors)
    report: dict[str, Any] = {
        "meta": meta(),
        "what": "seconds from launch to the first VisionTower.forward of `gemma3-vision encode one.jpg`",
        "machine": machine(), "model": a.model, "repeats": a.repeats,
        "python_c_import_torch_s": {"median": floor, "runs": floors}, "configs": [],
    }
    print(f"bare interpreter, launch to the end of `import torch`: {floor:.2f} s (median of {a.repeats})")
    for (src, dtype), config_runs in runs.items():
        stages = [breakdown(r["marks"]) for r in config_runs]
        med = median_of(stages)
        firsts = [s["first forward"] for s in stages]
        label = f"{a.model}, dtype {dtype or 'default'}, package {src or 'installed'}"
        loaded = sorted({m for r in config_runs for m in r["optional_modules_loaded"]})
        report["configs"].append({"package": str(src or "installed"), "dtype": dtype or "default", "median_s": med,
                                  "first_forward_s": firsts, "optional_modules_loaded": loaded, "runs": config_runs})
        print(f"{label}: first forward {med['first forward']:.2f} s after launch (median of {a.repeats}; runs "
              f"{', '.join(f'{t:.2f}' for t in firsts)})")
        print(f"  optional modules imported by then: {', '.join(loaded) or 'none'}")
        for k, v in med.items():
            if k != "first forward":
                print(f"  {k:<36} {'-' if v is None else f'{v:6.3f} s'}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
