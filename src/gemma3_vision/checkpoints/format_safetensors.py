"""Hugging Face safetensors checkpoints: Gemma 3 (every key layout), standalone SigLIP and mlx-community folders.

Headers are validated here before the safetensors library memory-maps anything, shard names in an index are checked
before any path is joined, and only the shards that hold vision or projector tensors are opened. The library returns
tensors that are views of its mapping: reading one costs nothing until its pages are touched.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConfigError, FormatError, ModelNotFoundError, WeightsError
from ..model.config import VisionConfig, configs_from_hf_dict
from ..model.preprocessing import RESAMPLE_CODES, PreprocessConfig, channel_values, resample_name
from ..safe_io import open_regular, parse_json, read_json, read_json_object
from .checkpoint import PROJECTOR, TOWER, Checkpoint, TensorSource

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_OTHER_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
                 "I64": 8, "U64": 8}
_DTYPE_BYTES = {**FLOAT_DTYPES, **_OTHER_DTYPES}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"

# File key prefix → canonical root, per layout. Longest prefixes first: the first match wins.
GEMMA3_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", TOWER),  # saved by transformers >= 4.52 (4.x)
    ("vision_tower.vision_model.", TOWER),  # released on the Hub; mlx-community
    ("vision_model.vision_model.", TOWER),  # pre-release
    ("vision_tower.", TOWER),  # saved by transformers 5.x
    ("model.multi_modal_projector.", PROJECTOR),
    ("multi_modal_projector.", PROJECTOR),
    ("multimodal_projector.", PROJECTOR),  # pre-release
)
GEMMA3_IGNORED = ("language_model.", "model.language_model.", "lm_head.")
SIGLIP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.", TOWER),  # SiglipModel / SiglipVisionModel (4.x)
    ("", TOWER),  # SiglipVisionModel saved by 5.x: bare embeddings.*, encoder.*, post_layernorm.*
)
SIGLIP_IGNORED = ("vision_model.head.", "head.", "text_model.", "logit_scale", "logit_bias")

Header = dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]


@dataclass(frozen=True)
class ShardFile:
    """A safetensors file whose header passed ``read_header``, and the file it was then."""

    path: Path
    header: Header
    identity: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) when validated


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header without trusting any of its numbers.

    Returns ``{name: (dtype, shape, (begin, end))}``.

    Raises:
        FormatError: anything the safetensors format forbids (lying lengths, overlaps, overflow, bad dtypes).
    """
    return read_shard(path).header


def read_shard(path: Path) -> ShardFile:
    """``read_header``, keeping which file was validated (for ``open_shard``)."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if size < 8:
            raise FormatError(f"{path}: safetensors file must be at least 8 bytes, found {size}")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header length {n:,} exceeds the {MAX_HEADER_BYTES:,}-byte limit")
        if 8 + n > size:
            raise FormatError(f"{path}: header claims {n:,} bytes but the file holds {size - 8:,} after the length")
        raw = f.read(n)
    header = parse_json(path, raw, "header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, found {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, found {str(metadata)[:80]}")
    buffer_len = size - 8 - n
    out: Header = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _check_entry(path, name, info)
    cursor = 0
    for name, (_, _, (begin, end)) in sorted(out.items(), key=lambda kv: kv[1][2]):
        if begin != cursor:
            raise FormatError(f"{path}: tensor {name} starts at byte {begin}, expected {cursor} "
                              "(data must be contiguous, without gaps or overlaps)")
        cursor = end
    if cursor != buffer_len:
        raise FormatError(f"{path}: tensors cover {cursor:,} bytes but the data section holds {buffer_len:,} "
                          "(truncated or padded file)")
    return ShardFile(path, out, (st.st_dev, st.st_ino, size, st.st_mtime_ns))


def open_shard(shard: ShardFile) -> Any:
    """``safetensors.safe_open`` on a shard whose header passed ``read_shard``, if it is still that file.

    Raises:
        WeightsError: the file is no longer the one whose header was validated (checked before and after opening
            it, since one cut short after being mapped would be SIGBUS on reading), or the library refuses it.
    """

    def check_unchanged() -> None:
        try:
            st = os.stat(shard.path)
        except OSError as e:
            raise WeightsError(f"{shard.path}: cannot stat the file ({e.strerror or e})") from None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != shard.identity:
            raise WeightsError(f"{shard.path}: the file changed after its header was validated")

    check_unchanged()
    try:
        handle = safe_open(str(shard.path), framework="pt")
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{shard.path}: safetensors cannot open the file ({e})") from None
    check_unchanged()
    return handle


def _check_entry(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict):
        raise FormatError(f"{path}: entry {name} must be an object, found {type(info).__name__}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise FormatError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
        raise FormatError(f"{path}: tensor {name} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise FormatError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]  # Python ints: no overflow
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(f"{path}: tensor {name} {dtype}{tuple(shape)} needs {nbytes:,} bytes, "
                          f"its offsets span {offsets[1] - offsets[0]:,}")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _regular_file(folder: Path, name: str, what: str) -> Path:
    """``folder/name`` after checking the *string* is a plain file name, then where it leads, then its kind.

    A symlink may point anywhere inside the checkpoint folder, or, when the folder is a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``), into that repository's ``blobs/``: that is how the cache stores every
    file. A link leaving both would let a downloaded index pull in any file on the machine.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or os.path.isabs(name) or "\0" in name):
        raise FormatError(f"{folder / INDEX_NAME}: {what} must be a plain file name inside the checkpoint "
                          f"folder, found {name!r}")
    path = folder / name
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise WeightsError(f"{folder}: {what} {name} is listed but missing") from None
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        allowed = [Path(os.path.realpath(folder))]
        snapshots = allowed[0].parent
        if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
            allowed.append(snapshots.parent / "blobs")
        if not any(target.is_relative_to(root) for root in allowed):
            raise FormatError(f"{folder}: {what} {name} is a link to {target}, outside the checkpoint folder"
                              + (" and its Hugging Face cache blobs/" if len(allowed) > 1 else ""))
    if not stat.S_ISREG(mode):
        raise FormatError(f"{folder}: {what} {name} is not a regular file")
    return path


def _index_shards(folder: Path, index: Path) -> dict[str, Path]:
    """Tensor name → shard path from ``model.safetensors.index.json``, every shard name checked first."""
    parsed = read_json(_regular_file(folder, INDEX_NAME, "index"), "index", max_bytes=MAX_HEADER_BYTES)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if weight_map is None:
        raise FormatError(f"{index}: not a safetensors index: expected an object with a weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: weight_map must be an object, found {type(weight_map).__name__}")
    shards: dict[str, Path] = {}
    by_name: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not (isinstance(shard, str) and shard.endswith(".safetensors")):
            raise FormatError(f"{index}: shard for {tensor} must be a .safetensors file name, found {shard!r}")
        if shard not in by_name:
            try:
                by_name[shard] = _regular_file(folder, shard, "shard")
            except FormatError:
                raise
            except WeightsError:  # missing: a partial hub download holds only the shards the tower needs;
                by_name[shard] = folder / shard  # load_hf_folder fails if a needed tensor lives here
        shards[tensor] = by_name[shard]
    return shards


def read_alone(folder: Path, weights: Path | None) -> bool:
    """Whether ``weights``, a ``.safetensors`` file in ``folder`` that the user named, is read by itself: unless
    the folder's index lists it, in which case it is one shard of the indexed checkpoint, read whole."""
    if weights is None:
        return False
    index = folder / INDEX_NAME
    return not (index.exists() and weights.name in {p.name for p in _index_shards(folder, index).values()})


def list_shards(folder: Path, weights: Path | None = None) -> dict[str, Path]:
    """Every tensor name → the shard file holding it: from ``weights`` if the user named a file read alone
    (``read_alone``), else from the index or the single file."""
    if read_alone(folder, weights):
        assert weights is not None  # for the type checker: read_alone says so
        return dict.fromkeys(read_header(weights), weights)
    index = folder / INDEX_NAME
    if index.exists():
        return _index_shards(folder, index)
    single = folder / SINGLE_NAME
    if single.exists():
        path = _regular_file(folder, SINGLE_NAME, "weights file")
        return dict.fromkeys(read_header(path), path)
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise WeightsError(f"{folder}: only pickle weights found ({', '.join(pickles)}); gemma3-vision never "
                           "unpickles. Convert them to safetensors first")
    raise ModelNotFoundError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _map_key(key: str, prefixes: tuple[tuple[str, str], ...], ignored: tuple[str, ...]) -> str | None | bool:
    """Canonical name for a file key; None when ignored on purpose; False when unknown."""
    if key.startswith(ignored):
        return None
    for prefix, root in prefixes:
        if key.startswith(prefix):
            return root + key[len(prefix):]
    return False


def load_hf_folder(folder: Path, weights: Path | None = None) -> Checkpoint:
    """A Hugging Face-layout folder: config.json, optional preprocessor_config.json, safetensors.

    Args:
        weights: a ``.safetensors`` file in ``folder`` that the user named (see ``list_shards``); the configs still
            come from the folder.
    """
    config_path = folder / CONFIG_NAME
    config_dict = _read_config(folder, CONFIG_NAME, "config")
    if config_dict is None:
        raise ModelNotFoundError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    vision, projector = configs_from_hf_dict(config_dict)
    is_siglip = projector is None
    preprocess = _preprocess_config(folder, vision, "bicubic" if is_siglip else "bilinear")
    prefixes, ignored = (SIGLIP_PREFIXES, SIGLIP_IGNORED) if is_siglip else (GEMMA3_PREFIXES, GEMMA3_IGNORED)

    shard_of = list_shards(folder, weights)
    wanted: dict[str, str] = {}  # canonical → file key
    unexpected: list[str] = []
    for key in shard_of:
        name = _map_key(key, prefixes, ignored)
        if name is False:
            unexpected.append(key)
        elif isinstance(name, str):
            if name in wanted:  # two layouts' names for one tensor: which one was meant is anyone's guess
                first, second = sorted((wanted[name], key))
                raise WeightsError(f"{folder}: {first} and {second} are both {name}; expected each tensor "
                                   "once, in one key layout")
            wanted[name] = key

    shards: dict[Path, ShardFile] = {}
    for path in sorted({shard_of[key] for key in wanted.values()}):
        # A file the user named may be a link to anywhere they like; names from the index may not.
        shards[path] = read_shard(path if path == weights else _regular_file(folder, path.name, "shard"))

    # Open while the model is read. Checkpoint.release() drops them: the tensors kept in the stored dtype hold the
    # mapping alive themselves, and when they are cast nothing of the file stays mapped or resident.
    handles: dict[Path, Any] = {}

    def reader(path: Path, key: str, fix: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            if path not in handles:
                handles[path] = open_shard(shards[path])
            t = handles[path].get_tensor(key)
            if t.data_ptr() % t.element_size():  # the format allows data at any byte; torch kernels assume alignment
                t = t.clone()
            return fix(t) if fix else t
        return read

    tensors: dict[str, TensorSource] = {}
    conventions: list[str] = []
    fmt = "siglip-safetensors" if is_siglip else "hf-safetensors"
    for name, key in sorted(wanted.items()):
        path = shard_of[key]
        if key not in shards[path].header:
            raise WeightsError(f"{folder / INDEX_NAME}: {key} is indexed in {path.name} but that file lacks it")
        dtype, shape, _ = shards[path].header[key]
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{path}: {key} must be a float tensor (F32, F16, BF16), found {dtype}")
        fix = None
        if name == "vision_tower.embeddings.patch_embedding.weight":
            shape, fix = _patch_conv_layout(path, key, shape, vision)
            if fix is not None:
                fmt = "mlx-safetensors"
                conventions.append("patch conv stored OHWI (MLX): permuted to OIHW")
        tensors[name] = TensorSource(name, shape, dtype, key, reader(path, key, fix))

    extra = [p for p in (folder / PREPROCESSOR_NAME, folder / INDEX_NAME) if p.exists()]  # read when present
    # The folder names the checkpoint, even when the user named its model.safetensors or one of its shards: the
    # description is part of an output folder's job key (output_folder.checkpoint_identity), and folders encoded
    # before a named file was read as such must still resume. Only a file read alone is its own description.
    alone = read_alone(folder, weights) and weights is not None and weights.name != SINGLE_NAME
    return Checkpoint(
        format=fmt, files=[config_path, *sorted(shards)], vision=vision, projector=projector,
        preprocess=preprocess, tensors=tensors, conventions=conventions, unexpected=unexpected,
        description=str(weights if alone else folder), release=handles.clear, extra_files=extra,
    )


def _patch_conv_layout(path: Path, key: str, shape: tuple[int, ...], vision: VisionConfig
                       ) -> tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor] | None]:
    """Torch stores the patch conv (O, C, P, P); MLX stores it (O, P, P, C). Decide by shape."""
    D, C, P = vision.hidden_size, vision.num_channels, vision.patch_size
    torch_shape, mlx_shape = (D, C, P, P), (D, P, P, C)
    if torch_shape == mlx_shape and C != 1:
        raise WeightsError(f"{path}: {key} has shape {shape}, which is ambiguous between OIHW and OHWI "
                           f"(channels = patch size = {C}); cannot tell the layout")
    if shape == mlx_shape and shape != torch_shape:
        return torch_shape, lambda t: t.permute(0, 3, 1, 2).contiguous()
    return shape, None  # a wrong shape is reported by the strict load, with every other problem


def _read_config(folder: Path, name: str, what: str) -> dict[str, Any] | None:
    """``folder/name`` as a JSON object, or None when there is no such file: a regular file (a FIFO would block,
    ``/dev/zero`` never ends), bounded size, strict JSON. Unlike the files an index names, it may be a link to
    anywhere: its name is fixed, so a downloaded file cannot point it elsewhere."""
    path = folder / name
    if not path.exists():
        return None
    return read_json_object(path, what, ConfigError)


def _preprocess_config(folder: Path, vision: VisionConfig, resample: str) -> PreprocessConfig:
    """From ``preprocessor_config.json`` when present. ``resample`` is the default of the model's image processor
    class (transformers' SiglipImageProcessor: bicubic; Gemma3ImageProcessor: bilinear)."""
    d = _read_config(folder, PREPROCESSOR_NAME, "preprocessor config")
    if d is None:
        return PreprocessConfig(image_size=vision.image_size, resample=resample)
    default = PreprocessConfig()
    try:
        mean = channel_values(d.get("image_mean", default.image_mean), "image_mean", broadcast=True)
        std = channel_values(d.get("image_std", default.image_std), "image_std", broadcast=True, positive=True)
        resample = resample_name(d.get("resample", RESAMPLE_CODES[resample]))
    except ConfigError as e:
        raise ConfigError(f"{folder / PREPROCESSOR_NAME}: {e}") from None
    return PreprocessConfig(image_size=vision.image_size, image_mean=mean, image_std=std, resample=resample)
