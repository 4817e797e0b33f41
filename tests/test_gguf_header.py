"""The GGUF header validator against crafted hostile files (struct.pack), a guard that legal files load, agreement
with gguf.GGUFReader, and a bounded fuzz run: every malformed file must fail with FormatError, nothing else."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import without_blocking
from gemma3_vision.checkpoints.gguf_header import read_gguf_header
from gemma3_vision.errors import FormatError

U32, U64, F32_T, STR, ARR = 4, 10, 6, 8, 9


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str | bytes, ne: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", ggml_type, offset)


def gguf_file(tmp_path: Path, *, kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"",
              version: int = 3, n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF",
              alignment: int = 32) -> Path:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    path = tmp_path / "f.gguf"
    path.write_bytes(head + data)
    return path


def legal(tmp_path: Path) -> Path:
    """The smallest useful legal file: one KV, one F32 tensor of 8 values."""
    return gguf_file(tmp_path, kvs=[kv("general.architecture", STR, s("clip"))],
                     infos=[tensor_info("t", [8])], data=np.arange(8, dtype=np.float32).tobytes())


def test_smallest_legal_file_loads(tmp_path):
    h = read_gguf_header(legal(tmp_path))
    assert h.metadata == {"general.architecture": "clip"}
    assert h.tensors["t"].shape == (8,) and h.tensors["t"].nbytes == 32


def test_agrees_with_gguf_reader(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "clip")
    w.add_uint32("clip.vision.block_count", 2)
    w.add_array("clip.vision.image_mean", [0.5, 0.25, 0.125])
    w.add_tensor("a", np.ones((3, 32), np.float32))
    w.add_tensor("b", np.ones((5, 64), np.float16))
    w.add_tensor("c", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = read_gguf_header(tmp_path / "w.gguf")
    theirs = gguf.GGUFReader(tmp_path / "w.gguf")
    assert ours.metadata["clip.vision.block_count"] == 2
    assert ours.metadata["clip.vision.image_mean"] == [0.5, 0.25, 0.125]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ne == tuple(int(d) for d in t.shape), t.name
        assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes, t.tensor_type), t.name


# Each case: what the crafted file claims, and the error it must produce.
HOSTILE = {
    "bad magic": (dict(magic=b"GGML"), "magic"),
    "version 1": (dict(version=1), "version must be 2 or 3"),
    "version 4": (dict(version=4), "version must be 2 or 3"),
    "byte-swapped version": (dict(version=0x03000000), "byte-swapped"),
    "2**60 KV pairs in a tiny file": (dict(n_kv=2**60), "metadata count"),
    "2**60 tensors in a tiny file": (dict(n_tensors=2**60), "tensor count"),
    "key length 2**40": (dict(kvs=[struct.pack("<Q", 2**40) + b"k"]), "limit|bytes"),
    "key not UTF-8": (dict(kvs=[kv(b"\xff\xfe", U32, struct.pack("<I", 1))]), "UTF-8"),
    "empty key": (dict(kvs=[kv("", U32, struct.pack("<I", 1))]), "empty"),
    "duplicate key": (dict(kvs=[kv("a", U32, struct.pack("<I", 1))] * 2), "twice"),
    "unknown value type 13": (dict(kvs=[kv("a", 13, b"\0" * 8)]), "unknown value type"),
    "array of arrays": (dict(kvs=[kv("a", ARR, struct.pack("<IQ", ARR, 1))]), "only scalar and string"),
    "array of 2**31 uint32": (dict(kvs=[kv("a", ARR, struct.pack("<IQ", U32, 2**31))]), "limit"),
    "array of 10**6 uint64 in a tiny file": (dict(kvs=[kv("a", ARR, struct.pack("<IQ", U64, 10**6))]), "left"),
    "string array of 2**29 items": (dict(kvs=[kv("a", ARR, struct.pack("<IQ", STR, 2**29))]), "bytes left"),
    "alignment stored as float": (dict(kvs=[kv("general.alignment", F32_T, struct.pack("<f", 32.0))]),
                                  "must be a uint32"),
    "alignment 0": (dict(kvs=[kv("general.alignment", U32, struct.pack("<I", 0))]), "power of two"),
    "alignment 48": (dict(kvs=[kv("general.alignment", U32, struct.pack("<I", 48))]), "power of two"),
    "tensor name of 64 bytes": (dict(infos=[tensor_info("x" * 64, [8])], data=b"\0" * 32), "limit"),
    "empty tensor name": (dict(infos=[tensor_info("", [8])], data=b"\0" * 32), "empty name"),
    "duplicate tensor": (dict(infos=[tensor_info("t", [8]), tensor_info("t", [8], offset=32)], data=b"\0" * 64),
                         "twice"),
    "5 dimensions": (dict(infos=[tensor_info("t", [1, 1, 1, 1, 8])], data=b"\0" * 32), "5 dimensions"),
    "0 dimensions": (dict(infos=[tensor_info("t", [])], data=b"\0" * 32), "0 dimensions"),
    "element count wraps uint64": (dict(infos=[tensor_info("t", [2**32, 2**32])]), "INT64_MAX"),
    "unknown ggml type 99": (dict(infos=[tensor_info("t", [8], ggml_type=99)], data=b"\0" * 32), "unknown ggml"),
    "removed ggml type 4 (Q4_2)": (dict(infos=[tensor_info("t", [32], ggml_type=4)], data=b"\0" * 32),
                                   "unknown ggml"),
    "Q8_0 row of 31 values": (dict(infos=[tensor_info("t", [31], ggml_type=8)], data=b"\0" * 34), "block size"),
    "offset not where the previous tensor ends": (
        dict(infos=[tensor_info("a", [8]), tensor_info("b", [8], offset=16)], data=b"\0" * 64), "contiguous"),
    "overlapping tensors": (
        dict(infos=[tensor_info("a", [8]), tensor_info("b", [8], offset=0)], data=b"\0" * 64), "contiguous"),
    "data past the end of the file": (dict(infos=[tensor_info("t", [1024])], data=b"\0" * 32), "truncated"),
    "huge tensor in a small file": (dict(infos=[tensor_info("t", [2**40])], data=b"\0" * 32), "truncated"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_rejected(tmp_path, case):
    kwargs, message = HOSTILE[case]
    path = gguf_file(tmp_path, **kwargs)
    with pytest.raises(FormatError, match=message):
        read_gguf_header(path)


def test_truncated_file_and_short_file(tmp_path):
    # A legal file cut inside its tensor data, and a file shorter than the fixed header.
    path = legal(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-4])
    with pytest.raises(FormatError, match="truncated"):
        read_gguf_header(path)
    path.write_bytes(raw[:20])
    with pytest.raises(FormatError, match="at least 24 bytes"):
        read_gguf_header(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    # A FIFO named like a model would block a plain open() forever.
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="regular file"):
        read_gguf_header(fifo)


def test_fifo_swapped_in_after_the_stat_is_refused_without_blocking(tmp_path, monkeypatch):
    # The path still looked like a regular file when it was stat-ed; by the open it is a FIFO. A blocking open would
    # wait for a writer forever: the descriptor must be opened non-blocking and checked again with fstat.
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if Path(p) == fifo else real_stat(p, *a, **k))
    with pytest.raises(FormatError, match="expected a non-empty regular file, found a FIFO"):
        without_blocking(lambda: read_gguf_header(fifo), fifo)


def test_unopenable_file_is_a_format_error(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 40)
    real_open = os.open

    def denied(p, *args, **kwargs):  # as for a file without read permission (chmod cannot show it to root)
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(FormatError, match=r"model.gguf: cannot read \(Permission denied\)"):
        read_gguf_header(path)


def test_big_vocabulary_is_summarised(tmp_path):
    tokens = [f"t{i}" for i in range(5000)]
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "gemma3")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [0.0] * 5000)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_gguf_header(tmp_path / "v.gguf").metadata
    assert (meta["tokenizer.ggml.tokens"].item_type, meta["tokenizer.ggml.tokens"].count) == ("string", 5000)
    assert meta["tokenizer.ggml.scores"].count == 5000


_VALID = None


def _valid_bytes() -> bytes:
    global _VALID
    if _VALID is None:
        kvs = [kv("general.architecture", STR, s("clip")), kv("general.alignment", U32, struct.pack("<I", 32)),
               kv("clip.vision.image_mean", ARR, struct.pack("<IQ", F32_T, 3) + struct.pack("<3f", .5, .5, .5)),
               kv("names", ARR, struct.pack("<IQ", STR, 2) + s("a") + s("bc"))]
        infos = [tensor_info("a", [8, 2]), tensor_info("b", [32], ggml_type=8, offset=64)]
        head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
        _VALID = head + b"\0" * (-len(head) % 32) + b"\1" * 64 + b"\2" * 34
    return _VALID


@settings(max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 500))
def test_fuzzed_headers_fail_only_with_format_error(tmp_path, edits, cut):
    raw = bytearray(_valid_bytes())
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    raw = raw[:max(cut, 0)] if cut < len(raw) else raw
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        header = read_gguf_header(path)
    except FormatError:
        return
    for info in header.tensors.values():  # whatever parses must describe data inside the file
        assert info.offset + info.nbytes <= len(raw)
        assert len(info.ne) <= 4
