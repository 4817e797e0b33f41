"""Where a layer's time goes in OpenVINO's CPU plugin: our graph and, with --transformers, OpenVINO converted from
transformers, side by side (docs/openvino.md, "What bounds the fraction of peak").

The full-width Gemma 3 tower with random weights, cut to LAYERS layers, at 896 px, batch 1, 2 threads. Each model is
compiled with PERF_COUNT on; after a warm-up run, REPEATS runs are profiled, one model after the other, and every
node's time kept at its median. Nodes fall in three groups, by the layers fused into them: the products
(FullyConnected: the patch embedding, q, k, v, out, fc1, fc2, with their fused bias and GELU), attention (the kernel
that ScaledDotProductAttention became: both products and the softmax), and everything else (residual adds,
LayerNorms, reorders, transposes). The products and attention are set against the
GEMM peak measured on the spot (the fc1 product in oneDNN, as `gemma3-vision bench` measures it), and the tower's
fraction of peak is bounded from above by the attention's measured rate: the fraction the tower would reach with
every product at the peak and nothing else costing time.

    python benchmarks/openvino_profile.py --layers 2 --dtype bfloat16 --transformers --json profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import openvino as ov
import torch

from gemma3_vision.backends import openvino_graph
from gemma3_vision.backends.openvino import compile_config
from gemma3_vision.model import cpu_kernels
from gemma3_vision.model.config import PRESETS
from gemma3_vision.tools.bench import (
    build_ours,
    convert_transformers_to_openvino,
    gemm_tflops,
    random_tower_state,
    result_meta,
)


def groups_of(compiled: Any) -> dict[str, str]:
    """Each executed node's group, by the layers fused into it (the runtime model's ``originalLayersNames``): a
    fused kernel takes the name of one of its layers, which need not be the attention's."""
    groups = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        fused = info["originalLayersNames"].astype(str)
        if info["layerType"].astype(str) == "FullyConnected":
            groups[op.get_friendly_name()] = "products"
        elif "ScaledDotProductAttention" in fused or "scaled_dot_product_attention" in fused:
            groups[op.get_friendly_name()] = "attention"
        else:
            groups[op.get_friendly_name()] = "other"
    return groups


def profile(compiled: Any, inputs: np.ndarray, repeats: int) -> tuple[list[float], dict[str, float]]:
    """Seconds of each run (summed over its nodes), and each group's time in ms: the sum of its nodes' medians over
    the runs (after one warm-up run)."""
    group = groups_of(compiled)
    request = compiled.create_infer_request()
    request.infer({0: inputs})
    walls: list[float] = []
    node_ms: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        request.infer({0: inputs})
        info = request.profiling_info
        walls.append(sum(p.real_time.total_seconds() for p in info))
        for p in info:
            node_ms[p.node_name].append(p.real_time.total_seconds() * 1e3)
    groups: dict[str, float] = defaultdict(float)
    for name, ms in node_ms.items():
        groups[group.get(name, "other")] += statistics.median(ms)
    return walls, dict(groups)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--transformers", action="store_true", help="also profile OpenVINO converted from transformers")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    vision = replace(PRESETS["gemma3-4b"][0], num_hidden_layers=a.layers)
    state = random_tower_state("gemma3-4b", a.layers)
    tower = build_ours(vision, state, dtype, torch.device("cpu"))
    compute = tower.compute_dtype or dtype
    core = ov.Core()
    config = compile_config(compute, a.threads) | {"PERF_COUNT": True}
    S = vision.image_size
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, S, S, vision.num_channels)).astype(np.float32)
    models = {"ours[openvino]": (openvino_graph.tower_model(tower, S, S, ()), pixels)}
    if a.transformers:  # NCHW, as transformers takes it
        models["openvino[transformers]"] = (convert_transformers_to_openvino(vision, state),
                                            np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    compiled = {name: core.compile_model(model, "CPU", config) for name, (model, _) in models.items()}

    rows = cpu_kernels.mlp_chunk(vision.num_patches, vision.intermediate_size, compute.itemsize)
    peak = max(gemm_tflops(compute, torch.device("cpu"), rows, vision.hidden_size, vision.intermediate_size),
               gemm_tflops(torch.float32, torch.device("cpu"), rows, vision.hidden_size, vision.intermediate_size))
    N, D, M, L = vision.num_patches, vision.hidden_size, vision.intermediate_size, a.layers
    gflop = {"products": 2 * N * D * (4 * D + 2 * M) * L / 1e9 + 2 * N * vision.num_channels * vision.patch_size**2 * D / 1e9,
             "attention": 4 * N * N * D * L / 1e9}
    results: dict[str, Any] = {"meta": result_meta(torch.device("cpu")), "layers": L, "dtype": a.dtype,
                               "compute": str(compute).replace("torch.", ""), "gemm_peak_tflops": peak, "models": {}}
    print(f"{L} layers at {S} px, {a.dtype}, {a.threads} threads; GEMM peak {peak:.3f} TFLOP/s")
    for name, (_, inputs) in models.items():
        walls, groups = profile(compiled[name], inputs, a.repeats)
        attention_rate = gflop["attention"] / groups["attention"]  # GFLOP/ms = TFLOP/s
        ceiling = (gflop["products"] + gflop["attention"]) / (gflop["products"] / peak + gflop["attention"] /
                                                              attention_rate) / peak
        entry = {
            "ms_per_layer": {k: v / L for k, v in groups.items()},
            "products_tflops": gflop["products"] / groups["products"], "attention_tflops": attention_rate,
            "products_peak_fraction": gflop["products"] / groups["products"] / peak,
            "attention_peak_fraction": attention_rate / peak,
            "tower_peak_fraction": sum(gflop.values()) / sum(groups.values()) / peak,
            "ceiling_peak_fraction": ceiling, "profiled_s": walls,
        }
        results["models"][name] = entry
        print(f"{name}: per layer {', '.join(f'{k} {v:.1f} ms' for k, v in entry['ms_per_layer'].items())}; "
              f"products {entry['products_peak_fraction']:.0%} of peak, attention "
              f"{entry['attention_peak_fraction']:.0%}, all {entry['tower_peak_fraction']:.0%}; at most "
              f"{ceiling:.0%} with every product at the peak and the attention as measured")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
