"""gemma3-vision: Gemma 3 vision embeddings (SigLIP tower + multimodal projector), reference-exact and fast.

Names that need torch are imported on first use (PEP 562), so ``gemma3-vision --help`` and the errors and configs
load without paying for torch's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    PromptError,
    WeightsError,
)
from .model.config import PRESETS, ProjectorConfig, VisionConfig

__version__ = "0.1.0"

_LAZY = {
    "Gemma3Vision": "api", "RandomWeightsWarning": "api", "load": "api",
    "VisionTower": "model.tower", "MultiModalProjector": "model.projector",
    "PreprocessConfig": "model.preprocessing", "preprocess": "model.preprocessing",
    "Embeddings": "jobs.embeddings", "open_embeddings": "jobs.embeddings",
    "SplicedPrompt": "language_model", "expand_prompt": "language_model", "greedy_generate": "language_model",
    "image_prompt": "language_model", "splice_images": "language_model",
}

if TYPE_CHECKING:
    from .api import Gemma3Vision, RandomWeightsWarning, load
    from .jobs.embeddings import Embeddings, open_embeddings
    from .language_model import SplicedPrompt, expand_prompt, greedy_generate, image_prompt, splice_images
    from .model.preprocessing import PreprocessConfig, preprocess
    from .model.projector import MultiModalProjector
    from .model.tower import VisionTower


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gemma3_vision' has no attribute {name!r}")


__all__ = [
    "PRESETS", "ConfigError", "DamagedOutputError", "Embeddings", "FormatError", "Gemma3Vision", "Gemma3VisionError",
    "ImageError", "InputNotFoundError", "ModelNotFoundError", "MultiModalProjector", "OptionError", "OutputError",
    "PreprocessConfig", "ProjectorConfig", "PromptError", "RandomWeightsWarning", "SplicedPrompt", "VisionConfig",
    "VisionTower", "WeightsError", "__version__", "expand_prompt", "greedy_generate", "image_prompt", "load",
    "open_embeddings", "preprocess", "splice_images",
]
