"""gemma3-vision: Gemma 3 vision embeddings (SigLIP tower + multimodal projector), reference-exact and fast.

Names that need torch are imported on first use (PEP 562), so ``gemma3-vision --help`` and the errors and configs
load without paying for torch's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import PRESETS, ProjectorConfig, VisionConfig
from .errors import (
    ConfigError,
    DamagedOutputError,
    FormatError,
    Gemma3VisionError,
    ImageError,
    InputNotFoundError,
    ModelNotFoundError,
    OptionError,
    OutputError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "Gemma3Vision": "api", "RandomWeightsWarning": "api", "load": "api",
    "VisionTower": "model", "MultiModalProjector": "projector",
    "PreprocessConfig": "preprocessing", "preprocess": "preprocessing",
    "Embeddings": "embeddings", "open_embeddings": "embeddings",
}

if TYPE_CHECKING:
    from .api import Gemma3Vision, RandomWeightsWarning, load
    from .embeddings import Embeddings, open_embeddings
    from .model import VisionTower
    from .preprocessing import PreprocessConfig, preprocess
    from .projector import MultiModalProjector


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gemma3_vision' has no attribute {name!r}")


__all__ = [
    "PRESETS", "ConfigError", "DamagedOutputError", "Embeddings", "FormatError", "Gemma3Vision", "Gemma3VisionError",
    "ImageError", "InputNotFoundError", "ModelNotFoundError", "MultiModalProjector", "OptionError", "OutputError",
    "PreprocessConfig", "ProjectorConfig", "RandomWeightsWarning", "VisionConfig", "VisionTower", "WeightsError",
    "__version__", "load", "open_embeddings", "preprocess",
]
