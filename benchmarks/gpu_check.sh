#!/usr/bin/env bash
# One prepared GPU session: every GPU check and benchmark of issue 4 (target 6) and issue 6 part 5, in one go.
# Run from the repository root on a CUDA machine with the package and transformers installed:
#     OUT=/some/folder bash benchmarks/gpu_check.sh
# Writes into $OUT: nvidia-smi.txt, gpu_tests.txt (pytest -m gpu), bench_bf16_b32.{txt,json} (bf16 batch 32, ours vs
# transformers, plain and compiled, with the bf16 GEMM peak measured on the spot), bench_fp16_b32.{txt,json}.
# Targets: bf16 batch 32 >= 55% of the measured GEMM peak and >= 1.3x transformers; fp16 and bf16 without inf/NaN.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt" || exit 1
# Correctness first (fast): half precision finite and close to fp32, including weights scaled to overflow fp16.
python -m pytest -q -m gpu tests/test_model.py -rs 2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"
# bf16, batch 32, the full tower: ours vs transformers (sdpa), both plain and under torch.compile.
timeout 420 python benchmarks/bench.py --device cuda --dtype bfloat16 --batch 32 --repeats 5 \
    --json "$OUT/bench_bf16_b32.json" 2>&1 | tee "$OUT/bench_bf16_b32.txt"
# fp16: no inf/NaN (the report's cosine against ours and a finite max|diff| show it); plain only, to save time.
timeout 240 python benchmarks/bench.py --device cuda --dtype float16 --batch 32 --repeats 3 --no-compile \
    --json "$OUT/bench_fp16_b32.json" 2>&1 | tee "$OUT/bench_fp16_b32.txt"
python - "$OUT" <<'PY'
import json, math, sys
out = sys.argv[1]
for name in ("bench_bf16_b32", "bench_fp16_b32"):
    try:
        report = json.load(open(f"{out}/{name}.json"))
    except OSError:
        print(name, "missing"); continue
    for c in report["configs"]:
        runners = {r["name"]: r for r in c["runners"]}
        ours = runners["ours"]
        finite = all(r["max_abs_diff"] is None or math.isfinite(r["max_abs_diff"]) for r in runners.values())
        print(f"{name}: {ours['median_s']*1e3:.1f} ms/image, {100*ours['peak_fraction']:.0f}% of the measured "
              f"{c['gemm_peak_tflops']:.0f} TFLOP/s GEMM peak, ratios {c['ratios']}, outputs finite: {finite}")
PY
