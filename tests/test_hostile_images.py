"""Hostile and unusual image files: each is refused with a typed error saying why, quickly and without allocating
what its header claims; odd but legitimate modes decode to what transformers (or the stated policy) gives."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gemma3_vision.errors import ImageError
from gemma3_vision.model.preprocessing import (
    PreprocessConfig,
    as_pil,
    open_image,
    preprocess_one,
    strict_decoding,
    to_rgb,
)

SMALL = PreprocessConfig(image_size=28)
MAX_SECONDS = 3.0  # per case; every refusal here happens after reading a header


# ------------------------------------------------------------------------------------------- byte-level builders

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG with an IHDR and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: np.ndarray,
            extra: bytes = b"") -> bytes:
    """A PNG from big-endian sample rows (filter 0), with optional extra chunks before IDAT."""
    raw = b"".join(b"\x00" + row.astype(">u2" if bit_depth == 16 else np.uint8).tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg_sof(width: int, height: int) -> bytes:
    """SOI, a baseline frame header claiming width x height, EOI: no scan data at all."""
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xd9"


def gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims width x height, holding one 1x1 frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b";"


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian, uncompressed 8-bit grey TIFF claiming width x height, holding one byte."""
    n = 9
    data_at = 8 + 2 + 12 * n + 4
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, data_at),
               (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd = struct.pack("<H", n) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00"


def bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP info header claiming width x height, with no pixels."""
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0))


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def ztxt_bomb() -> bytes:
    """A valid 2x2 PNG with a 20 KiB zTXt chunk that inflates to 20 MiB of text (Pillow caps text at 1 MiB)."""
    png = saved(Image.new("RGB", (2, 2)), "PNG")
    chunk = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (20 << 20), 9))
    return png[:33] + chunk + png[33:]  # after the signature (8) and IHDR (25)


def bad_crc() -> bytes:
    png = bytearray(saved(Image.new("RGB", (2, 2)), "PNG"))
    png[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(png)


NOT_ALLOWED = "not an image in an allowed format, or its header is corrupt"
CORRUPT = "corrupt or truncated image"

# (id, file name, bytes, open_image keyword arguments, message fragment)
REFUSED: list[tuple[str, str, Callable[[], bytes], dict, str]] = [
    ("png-30000x30000-header-only", "bomb.png", lambda: png_header(30000, 30000), {}, "decompression bomb"),
    ("png-over-default-limit", "big.png", lambda: png_header(10000, 10000), {},
     "10000x10000 = 100,000,000 pixels, over the decompression bomb limit of 89,478,485"),
    ("png-over-custom-limit", "small.png", lambda: saved(Image.new("RGB", (100, 100)), "PNG"),
     {"max_pixels": 5000}, "100x100 = 10,000 pixels, over the decompression bomb limit of 5,000"),
    ("jpeg-65000x65000-header-only", "bomb.jpg", lambda: jpeg_sof(65000, 65000), {}, "decompression bomb"),
    ("gif-65535x65535-screen", "bomb.gif", lambda: gif_screen(65535, 65535), {}, "decompression bomb"),
    ("tiff-100000x100000-header-only", "bomb.tif", lambda: tiff_header(100_000, 100_000), {},
     "decompression bomb"),
    ("bmp-30000x30000-header-only", "bomb.bmp", lambda: bmp_header(30000, 30000), {}, "decompression bomb"),
    ("png-zero-width", "zero.png", lambda: png_header(0, 10), {}, NOT_ALLOWED),
    ("bmp-zero-width", "zero.bmp", lambda: bmp_header(0, 10), {}, NOT_ALLOWED),
    ("tiff-zero-width", "zero.tif", lambda: tiff_header(0, 10), {}, NOT_ALLOWED),
    ("truncated-png", "t.png", lambda: truncated(saved(Image.fromarray(noise(64, 64)), "PNG")), {}, CORRUPT),
    ("truncated-jpeg", "t.jpg", lambda: truncated(saved(Image.fromarray(noise(64, 64)), "JPEG")), {}, CORRUPT),
    ("truncated-gif", "t.gif", lambda: truncated(saved(Image.fromarray(noise(64, 64)), "GIF")), {}, CORRUPT),
    ("truncated-webp", "t.webp", lambda: truncated(saved(Image.fromarray(noise(64, 64)), "WEBP")), {}, CORRUPT),
    ("truncated-bmp", "t.bmp", lambda: truncated(saved(Image.fromarray(noise(64, 64)), "BMP")), {}, CORRUPT),
    ("truncated-tiff", "t.tif", lambda: truncated(saved(Image.fromarray(noise(64, 64)), "TIFF")), {}, CORRUPT),
    ("png-bad-crc", "crc.png", bad_crc, {}, NOT_ALLOWED),
    ("png-ztxt-text-bomb", "ztxt.png", ztxt_bomb, {}, "Decompressed data too large"),
    ("text-named-jpg", "notes.jpg", lambda: b"just some text, not an image\n" * 20, {}, NOT_ALLOWED),
    ("html-named-png", "page.png", lambda: b"<!doctype html><html><body>404</body></html>", {}, NOT_ALLOWED),
    ("zero-bytes", "empty.jpg", lambda: b"", {}, "found an empty file (0 bytes)"),
    # Formats Pillow can read but we never let decode untrusted bytes: EPS runs Ghostscript, ICO/PPM/PSD are
    # outside the allow-list whatever the file is called.
    ("eps-named-jpg", "doc.jpg", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", {},
     NOT_ALLOWED),
    ("ico-named-png", "icon.png", lambda: saved(Image.new("RGB", (16, 16)), "ICO"), {}, NOT_ALLOWED),
    ("ppm-named-png", "pix.png", lambda: saved(Image.new("RGB", (16, 16)), "PPM"), {}, NOT_ALLOWED),
    ("tga-named-bmp", "pix.bmp", lambda: saved(Image.new("RGB", (16, 16)), "TGA"), {}, NOT_ALLOWED),
]


@pytest.mark.parametrize("case_id, name, build, kwargs, fragment", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_quickly_with_a_typed_error(tmp_path, case_id, name, build, kwargs, fragment):
    path = tmp_path / name
    path.write_bytes(build())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow warns; our check then refuses
        with pytest.raises(ImageError, match=re.escape(fragment)) as info:
            open_image(path, **kwargs)
    seconds = time.perf_counter() - start
    assert seconds < MAX_SECONDS, f"{case_id} took {seconds:.2f} s (limit {MAX_SECONDS} s)"
    assert str(path) in str(info.value), f"the message must name the file: {info.value}"


def test_refusals_allocate_nothing_like_their_claims(tmp_path):
    """Every refusal above, in a fresh process: its peak resident memory may grow by at most 64 MiB over the
    imports, while the bombs claim 0.9 to 10 gigapixels (several GB each once decoded)."""
    paths = []
    for case_id, name, build, kwargs, _ in REFUSED:
        path = tmp_path / f"{case_id}-{name}"
        path.write_bytes(build())
        paths.append([str(path), kwargs])
    script = """
import json, resource, sys, warnings
from gemma3_vision.model.preprocessing import open_image
from gemma3_vision.errors import ImageError
warnings.simplefilter("ignore")
cases = json.loads(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = 0
for path, kwargs in cases:
    try:
        open_image(path, **kwargs)
    except ImageError:
        refused += 1
print(json.dumps({"refused": refused, "growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}))
"""
    out = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True,
                         timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refused"] == len(REFUSED), out.stdout + out.stderr
    assert result["growth_kib"] < 64 * 1024, f"peak RSS grew by {result['growth_kib'] / 1024:.1f} MiB (limit 64)"


# ------------------------------------------------------------------------------------- not files, or not readable

def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "stream.jpg"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="expected a regular file, found a FIFO"):
        open_image(fifo)
    assert time.perf_counter() - start < MAX_SECONDS


def test_directory_socket_device_and_missing_file_are_refused(tmp_path):
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    with pytest.raises(ImageError, match="expected a regular file, found a directory"):
        open_image(folder)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(ImageError, match="expected a regular file, found a socket"):
            open_image(sock_path)
    with pytest.raises(ImageError, match="expected a regular file, found a character device"):
        open_image("/dev/zero")  # would never end if read
    with pytest.raises(ImageError, match="cannot read .No such file or directory"):
        open_image(tmp_path / "missing.png")


def test_float_images_are_refused_at_conversion(tmp_path):
    path = tmp_path / "f.tif"
    path.write_bytes(saved(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"))
    with pytest.raises(ImageError, match="mode F"):
        preprocess_one(path, SMALL)


# ---------------------------------------------------------------------------------------- odd but legitimate

def test_16_bit_grey_is_scaled_not_clamped(tmp_path):
    """Pillow's convert clamps 16-bit values (1000 → 255); we keep the high byte, as Pillow does for 16-bit RGB."""
    values = np.array([[0, 255, 256, 1000, 32768, 40000, 65280, 65535]], np.uint16)
    expected = (values >> 8).astype(np.uint8)  # [0, 0, 1, 3, 128, 156, 255, 255]
    for name, data in [("g16.png", png_raw(8, 1, 16, 0, values)),
                       ("g16.tif", saved(Image.fromarray(values), "TIFF"))]:
        path = tmp_path / name
        path.write_bytes(data)
        img = open_image(path)
        assert img.mode.startswith("I;16"), img.mode
        rgb = np.asarray(to_rgb(img))  # (1, 8, 3)
        np.testing.assert_array_equal(rgb[..., 0], expected, err_msg=name)
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_16_bit_rgb_matches_16_bit_grey(tmp_path):
    """The same 16-bit samples give the same 8-bit values whether stored grey or RGB."""
    grey = np.array([[1000, 40000, 65535]], np.uint16)
    rgb_rows = np.repeat(grey[..., None], 3, axis=-1).reshape(1, -1)  # (1, 9)
    (tmp_path / "g.png").write_bytes(png_raw(3, 1, 16, 0, grey))
    (tmp_path / "c.png").write_bytes(png_raw(3, 1, 16, 2, rgb_rows))
    a = np.asarray(to_rgb(open_image(tmp_path / "g.png")))
    b = np.asarray(to_rgb(open_image(tmp_path / "c.png")))
    np.testing.assert_array_equal(a, b)


def test_16_bit_grey_transparency_key_is_composited_onto_white(tmp_path):
    """A 16-bit tRNS key marks pixels transparent; Pillow's own convert ignores it."""
    values = np.array([[1000, 2000, 1000, 30000]], np.uint16)
    path = tmp_path / "key.png"
    path.write_bytes(png_raw(4, 1, 16, 0, values, extra=_chunk(b"tRNS", struct.pack(">H", 1000))))
    rgb = np.asarray(to_rgb(open_image(path)))[0, :, 0]
    np.testing.assert_array_equal(rgb, [255, 2000 >> 8, 255, 30000 >> 8])


def _hf_rgb(img: Image.Image) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    return transformers.image_transforms.convert_to_rgb(img, return_numpy=True)


MODE_CASES = {
    "rgba": lambda: Image.fromarray(np.dstack([noise(9, 7), np.linspace(0, 255, 63).reshape(9, 7)]).astype(np.uint8),
                                    "RGBA"),
    "la": lambda: Image.fromarray(noise(9, 7)[..., :2], "LA"),
    "palette-trns": lambda: _palette_with_transparency(),
    "one-bit": lambda: Image.fromarray(noise(9, 7)[..., 0] > 127),
    "grey": lambda: Image.fromarray(noise(9, 7)[..., 0], "L"),
    "cmyk": lambda: Image.fromarray(np.dstack([noise(9, 7), noise(9, 7, 1)[..., :1]]), "CMYK"),
}
MODE_FORMATS = {"rgba": "PNG", "la": "PNG", "palette-trns": "GIF", "one-bit": "PNG", "grey": "PNG",
                "cmyk": "TIFF"}


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(noise(9, 7)[..., 0] % 4, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    img.info["transparency"] = 2
    return img


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_modes_decode_like_transformers(tmp_path, mode):
    """Exact equality (tolerance 0) with transformers' convert_to_rgb after a round trip through a file."""
    path = tmp_path / f"x.{MODE_FORMATS[mode].lower()}"
    MODE_CASES[mode]().save(path, MODE_FORMATS[mode])
    img = open_image(path)
    ours = np.asarray(to_rgb(img))
    theirs = _hf_rgb(Image.open(path))
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff == 0, f"{mode}: max abs diff {diff} (tolerance 0)"
    if mode in ("palette-trns", "rgba", "la"):
        assert (ours == 255).all(axis=-1).any(), f"{mode}: some pixel is fully transparent, so white"


def test_cmyk_jpeg_decodes_like_transformers(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(np.dstack([noise(16, 16), noise(16, 16, 1)[..., :1]]), "CMYK").save(path, quality=95)
    img = open_image(path)
    assert img.mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), _hf_rgb(Image.open(path)))


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    rgb = np.asarray(to_rgb(open_image(path)))
    assert tuple(rgb[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1), (3, 2000)])
def test_tiny_and_extreme_aspect_images(tmp_path, size):
    w, h = size
    path = tmp_path / f"{w}x{h}.png"
    Image.fromarray(noise(h, w)).save(path)
    x = preprocess_one(path, SMALL)
    assert x.shape == (28, 28, 3) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


def _exif_rotated_jpeg(path: Path, orientation: int) -> None:
    img = Image.fromarray(noise(20, 40))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_policy(tmp_path):
    """Files are turned upright by their EXIF orientation (as transformers' load_image(path)); the switch turns it
    off."""
    path = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(path, 6)  # "rotate 90° clockwise to view"
    assert open_image(path).size == (20, 40)
    assert open_image(path, exif_transpose=False).size == (40, 20)


def test_exif_rotated_file_matches_transformers_load_image(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(path, 8)
    ours = preprocess_one(path, SMALL)
    proc = transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
    theirs = proc(transformers.image_utils.load_image(str(path)), return_tensors="np")["pixel_values"][0]
    diff = np.abs(ours - theirs.transpose(1, 2, 0)).max()
    assert diff <= 1e-6, f"max abs diff {diff} (tolerance 1e-6)"


# ------------------------------------------------------------------- strict whatever the caller's Pillow globals say

TRUNCATED = [c for c in REFUSED if c[0].startswith("truncated-")]


@pytest.mark.parametrize("case_id, name, build, kwargs, fragment", TRUNCATED, ids=[c[0] for c in TRUNCATED])
def test_truncated_refused_even_when_the_caller_allows_truncated_images(tmp_path, monkeypatch, case_id, name, build,
                                                                         kwargs, fragment):
    """Many training scripts set ``ImageFile.LOAD_TRUNCATED_IMAGES = True``; Pillow would then fill in the rest of
    these files (grey, or a pretended JPEG end marker). Ours stays an error, and the caller's setting is back after."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = tmp_path / name
    path.write_bytes(build())
    with pytest.raises(ImageError, match=re.escape(fragment)):
        open_image(path)
    if case_id != "truncated-webp":  # Pillow's WebP reader decodes in Image.open already: the caller gets the error
        with Image.open(path) as lazy:  # the caller's own lazily opened image, passed in memory
            with pytest.raises(ImageError) as info:
                as_pil(lazy)
        assert str(info.value).startswith("PIL image ("), info.value
        assert f"from {path}): {CORRUPT}" in str(info.value), info.value
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_lazily_opened_truncated_image_is_called_truncated(tmp_path):
    """Before: ``cannot convert RGB image to RGB (image file is truncated)``, from the conversion much later."""
    path = tmp_path / "t.png"
    path.write_bytes(truncated(saved(Image.fromarray(noise(64, 64)), "PNG")))
    with Image.open(path) as lazy:
        with pytest.raises(ImageError) as info:
            preprocess_one(lazy, SMALL)
    assert str(info.value).startswith(f"PIL image (RGB, from {path}): corrupt or truncated image"), info.value


def test_strict_decoding_overlapping_out_of_order(monkeypatch):
    """Two decodes overlap and the first to start finishes first: Pillow must stay strict until the last one ends,
    then get the caller's True back."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    first, second = strict_decoding(), strict_decoding()
    first.__enter__()
    second.__enter__()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    first.__exit__(None, None, None)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False, "the second decode is still running"
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # set by another thread of the caller meanwhile
    third = strict_decoding()
    third.__enter__()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False, "a decode that starts now is strict again"
    second.__exit__(None, None, None)
    third.__exit__(None, None, None)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_strict_decoding_in_concurrent_threads(tmp_path, monkeypatch):
    """Eight threads decode good and truncated files at once with the caller's flag True: every truncated file is
    refused, every good one decodes, and the flag is True afterwards."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = saved(Image.fromarray(noise(64, 64)), "PNG")
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "bad.png").write_bytes(truncated(good))
    barrier = threading.Barrier(8)

    def work(i: int) -> list[str]:
        barrier.wait()
        outcomes = []
        for _ in range(20):
            name = "bad.png" if i % 2 else "good.png"
            try:
                open_image(tmp_path / name)
                outcomes.append(f"{name} decoded")
            except ImageError:
                outcomes.append(f"{name} refused")
        return outcomes

    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for result in pool.map(work, range(8)) for o in result]
    assert sorted(set(outcomes)) == ["bad.png refused", "good.png decoded"], sorted(set(outcomes))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# ------------------------------------------------------------------------------- samples without a defined range

def test_32_bit_integer_images_beyond_16_bits_are_refused(tmp_path):
    """A mode-I TIFF holding up to 1.9e9 was clipped at 65535 and shifted as 16-bit: almost all white."""
    path = tmp_path / "i32.tif"
    path.write_bytes(saved(Image.fromarray(np.array([[0, 1000], [65536, 1_900_000_000]], np.int32)), "TIFF"))
    with pytest.raises(ImageError) as info:
        preprocess_one(path, SMALL)
    assert str(info.value).startswith(f"{path}: expected 32-bit integer samples (mode I) within 0..65535"), info.value
    assert "found 0..1900000000" in str(info.value)
    with pytest.raises(ImageError, match=re.escape("found -1..5")):
        as_pil(Image.fromarray(np.array([[-1, 5]], np.int32)))


def test_32_bit_integer_images_within_16_bits_keep_working(tmp_path):
    """Pillow opens some 16-bit files as mode I: 0..65535 keeps the high byte, as I;16 does."""
    values = np.array([[0, 255, 256, 1000, 32768, 65535]], np.int32)
    path = tmp_path / "i.tif"
    path.write_bytes(saved(Image.fromarray(values), "TIFF"))
    img = open_image(path)
    assert img.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(img))[..., 0], (values >> 8).astype(np.uint8))


def test_float_image_errors_name_the_input(tmp_path):
    path = tmp_path / "f.tif"
    path.write_bytes(saved(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"))
    with pytest.raises(ImageError) as info:
        preprocess_one(path, SMALL)
    assert str(info.value).startswith(f"{path}: expected 8- or 16-bit samples, found floating-point"), info.value
    with pytest.raises(ImageError, match=re.escape("PIL image (F): expected 8- or 16-bit samples")):
        preprocess_one(Image.fromarray(np.zeros((2, 2), np.float32)), SMALL)
