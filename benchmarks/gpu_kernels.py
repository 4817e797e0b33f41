"""The tower's kernels one by one on a GPU: each attention kernel and each linear shape, in TFLOP/s.

Where ``bench.py`` times the whole tower, this says where its time goes: the GEMM rate on the tower's four linear
shapes and on 8192³ (the peak), and every ``scaled_dot_product_attention`` kernel on the tower's attention (4096
tokens, 16 heads of 72), fed as the tower feeds it (strided views of one fused q/k/v product), and on head widths
padded to 80, 96 and 128 for comparison; and whether cuBLASLt's fused GELU epilogue computes the tanh GELU the
model needs, and what it would save on fc1. ``--profile`` adds where one forward of our whole tower spends its GPU
time, by kernel. Usage (on a CUDA machine)::

    python benchmarks/gpu_kernels.py --batch 32 --profile --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from gemma3_vision.model.config import PRESETS
from gemma3_vision.tools.bench import SDPA_KERNELS, build_ours, random_tower_state, result_meta


def cuda_seconds(fn, iters: int = 10) -> float:
    """Median of ``iters`` timed calls after two warm-ups, by CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gemm_rates(rows: int, dtype: torch.dtype) -> dict[str, float]:
    D, M = PRESETS["gemma3-4b"][0].hidden_size, PRESETS["gemma3-4b"][0].intermediate_size
    shapes = {"qkv": (rows, D, 3 * D), "out_proj": (rows, D, D), "fc1": (rows, D, M), "fc2": (rows, M, D),
              "8192^3": (8192, 8192, 8192)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        rates[name] = 2 * m * k * n / cuda_seconds(lambda: F.linear(a, w, bias)) / 1e12  # noqa: B023
    return rates


def gelu_epilogue(rows: int, dtype: torch.dtype) -> dict[str, float | str]:
    """fc1 with GELU fused into the GEMM (``torch._addmm_activation``, cuBLASLt's epilogue) against fc1 then GELU:
    which GELU the epilogue computes (the model needs tanh) and what it saves."""
    D, M = PRESETS["gemma3-4b"][0].hidden_size, PRESETS["gemma3-4b"][0].intermediate_size
    x = torch.randn(rows, D, device="cuda", dtype=dtype)
    w = torch.randn(M, D, device="cuda", dtype=dtype) * D**-0.5
    bias = torch.randn(M, device="cuda", dtype=dtype) * 0.02
    try:
        fused = torch._addmm_activation(bias, x, w.t(), use_gelu=True).float()
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:160]}
    plain = torch.addmm(bias, x, w.t()).float()
    return {
        "max_diff_to_tanh_gelu": (fused - F.gelu(plain, approximate="tanh")).abs().max().item(),
        "max_diff_to_erf_gelu": (fused - F.gelu(plain)).abs().max().item(),
        "fused_ms": 1e3 * cuda_seconds(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True)),
        "separate_ms": 1e3 * cuda_seconds(lambda: F.gelu(F.linear(x, w, bias), approximate="tanh")),
    }


def attention_rates(batch: int, dtype: torch.dtype) -> dict[str, float | str]:
    vision = PRESETS["gemma3-4b"][0]
    N, H, Dh = vision.num_patches, vision.num_attention_heads, vision.head_dim
    flop = 4 * batch * H * N * N * Dh  # q·kᵀ and a·v, at the true head width
    rates: dict[str, float | str] = {}
    for width in (Dh, 80, 96, 128):
        qkv = torch.randn(batch, N, 3, H, width, device="cuda", dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, width) each, strided as in the tower
        for name, kernel in SDPA_KERNELS.items():
            if name == "math":
                continue  # materialises (B, H, N, N): tens of GB at batch 32
            label = f"{name} d{width}"
            try:
                with sdpa_kernel(kernel):
                    seconds = cuda_seconds(lambda: F.scaled_dot_product_attention(q, k, v, scale=Dh**-0.5))  # noqa: B023
                rates[label] = flop / seconds / 1e12  # useful work: a padded width does more for the same result
            except RuntimeError as e:
                rates[label] = f"cannot run: {str(e).splitlines()[0][:120]}"
    return rates


def profile_tower(batch: int, dtype: torch.dtype) -> list[dict[str, float | str]]:
    """GPU time per kernel of one forward of our tower as ``load()`` sets it up, most expensive first."""
    vision = PRESETS["gemma3-4b"][0]
    tower = build_ours(vision, random_tower_state("gemma3-4b", vision.num_hidden_layers), dtype,
                       torch.device("cuda"))
    pixels = torch.rand(batch, vision.image_size, vision.image_size, 3, device="cuda") * 2 - 1
    with torch.inference_mode():
        tower(pixels)  # warm-up: kernel selection, allocator
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            tower(pixels)
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = event.self_device_time_total  # self: a kernel counted once, not again in its caller
        if device_us:
            rows.append({"kernel": event.key[:110], "calls": event.count, "ms_per_image": device_us / 1e3 / batch})
    return sorted(rows, key=lambda r: -float(r["ms_per_image"]))[:25]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--profile", action="store_true", help="also profile one forward of the whole tower")
    p.add_argument("--json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, a.dtype)
    rows = a.batch * PRESETS["gemma3-4b"][0].num_patches
    report = {"meta": result_meta(torch.device("cuda")), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "batch": a.batch, "dtype": a.dtype,
              "gemm_tflops": gemm_rates(rows, dtype), "attention_tflops": attention_rates(a.batch, dtype),
              "gelu_epilogue": gelu_epilogue(rows, dtype)}
    for group in ("gemm_tflops", "attention_tflops", "gelu_epilogue"):
        for name, rate in report[group].items():
            print(f"{group:<17}{name:<22}{rate if isinstance(rate, str) else f'{rate:10.4g}'}")
    write(report, a.json)
    if a.profile:
        report["profile"] = rows = profile_tower(a.batch, dtype)
        total = sum(float(r["ms_per_image"]) for r in rows)
        print(f"one forward, batch {a.batch}: GPU time by kernel (top {len(rows)}: {total:.2f} ms/image)")
        for r in rows:
            print(f"  {float(r['ms_per_image']):7.3f} ms/image {r['calls']:5} calls  {r['kernel']}")
    write(report, a.json)
    return 0


def write(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
