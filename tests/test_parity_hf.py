"""Our tower and projector against transformers' SiglipVisionModel + Gemma3MultiModalProjector, same weights."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PROJECTOR, TINY_VISION, TOL, Reference, cosine, max_abs, random_state

pytest.importorskip("transformers")


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g) * 2 - 1  # NHWC in [-1, 1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_fp32_matches_transformers(tiny_model, tiny_state, attn):
    ref = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state, attn=attn)
    x = pixels(3, TINY_VISION.image_size)
    ref_out, ref_proj = ref(x, output_hidden_states=True)
    tower = tiny_model.model.vision_tower(x, output_hidden_states=True)
    proj = tiny_model.encode_pixels(x)

    d = max_abs(tower.last_hidden_state, ref_out.last_hidden_state)
    assert d <= TOL["fp32_max_abs"], f"tower output max abs diff {d:.3g} > {TOL['fp32_max_abs']}"
    for i, (ours, theirs) in enumerate(zip(tower.hidden_states, ref_out.hidden_states, strict=True)):
        d = max_abs(ours, theirs)
        assert d <= TOL["fp32_max_abs"], f"hidden state {i}: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"
    d = max_abs(proj, ref_proj)
    assert proj.shape == (3, TINY_PROJECTOR.mm_tokens_per_image, TINY_PROJECTOR.text_hidden_size)
    assert d <= TOL["fp32_max_abs"], f"projected max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


def test_tiny_bf16_close_to_fp32_reference(tiny_state):
    import gemma3_vision as g3

    ref = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state)
    x = pixels(2, TINY_VISION.image_size, seed=1)
    ref_out, ref_proj = ref(x)
    with pytest.warns(g3.RandomWeightsWarning):
        bf16 = g3.load("random:tiny", dtype="bfloat16", device="cpu")
    tower = bf16.encode_pixels(x, project=False)
    proj = bf16.encode_pixels(x)
    assert tower.dtype == torch.bfloat16 and proj.dtype == torch.bfloat16
    c = cosine(tower, ref_out.last_hidden_state)
    assert c >= TOL["bf16_cosine"], f"bf16 tower cosine {c:.6f} < {TOL['bf16_cosine']}"
    c = cosine(proj, ref_proj)
    assert c >= TOL["bf16_cosine"], f"bf16 projected cosine {c:.6f} < {TOL['bf16_cosine']}"


@pytest.mark.slow
def test_full_gemma3_fp32_and_bf16_match_transformers():
    """The real Gemma 3 config (896 px, 27 layers, width 1152, D = 2560), one image: fp32 and bf16."""
    import gemma3_vision as g3
    from gemma3_vision.model.config import PRESETS

    vision, projector = PRESETS["gemma3-4b"]
    state = random_state("gemma3-4b")
    ref = Reference(vision, projector, state)
    x = pixels(1, vision.image_size, seed=2)
    ref_out, ref_proj = ref(x)
    del ref

    with pytest.warns(g3.RandomWeightsWarning):
        fp32 = g3.load("random", dtype="float32", device="cpu")
    tower = fp32.encode_pixels(x, project=False)
    proj = fp32.model.multi_modal_projector(tower)
    del fp32
    d = max_abs(tower, ref_out.last_hidden_state)
    assert d <= TOL["fp32_max_abs"], f"full tower fp32 max abs diff {d:.3g} > {TOL['fp32_max_abs']}"
    d = max_abs(proj, ref_proj)
    assert d <= TOL["fp32_max_abs"], f"full projected fp32 max abs diff {d:.3g} > {TOL['fp32_max_abs']}"

    with pytest.warns(g3.RandomWeightsWarning):
        bf16 = g3.load("random", dtype="bfloat16", device="cpu")
    tower = bf16.encode_pixels(x, project=False)
    proj = bf16.model.multi_modal_projector(tower)
    c = cosine(tower, ref_out.last_hidden_state)
    assert c >= TOL["bf16_cosine"], f"full tower bf16 cosine {c:.6f} < {TOL['bf16_cosine']}"
    c = cosine(proj, ref_proj)
    assert c >= TOL["bf16_cosine"], f"full projected bf16 cosine {c:.6f} < {TOL['bf16_cosine']}"
