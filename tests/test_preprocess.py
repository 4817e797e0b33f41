"""Preprocessing against transformers' Gemma3ImageProcessor (PIL backend), plus reference-free checks."""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION, make_rgb
from format_fixtures import write_hf_folder, write_siglip_folder
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.errors import ConfigError
from gemma3_vision.model.pan_and_scan import PanAndScanConfig, pan_and_scan_inputs
from gemma3_vision.model.preprocessing import PreprocessConfig, normalize, preprocess, to_rgb

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
    from gemma3_vision.model.preprocessing import as_pil, open_image

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


# ------------------------------------------------------------------------------ the resize filter a checkpoint asks

SIGLIP_CASES = ("rgb_downscale", "rgb_upscale", "rgba", "odd_aspect", "l")


def _so400m_like(tmp_path, tiny_state, **preprocessor) -> Path:
    """A standalone SigLIP folder whose config says 384 px; its preprocessor_config.json as so400m-patch14-384's
    (resample 3) unless overridden (None: the key left out)."""
    state = {k: v for k, v in tiny_state.items() if k.startswith("vision_tower.")}
    folder = write_siglip_folder(tmp_path / "siglip", state, replace(TINY_VISION, image_size=384))
    config = {"image_processor_type": "SiglipImageProcessor", "do_normalize": True, "do_rescale": True,
              "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
              "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}, **preprocessor}
    (folder / "preprocessor_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("case", SIGLIP_CASES)
@pytest.mark.parametrize("resample", [3, None], ids=["resample-3", "resample-default"])
def test_siglip_checkpoint_matches_siglip_image_processor(tmp_path, tiny_state, case, resample):
    """so400m's processor resizes bicubic; bilinear would be off by up to ~0.16 at 384 px. transformers reads the
    same preprocessor_config.json (its class default, when the key is absent, is bicubic too)."""
    transformers = pytest.importorskip("transformers")
    folder = _so400m_like(tmp_path, tiny_state, resample=resample)
    processor = transformers.SiglipImageProcessorPil.from_pretrained(folder)
    config = resolve(folder).preprocess
    assert (config.image_size, config.resample) == (384, "bicubic")
    img = CASES[case]()
    ours = preprocess(img, config)
    theirs = processor(images=[img], return_tensors="pt")["pixel_values"].permute(0, 2, 3, 1)  # NHWC
    assert ours.shape == theirs.shape == (1, 384, 384, 3)
    d = (ours - theirs).abs().max().item()
    assert d <= TOL_PIXELS, f"{case}: max abs pixel diff {d:.3g} > {TOL_PIXELS}"


def test_gemma3_checkpoint_stays_bilinear(tmp_path, tiny_state):
    """Gemma3ImageProcessor's filter is bilinear (2), whether preprocessor_config.json says so or not."""
    folder = write_hf_folder(tmp_path / "g", tiny_state, TINY_VISION, TINY_PROJECTOR)  # no resample key
    assert resolve(folder).preprocess == PreprocessConfig(image_size=TINY_VISION.image_size)
    assert resolve(folder).preprocess.resample == "bilinear"
    (folder / "preprocessor_config.json").unlink()
    assert resolve(folder).preprocess.resample == "bilinear"


def test_siglip_without_preprocessor_config_is_bicubic(tmp_path, tiny_state):
    folder = _so400m_like(tmp_path, tiny_state)
    (folder / "preprocessor_config.json").unlink()
    assert resolve(folder).preprocess.resample == "bicubic"  # SiglipImageProcessor's own default


def test_pan_and_scan_views_use_the_checkpoint_filter():
    img = Image.fromarray(make_rgb(300, 900))
    config = PreprocessConfig(image_size=56, resample="bicubic")
    views, _ = pan_and_scan_inputs(img, config, PanAndScanConfig(min_crop_size=64))
    assert len(views) > 1
    whole = preprocess(img, config)[0].numpy()
    assert np.array_equal(views[0], whole), f"max abs diff {np.abs(views[0] - whole).max():.3g}"


def test_unknown_filter_is_a_config_error():
    with pytest.raises(ConfigError, match="resample must be one of bilinear, bicubic, got 'lanczos'"):
        PreprocessConfig(resample="lanczos")


def test_job_keys_of_bilinear_models_are_unchanged_and_the_filter_is_in_the_key(tmp_path, tiny_state):
    """Gemma 3 keys must not change with the new field, or every output folder made before would be encoded again
    on resume; the digests below are what the code before it computed."""
    from gemma3_vision.jobs.job import EncodeOptions, job_key
    from gemma3_vision.jobs.output_folder import checkpoint_identity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = g3.load("random:tiny", dtype="float32", device="cpu", backend="torch")  # other engines: other keys
    assert job_key(encoder, EncodeOptions()) == "846cc669238797d7"
    assert job_key(encoder, EncodeOptions(project=False, pool="mean")) == "bd85454cff231094"

    checkpoint = resolve(_so400m_like(tmp_path, tiny_state))
    bicubic = checkpoint_identity(checkpoint)
    checkpoint.preprocess = replace(checkpoint.preprocess, resample="bilinear")
    assert checkpoint_identity(checkpoint) != bicubic
    assert "resample" not in checkpoint_identity(checkpoint)["preprocess"]


# --------------------------------------------------------------------------------------------- premultiplied alpha

PREMULTIPLIED_TOL = 1  # premultiplying rounds each sample to 8 bits, un-premultiplying rounds again: 1 level apart


@pytest.mark.parametrize("straight_mode, premultiplied_mode", [("RGBA", "RGBa"), ("LA", "La")])
def test_premultiplied_alpha_is_composited_like_straight_alpha(straight_mode, premultiplied_mode):
    """RGBa was converted as if opaque (premultiplied colours, dark where transparent) and La was refused
    ("conversion from La to L not supported"): both now match their straight-alpha image."""
    straight = _rgba(40, 60).convert(straight_mode)
    premultiplied = straight.convert(premultiplied_mode)
    ours = np.asarray(to_rgb(premultiplied)).astype(int)
    expected = np.asarray(to_rgb(straight)).astype(int)
    d = np.abs(ours - expected).max()
    assert d <= PREMULTIPLIED_TOL, f"{premultiplied_mode}: max abs diff {d} from {straight_mode} (tolerance 1)"
    assert (ours[:, 0] == 255).all(), "the first column is fully transparent, so white"
    pixels = preprocess(premultiplied, PreprocessConfig(image_size=56))
    d = (pixels - preprocess(straight, PreprocessConfig(image_size=56))).abs().max().item()
    assert d <= 2 * PREMULTIPLIED_TOL / 255 + TOL_PIXELS, f"{premultiplied_mode}: max abs pixel diff {d:.3g}"


# ------------------------------------------------------------------------------------------- encoded bytes inputs

def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_are_decoded_like_the_file(tmp_path, kind):
    """An image file's contents in memory give exactly what the file gives (tolerance 0), through the API's
    preprocess and its per-image decode (``Gemma3Vision.prepare``)."""
    from gemma3_vision.api import Gemma3Vision

    path = tmp_path / "a.png"
    Image.fromarray(make_rgb(30, 50)).save(path)
    data = kind(path.read_bytes())
    config = PreprocessConfig(image_size=56)
    from_file = preprocess([path], config)
    assert torch.equal(preprocess(data, config), from_file)
    assert torch.equal(preprocess([data, path], config), torch.cat([from_file, from_file]))
    size, pixels, _ = Gemma3Vision.prepare(data, config)
    assert size == (50, 30) and np.array_equal(pixels[0], from_file[0].numpy())


def test_bytes_get_the_checks_files_get(tmp_path, monkeypatch):
    """EXIF rotation, the first frame, the pixel limit, truncation (whatever Pillow's global says) and the
    allow-list apply to bytes as to files; errors name the input by its kind and length."""
    from gemma3_vision.errors import ImageError
    from gemma3_vision.model.preprocessing import as_pil

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    rotated = _encoded(Image.fromarray(make_rgb(20, 40)), "JPEG", exif=exif, quality=95)
    assert as_pil(rotated).size == (20, 40)
    assert as_pil(rotated, exif_transpose=False).size == (40, 20)

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert np.asarray(to_rgb(as_pil(gif)))[0, 0].tolist() == [255, 0, 0]

    png = _encoded(Image.fromarray(make_rgb(100, 100)), "PNG")
    with pytest.raises(ImageError, match=re.escape(f"<bytes, {len(png)} bytes>: image is 100x100")):
        as_pil(png, max_pixels=5000)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    cut = bytearray(png[: len(png) // 2])
    with pytest.raises(ImageError, match=re.escape(f"<bytearray, {len(cut)} bytes>: corrupt or truncated image")):
        as_pil(cut)
    with pytest.raises(ImageError, match=re.escape("<bytes, 30 bytes>: not an image in an allowed format")):
        as_pil(b"GIF87a but not really an image")
    ppm = _encoded(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(ImageError, match="not an image in an allowed format"):
        as_pil(memoryview(ppm))
    with pytest.raises(ImageError, match=re.escape("<bytes, 0 bytes>: expected the contents of an image file")):
        preprocess(b"")
