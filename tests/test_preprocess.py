"""Preprocessing against transformers' Gemma3ImageProcessor (PIL backend), plus reference-free checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_rgb
from gemma3_vision.preprocess import PreprocessConfig, normalize, preprocess, to_rgb

TOL_PIXELS = 1e-6  # same uint8 image, same PIL resize: only float rounding may differ


def hf_pixels(img: Image.Image, size: int) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    processor = transformers.Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out = processor(images=[img], return_tensors="pt")["pixel_values"]  # (1, 3, S, S)
    return out.permute(0, 2, 3, 1)  # NHWC


def _rgba(h, w):
    a = make_rgb(h, w, 1)
    alpha = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)[..., None]
    return Image.fromarray(np.concatenate([a, alpha], -1), "RGBA")


def _palette_with_transparency():
    img = Image.fromarray(make_rgb(90, 120, 2)).quantize(16)
    img.info["transparency"] = 3  # palette index 3 is fully transparent
    return img


CASES = {
    "rgb_downscale": lambda: Image.fromarray(make_rgb(1200, 1600)),
    "rgb_upscale": lambda: Image.fromarray(make_rgb(100, 150)),
    "rgba": lambda: _rgba(300, 500),
    "la": lambda: _rgba(200, 100).convert("LA"),
    "l": lambda: Image.fromarray(make_rgb(321, 123)[..., 0], "L"),
    "p_transparency": _palette_with_transparency,
    "tiny_1x1": lambda: Image.fromarray(np.array([[[200, 10, 30]]], np.uint8)),
    "tiny_2x3": lambda: Image.fromarray(make_rgb(2, 3)),
    "huge": lambda: Image.fromarray(make_rgb(3000, 2000)),
    "odd_aspect": lambda: Image.fromarray(make_rgb(37, 1000)),
    "one_bit": lambda: Image.fromarray(make_rgb(64, 64)[..., 0] > 128),
    "cmyk": lambda: Image.fromarray(make_rgb(80, 60)).convert("CMYK"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [896, 112])
def test_matches_gemma3_image_processor(case, size):
    img = CASES[case]()
    ours = preprocess(img, PreprocessConfig(image_size=size))
    theirs = hf_pixels(img, size)
    assert ours.shape == theirs.shape == (1, size, size, 3)
    d = (ours - theirs).abs().max().item()
    assert d <= TOL_PIXELS, f"{case} at {size}: max abs pixel diff {d:.3g} > {TOL_PIXELS}"


def test_normalize_by_hand():
    rgb = np.array([[[0, 255, 51]]], np.uint8)
    expected = np.array([[[-1.0, 1.0, 51 / 255 * 2 - 1]]], np.float32)
    np.testing.assert_allclose(normalize(rgb), expected, atol=1e-7)


def test_alpha_composited_onto_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(img)).tolist() == [[[255, 255, 255]] * 4] * 4


def test_sixteen_bit_is_scaled_not_clamped():
    """Our deliberate difference: Pillow's convert clamps I;16 above 255, so a ramp comes out ~99% white."""
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)[None, :].repeat(4, 0)  # 0 .. 65535
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    ours = np.asarray(to_rgb(img))[..., 0]
    assert ours[0].tolist() == list(range(256))
    clamped = np.asarray(img.convert("RGB"))[..., 0]  # what the reference route sees
    assert (clamped == 255).mean() > 0.99


def test_exif_rotation_applied_to_files_only(tmp_path):
    arr = make_rgb(40, 80)  # landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    from gemma3_vision.preprocess import as_pil, open_image

    assert open_image(path).size == (40, 80)  # displayed upright: portrait
    assert open_image(path, exif_transpose=False).size == (80, 40)
    with Image.open(path) as im:
        assert as_pil(im).size == (80, 40)  # a PIL image is taken as already oriented, like the reference


def test_array_inputs():
    arr = make_rgb(50, 70)
    a = preprocess(arr, PreprocessConfig(image_size=112))
    b = preprocess(Image.fromarray(arr), PreprocessConfig(image_size=112))
    assert torch.equal(a, b)
    assert preprocess([arr, arr[..., 0]], PreprocessConfig(image_size=56)).shape == (2, 56, 56, 3)
