"""Other input sizes against transformers with ``interpolate_pos_encoding=True``, same weights.

The tiny preset (112 px, 8×8 grid, 2×2 merge → 16 tokens) stands in for Gemma 3 (896 px, 64×64, 4×4 → 256): its
56 and 168 px runs are Gemma 3's 448 and 1344 scaled by the same factor (grids 4 and 12, i.e. 32 and 96).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import (
    TINY_PROJECTOR,
    TINY_VISION,
    TOL,
    Reference,
    hf_gemma3_config,
    make_rgb,
    max_abs,
)
from gemma3_vision import ConfigError, Gemma3Vision, RandomWeightsWarning, load
from gemma3_vision.checkpoints.checkpoint import Checkpoint, TensorSource
from gemma3_vision.checkpoints.weights import load_model
from gemma3_vision.model.config import PRESETS, ProjectorConfig, VisionConfig
from gemma3_vision.model.preprocessing import PreprocessConfig, preprocess
from gemma3_vision.model.tower import interpolate_position_embedding

transformers = pytest.importorskip("transformers")


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g) * 2 - 1  # NHWC in [-1, 1]


def reference_projector(vision: VisionConfig, projector: ProjectorConfig, state: dict[str, torch.Tensor],
                        image_size: int, kernel: int):
    """transformers' projector built for ``image_size``: it derives its pool from the config, so the config gets
    the size and the token count that keep the k×k merge."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    grid = image_size // vision.patch_size
    config = hf_gemma3_config(vision.with_image_size(image_size),
                              ProjectorConfig(projector.text_hidden_size, (grid // kernel) ** 2))
    ref = Gemma3MultiModalProjector(config).eval()
    ref.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in state.items()
                         if k.startswith("multi_modal_projector.")}, strict=True)
    assert ref.kernel_size == kernel
    return ref


@pytest.mark.parametrize("size", [56, 168, 224], ids=["448-like", "1344-like", "2x"])
def test_tiny_other_sizes_match_transformers(tiny_model, tiny_state, size):
    ref = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state)
    x = pixels(2, size, seed=size)
    with torch.inference_mode():  # the tower alone: the reference projector's pool is built for one size
        ref_out = ref.tower(pixel_values=x.permute(0, 3, 1, 2), interpolate_pos_encoding=True,
                            output_hidden_states=True)
    ours = tiny_model.model.vision_tower(x, output_hidden_states=True)
    grid = size // TINY_VISION.patch_size
    assert ours.last_hidden_state.shape == (2, grid * grid, TINY_VISION.hidden_size)
    d = max_abs(ours.last_hidden_state, ref_out.last_hidden_state)
    assert d <= TOL["fp32_max_abs"], f"{size} px tower: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"
    d = max_abs(ours.hidden_states[0], ref_out.hidden_states[0])  # the interpolated positions enter here
    assert d <= TOL["fp32_max_abs"], f"{size} px embeddings: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"

    kernel = tiny_model.model.multi_modal_projector.kernel_size
    ref_proj = reference_projector(TINY_VISION, TINY_PROJECTOR, tiny_state, size, kernel)
    with torch.inference_mode():
        expected = ref_proj(ref_out.last_hidden_state)
    projected = tiny_model.encode_pixels(x)
    assert projected.shape == (2, (grid // kernel) ** 2, TINY_PROJECTOR.text_hidden_size)
    assert tiny_model.tokens_per_image(size) == (grid // kernel) ** 2
    d = max_abs(projected, expected)
    assert d <= TOL["fp32_max_abs"], f"{size} px projected: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


def test_interpolation_is_transformers_bicubic(tiny_state):
    """The resampled table alone, against the reference embeddings' own interpolation."""
    ref = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state)
    table = tiny_state["vision_tower.embeddings.position_embedding.weight"]  # (64, 64)
    for grid in (4, 12, 16, 5):
        ours = interpolate_position_embedding(table, grid, grid)
        with torch.inference_mode():
            theirs = ref.tower.embeddings.interpolate_pos_encoding(
                torch.zeros(1, grid * grid, table.shape[1]), grid * 14, grid * 14)[0]
        d = max_abs(ours, theirs)
        assert d <= 1e-6, f"interpolated {grid}x{grid} table: max abs diff {d:.3g} > 1e-6"
    assert interpolate_position_embedding(table, 8, 8) is table  # the native grid is used as-is, as transformers


def test_encode_and_load_take_an_image_size(tiny_model):
    images = [make_rgb(90, 130, seed=1), make_rgb(200, 150, seed=2)]
    at_224 = tiny_model.encode(images, image_size=224)
    assert at_224.shape == (2, 64, TINY_PROJECTOR.text_hidden_size)  # (16 // 2)² tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        loaded = load("random:tiny", dtype="float32", device="cpu", image_size=224, backend="torch")  # as tiny_model
    assert loaded.preprocess_config.image_size == 224
    d = max_abs(loaded.encode(images), at_224)
    assert d == 0.0, f"load(image_size=224) vs encode(image_size=224): max abs diff {d:.3g} (tolerance 0)"
    # The preprocessed input at 224 equals transformers' processor at 224.
    proc = transformers.Gemma3ImageProcessorPil(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
    ref = proc(images[0], return_tensors="pt")["pixel_values"].permute(0, 2, 3, 1)
    d = max_abs(loaded.preprocess([images[0]]), ref)
    assert d == 0.0, f"224 px preprocessing vs transformers: max abs diff {d:.3g} (tolerance 0)"


def test_sizes_the_projector_cannot_merge_are_refused(tiny_model):
    image = make_rgb(64, 64)
    with pytest.raises(ConfigError, match=r"9x9 patch grid, which the projector's 2x2 merge does not divide"):
        tiny_model.encode([image], image_size=126)
    assert tiny_model.encode([image], image_size=126, project=False).shape == (1, 81, TINY_VISION.hidden_size)
    # A remainder under one patch is cut before the merge: 125 px is a 8x8 grid, as 112 px (docs/pan-and-scan.md).
    assert tiny_model.tokens_per_image(125) == 16
    assert tiny_model.encode([image], image_size=125).shape == (1, 16, TINY_PROJECTOR.text_hidden_size)
    with pytest.raises(ConfigError, match="at least the patch size 14"):
        tiny_model.encode([image], image_size=10)
    with pytest.raises(ConfigError, match="at least the patch size 14"):
        load("random:tiny", image_size=0)


def siglip_encoder(vision: VisionConfig, state: dict[str, torch.Tensor]) -> Gemma3Vision:
    """A standalone SigLIP tower (no projector) holding ``state``, as a SigLIP checkpoint folder would load."""
    tensors = {k: TensorSource(k, tuple(v.shape), "F32", k, lambda v=v: v) for k, v in state.items()}
    checkpoint = Checkpoint(format="siglip-test", files=[], vision=vision, projector=None,
                            preprocess=PreprocessConfig(image_size=vision.image_size), tensors=tensors,
                            description="tiny SigLIP")
    model = load_model(checkpoint, dtype=torch.float32, device="cpu")
    return Gemma3Vision(model, checkpoint, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("size", [384, 224, 448])
def test_siglip_27x27_grid_at_other_sizes(size):
    """so400m-patch14-384 geometry (384 px, 27×27 grid, remainder cut) on a tiny width, run at other sizes."""
    vision = VisionConfig(hidden_size=64, image_size=384, intermediate_size=128, num_attention_heads=4,
                          num_hidden_layers=2, patch_size=14)
    g = torch.Generator().manual_seed(7)
    hf = transformers.SiglipVisionModel(hf_gemma3_config(vision, TINY_PROJECTOR).vision_config).eval()
    state = {f"vision_tower.{k}": torch.randn(v.shape, generator=g) * 0.05 + (k.endswith("norm1.weight")
             or k.endswith("norm2.weight") or k.endswith("post_layernorm.weight"))
             for k, v in hf.state_dict().items()}
    hf.load_state_dict({k.removeprefix("vision_tower."): v for k, v in state.items()}, strict=True)
    encoder = siglip_encoder(vision, state)
    assert encoder.model.vision_tower.embeddings.position_embedding.weight.shape[0] == 27 * 27

    images = [make_rgb(300, 200, seed=size)]
    ours = encoder.encode(images, image_size=size, project=False)
    x = preprocess(images, PreprocessConfig(image_size=size)).permute(0, 3, 1, 2)  # NCHW for transformers
    with torch.inference_mode():
        theirs = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    grid = size // 14
    assert ours.shape == (1, grid * grid, 64)
    d = max_abs(ours, theirs)
    assert d <= TOL["fp32_max_abs"], f"SigLIP 27x27 table at {size} px: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


@pytest.mark.parametrize("size", [448, 1344])
def test_full_size_table_interpolates_as_transformers(size):
    """Gemma 3's own 64×64×1152 table resampled to 32×32 (448 px) and 96×96 (1344 px), against the reference
    embeddings module (the rest of the tower is size-independent and covered on the tiny model above)."""
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    vision, projector = PRESETS["gemma3-4b"]
    embeddings = SiglipVisionEmbeddings(hf_gemma3_config(vision, projector).vision_config).eval()
    table = torch.randn(vision.num_patches, vision.hidden_size, generator=torch.Generator().manual_seed(size))
    embeddings.position_embedding.weight.data.copy_(table)
    grid = size // vision.patch_size
    ours = interpolate_position_embedding(table, grid, grid)
    with torch.inference_mode():
        theirs = embeddings.interpolate_pos_encoding(torch.zeros(1, grid * grid, vision.hidden_size), size, size)[0]
    assert ours.shape == (grid * grid, vision.hidden_size)
    d = max_abs(ours, theirs)
    assert d <= 1e-6, f"64x64 table at {size} px: max abs diff {d:.3g} > 1e-6"
