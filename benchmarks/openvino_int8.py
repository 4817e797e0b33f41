"""int8 on the OpenVINO backend: how close NNCF's weight-only int8 and its int8 PTQ stay to fp32 (docs/openvino.md).

The full-width Gemma 3 tower with random weights, cut to LAYERS layers, at 224 px; 8 made photo-like images
calibrate, 4 others are measured. Prints the cosine to the fp32 OpenVINO model on the tower output and on the
projected tokens (the torch projector applied to each).

    python benchmarks/openvino_int8.py 2
    python benchmarks/openvino_int8.py 8
"""

from __future__ import annotations

import sys
import time
import warnings

import nncf
import openvino as ov
import torch
from pipeline_bench import photo_like

import gemma3_vision as g3
from gemma3_vision.backends import openvino_graph


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def main() -> int:
    layers, size = int(sys.argv[1]) if len(sys.argv) > 1 else 2, 224
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = g3.load("random", dtype="float32", device="cpu", backend="torch", image_size=size)
    del encoder.model.vision_tower.encoder.layers[layers:]
    tower, projector = encoder.model.vision_tower, encoder.model.multi_modal_projector
    pixels = encoder.preprocess([photo_like(640, 480, seed=i) for i in range(12)])  # (12, S, S, 3)
    calibration, measured = pixels[:8], pixels[8:]
    core = ov.Core()

    def run(model: ov.Model) -> tuple[torch.Tensor, torch.Tensor]:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        out = torch.cat([torch.from_numpy(compiled(x[None].numpy())[0].copy()) for x in measured])
        return out, projector(out)

    reference = run(openvino_graph.tower_model(tower, size, size))
    methods = {
        "int8 weights (nncf.compress_weights INT8_ASYM)": lambda: nncf.compress_weights(
            openvino_graph.tower_model(tower, size, size), mode=nncf.CompressWeightsMode.INT8_ASYM),
        "int8 PTQ (nncf.quantize, 8 made photos, transformer preset)": lambda: nncf.quantize(
            openvino_graph.tower_model(tower, size, size), nncf.Dataset([x[None].numpy() for x in calibration]),
            model_type=nncf.ModelType.TRANSFORMER, subset_size=8),
    }
    for name, make in methods.items():
        t = time.perf_counter()
        model = make()
        made = time.perf_counter() - t
        out, tokens = run(model)
        print(f"{layers} layers, {size} px, {name}: tower cosine {cosine(out, reference[0]):.6f}, tokens cosine "
              f"{cosine(tokens, reference[1]):.6f} (made in {made:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
