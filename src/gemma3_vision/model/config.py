"""Configs of the vision tower and the multimodal projector, their presets, and how files become configs.

The dataclass defaults *are* the Gemma 3 tower (identical for 4B, 12B and 27B). Files become configs only through
the ``from_*`` functions here, never through lookups scattered through the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import ConfigError

# SiglipVisionConfig's class defaults: what transformers uses for a key a config.json leaves out.
_SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "image_size": 224,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "num_channels": 3,
}
_GEMMA3_TEXT_HIDDEN_DEFAULT = 2304  # Gemma3TextConfig's default hidden_size
_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_fast", "gelu_new")  # all the tanh GELU


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive_int(name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision tower. Defaults are Gemma 3's."""

    hidden_size: int = 1152
    image_size: int = 896
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("hidden_size", "image_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "patch_size", "num_channels"):
            _positive_int(name, getattr(self, name))
        eps = self.layer_norm_eps
        _require(
            isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and 0 < eps < 1,
            f"layer_norm_eps must be a float in (0, 1), got {eps!r}",
        )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"num_attention_heads must divide hidden_size: {self.hidden_size} is not a multiple of "
            f"{self.num_attention_heads}",
        )
        # Not "patch divides image": SigLIP so400m-patch14-384 has a 27x27 grid and its valid-padding conv drops
        # the last 6 pixels of each side, as our patchify does.
        _require(
            self.patch_size <= self.image_size,
            f"patch_size must not exceed image_size: patch {self.patch_size} > image {self.image_size}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side: 896 // 14 = 64 for Gemma 3."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def with_image_size(self, image_size: int) -> VisionConfig:
        return replace(self, image_size=image_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProjectorConfig:
    """The Gemma 3 multimodal projector: avg-pool to ``mm_tokens_per_image``, RMSNorm(1 + w), ``x @ W``."""

    text_hidden_size: int = 2560  # 4B; 3840 for 12B, 5376 for 27B
    mm_tokens_per_image: int = 256

    def __post_init__(self) -> None:
        _positive_int("text_hidden_size", self.text_hidden_size)
        _positive_int("mm_tokens_per_image", self.mm_tokens_per_image)
        side = math.isqrt(self.mm_tokens_per_image)
        _require(
            side * side == self.mm_tokens_per_image,
            f"mm_tokens_per_image must be a square number, got {self.mm_tokens_per_image}",
        )

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    def pool_kernel(self, vision: VisionConfig) -> int:
        """Side of the average-pool window: the patch grid over the token grid (64 // 16 = 4 for Gemma 3)."""
        grid, side = vision.grid_size, self.tokens_per_side
        _require(
            grid % side == 0,
            f"the {grid}x{grid} patch grid must divide into {side}x{side} tokens "
            f"(mm_tokens_per_image={self.mm_tokens_per_image})",
        )
        return grid // side

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named presets: the model each `random[:name]` builds, and handy configs for tests.
PRESETS: dict[str, tuple[VisionConfig, ProjectorConfig]] = {
    "gemma3-4b": (VisionConfig(), ProjectorConfig(text_hidden_size=2560)),
    "gemma3-12b": (VisionConfig(), ProjectorConfig(text_hidden_size=3840)),
    "gemma3-27b": (VisionConfig(), ProjectorConfig(text_hidden_size=5376)),
    "tiny": (
        VisionConfig(hidden_size=64, image_size=112, intermediate_size=128, num_attention_heads=4,
                     num_hidden_layers=2, patch_size=14),
        ProjectorConfig(text_hidden_size=96, mm_tokens_per_image=16),
    ),
}


def vision_config_from_hf_dict(d: dict[str, Any]) -> VisionConfig:
    """A SigLIP vision config dict (``vision_config`` of a gemma3 config, or a siglip_vision_model config).

    Keys the file leaves out take SiglipVisionConfig's defaults, as transformers does.
    """
    _require(isinstance(d, dict), f"vision config must be a JSON object, got {type(d).__name__}")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    _require(
        act in _SUPPORTED_ACTIVATIONS,
        f"hidden_act must be a tanh GELU ({', '.join(_SUPPORTED_ACTIVATIONS)}), got {act!r}",
    )
    values = {key: d.get(key, default) for key, default in _SIGLIP_DEFAULTS.items()}
    return VisionConfig(**values)


def configs_from_hf_dict(d: dict[str, Any]) -> tuple[VisionConfig, ProjectorConfig | None]:
    """Configs from a Hugging Face ``config.json``: a gemma3 model, a SigLIP model or a SigLIP vision model.

    Returns the vision config and, for gemma3 only, the projector config (SigLIP has no projector).
    """
    _require(isinstance(d, dict), f"config.json must be a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type == "gemma3":
        _require("vision_config" in d, "a gemma3 config.json has no vision_config: it is a text-only model")
        vision = vision_config_from_hf_dict(d["vision_config"])
        text = d.get("text_config") or {}
        _require(isinstance(text, dict), f"text_config must be a JSON object, got {type(text).__name__}")
        projector = ProjectorConfig(
            text_hidden_size=text.get("hidden_size", _GEMMA3_TEXT_HIDDEN_DEFAULT),
            mm_tokens_per_image=d.get("mm_tokens_per_image", 256),
        )
        projector.pool_kernel(vision)  # the grid must pool evenly; fail at load, not at the first encode
        return vision, projector
    if model_type == "siglip":
        return vision_config_from_hf_dict(d.get("vision_config") or {}), None
    if model_type == "siglip_vision_model":
        return vision_config_from_hf_dict(d), None
    raise ConfigError(
        f"config.json model_type must be gemma3, siglip or siglip_vision_model, got {model_type!r}"
    )
