"""MLX against torch: the tower on the MLX backend and on torch (MPS where there is one, and the CPU), in one run.

Same seeded random weights for every runner (``random:<preset>``, the first ``--layers`` layers), same pixels; each
runner is warmed up once, then they run in alternation (``--repeats`` times), so a noisy machine hurts all alike.
Reported per runner: seconds per image (median, min, max), achieved TFLOP/s, its fraction of the GEMM peak measured
on the spot (the best of torch's fc1-shaped product on each torch device and MLX's own, the tower's fc1 shape:
``gemm_peaks_tflops`` lists them), peak RSS, and the max abs diff and cosine of its output against torch on the CPU.
``ratios`` gives each torch runner's median over MLX's (above 1: MLX is faster).

``--layers`` cuts the depth (the 27 layers cost alike, so per-layer figures carry over) and ``--image-size`` the
input; both are in the result. The result JSON (machine, versions, the exact command) goes to
``benchmarks/results/<machine>/`` (a name made from the OS, architecture and CPU model) unless ``--json`` names
a file. On a Mac (Apple silicon)::

    pip install -e ".[mlx,test]"
    python benchmarks/mlx_bench.py --dtype bfloat16 --dtype float32

On MLX's Linux CPU build, whose products run at a few GFLOP/s, a cut tower and a small image::

    python benchmarks/mlx_bench.py --layers 2 --image-size 224 --dtype float32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import torch

from gemma3_vision.backends.mlx import MLXBackend
from gemma3_vision.checkpoints.weights import VisionModel
from gemma3_vision.model.config import PRESETS
from gemma3_vision.model.tower import interpolate_position_embedding
from gemma3_vision.tools.bench import (
    _DTYPES,
    _cosine,
    _sync,
    _time_runners,
    build_ours,
    cpu_name,
    gemm_tflops,
    gflop_per_image,
    machine_info,
    random_tower_state,
    result_meta,
)

RESULTS = Path(__file__).parent / "results"


def mlx_gemm_tflops(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of one MLX ``(m, k) @ (k, n)`` product on MLX's default device."""
    mdt = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}[dtype]
    a, b = mx.random.normal((m, k)).astype(mdt), mx.random.normal((k, n)).astype(mdt)
    mx.eval(a, b)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e12


def machine_slug() -> str:
    """A folder name for this machine: OS, architecture and CPU model, e.g. ``linux-x86_64-amd-epyc-9r14``."""
    return re.sub(r"[^a-z0-9]+", "-", f"{platform.system()} {platform.machine()} {cpu_name()}".lower()).strip("-")


def mlx_runner(vision: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, pixels: torch.Tensor) -> Any:
    model = VisionModel(vision, None).eval()
    model.vision_tower.load_state_dict(state, strict=True)
    model.to(dtype)
    backend = MLXBackend(model, dtype)
    return lambda: backend.tower(pixels)[0]


def synced(run: Any, device: torch.device) -> Any:
    """``run`` that returns once ``device`` has finished: the runners share one clock (MLX's runner waits on its
    own results)."""
    def run_and_wait() -> torch.Tensor:
        out = run()
        _sync(device)
        return out
    return run_and_wait


def bench(preset: str, layers: int, image_size: int | None, dtype_name: str, batch: int,
          repeats: int) -> dict[str, Any]:
    vision = PRESETS[preset][0]
    full_layers = vision.num_hidden_layers
    vision = replace(vision, num_hidden_layers=layers, image_size=image_size or vision.image_size)
    dtype = _DTYPES[dtype_name]
    state = random_tower_state(preset, layers)
    if vision.grid_size != PRESETS[preset][0].grid_size:  # one table at the new size for every runner
        grid = vision.grid_size
        state["embeddings.position_embedding.weight"] = interpolate_position_embedding(
            state["embeddings.position_embedding.weight"], grid, grid)
    pixels = torch.rand(batch, vision.image_size, vision.image_size, 3, generator=torch.Generator().manual_seed(0))
    pixels = pixels * 2 - 1  # NHWC in [-1, 1]

    devices = [torch.device("cpu")]
    if torch.backends.mps.is_available():
        devices.insert(0, torch.device("mps"))
    runners = {"mlx": mlx_runner(vision, state, dtype, pixels)}
    for device in devices:
        tower, moved = build_ours(vision, state, dtype, device), pixels.to(device)
        runners[f"torch-{device.type}"] = synced(lambda tower=tower, moved=moved: tower(moved), device)

    fc1 = (min(batch * vision.num_patches, 4096), vision.hidden_size, vision.intermediate_size)
    peaks = {"mlx": mlx_gemm_tflops(dtype, *fc1)}
    for device in devices:
        peaks[f"torch-{device.type}"] = gemm_tflops(dtype, device, *fc1)
        if dtype != torch.float32:  # a CPU without native bf16 runs the tower's products in fp32
            peaks[f"torch-{device.type} float32"] = gemm_tflops(torch.float32, device, *fc1)
    peak = max(peaks.values())

    with torch.inference_mode():
        times, first, memory, outputs = _time_runners(runners, repeats, batch, torch.device("cpu"))
    gflop = gflop_per_image(vision)
    result: dict[str, Any] = {
        "dtype": dtype_name, "batch": batch, "image_size": vision.image_size, "layers": layers,
        "full_layers": full_layers, "gflop_per_image": gflop, "gemm_peak_tflops": peak,
        "gemm_peaks_tflops": peaks, "runners": [], "ratios": {},
    }
    for name, ts in times.items():
        median = statistics.median(ts)
        tflops = gflop / median / 1e3
        reference = outputs["torch-cpu"]
        result["runners"].append({
            "name": name, "seconds_per_image": ts, "median_s": median, "min_s": min(ts), "max_s": max(ts),
            "first_call_s": first[name], "tflops": tflops, "peak_fraction": tflops / peak,
            "peak_rss_mb": memory[name],
            "max_abs_diff_vs_torch_cpu": (outputs[name] - reference).abs().max().item(),
            "cosine_vs_torch_cpu": _cosine(outputs[name], reference),
        })
    medians = {r["name"]: r["median_s"] for r in result["runners"]}
    for name in medians:
        if name != "mlx":
            result["ratios"][f"{name} / mlx"] = medians[name] / medians["mlx"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma3-4b", choices=[k for k in PRESETS if k != "tiny"])
    p.add_argument("--layers", type=int, default=27, help="encoder layers to run (27: the whole tower)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the model's, 896)")
    p.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable; default bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="result file (default: under benchmarks/results/)")
    a = p.parse_args()
    warnings.simplefilter("ignore")
    configs = []
    for dtype in a.dtype or ["bfloat16"]:
        print(f"{dtype}: {a.layers} layers at {a.image_size or 'the model size'} px, batch {a.batch}", flush=True)
        config = bench(a.preset, a.layers, a.image_size, dtype, a.batch, a.repeats)
        for r in config["runners"]:
            print(f"  {r['name']:>10}: {r['median_s']:.3f} s/image, {r['tflops'] * 1e3:.1f} GFLOP/s, "
                  f"{100 * r['peak_fraction']:.1f}% of the {config['gemm_peak_tflops'] * 1e3:.1f} GFLOP/s peak, "
                  f"cosine vs torch-cpu {r['cosine_vs_torch_cpu']:.6f}", flush=True)
        print("  " + ", ".join(f"{k} = {v:.3g}" for k, v in config["ratios"].items()), flush=True)
        configs.append(config)
    meta = result_meta(torch.device("cpu"))  # machine, versions (mlx among them), command, date
    meta["machine"] |= {"mlx_device": str(mx.default_device()), "mps": torch.backends.mps.is_available()}
    report = {"meta": meta, "machine": machine_info(torch.device("cpu")), "configs": configs}
    path = a.json or RESULTS / machine_slug() / (
        f"mlx_{'_'.join(c['dtype'] for c in configs)}_{a.layers}layers_{configs[0]['image_size']}px.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
