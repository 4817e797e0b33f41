"""One random model written in every format: each loads to the same weights and gives the same embeddings as the
Hugging Face safetensors folder; `info --json` describes each; SigLIP and MLX specifics."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION, TOL, max_abs
from format_fixtures import (
    populate_hf_cache,
    write_hf_folder,
    write_mlx_folder,
    write_mmproj,
    write_ollama_blob,
    write_ollama_store,
    write_siglip_folder,
)
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.cli import main
from gemma3_vision.errors import ConfigError, WeightsError
from gemma3_vision.model.config import ProjectorConfig, VisionConfig


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_state):
    """Every format of the same weights, keyed by a short name → (model argument, expected format)."""
    root = tmp_path_factory.mktemp("formats")
    hf = write_hf_folder(root / "hf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    write_hf_folder(root / "hf-sharded", tiny_state, TINY_VISION, TINY_PROJECTOR, shards=3)
    write_mmproj(root / "mmproj.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, projection=Q.F32)
    write_mmproj(root / "legacy.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, projection=Q.F32, legacy_ffn=True)
    write_ollama_blob(root / "blob.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR, matrices=Q.F32)
    write_ollama_store(root / "ollama", "gemma3:tiny", root / "blob.gguf")
    write_mlx_folder(root / "mlx", tiny_state, TINY_VISION, TINY_PROJECTOR)
    populate_hf_cache(root / "hf-cache", "acme/tiny", {p.name: p for p in hf.iterdir()})
    return root, {
        "hf": (str(hf), "hf-safetensors"),
        "hf-sharded": (str(root / "hf-sharded"), "hf-safetensors"),
        "hf-file": (str(hf / "model.safetensors"), "hf-safetensors"),
        "mmproj": (str(root / "mmproj.gguf"), "gguf-mmproj"),
        "mmproj-legacy": (str(root / "legacy.gguf"), "gguf-mmproj"),
        "ollama-blob": (str(root / "blob.gguf"), "gguf-ollama"),
        "ollama-name": ("gemma3:tiny", "gguf-ollama"),
        "mlx": (str(root / "mlx"), "mlx-safetensors"),
        "hub-cache": ("acme/tiny", "hf-safetensors"),
    }


@pytest.fixture
def env(sources, monkeypatch):
    root, _ = sources
    monkeypatch.setenv("OLLAMA_MODELS", str(root / "ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return sources[1]


FORMATS = ["hf-sharded", "hf-file", "mmproj", "mmproj-legacy", "ollama-blob", "ollama-name", "mlx", "hub-cache"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_embeddings(env, fmt, tiny_state):
    model, expected_format = env[fmt]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-weights warning: these are real files
        ref = g3.load(env["hf"][0], dtype="float32", device="cpu")
        ours = g3.load(model, dtype="float32", device="cpu")
    assert ours.checkpoint.format == expected_format
    ref_sd, sd = ref.model.state_dict(), ours.model.state_dict()
    for name, t in ref_sd.items():
        if name.endswith("mm_soft_emb_norm.weight") and expected_format.startswith("gguf"):
            d = max_abs(sd[name], t)  # stored as fp32 (1 + w): recovering w costs up to 2**-24
            assert d <= 2.0**-24, f"{name}: max abs diff {d:.3g} > 2**-24"
        else:
            assert torch.equal(sd[name], t), f"{name}: max abs diff {max_abs(sd[name], t):.3g}"
    x = pixels(2, TINY_VISION.image_size)
    d = max_abs(ours.encode_pixels(x), ref.encode_pixels(x))
    assert d <= TOL["fp32_max_abs"], f"{fmt}: projected max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


@pytest.mark.parametrize("fmt", ["hf", *FORMATS])
def test_info_json_describes_each_format(env, fmt):
    model, expected_format = env[fmt]
    result = CliRunner().invoke(main, ["info", model, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == expected_format
    assert info["vision_config"]["num_hidden_layers"] == TINY_VISION.num_hidden_layers
    assert info["vision_config"]["layer_norm_eps"] == TINY_VISION.layer_norm_eps
    assert info["projector_width"] == TINY_PROJECTOR.text_hidden_size
    assert info["tensors"] == 4 + 16 * TINY_VISION.num_hidden_layers + 2 + 2 - 1  # 39 for 2 layers
    D, F = TINY_VISION.hidden_size, TINY_VISION.intermediate_size
    tower = 3 * 14 * 14 * D + D + 64 * D + TINY_VISION.num_hidden_layers * (4 * D * D + 4 * D + 2 * D * F + F + D
                                                                           + 4 * D) + 2 * D
    assert info["parameters"] == {"vision_tower": tower, "projector": D + D * TINY_PROJECTOR.text_hidden_size,
                                  "total": tower + D + D * TINY_PROJECTOR.text_hidden_size}
    conventions = " ".join(info["conventions_undone"])
    assert ("1 + w" in conventions) == expected_format.startswith("gguf")
    assert ("swapped FFN" in conventions) == (fmt == "mmproj-legacy")
    assert ("OHWI" in conventions) == (fmt == "mlx")
    assert info["files"] and all(isinstance(f, str) for f in info["files"])
    assert set(info["stored_dtypes"]) == {"F32"}


def test_info_text_output(env):
    result = CliRunner().invoke(main, ["info", env["mmproj-legacy"][0]])
    assert result.exit_code == 0, result.output
    assert "gguf-mmproj" in result.output and "swapped FFN" in result.output and "parameters:" in result.output


def test_info_on_a_missing_model_is_one_line(env):
    result = CliRunner().invoke(main, ["info", "gemma3:404"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "not pulled" in result.output


def test_siglip_checkpoint_runs_at_its_own_size_without_projector(tmp_path, tiny_state):
    # A SigLIP at 56 px (4 x 4 grid): head, text model and logit scale/bias are dropped on purpose.
    vision = VisionConfig(hidden_size=64, image_size=56, intermediate_size=128, num_attention_heads=4,
                          num_hidden_layers=2, patch_size=14)
    state = {k: v for k, v in tiny_state.items() if k.startswith("vision_tower.")}
    state["vision_tower.embeddings.position_embedding.weight"] = state[
        "vision_tower.embeddings.position_embedding.weight"][:16]
    folder = write_siglip_folder(tmp_path / "siglip", state, vision)
    m = g3.load(folder, dtype="float32", device="cpu")
    assert m.checkpoint.format == "siglip-safetensors" and m.checkpoint.unexpected == []
    assert m.vision_config == vision and not m.has_projector
    out = m.encode_pixels(pixels(1, 56), project=False)
    assert out.shape == (1, 16, 64)
    with pytest.raises(ConfigError, match="no multimodal projector .*project=False"):
        m.encode_pixels(pixels(1, 56))
    info = json.loads(CliRunner().invoke(main, ["info", str(folder), "--json"]).output)
    assert info["format"] == "siglip-safetensors" and info["projector_config"] is None
    assert info["output_shape"] == [16, 64]


def test_mlx_patch_conv_layout_ambiguity_is_refused(tmp_path):
    # With 14 input channels, (O, C, 14, 14) and (O, 14, 14, C) are the same shape: the layout cannot be told.
    vision = VisionConfig(hidden_size=32, image_size=28, intermediate_size=64, num_attention_heads=2,
                          num_hidden_layers=1, patch_size=14, num_channels=14)
    folder = tmp_path / "mlx"
    folder.mkdir()
    from safetensors.torch import save_file

    from format_fixtures import gemma3_config_dict

    projector = ProjectorConfig(text_hidden_size=96, mm_tokens_per_image=4)
    (folder / "config.json").write_text(json.dumps(gemma3_config_dict(vision, projector)))
    save_file({"vision_tower.vision_model.embeddings.patch_embedding.weight": torch.zeros(32, 14, 14, 14)},
              str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="ambiguous between OIHW and OHWI"):
        resolve(folder)
