"""Configs: Gemma 3 defaults, presets, Hugging Face config.json parsing, validation messages."""

from __future__ import annotations

import pytest

from gemma3_vision import ConfigError, ProjectorConfig, VisionConfig
from gemma3_vision.model.config import PRESETS, configs_from_hf_dict


def test_defaults_are_gemma3():
    c = VisionConfig()
    assert (c.hidden_size, c.image_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers,
            c.patch_size, c.layer_norm_eps, c.num_channels) == (1152, 896, 4304, 16, 27, 14, 1e-6, 3)
    assert (c.head_dim, c.grid_size, c.num_patches) == (72, 64, 4096)
    assert ProjectorConfig().pool_kernel(c) == 4
    assert {k: p.text_hidden_size for k, (_, p) in PRESETS.items() if k.startswith("gemma3")} == {
        "gemma3-4b": 2560, "gemma3-12b": 3840, "gemma3-27b": 5376}


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ({"num_attention_heads": 5}, "num_attention_heads must divide hidden_size: 1152 is not a multiple of 5"),
    ({"image_size": 10}, "patch_size must not exceed image_size: patch 14 > image 10"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a float in (0, 1), got -1.0"),
    ({"patch_size": 14.0}, "patch_size must be a positive integer, got 14.0"),
])
def test_bad_vision_values_say_expected_and_found(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        VisionConfig(**kwargs)
    assert fragment in str(e.value)


def test_projector_validation():
    with pytest.raises(ConfigError, match="must be a square number, got 250"):
        ProjectorConfig(mm_tokens_per_image=250)
    with pytest.raises(ConfigError, match="64x64 patch grid must divide into 12x12 tokens"):
        ProjectorConfig(mm_tokens_per_image=144).pool_kernel(VisionConfig())


def test_from_gemma3_config_json():
    d = {
        "model_type": "gemma3", "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 3840, "model_type": "gemma3_text"},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
    }
    vision, projector = configs_from_hf_dict(d)
    assert vision == VisionConfig()  # layer_norm_eps and channels take SigLIP's defaults (1e-6, 3)
    assert projector == ProjectorConfig(text_hidden_size=3840, mm_tokens_per_image=256)


def test_from_siglip_configs():
    so400m = {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "num_attention_heads": 16,
              "num_hidden_layers": 27, "patch_size": 14}
    vision, projector = configs_from_hf_dict({"model_type": "siglip", "vision_config": so400m})
    assert projector is None and vision.grid_size == 27
    vision, projector = configs_from_hf_dict({"model_type": "siglip_vision_model", **so400m})
    assert projector is None and vision.num_patches == 729


@pytest.mark.parametrize(("d", "fragment"), [
    ({"model_type": "llama"}, "model_type must be gemma3, siglip or siglip_vision_model, got 'llama'"),
    ({"model_type": "gemma3"}, "no vision_config: it is a text-only model"),
    ({"model_type": "siglip_vision_model", "hidden_act": "relu"}, "hidden_act must be a tanh GELU"),
    ({"model_type": "siglip_vision_model", "num_attention_heads": 7},
     "num_attention_heads must divide hidden_size: 768 is not a multiple of 7"),
])
def test_bad_config_json(d, fragment):
    with pytest.raises(ConfigError) as e:
        configs_from_hf_dict(d)
    assert fragment in str(e.value)
