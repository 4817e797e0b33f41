"""A GGUF header parser that trusts none of the file's numbers (the checks llama.cpp's ``gguf.cpp`` makes).

Every count, length and offset is checked with Python ints against the bytes actually left before anything is
allocated, so a hostile file fails here with a ``FormatError`` rather than by accident (IndexError, wrapping uint64
element counts, multi-GB allocations) deep inside a reader. The tensor data itself is only memory-mapped later.

It is also fast: ``gguf.GGUFReader`` builds numpy objects for every array item and takes ~20 s on an Ollama blob's
262k-token vocabulary; here large arrays are skipped over (numbers) or walked (strings) without being kept.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError
from ..safe_io import open_regular

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_STRING_BYTES = 1 << 30  # llama.cpp GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ITEMS = 1 << 30  # llama.cpp GGUF_MAX_ARRAY_ELEMENTS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME = 64, including the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = (1 << 63) - 1  # INT64_MAX
KEPT_ARRAY_ITEMS = 1024  # longer arrays (vocabularies) are validated but only summarised

# GGUF value types: struct format of each scalar (STRING = 8, ARRAY = 9 are handled apart).
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                            12: "d"}
STRING, ARRAY, UINT32 = 8, 9, 4
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
# Smallest bytes one KV pair / tensor info can take: used to bound counts by the bytes left before looping.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep (a vocabulary): its item type and length only."""

    item_type: str
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: innermost (contiguous) dimension first
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch (row-major) shape: ``ne`` reversed."""
        return tuple(reversed(self.ne))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0
    file_size: int = 0


class _Cursor:
    """Bounded reads over a buffer: every read checks the bytes left first."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what} (at byte {self.pos:,})")

    def take(self, n: int, what: str, keep: bool = True) -> bytes:
        """The next ``n`` bytes (a copy: no buffer export outlives the read), or b"" when not kept."""
        if n > self.left():
            raise self.fail(f"{what} needs {n:,} bytes but only {self.left():,} are left (truncated file?)")
        out = self.buf[self.pos:self.pos + n] if keep else b""
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if size > self.left():
            raise self.fail(f"{what} needs {size} bytes but only {self.left()} are left (truncated file?)")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES, keep: bool = True) -> str | None:
        n = self.unpack("Q", f"{what} length")
        if n > limit:
            raise self.fail(f"{what} claims {n:,} bytes, more than the {limit:,}-byte limit")
        raw = self.take(n, what, keep)
        if not keep:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Walk ``count`` strings without decoding them: the fast path for vocabularies."""
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        for i in range(count):
            if pos + 8 > end:
                raise self.fail(f"{what}[{i}] length runs past the end of the file")
            (n,) = unpack(buf, pos)
            if n > MAX_STRING_BYTES or pos + 8 + n > end:
                raise self.fail(f"{what}[{i}] claims {n:,} bytes, more than the file holds or the limit allows")
            pos += 8 + n
        self.pos = pos


_U64 = struct.Struct("<Q")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate a GGUF file's header, tensor infos and data layout without reading tensor data.

    Raises:
        FormatError: the bytes do not follow the GGUF format (bad magic or version, lying counts or lengths,
            unknown types, more than 4 dims, misaligned, overlapping or out-of-file tensor data).
    """
    path = Path(path)
    with open_regular(path, FormatError) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise FormatError(f"{path}: a GGUF file is at least 24 bytes (magic, version, counts), found {size}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, size)


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFHeader:
    c = _Cursor(buf, path)
    magic = c.take(4, "magic")
    if magic != MAGIC:
        raise FormatError(f"{path}: not a GGUF file: magic must be b'GGUF', found {magic!r}")
    version = c.unpack("I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise FormatError(f"{path}: GGUF version {version:#x} looks byte-swapped: big-endian files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{path}: GGUF version must be 2 or 3, found {version}")
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "metadata count")
    if n_kv * _MIN_KV_BYTES > c.left():
        raise c.fail(f"metadata count {n_kv:,} cannot fit in the {c.left():,} bytes left")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > c.left():
        raise c.fail(f"tensor count {n_tensors:,} cannot fit in the {c.left():,} bytes left")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        assert key is not None
        if not key:
            raise c.fail(f"metadata key #{i} is empty")
        if key in metadata:
            raise c.fail(f"metadata key {key!r} appears twice")
        vtype, metadata[key] = _value(c, key)
        if key == "general.alignment" and vtype != UINT32:
            raise c.fail(f"general.alignment must be a uint32, found a {_TYPE_NAMES[vtype]}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not alignment or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment must be a non-zero power of two, found {alignment!r}")

    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name", limit=MAX_NAME_BYTES)
        assert name is not None
        if not name:
            raise c.fail(f"tensor #{i} has an empty name")
        if name in names:
            raise c.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = c.unpack("I", f"{name} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        ne = tuple(c.unpack("Q", f"{name} ne[{d}]") for d in range(n_dims))
        raw_type = c.unpack("I", f"{name} type")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name} has unknown ggml type {raw_type}") from None
        offset = c.unpack("Q", f"{name} offset")
        n = 1
        for d in ne:
            n *= d
        if n > MAX_ELEMENTS:
            raise c.fail(f"tensor {name} ne {list(ne)} holds {n:,} elements, more than INT64_MAX")
        if ne[0] % block:
            raise c.fail(f"tensor {name}: ne[0] = {ne[0]} is not a multiple of the {ggml_type.name} block "
                         f"size {block}")
        infos.append((name, ne, ggml_type, offset, n // block * type_size))

    data_offset = _align(c.pos, alignment)
    tensors: dict[str, TensorInfo] = {}
    expected = 0  # tensors lie back to back, each padded to the alignment, in the order listed
    for name, ne, ggml_type, offset, nbytes in infos:
        if offset != expected:
            raise FormatError(f"{path}: tensor {name} data starts at offset {offset:,}, expected {expected:,} "
                              "(data must be contiguous and aligned, in tensor order)")
        if data_offset + offset + nbytes > size:
            raise FormatError(f"{path}: tensor {name} needs bytes {data_offset + offset:,}..."
                              f"{data_offset + offset + nbytes:,} but the file holds {size:,} (truncated?)")
        tensors[name] = TensorInfo(name, ne, ggml_type, data_offset + offset, nbytes)
        expected = _align(offset + nbytes, alignment)
    return GGUFHeader(path, version, metadata, tensors, alignment, data_offset, size)


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _value(c: _Cursor, key: str) -> tuple[int, Any]:
    """One metadata value: (GGUF value type, value). Arrays longer than KEPT_ARRAY_ITEMS become summaries."""
    vtype = c.unpack("I", f"{key} value type")
    if vtype in _SCALARS:
        return vtype, c.unpack(_SCALARS[vtype], key)
    if vtype == STRING:
        return vtype, c.string(f"{key} value")
    if vtype != ARRAY:
        raise c.fail(f"metadata {key} has unknown value type {vtype}")
    item_type = c.unpack("I", f"{key} array item type")
    count = c.unpack("Q", f"{key} array length")
    if count > MAX_ARRAY_ITEMS:
        raise c.fail(f"metadata array {key} claims {count:,} items, more than the {MAX_ARRAY_ITEMS:,} limit")
    keep = count <= KEPT_ARRAY_ITEMS
    if item_type in _SCALARS:
        item = struct.calcsize("<" + _SCALARS[item_type])
        raw = c.take(count * item, f"{key} array ({count:,} x {_TYPE_NAMES[item_type]})", keep)
        if not keep:
            return vtype, ArraySummary(_TYPE_NAMES[item_type], count)
        return vtype, list(struct.unpack_from(f"<{count}{_SCALARS[item_type]}", raw))
    if item_type == STRING:
        if count * 8 > c.left():
            raise c.fail(f"metadata array {key} claims {count:,} strings, more than the bytes left can hold")
        if not keep:
            c.skip_strings(count, key)
            return vtype, ArraySummary("string", count)
        return vtype, [c.string(f"{key}[{i}]") for i in range(count)]
    raise c.fail(f"metadata array {key} has item type {item_type}: only scalar and string arrays are allowed")
