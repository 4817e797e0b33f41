"""The Python API: ``load(model)`` returns an encoder whose ``encode(images)`` gives Gemma 3 soft tokens."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from .checkpoint import Checkpoint
from .errors import ConfigError
from .preprocess import DEFAULT_MAX_PIXELS, ImageInput, preprocess
from .resolve import resolve
from .weights import VisionModel, load_model

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


class RandomWeightsWarning(UserWarning):
    """The model has seeded random weights: its embeddings mean nothing."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls then run several times faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` picks bfloat16 where it is fast (CUDA, CPUs with AMX or AVX512-BF16), else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype is None:
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return DTYPES[dtype]


class Gemma3Vision:
    """A loaded tower (and projector). Use ``encode`` for images, ``encode_pixels`` for preprocessed input."""

    def __init__(self, model: VisionModel, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = device

    @property
    def vision_config(self):  # noqa: ANN201 - VisionConfig
        return self.checkpoint.vision

    @property
    def projector_config(self):  # noqa: ANN201 - ProjectorConfig | None
        return self.checkpoint.projector

    @property
    def preprocess_config(self):  # noqa: ANN201 - PreprocessConfig
        return self.checkpoint.preprocess

    @property
    def has_projector(self) -> bool:
        return self.model.multi_modal_projector is not None

    def preprocess(self, images: ImageInput | Sequence[ImageInput], *, exif_transpose: bool = True,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Images → float32 NHWC ``(B, S, S, 3)`` in [-1, 1]."""
        return preprocess(images, self.preprocess_config, exif_transpose=exif_transpose, max_pixels=max_pixels)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, *, project: bool = True) -> torch.Tensor:
        """NHWC pixels ``(B, H, W, 3)`` → ``(B, T, text_hidden)`` projected, or ``(B, N, hidden)`` with
        ``project=False``."""
        if project and not self.has_projector:
            raise ConfigError(f"{self.checkpoint.description} has no multimodal projector (a standalone SigLIP "
                              "tower): use project=False / --no-project")
        x = self.model.vision_tower(pixels.to(self.device, non_blocking=True))
        if project:
            assert self.model.multi_modal_projector is not None
            x = self.model.multi_modal_projector(x)
        return x

    def encode(self, images: ImageInput | Sequence[ImageInput], *, project: bool = True,
               batch_size: int = 8) -> torch.Tensor:
        """Images (paths, PIL images or uint8 HWC arrays) → ``(B, 256, text_hidden)``, or
        ``(B, num_patches, hidden)`` with ``project=False``."""
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        outputs = [
            self.encode_pixels(self.preprocess(images[i:i + batch_size]), project=project)
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(outputs)


def load(model: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None) -> Gemma3Vision:
    """Load a Gemma 3 vision tower and projector.

    Args:
        model: a checkpoint folder, or ``random`` / ``random:tiny`` for seeded random weights.
        dtype: ``float32``, ``bfloat16`` or ``float16``; ``None`` picks bfloat16 where it is fast, else float32.
        device: ``cpu``, ``cuda``, ...; ``None`` picks CUDA when available.

    Returns:
        A ``Gemma3Vision`` whose ``encode(images)`` returns embeddings.
    """
    device = torch.device(device) if device is not None else default_device()
    run_dtype = resolve_dtype(dtype, device)
    checkpoint = resolve(model)
    if checkpoint.is_random:
        warnings.warn(f"{checkpoint.description} has seeded RANDOM weights: its embeddings mean nothing",
                      RandomWeightsWarning, stacklevel=2)
    vision_model = load_model(checkpoint, dtype=run_dtype, device=device, check_finite=not checkpoint.is_random)
    return Gemma3Vision(vision_model, checkpoint, run_dtype, device)
