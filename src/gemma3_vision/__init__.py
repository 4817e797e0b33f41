"""gemma3-vision: Gemma 3 vision embeddings (SigLIP tower + multimodal projector), reference-exact and fast."""

from .api import Gemma3Vision, RandomWeightsWarning, load
from .config import PRESETS, ProjectorConfig, VisionConfig
from .errors import ConfigError, FormatError, Gemma3VisionError, ImageError, ModelNotFoundError, WeightsError
from .model import VisionTower
from .preprocess import PreprocessConfig, preprocess
from .projector import MultiModalProjector

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ConfigError", "FormatError", "Gemma3Vision", "Gemma3VisionError", "ImageError",
    "ModelNotFoundError", "MultiModalProjector", "PreprocessConfig", "ProjectorConfig", "RandomWeightsWarning",
    "VisionConfig", "VisionTower", "WeightsError", "__version__", "load", "preprocess",
]
