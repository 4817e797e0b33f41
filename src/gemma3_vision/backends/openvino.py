"""The OpenVINO backend: the tower runs as an OpenVINO model on the CPU plugin; the projector stays in torch.

The model is built from the loaded torch weights (``openvino_graph``), whatever format they came from, once per
image size and set of hidden layers asked for, and cached on disk with its compiled blob (``openvino_cache``): a
second process reads the blob (0.85 s for the full tower, docs/openvino.md). Precision: an fp32 run computes in f32
(``INFERENCE_PRECISION_HINT``); a bf16 run in bf16 where the CPU has AVX512-BF16 or AMX, else in f32, as the torch
backend decides (``api.compute_dtype_for``).

Images run one at a time, so an image's output never depends on its batch: the torch backend's CPU policy, which
runs a batch in chunks of one 896-px image too. The projector (4x4 pool, RMSNorm, one product: 0.03%
of the tower's work) is the torch module, so projected tokens are exactly the torch projector's of this tower output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openvino as ov
import torch

from ..model.projector import MultiModalProjector
from ..model.tower import VisionTower
from . import openvino_cache, openvino_graph

# OpenVINO's names for the compute dtypes this backend runs
_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def compile_config(compute_dtype: torch.dtype, threads: int | None = None) -> dict[str, Any]:
    """CPU plugin properties: the compute precision, one stream for latency (an image at a time), the threads."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _PRECISION[compute_dtype], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVINOBackend:
    """Runs ``tower`` with OpenVINO's CPU plugin and ``projector`` in torch; ``identity`` (the weights' cache identity, as
    ``output_folder.checkpoint_identity`` gives it) turns the disk cache on, None builds in memory each time."""

    name = "openvino"

    def __init__(self, tower: VisionTower, projector: MultiModalProjector | None, *, dtype: torch.dtype,
                 compute_dtype: torch.dtype, identity: dict[str, Any] | None = None, cache_dir: Path | None = None,
                 threads: int | None = None):
        self.vision_tower = tower
        self.projector = projector
        self.dtype = dtype  # what outputs are returned in
        self.compute_dtype = compute_dtype  # what the plugin computes in
        self.identity = identity
        self.cache_dir = cache_dir
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.core = ov.Core()
        self.compiled: dict[tuple[int, int, tuple[int, ...]], Any] = {}  # (H, W, layers) → an infer request
        self.last_cache_hit: bool | None = None  # whether the last model compiled came from the disk cache

    def __getstate__(self) -> dict[str, Any]:
        """Compiled models cannot be pickled: a copy compiles again (from the disk cache when it has one)."""
        return {**self.__dict__, "core": None, "compiled": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.core = ov.Core()

    def plugin_properties(self, height: int, width: int) -> dict[str, Any]:
        """The plugin properties for this input size: ``compile_config``'s, and no fused attention kernel where an
        image has as many tokens as the tower has heads."""
        config = compile_config(self.compute_dtype, self.threads)
        c = self.vision_tower.config
        if (height // c.patch_size) * (width // c.patch_size) == c.num_attention_heads:
            # OpenVINO 2026.4's CPU plugin computes attention wrongly in bf16 through its fused ("snippets") kernel
            # when an image has as many tokens as the tower has heads (16 tokens, 56 px, for Gemma 3: cosine 0.95 to
            # fp32). Without snippets it is right; on inputs that small the speed does not matter.
            config["SNIPPETS_MODE"] = "DISABLE"
        return config

    def cache_key(self, height: int, width: int, layers: tuple[int, ...], config: dict[str, Any]) -> dict[str, Any]:
        """What the cached IR and compiled blob depend on. The properties are in it because OpenVINO's own blob cache
        does not key on all of them (a blob compiled with snippets was loaded for a model compiled without)."""
        properties = {k: str(v) for k, v in sorted(config.items()) if k != "INFERENCE_NUM_THREADS"}
        return {"weights": self.identity, "dtype": str(self.dtype), "compute": _PRECISION[self.compute_dtype],
                "size": [height, width], "layers": list(layers), "openvino": ov.get_version(),
                "graph": openvino_graph.GRAPH_VERSION, "properties": properties}

    def request(self, height: int, width: int, layers: tuple[int, ...]) -> Any:
        """The infer request of the model for this input size and these hidden layers, built on first use."""
        key = (height, width, layers)
        if key not in self.compiled:
            config = self.plugin_properties(height, width)
            tower = self.vision_tower
            if self.identity is None:
                compiled = self.core.compile_model(openvino_graph.tower_model(tower, height, width, layers), "CPU",
                                                   config)
            else:
                def write(xml: Path) -> None:
                    model = openvino_graph.tower_model(tower, height, width, layers)
                    ov.save_model(model, xml, compress_to_fp16=False)  # fp16 compression would round the weights

                entry, self.last_cache_hit = openvino_cache.cached_ir(
                    self.cache_key(height, width, layers, config), write, root=self.cache_dir)
                config["CACHE_DIR"] = os.fspath(entry / openvino_cache.COMPILED)
                compiled = self.core.compile_model(os.fspath(entry / openvino_cache.XML), "CPU", config)
            self.compiled[key] = compiled.create_infer_request()
        return self.compiled[key]

    def tower(self, pixels: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        tower = self.vision_tower
        tower.check_pixels(pixels)
        wanted = tower.check_hidden_layers(layers) or ()
        B, H, W, _ = pixels.shape
        if B == 0:
            empty = torch.empty(0, tower.tokens_per_image(pixels), tower.config.hidden_size, dtype=self.dtype)
            return empty, {i: empty for i in wanted}
        request = self.request(H, W, wanted)
        pixels = pixels.detach().cpu().float().contiguous()
        outputs: list[list[torch.Tensor]] = [[] for _ in range(1 + len(wanted))]
        for b in range(B):
            request.infer({0: pixels[b:b + 1].numpy()})  # (1, H, W, 3)
            for i in range(len(outputs)):
                # copied out: the request reuses its output buffers on the next call
                outputs[i].append(torch.from_numpy(request.get_output_tensor(i).data.copy()))
        last, *hidden = (torch.cat(parts).to(self.dtype) for parts in outputs)  # (B, N, D) each
        return last, dict(zip(wanted, hidden, strict=True))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        assert self.projector is not None  # callers check has_projector first
        return self.projector(x)  # (B, T, text_hidden), per image on a CPU
