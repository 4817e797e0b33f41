"""Image decoding and preprocessing, equal to transformers' ``Gemma3ImageProcessor`` (PIL backend).

Inputs: a file path, the encoded bytes of an image file (``bytes``, ``bytearray`` or ``memoryview``), a PIL image, or
a uint8 array. Paths and bytes are decoded by the same code, with the same checks.

Pipeline: decode (allow-listed formats, bomb-checked, first frame, truncation always an error) → EXIF orientation
(files and bytes only, see the policy below) → RGB (alpha, straight or premultiplied, composited onto white; 16-bit
scaled) → stretch-resize to ``image_size²`` with Pillow's antialiasing bilinear filter (bicubic for SigLIP
checkpoints that ask for it) → ``x/255`` → ``(x - mean) / std`` → float32 NHWC.

EXIF policy: an image given as a *file path* or as encoded bytes is rotated by its EXIF orientation tag (as
transformers' ``load_image(path)`` does); an image given as a PIL image or an array is taken as already oriented (as
transformers takes it). ``exif_transpose=False`` turns the rotation off for files and bytes.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, cast

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ..checks import is_number
from ..errors import ConfigError, ImageError
from ..safe_io import file_kind as file_kind  # re-exported: discovery takes it from here
from ..safe_io import open_regular

ImageInput = str | os.PathLike | Image.Image | np.ndarray
# An image file's contents, held in memory: decoded like a file. Kept apart from ImageInput, which callers unpack
# as "one image or a sequence" (bytes are a sequence of ints); the functions here take ImageInput | EncodedImage.
EncodedImage = bytes | bytearray | memoryview
ENCODED = (bytes, bytearray, memoryview)

# Only these decoders run on untrusted bytes: Pillow's bomb checks live per plugin and keep failing in exotic ones.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold; 896² needs a tiny fraction of it
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}  # Pillow's premultiplied-alpha modes → their straight-alpha forms


# preprocessor_config.json's ``resample`` (PIL's filter numbers) → the filters honoured. Gemma3ImageProcessor uses
# bilinear (2); SiglipImageProcessor defaults to bicubic (3), and so400m's config says 3.
RESAMPLE_CODES = {"bilinear": 2, "bicubic": 3}
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessConfig:
    """What turns an RGB image into model input. Gemma 3: 896 px, mean = std = 0.5 (from preprocessor_config),
    bilinear resize."""

    image_size: int = 896
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"  # a key of RESAMPLE_CODES

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_CODES:
            raise ConfigError(f"resample must be one of {', '.join(RESAMPLE_CODES)}, got {self.resample!r}")

    def identity(self) -> dict[str, Any]:
        """The fields, for job keys: bilinear (the only filter before ``resample`` existed) is left out, so the
        keys of jobs made before stay the same and resume."""
        fields = asdict(self)
        if self.resample == "bilinear":
            del fields["resample"]
        return fields


def resample_name(code: Any) -> str:
    """A preprocessor_config.json ``resample`` number → its name in RESAMPLE_CODES.

    Raises:
        ConfigError: any other value (nearest, lanczos, box, hamming are not implemented).
    """
    for name, value in RESAMPLE_CODES.items():
        if code == value and isinstance(code, int) and not isinstance(code, bool):
            return name
    known = {0: "nearest", 1: "lanczos", 4: "box", 5: "hamming"}
    found = f"{code} ({known[code]})" if isinstance(code, int) and code in known else _short(code)
    raise ConfigError(f"resample must be 2 (bilinear) or 3 (bicubic), found {found}")


def channel_values(value: Any, key: str, *, broadcast: bool = False,
                   positive: bool = False) -> tuple[float, float, float]:
    """``image_mean`` / ``image_std`` as three finite floats (``positive``: each > 0). ``broadcast``: one number
    stands for all three channels, as transformers' ``normalize`` allows.

    Raises:
        ConfigError: anything else (a string, a wrong length, NaN, a std of 0, a number too large for a float).
    """
    if broadcast and is_number(value):
        value = [value] * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(is_number(x) for x in value)):
        raise ConfigError(f"{key} must be a list of 3 numbers, found {_short(value)}")
    try:
        out = (float(value[0]), float(value[1]), float(value[2]))
    except OverflowError:  # a JSON integer beyond float range
        out = (math.inf,) * 3
    if not all(math.isfinite(x) and (x > 0 or not positive) for x in out):
        raise ConfigError(f"{key} must be 3 finite numbers{' > 0' if positive else ''}, found {_short(value)}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular, non-empty file, without ever blocking
    (``safe_io.open_regular``).

    Raises:
        ImageError: missing, unreadable, not a regular file, or empty.
    """
    return open_regular(path, ImageError, allow_empty=False)


def open_image(path: str | os.PathLike, *, exif_transpose: bool = True,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the first frame of an image file, safely (see ``open_regular_file`` and ``decode_image``).

    Raises:
        ImageError: not a regular file, not an allowed format, over ``max_pixels``, truncated or corrupt.
    """
    with open_regular_file(path) as f:
        return decode_image(f, str(path), exif_transpose=exif_transpose, max_pixels=max_pixels)


def decode_image(fp: BinaryIO, name: str, *, exif_transpose: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the first frame from an open binary file; every pixel is read before this returns.

    Only ``ALLOWED_FORMATS`` decoders run. The pixel count is checked from the header, before any pixel is
    allocated. ``max_pixels=None`` leaves only Pillow's own hard limit (178,956,970 pixels). Truncated data is an
    error, never grey fill, even when the caller has set ``ImageFile.LOAD_TRUNCATED_IMAGES`` (see
    ``strict_decoding``). Samples with no defined range (``check_mode``) are refused here, where the input's name
    is known.

    Raises:
        ImageError: with ``name`` and the reason.
    """
    try:
        with strict_decoding():
            img: Image.Image = Image.open(fp, formats=ALLOWED_FORMATS)
            # Only the header has been read: refuse the claimed size before the decoder allocates anything.
            check_pixel_count(img.size, max_pixels, name)
            img.load()
            if exif_transpose:
                # Inside the try: a TIFF reads its EXIF from the file, and a malformed block raises anything. In
                # place: the image is ours, and the default returns a full copy even when there is nothing to rotate.
                ImageOps.exif_transpose(img, in_place=True)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in an allowed format, or its header is corrupt "
                         f"(expected one of {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit, when it is below ours
        raise ImageError(f"{name}: decompression bomb refused by Pillow ({one_line(e)})") from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error... on corrupt data
        raise ImageError(f"{name}: {CORRUPT} ({type(e).__name__}: {one_line(e)})") from None
    check_mode(img, name)
    return img


CORRUPT = "corrupt or truncated image"

# Pillow has no per-call switch for truncated data: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is one process-wide module
# global, read during ``open`` (PNG skips bad ancillary CRCs) and ``load`` (JPEG pretends an end marker, the others
# stop early and leave the rest grey). Many training scripts set it to True. While at least one of our decodes runs
# it is False; the last one to finish gives the caller's value back. The count, under a lock, is what makes this
# safe with our decode threads overlapping: a plain save/set/restore per decode would let a thread that finishes
# first restore True while another is still decoding (and one that starts second would save our False as "theirs").
_strict_lock = threading.Lock()
_strict_users = 0
_caller_truncated = False  # True if the caller's value was True at our first decode or was set so since


@contextmanager
def strict_decoding() -> Iterator[None]:
    """Pillow refuses truncated data inside this block, whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says outside.

    Meanwhile, Pillow decodes elsewhere in the process are strict too. Afterwards the caller's value is back: True
    if it was True before or was set to True meanwhile (each decode that starts resets it to False, so only a decode
    already running when another thread sets it can escape).
    """
    global _strict_users, _caller_truncated
    with _strict_lock:
        if _strict_users == 0:
            _caller_truncated = False
        _caller_truncated = _caller_truncated or bool(ImageFile.LOAD_TRUNCATED_IMAGES)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _caller_truncated or ImageFile.LOAD_TRUNCATED_IMAGES


def decode_bytes(data: EncodedImage, *, exif_transpose: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the encoded contents of an image file held in memory, exactly as ``open_image`` decodes a file.

    Raises:
        ImageError: empty, or anything ``decode_image`` refuses; the input is named ``<bytes, N bytes>``.
    """
    try:
        view = memoryview(data)
    except ValueError as e:  # a memoryview already released
        raise ImageError(f"<{type(data).__name__}>: {e}") from None
    name = f"<{type(data).__name__}, {view.nbytes} bytes>"
    if view.nbytes == 0:
        raise ImageError(f"{name}: expected the contents of an image file, found no bytes")
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return decode_image(io.BytesIO(view.cast("B")), name, exif_transpose=exif_transpose, max_pixels=max_pixels)


def check_pixel_count(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    """Raise ``ImageError`` for a zero-size image or one over ``max_pixels`` (``None``: no limit)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: expected an image of at least 1x1 pixels, found {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{name}: image is {w}x{h} = {w * h:,} pixels, over the decompression bomb limit of {max_pixels:,} "
            "(raise it with max_pixels / --max-pixels if this image is trusted)"
        )


def check_mode(img: Image.Image, name: str) -> None:
    """Refuse, naming the input, an image whose samples have no defined range (``mode_problem``)."""
    problem = mode_problem(img)
    if problem is not None:
        raise ImageError(f"{name}: {problem}")


def mode_problem(img: Image.Image) -> str | None:
    """Why ``to_rgb`` cannot take this image's samples, or None.

    Mode ``F`` (floats) has no defined range. Mode ``I`` (32-bit integers) is how Pillow opens some 16-bit files,
    so it is taken as 16-bit while it holds only 0..65535; beyond that its range is as undefined as F's.
    """
    if img.mode == "F":
        return ("expected 8- or 16-bit samples, found floating-point samples (mode F), which have no defined value "
                "range; convert the image to 8 or 16 bits")
    if img.mode == "I":
        lo, hi = cast(tuple[int, int], img.getextrema())  # one band: (min, max)
        if lo < 0 or hi > 65535:
            return (f"expected 32-bit integer samples (mode I) within 0..65535, taken as 16-bit, found {lo}..{hi}, "
                    "which has no defined value range; convert the image to 8 or 16 bits")
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, exactly as transformers 5.x ``convert_to_rgb`` does.

    16-bit greyscale (``I;16*``, and ``I`` holding only 0..65535) keeps its high byte (``>> 8``), as Pillow itself
    does for 16-bit RGB PNGs; Pillow's ``convert`` would clamp it instead (1000 → 255), turning a 16-bit ramp almost
    white. This is a deliberate difference from the reference. Premultiplied alpha (``RGBa``, ``La``) is
    un-premultiplied by Pillow and composited like ``RGBA`` / ``LA`` (transformers composites only an ``A`` band).
    Images ``mode_problem`` names are refused. An RGB image without transparency is returned as it is, not copied.

    Raises:
        ImageError: a mode with no defined conversion to RGB (without the input's name: ``decode_image`` and
            ``as_pil`` refuse these first, naming it).
    """
    problem = mode_problem(img)
    if problem is not None:
        raise ImageError(problem)
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_8(img)
    if img.mode in _PREMULTIPLIED:
        img = img.convert(_PREMULTIPLIED[img.mode])
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy an RGB image


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` (0..65535, checked by ``mode_problem``) → ``L`` (or ``LA`` when a tRNS value marks
    transparent pixels) by the high byte."""
    a = np.asarray(img).astype(np.int64)  # (H, W), whatever the byte order
    grey = Image.fromarray((a >> 8).astype(np.uint8), mode="L")
    key = img.info.get("transparency")
    if isinstance(key, int):  # Pillow's own convert ignores a 16-bit tRNS value; honour it
        alpha = Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), mode="L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def as_pil(image: ImageInput | EncodedImage, *, exif_transpose: bool = True,
           max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, an image file's bytes, a PIL image or a uint8 array (HW, HWC with 1/3/4 channels) as a PIL image.

    ``max_pixels`` guards decoding, so it applies to files and bytes; an image already in memory is only refused
    when it has no pixels (resized, it would come out black, and Pan & Scan would divide by its zero side), when
    its pixels cannot be read (a lazily opened, truncated file), or when ``mode_problem`` refuses its samples.

    Raises:
        ImageError: zero-size, not an image, truncated or corrupt, samples without a defined range, or a file or
            bytes ``decode_image`` refuses; the message starts with the input (its path, ``<bytes, N bytes>``,
            ``PIL image (mode, from path)`` or the array's shape).
    """
    if isinstance(image, Image.Image):
        name = f"PIL image ({image.mode})"
        source = getattr(image, "filename", None)  # set when the caller opened a file by its path
        if isinstance(source, str) and source:
            name = f"PIL image ({image.mode}, from {source})"
        check_pixel_count(image.size, None, name)
        _load_in_memory(image, name)
        check_mode(image, name)
        return image
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    if isinstance(image, ENCODED):
        return decode_bytes(image, exif_transpose=exif_transpose, max_pixels=max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, exif_transpose=exif_transpose, max_pixels=max_pixels)
    raise ImageError(f"expected a path, an image file's bytes, a PIL image or a uint8 array, "
                     f"got {type(image).__name__}")


def _load_in_memory(image: Image.Image, name: str) -> None:
    """Read the pixels of a PIL image the caller opened lazily (``Image.open`` reads only the header), strictly, so
    a truncated file is reported as such rather than as a failed conversion later."""
    try:
        with strict_decoding():
            image.load()
    except Exception as e:  # as in decode_image: Pillow raises many types on corrupt data
        if getattr(image, "fp", True) is None:  # closed (``with Image.open(p) as im``) before its pixels were read
            raise ImageError(f"{name}: closed before its pixels were read: call load() before closing it, or pass "
                             "its path") from None
        raise ImageError(f"{name}: {CORRUPT} ({type(e).__name__}: {one_line(e)})") from None


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 HWC, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    check_pixel_count((a.shape[1], a.shape[0]), None, f"image array of shape {a.shape}")
    if a.ndim == 2:
        return Image.fromarray(a, mode="L")
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB" if a.shape[-1] == 3 else "RGBA")


def resize(img: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """Stretch to size×size with Pillow's bilinear or bicubic filter (antialiased on downscale), aspect not kept.
    As transformers' PIL backend calls it: no ``reducing_gap``."""
    return img.resize((size, size), _FILTERS[resample])


def _normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(256, 3)`` float32 lookup table: uint8 value → normalized value, per channel.

    Computed in transformers' order and precision (rescale in float64 then cast, normalize in float32), so a
    lookup equals its arithmetic bit for bit.
    """
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]  # (256, 1)
    return (rescaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (256, 3)


_TABLES: dict[tuple[tuple[float, ...], tuple[float, ...]], np.ndarray] = {}


def normalize(rgb: np.ndarray, mean: Sequence[float] = (0.5, 0.5, 0.5),
              std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """uint8 ``(H, W, 3)`` → float32 ``(H, W, 3)``: ``(x/255 - mean) / std``."""
    key = (tuple(mean), tuple(std))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = _normalize_table(mean, std)
    return table[rgb, np.arange(3)]  # (H, W, 3) float32


def preprocess_one(image: ImageInput | EncodedImage, config: PreprocessConfig = PreprocessConfig(), *,
                   exif_transpose: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image (a path, an image file's bytes, a PIL image or a uint8 array) → float32 ``(S, S, 3)`` model
    input."""
    img = as_pil(image, exif_transpose=exif_transpose, max_pixels=max_pixels)
    return pil_to_input(img, config)


def pil_to_input(img: Image.Image, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """A decoded PIL image → float32 ``(S, S, 3)``: RGB, resize, normalize."""
    try:
        rgb = np.asarray(resize(to_rgb(img), config.image_size, config.resample))  # (S, S, 3) uint8
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot convert {img.mode} image to RGB ({one_line(e)})") from None
    return normalize(rgb, config.image_mean, config.image_std)


def preprocess(images: ImageInput | EncodedImage | Iterable[ImageInput | EncodedImage],
               config: PreprocessConfig = PreprocessConfig(), *, exif_transpose: bool = True,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Images → float32 NHWC ``(B, S, S, 3)`` in [-1, 1], the tower's input (``(0, S, S, 3)`` for none).

    Args:
        images: one image, or a list, tuple or other iterable of them (``image_list``), each a file path, an image
            file's encoded bytes (``bytes``, ``bytearray`` or ``memoryview``, decoded like a file), a PIL image or a
            uint8 array (see ``as_pil``).
    """
    arrays = [preprocess_one(im, config, exif_transpose=exif_transpose, max_pixels=max_pixels)
              for im in image_list(images)]
    if not arrays:  # as encode([]) gives no rows
        return torch.empty(0, config.image_size, config.image_size, 3)
    return torch.from_numpy(np.stack(arrays))  # (B, S, S, 3)


# One image each, though Python could iterate them: a path, a file's bytes, an array, a tensor (refused by as_pil).
_ONE_IMAGE = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor, *ENCODED)


def image_list(images: object) -> list[Any]:
    """One image alone, or a list, tuple, generator or other iterable of them, as a list of images."""
    if isinstance(images, _ONE_IMAGE) or not isinstance(images, Iterable):
        return [images]
    return list(images)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace runs folded), or its type's name if it has none."""
    return " ".join(str(e).split()) or type(e).__name__


def without_name(name: str, reason: str) -> str | None:
    """``reason`` less the input's ``name`` it starts with (``NAME: ...``), as written or as ``one_line`` folded it
    ("a  b.png" as "a b.png"); None if it does not start with it."""
    for prefix in (f"{name}:", " ".join(f"{name}:".split())):
        if reason.startswith(prefix):
            return reason[len(prefix):].lstrip(" ")
    return None
