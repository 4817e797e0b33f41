"""One layer's attention on a CPU: our blocked attention against torch's flash kernel, per image size and dtype.

Where ``bench.py`` times the whole tower, this times only what ``VisionTower``'s attention choice rests on
(``model.default_attention``, ``model.BLOCKED_MIN_TOKENS``): one layer's attention, 16 heads of 72 (Gemma 3's
width), for an image of N tokens, each kernel fed q, k and v as the tower feeds them (strided views of one fused
qkv), the two timed in alternation. It also times the softmax step alone on one (512, 4096) block: torch's softmax,
exp and exp2, which is why the blocked attention computes 2**x. Usage::

    python benchmarks/cpu_attention.py --tokens 256 --tokens 576 --tokens 1024 --tokens 4096 --json attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gemma3_vision.model import cpu_kernels
from gemma3_vision.tools.bench import _time_runners, result_meta

HEADS, HEAD_DIM = 16, 72


def alternate(runners: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds of each runner over ``repeats`` calls taken in turn, after one warm-up call each (the tower
    benchmark's own timing loop)."""
    times, _, _, _ = _time_runners(runners, repeats, batch=1, device=torch.device("cpu"))
    return {name: statistics.median(t) for name, t in times.items()}


def attention_layer(tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    """Blocked against flash on one image of ``tokens`` tokens."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, tokens, 3, HEADS, HEAD_DIM, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    q, k, v = qkv.unbind(0)
    scale = HEAD_DIM**-0.5
    seconds = alternate({
        "blocked": lambda: cpu_kernels.blocked_attention(q, k, v, scale),
        "flash": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(1, tokens, -1),
    }, repeats)
    return {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "flash_over_blocked": seconds["flash"] / seconds["blocked"]}


def softmax_step(dtype: torch.dtype, repeats: int) -> dict:
    """torch's softmax, exp and exp2 on one block of scores, (512, 4096), in place where they can be."""
    scores = (3 * torch.randn(512, 4096, generator=torch.Generator().manual_seed(1))).to(dtype)
    buffer = torch.empty_like(scores)
    seconds = alternate({
        "softmax": lambda: scores.softmax(dim=-1),
        "exp": lambda: torch.exp(scores, out=buffer),
        "exp2": lambda: torch.exp2(scores, out=buffer),
    }, repeats)
    return {"dtype": str(dtype).removeprefix("torch."), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, action="append", help="tokens an image (default: 256, 576, 1024, 4096)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], action="append", help="default: both")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtype or ["float32", "bfloat16"]]
    if torch.bfloat16 in dtypes and not cpu_kernels.onednn_runs(torch.bfloat16):
        print("oneDNN does not run bf16 on this CPU: timing float32 only", file=sys.stderr)
        dtypes.remove(torch.bfloat16)
    report = {"meta": result_meta(torch.device("cpu")),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "layers": [], "softmax_step": []}
    for dtype in dtypes:
        step = softmax_step(dtype, args.repeats * 5)
        report["softmax_step"].append(step)
        print(f"{step['dtype']:8s} (512, 4096) block: " + ", ".join(
            f"{name} {s * 1e3:.3f} ms" for name, s in step["seconds"].items()), flush=True)
        for tokens in args.tokens or [256, 576, 1024, 4096]:
            layer = attention_layer(tokens, dtype, args.repeats)
            report["layers"].append(layer)
            print(f"{layer['dtype']:8s} {tokens:5d} tokens: blocked {layer['seconds']['blocked'] * 1e3:8.2f} ms, "
                  f"flash {layer['seconds']['flash'] * 1e3:8.2f} ms, flash/blocked {layer['flash_over_blocked']:.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
