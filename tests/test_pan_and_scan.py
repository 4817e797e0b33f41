"""Pan & Scan against transformers' Gemma 3 image processor: the same crops, the same pixel tensors, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TOL, make_rgb, max_abs
from gemma3_vision import ConfigError
from gemma3_vision.model.pan_and_scan import PanAndScanConfig, crop_boxes, pan_and_scan_inputs
from gemma3_vision.model.preprocessing import PreprocessConfig

transformers = pytest.importorskip("transformers")

GEMMA3 = PreprocessConfig()  # 896 px, mean = std = 0.5, as preprocessor_config.json sets them


def hf_processor(size: int = 896):
    return transformers.Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)


def hf_pan_and_scan(image: Image.Image, config: PanAndScanConfig, size: int = 896) -> tuple[torch.Tensor, int]:
    out = hf_processor(size)(
        image, do_pan_and_scan=True, pan_and_scan_min_crop_size=config.min_crop_size,
        pan_and_scan_max_num_crops=config.max_num_crops,
        pan_and_scan_min_ratio_to_activate=config.min_ratio_to_activate, return_tensors="pt",
    )
    return out["pixel_values"].permute(0, 2, 3, 1), int(out["num_crops"][0])  # NHWC, like ours


def test_defaults_are_the_gemma3_processors():
    defaults = transformers.Gemma3Processor.images_kwargs
    ours = PanAndScanConfig()
    assert (defaults["pan_and_scan_min_crop_size"], defaults["pan_and_scan_max_num_crops"],
            defaults["pan_and_scan_min_ratio_to_activate"]) == (ours.min_crop_size, ours.max_num_crops,
                                                                ours.min_ratio_to_activate)
    assert defaults["do_pan_and_scan"] is False


@pytest.mark.parametrize(
    ("height", "width", "expected_boxes"),
    [
        (300, 900, [(0, 0, 300, 300), (300, 0, 600, 300), (600, 0, 900, 300)]),  # landscape 3:1
        (900, 300, [(0, 0, 300, 300), (0, 300, 300, 600), (0, 600, 300, 900)]),  # portrait 1:3
        (400, 1000, [(0, 0, 334, 400), (334, 0, 668, 400), (668, 0, 1000, 400)]),  # 2.5 rounds up; last shorter
        (600, 2900, [(0, 0, 725, 600), (725, 0, 1450, 600), (1450, 0, 2175, 600), (2175, 0, 2900, 600)]),  # cap 4
        (500, 500, []),  # square: never split
        (500, 590, []),  # ratio 1.18 < 1.2
        (200, 700, []),  # crops would be 200 px high < 256
    ],
    ids=["landscape", "portrait", "uneven", "capped", "square", "near-square", "too-small"],
)
def test_same_crops_and_pixels_as_transformers(height, width, expected_boxes):
    image = Image.fromarray(make_rgb(height, width, seed=height + width))
    config = PanAndScanConfig()
    ref, ref_crops = hf_pan_and_scan(image, config)
    ours, boxes = pan_and_scan_inputs(image, GEMMA3, config)

    assert boxes == [(0, 0, width, height), *expected_boxes]
    assert ref_crops == len(expected_boxes)
    assert ours.shape == tuple(ref.shape) == (1 + len(expected_boxes), 896, 896, 3)
    # Same uint8 crops through the same Pillow resize and the same normalisation: equal, not merely close.
    d = max_abs(torch.from_numpy(ours), ref)
    assert d == 0.0, f"pan-and-scan pixels differ from transformers: max abs diff {d:.3g} (tolerance 0)"


def test_crops_come_from_the_unresized_original():
    """Each crop, resized alone, equals the processor output for that region cut from the original."""
    original = make_rgb(320, 1100, seed=3)
    ours, boxes = pan_and_scan_inputs(Image.fromarray(original), GEMMA3)
    for view, (left, top, right, bottom) in zip(ours[1:], boxes[1:], strict=True):
        region = Image.fromarray(np.ascontiguousarray(original[top:bottom, left:right]))
        ref = hf_processor()(region, return_tensors="pt")["pixel_values"].permute(0, 2, 3, 1)[0]
        d = max_abs(torch.from_numpy(view), ref)
        assert d == 0.0, f"crop {(left, top, right, bottom)}: max abs diff {d:.3g} (tolerance 0)"


def test_rgba_is_composited_before_cropping():
    rgba = np.concatenate([make_rgb(300, 800, seed=4), np.full((300, 800, 1), 90, np.uint8)], axis=-1)
    image = Image.fromarray(rgba, mode="RGBA")
    ref, _ = hf_pan_and_scan(image, PanAndScanConfig())
    ours, boxes = pan_and_scan_inputs(image, GEMMA3)
    assert len(boxes) == 4
    d = max_abs(torch.from_numpy(ours), ref)
    assert d == 0.0, f"RGBA pan-and-scan: max abs diff {d:.3g} (tolerance 0)"


def test_custom_parameters_and_another_input_size():
    image = Image.fromarray(make_rgb(150, 700, seed=5))
    config = PanAndScanConfig(min_crop_size=100, max_num_crops=3, min_ratio_to_activate=2.0)
    ref, n = hf_pan_and_scan(image, config, size=448)
    ours, boxes = pan_and_scan_inputs(image, PreprocessConfig(image_size=448), config)
    assert n == 3 and len(boxes) == 4
    d = max_abs(torch.from_numpy(ours), ref)
    assert d == 0.0, f"custom pan-and-scan at 448: max abs diff {d:.3g} (tolerance 0)"


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000), min_crop=st.integers(16, 400),
       max_crops=st.integers(2, 6), ratio=st.sampled_from([1.0, 1.2, 1.5, 2.0, 3.3]))
def test_boxes_equal_transformers_slicing(width, height, min_crop, max_crops, ratio):
    """The crop rule over many sizes: the reference's slices of a (3, h, w) array equal our boxes."""
    config = PanAndScanConfig(min_crop, max_crops, ratio)
    probe = np.broadcast_to(np.zeros(1, np.uint8), (3, height, width))  # no memory behind it
    ref = hf_processor().pan_and_scan(probe, min_crop, max_crops, ratio)
    boxes = crop_boxes(width, height, config)
    assert [(b[2] - b[0], b[3] - b[1]) for b in boxes] == [(c.shape[2], c.shape[1]) for c in ref]


def test_bad_parameters_are_refused():
    for kwargs, match in [({"min_crop_size": 0}, "min_crop_size"), ({"max_num_crops": 1}, "at least 2"),
                          # one image's views are held together: 100,000 crops got the process OOM-killed
                          ({"max_num_crops": 33}, "at most 32, got 33: one image's views"),
                          ({"min_ratio_to_activate": 0.5}, ">= 1"),
                          ({"min_ratio_to_activate": float("nan")}, ">= 1")]:
        with pytest.raises(ConfigError, match=match):
            PanAndScanConfig(**kwargs)
    assert PanAndScanConfig(max_num_crops=32).max_num_crops == 32


def test_encode_returns_original_then_crops(tiny_model):
    image = make_rgb(300, 900, seed=6)
    plain = tiny_model.encode([image])
    [result] = tiny_model.encode([image], pan_and_scan=True)
    assert result.size == (900, 300)
    assert result.crop_boxes == [(0, 0, 300, 300), (300, 0, 600, 300), (600, 0, 900, 300)]
    assert [v.box for v in result.views][0] == (0, 0, 900, 300)
    d = max_abs(result.embeddings, plain[0])
    assert d <= TOL["fp32_max_abs"], f"original view vs plain encode: max abs diff {d:.3g}"
    # Each crop's embeddings equal encoding that region on its own.
    for crop in result.crops:
        left, top, right, bottom = crop.box
        alone = tiny_model.encode([np.ascontiguousarray(image[top:bottom, left:right])])[0]
        d = max_abs(crop.embeddings, alone)
        assert d <= TOL["fp32_max_abs"], f"crop {crop.box} vs its region encoded alone: max abs diff {d:.3g}"
    assert sorted(result.arrays()) == ["", "crop1", "crop2", "crop3"]


def test_encode_square_image_has_no_crops(tiny_model):
    [result] = tiny_model.encode([make_rgb(200, 200)], pan_and_scan=True)
    assert result.crops == [] and result.crop_boxes == []
