"""Shared fixtures: seeded random models, the transformers reference built from the same weights, test images."""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gemma3_vision as g3
from gemma3_vision.model.config import PRESETS, ProjectorConfig, VisionConfig

# Tolerances per dtype, in one place. fp32 reorders sums (fused kernels, patchify-as-matmul), nothing more;
# bf16 keeps 8 mantissa bits, so it is judged by cosine against the fp32 reference.
TOL = {
    "fp32_max_abs": 1e-4,
    "bf16_cosine": 0.9999,
}

TINY_VISION, TINY_PROJECTOR = PRESETS["tiny"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def hf_gemma3_config(vision: VisionConfig, projector: ProjectorConfig):
    transformers = pytest.importorskip("transformers")
    return transformers.Gemma3Config(
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": vision.hidden_size,
            "image_size": vision.image_size, "intermediate_size": vision.intermediate_size,
            "num_attention_heads": vision.num_attention_heads, "num_hidden_layers": vision.num_hidden_layers,
            "patch_size": vision.patch_size, "layer_norm_eps": vision.layer_norm_eps,
            "num_channels": vision.num_channels, "vision_use_head": False,
        },
        text_config={"hidden_size": projector.text_hidden_size, "num_hidden_layers": 1,
                     "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 16, "vocab_size": 300000, "vision_use_head": False},
        mm_tokens_per_image=projector.mm_tokens_per_image,
    )


class Reference:
    """transformers' SiglipVisionModel + Gemma3MultiModalProjector holding given canonical weights."""

    def __init__(self, vision: VisionConfig, projector: ProjectorConfig, state: dict[str, torch.Tensor],
                 attn: str = "sdpa"):
        transformers = pytest.importorskip("transformers")
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        config = hf_gemma3_config(vision, projector)
        config.vision_config._attn_implementation = attn
        self.tower = transformers.SiglipVisionModel(config.vision_config).eval()
        self.projector = Gemma3MultiModalProjector(config).eval()
        tower_sd = {k[len("vision_tower."):]: v for k, v in state.items()
                    if k.startswith("vision_tower.")}
        proj_sd = {k[len("multi_modal_projector."):]: v for k, v in state.items()
                   if k.startswith("multi_modal_projector.")}
        self.tower.load_state_dict(tower_sd, strict=True)
        self.projector.load_state_dict(proj_sd, strict=True)

    @torch.inference_mode()
    def __call__(self, pixels_nhwc: torch.Tensor, **kwargs):
        out = self.tower(pixel_values=pixels_nhwc.permute(0, 3, 1, 2), **kwargs)
        return out, self.projector(out.last_hidden_state)


def random_state(preset: str) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", g3.RandomWeightsWarning)
        model = g3.load(f"random:{preset}", dtype="float32", device="cpu").model  # CPU also where CUDA is
        # clone(): random weights are overlapping windows of shared pools, which safetensors' save_file refuses
        return {k: v.float().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session", autouse=True)
def openvino_cache_in_tmp(tmp_path_factory):
    """The OpenVINO backend's model cache (backends/openvino_cache.py) in the session's temporary folder, not the
    user's ~/.cache: ``auto`` picks that backend on x86-64 wherever the extra is installed, as in CI."""
    saved = os.environ.get("GEMMA3_VISION_CACHE")
    os.environ["GEMMA3_VISION_CACHE"] = str(tmp_path_factory.mktemp("gemma3-vision-cache"))
    yield
    if saved is None:
        os.environ.pop("GEMMA3_VISION_CACHE", None)
    else:
        os.environ["GEMMA3_VISION_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_state("tiny")


@pytest.fixture(scope="session")
def tiny_model():
    """random:tiny in fp32 on the torch backend, whose modules tests instrument (``auto`` may pick OpenVINO)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", g3.RandomWeightsWarning)
        return g3.load("random:tiny", dtype="float32", device="cpu", backend="torch")


def make_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with detail: gradients plus seeded noise, uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def without_blocking(fn: Callable[[], Any], fifo: Path, seconds: float = 10.0) -> Any:
    """``fn()``, failing the test (not hanging it) if it is still blocked on opening ``fifo`` after ``seconds``."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is waiting: this releases it
        thread.join(seconds)
        pytest.fail(f"blocked for {seconds} s opening the FIFO {fifo}")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def states_alive_at_the_last_norm(t: torch.nn.Module, run: Callable[[], object]) -> list[int]:
    """Which states (0 the embeddings, i the output of layer i) are still held when ``run()`` reaches the tower's
    post_layernorm: those it keeps, plus the last layer's, which the norm is about to read."""
    refs: dict[int, weakref.ref] = {}

    def keep_ref(i: int) -> Callable[..., None]:
        return lambda module, args, out: refs.__setitem__(i, weakref.ref(out))

    alive: list[int] = []
    hooks = [t.embeddings.register_forward_hook(keep_ref(0)),
             *(layer.register_forward_hook(keep_ref(i)) for i, layer in enumerate(t.encoder.layers, start=1)),
             t.post_layernorm.register_forward_pre_hook(
                 lambda module, args: alive.extend(i for i, ref in sorted(refs.items()) if ref() is not None))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return alive
