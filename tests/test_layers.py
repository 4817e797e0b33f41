"""Intermediate layers against transformers' ``output_hidden_states``; pooled vectors (mean, L2 norm)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PROJECTOR, TINY_VISION, TOL, Reference, make_rgb, max_abs
from gemma3_vision import ConfigError

pytest.importorskip("transformers")

IMAGES = [make_rgb(120, 160, seed=1), make_rgb(300, 90, seed=2), make_rgb(112, 112, seed=3)]


def test_layers_match_transformers_hidden_states(tiny_model, tiny_state):
    """Layer 0 is the embeddings, layer i the output of encoder layer i, before post_layernorm: as transformers."""
    depth = TINY_VISION.num_hidden_layers
    results = tiny_model.encode(IMAGES, layers=list(range(depth + 1)), batch_size=2)
    ref = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state)
    ref_out, ref_proj = ref(tiny_model.preprocess(IMAGES), output_hidden_states=True)
    assert len(ref_out.hidden_states) == depth + 1
    for b, result in enumerate(results):
        assert sorted(result.layers) == list(range(depth + 1))
        for i, hidden in result.layers.items():
            assert hidden.shape == (TINY_VISION.num_patches, TINY_VISION.hidden_size)
            d = max_abs(hidden, ref_out.hidden_states[i][b])
            assert d <= TOL["fp32_max_abs"], f"image {b} layer {i}: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"
        d = max_abs(result.embeddings, ref_proj[b])
        assert d <= TOL["fp32_max_abs"], f"image {b} projected: max abs diff {d:.3g} > {TOL['fp32_max_abs']}"
    # The last hidden state is before post_layernorm: it is not the tower output.
    tower = tiny_model.encode(IMAGES[:1], project=False)
    assert max_abs(results[0].layers[depth], tower[0]) > 0.1


def test_layers_arrays_are_named_and_ordered(tiny_model):
    [result] = tiny_model.encode(IMAGES[:1], layers=[2, 0, 2])
    assert list(result.layers) == [2, 0]  # duplicates dropped, order kept
    assert list(result.arrays()) == ["", "layer2", "layer0"]


def test_mean_pool_and_l2_norm(tiny_model, tiny_state):
    plain = tiny_model.encode(IMAGES)
    pooled = tiny_model.encode(IMAGES, pool="mean")
    normed = tiny_model.encode(IMAGES, pool="mean", normalize=True)
    for b in range(len(IMAGES)):
        expected = plain[b].double().mean(dim=0)  # (D,)
        d = max_abs(pooled[b].pooled, expected)
        assert pooled[b].pooled.shape == (TINY_PROJECTOR.text_hidden_size,)
        assert pooled[b].pooled.dtype == torch.float32
        assert d <= 1e-6, f"image {b} mean pool: max abs diff {d:.3g} > 1e-6"
        d = max_abs(normed[b].pooled, expected / expected.norm())
        assert d <= 1e-6, f"image {b} normalised pool: max abs diff {d:.3g} > 1e-6"
        norm = normed[b].pooled.double().norm().item()
        assert abs(norm - 1) <= 1e-6, f"image {b}: L2 norm {norm} != 1 (tolerance 1e-6)"
    # Against the reference: the mean of transformers' projected tokens.
    _, ref_proj = Reference(TINY_VISION, TINY_PROJECTOR, tiny_state)(tiny_model.preprocess(IMAGES))
    d = max_abs(torch.stack([r.pooled for r in pooled]), ref_proj.mean(dim=1))
    assert d <= TOL["fp32_max_abs"], f"pooled vs transformers projected mean: max abs diff {d:.3g}"


def test_pool_of_the_tower_output(tiny_model):
    tower = tiny_model.encode(IMAGES[:2], project=False)
    results = tiny_model.encode(IMAGES[:2], project=False, pool="mean")
    for b, result in enumerate(results):
        assert result.pooled.shape == (TINY_VISION.hidden_size,)
        d = max_abs(result.pooled, tower[b].mean(dim=0))
        assert d <= 1e-6, f"image {b} tower mean pool: max abs diff {d:.3g} > 1e-6"


def test_results_do_not_depend_on_batch_size(tiny_model):
    one = tiny_model.encode(IMAGES, layers=[1], pool="mean", batch_size=1)
    three = tiny_model.encode(IMAGES, layers=[1], pool="mean", batch_size=3)
    for a, b in zip(one, three, strict=True):
        for name, tensor in a.arrays().items():
            d = max_abs(tensor, b.arrays()[name])
            assert d <= TOL["fp32_max_abs"], f"{name}: batch 1 vs 3 max abs diff {d:.3g}"


def test_pan_and_scan_with_layers_and_pool(tiny_model):
    [result] = tiny_model.encode([make_rgb(300, 700, seed=4)], pan_and_scan=True, layers=[1], pool="mean",
                                 normalize=True)
    assert list(result.arrays()) == ["", "layer1", "pooled", "crop1", "crop1.layer1", "crop1.pooled",
                                     "crop2", "crop2.layer1", "crop2.pooled"]
    for view in result.views:
        assert abs(view.pooled.norm().item() - 1) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": [3]}, r"layers must be in 0\.\.2"),
        ({"layers": [-1]}, r"layers must be in 0\.\.2"),
        ({"layers": 1}, "list of integers"),
        ({"layers": ["1"]}, "list of integers"),
        ({"pool": "max"}, "pool must be one of mean"),
        ({"normalize": True}, "normalize applies to pooled vectors"),
    ],
)
def test_bad_options_are_refused(tiny_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_model.encode(IMAGES[:1], **kwargs)


def test_default_return_is_still_a_plain_tensor(tiny_model):
    out = tiny_model.encode(IMAGES)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, TINY_PROJECTOR.mm_tokens_per_image, TINY_PROJECTOR.text_hidden_size)
