"""Image decoding and preprocessing, equal to transformers' ``Gemma3ImageProcessor`` (PIL backend).

Pipeline: decode (allow-listed formats, bomb-checked, first frame) → EXIF orientation (files only, see the policy
below) → RGB (alpha composited onto white, 16-bit scaled) → stretch-resize to ``image_size²`` with Pillow's
antialiasing bilinear filter (bicubic for SigLIP checkpoints that ask for it) → ``x/255`` → ``(x - mean) / std`` →
float32 NHWC.

EXIF policy: an image given as a *file path* is rotated by its EXIF orientation tag (as transformers'
``load_image(path)`` does); an image given as a PIL image or an array is taken as already oriented (as transformers
takes it). ``exif_transpose=False`` turns the rotation off for files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConfigError, ImageError
from .safe_io import file_kind as file_kind  # re-exported: discovery takes it from here
from .safe_io import open_regular

ImageInput = str | os.PathLike | Image.Image | np.ndarray

# Only these decoders run on untrusted bytes: Pillow's bomb checks live per plugin and keep failing in exotic ones.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold; 896² needs a tiny fraction of it
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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
    if broadcast and _is_number(value):
        value = [value] * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(x) for x in value)):
        raise ConfigError(f"{key} must be a list of 3 numbers, found {_short(value)}")
    try:
        out = (float(value[0]), float(value[1]), float(value[2]))
    except OverflowError:  # a JSON integer beyond float range
        out = (math.inf,) * 3
    if not all(math.isfinite(x) and (x > 0 or not positive) for x in out):
        raise ConfigError(f"{key} must be 3 finite numbers{' > 0' if positive else ''}, found {_short(value)}")
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    error, never grey fill (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off).

    Raises:
        ImageError: with ``name`` and the reason.
    """
    try:
        img: Image.Image = Image.open(fp, formats=ALLOWED_FORMATS)
        # Only the header has been read: refuse the claimed size before the decoder allocates anything.
        check_pixel_count(img.size, max_pixels, name)
        img.load()
        if exif_transpose:
            # Inside the try: a TIFF reads its EXIF from the file, and a malformed block raises anything. In place:
            # the image is ours, and the default returns a full copy even when there is nothing to rotate.
            ImageOps.exif_transpose(img, in_place=True)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in an allowed format, or its header is corrupt "
                         f"(expected one of {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit, when it is below ours
        raise ImageError(f"{name}: decompression bomb refused by Pillow ({one_line(e)})") from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error... on corrupt data
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {one_line(e)})") from None
    return img


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


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, exactly as transformers 5.x ``convert_to_rgb`` does.

    16-bit greyscale (``I;16*``, and ``I`` taken as 16-bit) keeps its high byte (``>> 8``), as Pillow itself does
    for 16-bit RGB PNGs; Pillow's ``convert`` would clamp it instead (1000 → 255), turning a 16-bit ramp almost
    white. This is a deliberate difference from the reference. Float images (mode ``F``) have no defined range
    and are refused. An RGB image without transparency is returned as it is, not copied.

    Raises:
        ImageError: a mode with no defined conversion to RGB.
    """
    if img.mode == "F":
        raise ImageError("floating-point (mode F) images have no defined value range; convert them to 8 or 16 bits")
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_8(img)
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy an RGB image


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` → ``L`` (or ``LA`` when a tRNS value marks transparent pixels) by the high byte."""
    a = np.asarray(img).astype(np.int64)  # (H, W), whatever the byte order
    grey = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), mode="L")
    key = img.info.get("transparency")
    if isinstance(key, int):  # Pillow's own convert ignores a 16-bit tRNS value; honour it
        alpha = Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), mode="L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def as_pil(image: ImageInput, *, exif_transpose: bool = True,
           max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, a PIL image or a uint8 array (HW, HWC with 1/3/4 channels) as a PIL image.

    ``max_pixels`` guards decoding, so it applies to files; an image already in memory is only refused when it has
    no pixels (resized, it would come out black, and Pan & Scan would divide by its zero side).

    Raises:
        ImageError: zero-size, not an image, or a file ``open_image`` refuses.
    """
    if isinstance(image, Image.Image):
        check_pixel_count(image.size, None, f"PIL image ({image.mode})")
        return image
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, exif_transpose=exif_transpose, max_pixels=max_pixels)
    raise ImageError(f"expected a path, a PIL image or a uint8 array, got {type(image).__name__}")


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


def preprocess_one(image: ImageInput, config: PreprocessConfig = PreprocessConfig(), *,
                   exif_transpose: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image → float32 ``(S, S, 3)`` model input."""
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


def preprocess(images: ImageInput | Sequence[ImageInput], config: PreprocessConfig = PreprocessConfig(), *,
               exif_transpose: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Images → float32 NHWC ``(B, S, S, 3)`` in [-1, 1], the tower's input."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    arrays = [preprocess_one(im, config, exif_transpose=exif_transpose, max_pixels=max_pixels) for im in images]
    if not arrays:
        raise ImageError("no images given")
    return torch.from_numpy(np.stack(arrays))  # (B, S, S, 3)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace runs folded), or its type's name if it has none."""
    return " ".join(str(e).split()) or type(e).__name__
