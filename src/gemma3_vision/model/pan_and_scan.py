"""Pan & Scan: Gemma 3's extra crops for non-square images, exactly as transformers' Gemma 3 processor cuts them.

An image whose long side is at least ``min_ratio_to_activate`` times its short side is split along the long side into
2 to ``max_num_crops`` crops of ``ceil(long / n)`` pixels (the last may be shorter), cut from the *original, unresized*
RGB image in row-major order. The model then sees ``[original] + crops``, each stretched to the input size on its own.
Squares, near-squares and images whose crops would be under ``min_crop_size`` pixels get no crops.

Source of the rule: transformers ``Gemma3ImageProcessorPil.pan_and_scan``; the defaults (256, 4, 1.2) are
``Gemma3Processor.images_kwargs`` (the image processor's own attributes are ``None``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..checks import is_integer, is_number
from ..errors import OptionError
from .preprocessing import PreprocessConfig, check_pixel_count, normalize, resize, to_rgb

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in original pixels, right/bottom exclusive
_GEMMA3_INPUT = PreprocessConfig()
# One image's views, the original and every crop, are held together (each 896×896×3 float32 = 9.6 MB, and its
# outputs): the crop count, not the batch size, bounds that memory, and 100,000 crops of a 1×100,000 image asked
# for ~1 TB. Gemma 3's processor uses 4; 32 leaves 8 times that (a 1:32 scroll) at ~0.3 GB an image.
MAX_NUM_CROPS = 32
TOO_MANY_CROPS = ("one image's views, the original and every crop (9.6 MB each at 896 px), are held in memory "
                  "together")


@dataclass(frozen=True)
class PanAndScanConfig:
    """The three knobs of Pan & Scan, with the Gemma 3 processor's defaults."""

    min_crop_size: int = 256
    max_num_crops: int = 4
    min_ratio_to_activate: float = 1.2

    def __post_init__(self) -> None:
        for name in ("min_crop_size", "max_num_crops"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise OptionError(f"pan-and-scan {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer as an int: job keys are JSON
        if self.max_num_crops < 2:
            # The rule always makes at least 2 crops; a cap of 1 would silently be exceeded.
            raise OptionError(f"pan-and-scan max_num_crops must be at least 2, got {self.max_num_crops}")
        if self.max_num_crops > MAX_NUM_CROPS:
            raise OptionError(f"pan-and-scan max_num_crops must be at most {MAX_NUM_CROPS}, got "
                              f"{self.max_num_crops}: {TOO_MANY_CROPS}")
        r = self.min_ratio_to_activate
        if not is_number(r) or not math.isfinite(r) or r < 1:
            raise OptionError(f"pan-and-scan min_ratio_to_activate must be a number >= 1, got {r!r}")
        if not isinstance(r, (int, float)):  # a numpy float; Python numbers stay as given (job keys spell them)
            object.__setattr__(self, "min_ratio_to_activate", float(r))


def crop_boxes(width: int, height: int, config: PanAndScanConfig = PanAndScanConfig()) -> list[Box]:
    """The crops of a ``width`` × ``height`` image, row-major; empty when Pan & Scan does not activate.

    Raises:
        ImageError: a zero-size image (it has no aspect ratio).
    """
    check_pixel_count((width, height), None, "Pan & Scan input")
    if width >= height:  # landscape or square: split the width
        if width / height < config.min_ratio_to_activate:
            return []
        n_w = _num_crops(width, height, config)
        n_h = 1
    else:  # portrait: split the height
        if height / width < config.min_ratio_to_activate:
            return []
        n_w = 1
        n_h = _num_crops(height, width, config)
    crop_w = math.ceil(width / n_w)
    crop_h = math.ceil(height / n_h)
    if min(crop_w, crop_h) < config.min_crop_size:
        return []
    # Clipped to the image, as slicing clips in the reference: the last crop along the split axis may be shorter.
    # With a tiny min_crop_size a last crop can start past the edge (5 px in 4 crops of 2); the reference then
    # fails resizing an empty array, so such empty boxes are left out.
    boxes = [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y, x in itertools.product(range(0, crop_h * n_h, crop_h), range(0, crop_w * n_w, crop_w))
    ]
    return [b for b in boxes if b[0] < b[2] and b[1] < b[3]]


def _num_crops(long: int, short: int, config: PanAndScanConfig) -> int:
    n = math.floor(long / short + 0.5)  # the aspect ratio, rounded half up
    n = min(n, math.floor(long / config.min_crop_size))  # no more crops than fit at the minimum size
    return min(config.max_num_crops, max(2, n))


def views(img: Image.Image, config: PanAndScanConfig = PanAndScanConfig()) -> tuple[list[Image.Image], list[Box]]:
    """``[original] + crops`` as RGB images, and each one's box in the original (the original's is the whole image).

    The image is made RGB (alpha onto white) before cropping, as the reference converts before it crops.
    """
    rgb = to_rgb(img)
    boxes = [(0, 0, rgb.width, rgb.height), *crop_boxes(rgb.width, rgb.height, config)]
    return [rgb, *(rgb.crop(box) for box in boxes[1:])], boxes


def pan_and_scan_inputs(img: Image.Image, preprocess: PreprocessConfig = _GEMMA3_INPUT,
                        config: PanAndScanConfig = PanAndScanConfig()) -> tuple[np.ndarray, list[Box]]:
    """One decoded image → float32 ``(1 + n_crops, S, S, 3)`` model input (original first) and the boxes."""
    images, boxes = views(img, config)
    arrays = [normalize(np.asarray(resize(view, preprocess.image_size, preprocess.resample)),
                        preprocess.image_mean, preprocess.image_std) for view in images]  # each (S, S, 3)
    return np.stack(arrays), boxes
