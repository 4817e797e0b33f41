"""The Python API: ``load(model)`` returns an encoder whose ``encode(images)`` gives Gemma 3 soft tokens."""

from __future__ import annotations

import copy
import functools
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .backends import Backend, resolve_backend
from .checkpoints.checkpoint import Checkpoint
from .checkpoints.resolve import resolve
from .checkpoints.weights import VisionModel, load_model
from .checks import is_integer
from .errors import ConfigError, OptionError
from .model.pan_and_scan import Box, PanAndScanConfig, pan_and_scan_inputs
from .model.preprocessing import (
    DEFAULT_MAX_PIXELS,
    EncodedImage,
    ImageInput,
    PreprocessConfig,
    as_pil,
    image_list,
    pil_to_input,
    preprocess,
)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


class RandomWeightsWarning(UserWarning):
    """The model has seeded random weights: its embeddings mean nothing."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``, without asking whether this machine has it (a Ray
    driver names the device of other machines).

    Raises:
        OptionError: anything else.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message lists every device type it knows
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise OptionError(f"device must be cpu, cuda or cuda:N (N a GPU index), got {str(device)!r}")
    return parsed


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: ``None`` picks CUDA when available, else the CPU; a named one must exist here.

    Raises:
        OptionError: not cpu, cuda or cuda:N; CUDA asked for where there is none; a GPU index this machine lacks.
    """
    if device is None:
        return default_device()
    parsed = parse_device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise OptionError(f"device {str(device)!r} asked for, but CUDA is not available on this machine "
                              f"({why}): use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(f"device must be one of cuda:0..cuda:{count - 1} on this machine ({count} GPU"
                              f"{'s' if count > 1 else ''}), got {str(device)!r}")
    return parsed


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls then run several times faster than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def cpu_has_fast_fp16() -> bool:
    """AMX-FP16 or AVX512-FP16: native fp16 matmuls."""
    return bool({"amx_fp16", "avx512_fp16"} & _cpu_flags())


def compute_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the tower's matmuls run in for weights stored in ``dtype``.

    On a CPU without native bf16 (fp16) support, oneDNN/MKL emulate those matmuls about 8x slower than fp32, so
    bf16/fp16 weights stay stored as such (half the memory) and are computed in float32, one layer at a time:
    faster and closer to the fp32 reference. Elsewhere (CUDA, AMX / AVX512-BF16 CPUs) the stored dtype is used.
    """
    if device.type == "cpu":
        if (dtype == torch.bfloat16 and not cpu_has_fast_bf16()) or (dtype == torch.float16 and not cpu_has_fast_fp16()):
            return torch.float32
    return dtype


def kept_storage_dtypes(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, ...]:
    """Stored dtypes that a run in ``dtype`` keeps as stored instead of casting at load.

    A float32 run on a CPU keeps bf16 and fp16 weights (every Hugging Face Gemma 3 checkpoint is bf16) and widens
    them one layer at a time as it computes: the widening is exact, so the results equal those of casting everything
    at load, which writes 1.6 GB (docs/precision.md). The widening did not show in the time of a CPU
    forward (0.99x, within noise). A GPU forward takes milliseconds, so there it would be a larger share (not
    measured): weights are cast at load.
    """
    return (torch.bfloat16, torch.float16) if device.type == "cpu" and dtype == torch.float32 else ()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` picks bfloat16 where it is fast (CUDA, CPUs with AMX or AVX512-BF16), else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise OptionError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype is None:
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


POOLS = ("mean",)


@dataclass
class ViewEncoding:
    """What ``encode`` computed for one view of an image: the image itself, or one Pan & Scan crop."""

    box: Box  # (left, top, right, bottom) of this view in the original image's pixels; the whole image for it
    embeddings: torch.Tensor  # (T, text_hidden) projected, T = (grid / 4)²; or (N, hidden) with project=False
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # {i: (N, hidden)}: 0 embeddings, i after layer i
    pooled: torch.Tensor | None = None  # (text_hidden,) or (hidden,) float32: mean over rows of `embeddings`

    def arrays(self) -> dict[str, torch.Tensor]:
        """``{"": embeddings, "layer13": ..., "pooled": ...}``: this view's tensors by name."""
        named = {"": self.embeddings, **{f"layer{i}": hidden for i, hidden in self.layers.items()}}
        if self.pooled is not None:
            named["pooled"] = self.pooled
        return named


@dataclass
class ImageEncoding:
    """``encode``'s result per image when an option asks for more than one tensor.

    ``views[0]`` is the image itself; Pan & Scan crops follow in row-major order. The shortcuts ``embeddings``,
    ``layers`` and ``pooled`` read the image's own view; ``arrays()`` names every tensor for saving.
    """

    size: tuple[int, int]  # (width, height) of the original image, after EXIF orientation
    views: list[ViewEncoding]

    @property
    def embeddings(self) -> torch.Tensor:
        return self.views[0].embeddings

    @property
    def layers(self) -> dict[int, torch.Tensor]:
        return self.views[0].layers

    @property
    def pooled(self) -> torch.Tensor | None:
        return self.views[0].pooled

    @property
    def crops(self) -> list[ViewEncoding]:
        return self.views[1:]

    @property
    def crop_boxes(self) -> list[Box]:
        return [view.box for view in self.crops]

    def arrays(self) -> dict[str, torch.Tensor]:
        """Every tensor by name: ``""`` the main embeddings, ``layer13``, ``pooled``, ``crop1``, ``crop1.layer13``,
        ``crop1.pooled``... (crops numbered from 1)."""
        return {".".join(part for part in (f"crop{i}" if i else "", name) if part): tensor
                for i, view in enumerate(self.views) for name, tensor in view.arrays().items()}


class Gemma3Vision:
    """A loaded tower (and projector). Use ``encode`` for images, ``encode_pixels`` for preprocessed input."""

    def __init__(self, model: VisionModel, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                 image_size: int | None = None, backend: Backend | None = None):
        self.model = model  # the torch modules: the weights every backend starts from
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = device
        self.image_size = image_size if image_size is not None else checkpoint.preprocess.image_size
        self.check_image_size(self.image_size, project=False)
        self.backend: Backend = backend if backend is not None else make_backend("torch", model, checkpoint, dtype, device)

    def __getstate__(self) -> dict[str, object]:
        """For pickle and copy (a DataLoader's spawned workers, torch.multiprocessing): the weights travel in
        ``model``, each in a storage of its own (``compact``), the checkpoint without its file readers
        (``Checkpoint.detached``)."""
        # The backend travels by name and is made again from the compact model, which it would otherwise pickle
        # twice (and an OpenVINO compiled model cannot be pickled: the copy reads it from the disk cache).
        return {**self.__dict__, "model": compact(self.model), "checkpoint": self.checkpoint.detached(),
                "backend": self.backend.name}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        name = state["backend"]
        assert isinstance(name, str)
        self.backend = make_backend(name, self.model, self.checkpoint, self.dtype, self.device)

    @property
    def vision_config(self):  # noqa: ANN201 - VisionConfig
        return self.checkpoint.vision

    @property
    def projector_config(self):  # noqa: ANN201 - ProjectorConfig | None
        return self.checkpoint.projector

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The checkpoint's preprocessing at this encoder's ``image_size``."""
        return replace(self.checkpoint.preprocess, image_size=self.image_size)

    @property
    def has_projector(self) -> bool:
        return self.model.multi_modal_projector is not None

    def require_projector(self) -> None:
        """Raises ConfigError when there is nothing to project with (a standalone SigLIP tower)."""
        if not self.has_projector:
            raise OptionError(f"{self.checkpoint.description} has no multimodal projector (a standalone SigLIP "
                              "tower): use project=False / --no-project")

    def check_image_size(self, image_size: int, *, project: bool) -> None:
        """Refuse an input size the tower (or, projecting, the projector's fixed k×k merge) cannot take.

        Raises:
            ConfigError: under one patch, or a patch grid the projector's pool does not divide.
        """
        P = self.vision_config.patch_size
        check_input_size(image_size, P)
        if project and self.model.multi_modal_projector is not None:
            k = self.model.multi_modal_projector.kernel_size
            grid = image_size // P
            if grid % k:
                raise OptionError(
                    f"image_size {image_size} gives a {grid}x{grid} patch grid, which the projector's {k}x{k} "
                    f"merge does not divide: use a multiple of {P * k} (e.g. {max(1, grid // k) * P * k}), "
                    "or project=False / --no-project"
                )

    def tokens_per_image(self, image_size: int | None = None, *, project: bool = True) -> int:
        """Rows of one image's output at ``image_size``: (grid / k)² soft tokens, or grid² patches unprojected."""
        grid = (image_size or self.image_size) // self.vision_config.patch_size
        if project and self.model.multi_modal_projector is not None:
            return (grid // self.model.multi_modal_projector.kernel_size) ** 2
        return grid * grid

    def preprocess(self, images: ImageInput | EncodedImage | Iterable[ImageInput | EncodedImage], *,
                   exif_transpose: bool = True,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Images → float32 NHWC ``(B, S, S, 3)`` in [-1, 1]."""
        return preprocess(images, self.preprocess_config, exif_transpose=exif_transpose, max_pixels=max_pixels)

    @torch.no_grad()  # not inference_mode: its tensors refuse in-place changes and autograd outside it
    def encode_pixels(self, pixels: torch.Tensor, *, project: bool = True) -> torch.Tensor:
        """NHWC pixels ``(B, H, W, 3)``, floating point in [-1, 1] (what ``preprocess`` returns, or a float numpy
        array) → ``(B, T, text_hidden)`` projected, or ``(B, N, hidden)`` with ``project=False``. No gradients:
        for them, call ``self.model.vision_tower`` and ``self.model.multi_modal_projector`` (docs/python-api.md)."""
        if project:
            self.require_projector()
        pixels = check_pixel_tensor(pixels)
        x, _ = self.backend.tower(pixels)
        return self.backend.project(x) if project else x

    def encode(
        self, images: ImageInput | EncodedImage | Iterable[ImageInput | EncodedImage], *, project: bool = True,
        batch_size: int = 8, image_size: int | None = None, pan_and_scan: bool = False,
        pan_and_scan_min_crop_size: int = 256,
        pan_and_scan_max_num_crops: int = 4, pan_and_scan_min_ratio_to_activate: float = 1.2,
        layers: Sequence[int] | None = None, pool: str | None = None, normalize: bool = False,
        exif_transpose: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> torch.Tensor | list[ImageEncoding]:
        """Encode images (paths, PIL images, uint8 arrays: HWC RGB, or HW grey; or an image file's bytes).

        Args:
            images: one image, or a list, tuple or any other iterable of them.
            project: return the projector's soft tokens; ``False`` returns the tower output.
            batch_size: views per forward pass, which is what bounds memory: images, and with ``pan_and_scan``
                each image and each of its crops counts one (views of several images share a pass).
            image_size: input side in pixels for this call (default: the encoder's, 896 for Gemma 3). Position
                embeddings are interpolated (bicubic, as transformers' ``interpolate_pos_encoding``); the projector
                keeps its 4×4 merge, so there are ``(image_size // 14 // 4)²`` tokens: 64 at 448, 576 at 1344.
            pan_and_scan: also encode Gemma 3 Pan & Scan crops of non-square images (see ``pan_and_scan.py``),
                with the processor's three parameters below.
            layers: hidden states to return, by index: 0 the embeddings, ``i`` after encoder layer ``i``
                (before ``post_layernorm``), as transformers' ``output_hidden_states``.
            pool: ``"mean"``: also return the mean over rows of the main output, one vector per view.
            normalize: L2-normalise the pooled vectors.

        Returns:
            With none of ``pan_and_scan``, ``layers``, ``pool``: one tensor ``(B, T, text_hidden)`` projected, or
            ``(B, N, hidden)`` with ``project=False``. Otherwise one ``ImageEncoding`` per image. No images give
            no rows: a ``(0, T, text_hidden)`` (or ``(0, N, hidden)``) tensor, or ``[]``.
        """
        batch_size = check_count("batch_size", batch_size)
        config = self.preprocess_config if image_size is None else replace(self.preprocess_config,
                                                                           image_size=image_size)
        self.check_image_size(config.image_size, project=project and self.has_projector)
        wanted = self.check_layers(layers)
        if pool is not None and pool not in POOLS:
            raise OptionError(f"pool must be one of {', '.join(POOLS)} or None, got {pool!r}")
        if normalize and pool is None:
            raise OptionError("normalize applies to pooled vectors: set pool='mean' as well")
        images = image_list(images)  # after the checks: a generator is not used up by a call that fails
        if not (pan_and_scan or layers is not None or pool is not None):
            if not images:
                return self.empty_output(config.image_size, project=project)
            outputs = [
                self.encode_pixels(preprocess(images[i:i + batch_size], config, exif_transpose=exif_transpose,
                                              max_pixels=max_pixels), project=project)
                for i in range(0, len(images), batch_size)
            ]
            return torch.cat(outputs)
        pas = PanAndScanConfig(pan_and_scan_min_crop_size, pan_and_scan_max_num_crops,
                               pan_and_scan_min_ratio_to_activate) if pan_and_scan else None
        decoded: list[tuple[tuple[int, int], list[Box]]] = []  # each image's size and its views' boxes

        def views() -> Iterator[np.ndarray]:
            for image in images:
                size, pixels, boxes = self.prepare(image, config, pas, exif_transpose=exif_transpose,
                                                   max_pixels=max_pixels)  # (V, S, S, 3)
                decoded.append((size, boxes))
                yield from pixels

        encoded = [view for batch in view_batches(views(), batch_size)
                   for view in self.encode_views(torch.from_numpy(batch), project=project, layers=wanted, pool=pool,
                                                 normalize=normalize)]
        results: list[ImageEncoding] = []
        start = 0
        for size, boxes in decoded:  # each image's views, in order
            own = encoded[start:start + len(boxes)]
            start += len(boxes)
            results.append(ImageEncoding(size, [replace(v, box=b) for v, b in zip(own, boxes, strict=True)]))
        return results

    def empty_output(self, image_size: int, *, project: bool) -> torch.Tensor:
        """What ``encode`` returns for no images: ``(0, T, text_hidden)``, or ``(0, N, hidden)`` unprojected, in
        the dtype and on the device of a non-empty result."""
        if project:
            self.require_projector()
        width = self.projector_config.text_hidden_size if project else self.vision_config.hidden_size
        return torch.empty(0, self.tokens_per_image(image_size, project=project), width, dtype=self.dtype,
                           device=self.device)

    @staticmethod
    def prepare(image: ImageInput | EncodedImage, config: PreprocessConfig,
                pan_and_scan: PanAndScanConfig | None = None, *,
                exif_transpose: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                ) -> tuple[tuple[int, int], np.ndarray, list[Box]]:
        """Decode one image into its views: ``(width, height)``, float32 ``(views, S, S, 3)`` and each view's box
        (the whole image first, then any Pan & Scan crops)."""
        img = as_pil(image, exif_transpose=exif_transpose, max_pixels=max_pixels)
        if pan_and_scan is not None:
            pixels, boxes = pan_and_scan_inputs(img, config, pan_and_scan)
        else:
            pixels, boxes = pil_to_input(img, config)[None], [(0, 0, img.width, img.height)]
        return (img.width, img.height), pixels, boxes

    @torch.no_grad()
    def encode_views(self, pixels: torch.Tensor, *, project: bool = True, layers: Sequence[int] = (),
                     pool: str | None = None, normalize: bool = False) -> list[ViewEncoding]:
        """NHWC pixels ``(V, S, S, 3)`` → one ``ViewEncoding`` per row (boxes left empty for the caller)."""
        if project:
            self.require_projector()
        x, hidden = self.backend.tower(pixels, layers)  # (V, N, hidden), {i: (V, N, hidden)}
        if project:
            x = self.backend.project(x)  # (V, T, text_hidden)
        pooled = pool_rows(x, normalize=normalize) if pool is not None else None  # (V, D) float32
        return [
            ViewEncoding(box=(0, 0, 0, 0), embeddings=x[v], layers={i: hidden[i][v] for i in layers},
                         pooled=pooled[v] if pooled is not None else None)
            for v in range(x.shape[0])
        ]

    def check_layers(self, layers: Sequence[int] | None) -> list[int]:
        """``layers`` validated against the depth, duplicates dropped, order kept; ``[]`` for ``None``."""
        if layers is None:
            return []
        depth = self.vision_config.num_hidden_layers
        if isinstance(layers, (numbers.Integral, str)) or not all(is_integer(i) for i in layers):
            raise OptionError(f"layers must be a list of integers, got {layers!r}")
        layers = [int(i) for i in layers]  # numpy integers too
        bad = [i for i in layers if not 0 <= i <= depth]
        if bad:
            raise OptionError(f"layers must be in 0..{depth} (0 = the embeddings, {depth} = the last layer, "
                              f"before post_layernorm), got {bad}")
        return list(dict.fromkeys(layers))


def view_batches(views: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Views ``(S, S, 3)`` stacked ``batch_size`` at a time, across images: ``(batch_size, S, S, 3)``, the last
    batch maybe smaller."""
    batch: list[np.ndarray] = []
    for view in views:
        batch.append(view)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def check_input_size(image_size: int, patch_size: int) -> None:
    """An input side must hold at least one patch (a remainder is cut, as a valid-padding conv does)."""
    if not is_integer(image_size) or image_size < patch_size:
        raise OptionError(f"image_size must be an integer of at least the patch size {patch_size}, "
                          f"got {image_size!r}")


def check_count(name: str, value: int) -> int:
    """``value`` as an int of at least 1, or an OptionError naming the option."""
    if not is_integer(value) or value < 1:
        raise OptionError(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


def compact(model: VisionModel) -> VisionModel:
    """``model``, or a copy whose parameters each own their storage where some are views of a larger one: random
    weights are windows of a few shared pools, which pickle would write whole (70 MB for random:tiny's 0.5 MB)."""
    shared = any(p.untyped_storage().nbytes() > p.numel() * p.element_size() for p in model.parameters())
    if not shared:
        return model
    own = {id(p): torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, own)  # deepcopy takes each parameter from the memo: no pool is copied


def check_pixel_tensor(pixels: object) -> torch.Tensor:
    """``encode_pixels``' input as a floating-point tensor: integer pixels (0..255) would be read as [-1, 1]."""
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))  # torch takes no negative strides (a[:, ::-1])
    if not isinstance(pixels, torch.Tensor):
        raise ConfigError(f"pixels must be a torch tensor or numpy array, got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise ConfigError(f"pixels must be floating point in [-1, 1] (what preprocess() returns), got {pixels.dtype}: "
                          "pass images to encode() instead")
    return pixels


def pool_rows(x: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """``(B, T, D)`` → ``(B, D)`` float32: the mean over rows, L2-normalised on request."""
    pooled = x.float().mean(dim=1)  # (B, D)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def load(model: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, image_size: int | None = None,
         backend: str | None = "auto") -> Gemma3Vision:
    """Load a Gemma 3 vision tower and projector.

    Args:
        model: a Hugging Face folder or hub id, a GGUF file (llama.cpp mmproj or Ollama blob), an Ollama model
            name, an MLX or SigLIP folder, or ``random`` / ``random:tiny`` for seeded random weights (the
            resolution order is in ``resolve.py`` and docs/models.md).
        dtype: ``float32``, ``bfloat16`` or ``float16``; ``None`` picks bfloat16 where it is fast, else float32.
        device: ``cpu``, ``cuda`` or ``cuda:N``; ``None`` picks CUDA when available.
        image_size: input side in pixels, overriding the checkpoint's (e.g. 448 or 1344 for Gemma 3, whose
            position table is 64×64: it is interpolated bicubically, as transformers does).
        backend: the engine that runs the tower and projector (``backends/``): ``auto`` (default) picks the
            fastest exact one present for the device (``openvino`` on an x86-64 CPU with the ``openvino`` extra,
            ``mlx`` on Apple silicon with mlx installed, else ``torch``); ``torch`` is the reference path and the
            only one on a GPU; ``mlx`` runs on MLX's device and needs ``device="cpu"`` or none (docs/mlx.md).

    Returns:
        A ``Gemma3Vision`` whose ``encode(images)`` returns embeddings.

    Raises:
        ConfigError: a bad dtype, device or image size; a device this machine does not have; a backend that is
            not installed or does not run on the device.
        ModelNotFoundError, WeightsError: the model cannot be found, or its files cannot be read as one.
    """
    if device is None and backend == "mlx":
        device = "cpu"  # MLX computes on its own device (the Apple GPU); results come back as CPU tensors
    device = resolve_device(device)
    backend = resolve_backend(backend, device)
    run_dtype = resolve_dtype(dtype, device)
    if dtype is None and backend == "mlx":
        from .backends.mlx import default_dtype

        run_dtype = default_dtype(run_dtype)
    checkpoint = resolve(model, dtype=run_dtype)  # random weights are made in it: nothing to cast
    if image_size is not None:
        check_input_size(image_size, checkpoint.vision.patch_size)  # before the weights are read
    if checkpoint.is_random:
        warnings.warn(f"{checkpoint.description} has seeded RANDOM weights: its embeddings mean nothing",
                      RandomWeightsWarning, stacklevel=2)
    vision_model = load_model(checkpoint, dtype=run_dtype, device=device, check_finite=not checkpoint.is_random,
                              keep_dtypes=kept_storage_dtypes(run_dtype, device))
    tower = vision_model.vision_tower
    tower.compute_dtype, tower.output_dtype = compute_dtype_for(run_dtype, device), run_dtype
    if vision_model.multi_modal_projector is not None:
        vision_model.multi_modal_projector.compute_dtype = tower.compute_dtype
    return Gemma3Vision(vision_model, checkpoint, run_dtype, device, image_size=image_size,
                        backend=make_backend(backend, vision_model, checkpoint, run_dtype, device))


def make_backend(name: str, model: VisionModel, checkpoint: Checkpoint, dtype: torch.dtype,
                 device: torch.device) -> Backend:
    """The backend called ``name`` (one ``resolve_backend`` returned) for loaded weights."""
    if name == "openvino":
        from .backends.openvino import OpenVINOBackend
        from .jobs.output_folder import checkpoint_identity

        return OpenVINOBackend(model.vision_tower, model.multi_modal_projector, dtype=dtype,
                               compute_dtype=compute_dtype_for(dtype, device),
                               identity=checkpoint_identity(checkpoint))
    if name == "mlx":
        from .backends.mlx import MLXBackend

        return MLXBackend(model, dtype)
    from .backends.torch import TorchBackend

    return TorchBackend(model, device)
