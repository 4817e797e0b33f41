"""Hostile safetensors files, indexes and checkpoint folders: each is refused with a typed error naming the file
and the problem, before any tensor is memory-mapped; the smallest legal files still load."""

from __future__ import annotations

import json
import math
import os
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import without_blocking
from format_fixtures import populate_hf_cache, write_hf_folder
from gemma3_vision.checkpoints.format_safetensors import (
    MAX_HEADER_BYTES,
    list_shards,
    load_hf_folder,
    read_header,
)
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.checkpoints.weights import check_tensors, load_model
from gemma3_vision.errors import ConfigError, FormatError, ModelNotFoundError, WeightsError
from gemma3_vision.model.config import PRESETS

TINY_VISION, TINY_PROJECTOR = PRESETS["tiny"]


def st_bytes(header: dict | bytes, data: bytes = b"", *, claimed: int | None = None) -> bytes:
    """A safetensors file: u64 header length (``claimed`` to lie about it), the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def f32(shape: list[int], begin: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * math.prod(shape)]}


# (id, file bytes, message fragment). Every fragment is checked against a FormatError.
HEADER_CASES = [
    ("under-8-bytes", b"\x01\x02\x03", "must be at least 8 bytes, found 3"),
    ("length-over-100MB", st_bytes({}, claimed=MAX_HEADER_BYTES + 1), "exceeds the 100,000,000-byte limit"),
    # The length field claims 1 MiB of header; the file holds 2 bytes after it.
    ("lying-header-length", st_bytes(b"{}", claimed=1 << 20), "header claims 1,048,576 bytes but the file holds 2"),
    ("length-near-u64-max", st_bytes(b"{}", claimed=2**64 - 1), "exceeds the 100,000,000-byte limit"),
    ("not-utf8", st_bytes(b"\xff\xfe{}"), "not UTF-8 JSON"),
    ("not-json", st_bytes(b"{'a': 1}"), "not UTF-8 JSON"),
    ("json-array", st_bytes(b"[1, 2]"), "must be a JSON object, found list"),
    ("deep-nesting", st_bytes(b"[" * 100_000 + b"]" * 100_000), "nests too deeply"),
    # Two entries with one name: a reader keeping the first and one keeping the last would disagree.
    ("duplicate-name", st_bytes(b'{"a": ' + json.dumps(f32([1], 0)).encode() + b', "a": '
                                + json.dumps(f32([1], 0)).encode() + b"}", b"\0" * 4), "duplicate key 'a'"),
    # b occupies bytes 8..24 while a occupies 0..16.
    ("overlapping-offsets", st_bytes({"a": f32([4], 0), "b": f32([4], 8)}, b"\0" * 24),
     "tensor b starts at byte 8, expected 16"),
    ("gap-between-tensors", st_bytes({"a": f32([1], 0), "b": f32([1], 8)}, b"\0" * 12),
     "tensor b starts at byte 8, expected 4"),
    ("not-starting-at-zero", st_bytes({"a": f32([1], 4)}, b"\0" * 8), "tensor a starts at byte 4, expected 0"),
    # 2^40 x 2^40 floats claimed, 16 bytes of offsets: never multiplied in fixed width, never allocated.
    ("huge-shape", st_bytes({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                            b"\0" * 16), "needs 4,835,703,278,458,516,698,824,704 bytes, its offsets span 16"),
    ("shape-over-u64", st_bytes({"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]}}, b"\0" * 4),
     "invalid shape"),
    ("negative-dim", st_bytes({"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\0" * 16),
     "invalid shape"),
    ("float-dim", st_bytes({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4),
     "invalid shape"),
    ("too-many-dims", st_bytes({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4),
     "invalid shape"),
    ("unknown-dtype", st_bytes({"a": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "unknown dtype 'Q4_K'"),
    ("reversed-offsets", st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
     "invalid data_offsets"),
    ("offsets-not-a-pair", st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
     "invalid data_offsets"),
    ("size-mismatch", st_bytes({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
     "F16(4,) needs 8 bytes, its offsets span 4"),
    ("entry-not-object", st_bytes({"a": [0, 4]}, b"\0" * 4), "entry a must be an object, found list"),
    ("metadata-not-strings", st_bytes({"__metadata__": {"format": 1}}), "__metadata__ must map strings"),
    # The header describes 64 bytes; the file was cut after 10 of them.
    ("truncated-data", st_bytes({"a": f32([16], 0)}, b"\0" * 10), "tensors cover 64 bytes but the data section holds 10"),
    ("trailing-bytes", st_bytes({"a": f32([1], 0)}, b"\0" * 8), "tensors cover 4 bytes but the data section holds 8"),
]


@pytest.mark.parametrize("case_id, data, fragment", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_hostile_headers_are_refused(tmp_path, case_id, data, fragment):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(FormatError, match=_escape(fragment)) as info:
        read_header(path)
    assert time.perf_counter() - start < 3.0
    assert str(path) in str(info.value)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_smallest_legal_files_pass(tmp_path):
    """Guard: an empty header, and a file with a zero-element tensor beside a real one, are both valid."""
    (tmp_path / "empty.safetensors").write_bytes(st_bytes({}))
    assert read_header(tmp_path / "empty.safetensors") == {}
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(0, 3), "b": torch.arange(3, dtype=torch.float16),
               "c": torch.zeros(2, dtype=torch.int32)}, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert {k: v[:2] for k, v in header.items()} == {"a": ("F32", (0, 3)), "b": ("F16", (3,)), "c": ("I32", (2,))}
    assert sorted(end - begin for _, _, (begin, end) in header.values()) == [0, 6, 8]


def test_fifo_weights_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="expected a regular file, found a FIFO"):
        read_header(fifo)


# --------------------------------------------------------------------------------------- property-based fuzzing

_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "Q4_0", "", None, 7]
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(_DTYPES),
    "shape": st.one_of(st.lists(st.integers(-2, 2**66), max_size=10), st.just("x"), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 2**65), min_size=0, max_size=3), st.just([0, 0])),
})
_header = st.dictionaries(st.text(max_size=8), _entry, max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, data_len=st.integers(0, 256), claimed_delta=st.integers(-4, 4) | st.just(0),
       junk=st.binary(max_size=64), mode=st.sampled_from(["json", "json", "junk"]))
def test_fuzzed_headers_fail_only_with_format_error(tmp_path, header, data_len, claimed_delta, junk, mode):
    """Whatever the header says, ``read_header`` either returns entries that tile the data section exactly, or
    raises FormatError; never another exception, a hang or a large allocation."""
    raw = json.dumps(header).encode() if mode == "json" else junk
    data = st_bytes(raw, b"\0" * data_len, claimed=max(0, len(raw) + claimed_delta))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        out = read_header(path)
    except FormatError:
        return
    finally:
        assert time.perf_counter() - start < 1.0
    spans = sorted(offsets for _, _, offsets in out.values())
    cursor = 0
    for begin, end in spans:
        assert begin == cursor
        cursor = end
    assert cursor == len(data) - 8 - len(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_fuzzed_bytes_fail_only_with_format_error(tmp_path, data):
    path = tmp_path / "bytes.safetensors"
    path.write_bytes(data)
    try:
        read_header(path)
    except FormatError:
        pass


def test_fuzzed_valid_files_are_accepted(tmp_path):
    """The fuzzers above must also see acceptance: a real file with many tensors validates and lists them all."""
    tensors = {f"t{i}": torch.randn(i % 3 + 1, 2).to([torch.float32, torch.float16, torch.bfloat16][i % 3])
               for i in range(12)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    header = read_header(tmp_path / "ok.safetensors")
    assert sorted(header) == sorted(tensors)
    assert all(header[k][1] == tuple(v.shape) for k, v in tensors.items())


# ------------------------------------------------------------------------------------------------- shard indexes

@pytest.fixture()
def sharded(tiny_state, tmp_path) -> Path:
    return write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR, shards=3)


def _rewrite_index(folder: Path, fn) -> None:
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    fn(d["weight_map"])
    index.write_text(json.dumps(d))


def _first_shard(folder: Path) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "vision_tower.vision_model.post_layernorm.weight"]


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors",
                                 "..\\outside.safetensors", ".safetensors/../x.safetensors", "a\0.safetensors"])
def test_index_shard_names_must_be_plain_file_names(sharded, bad):
    # The index points one tensor at a file outside (or below) the checkpoint folder; it need not even exist.
    outside = sharded.parent / "outside.safetensors"
    save_file({"vision_tower.vision_model.post_layernorm.weight": torch.zeros(TINY_VISION.hidden_size)},
              str(outside))
    _rewrite_index(sharded, lambda wm: wm.update({"vision_tower.vision_model.post_layernorm.weight": bad}))
    with pytest.raises(FormatError, match="must be a plain file name inside the checkpoint folder"):
        list_shards(sharded)


def test_index_shard_must_be_a_safetensors_name(sharded):
    _rewrite_index(sharded, lambda wm: wm.update({"vision_tower.vision_model.post_layernorm.weight":
                                                  "pytorch_model.bin"}))
    with pytest.raises(FormatError, match="must be a .safetensors file name, found 'pytorch_model.bin'"):
        list_shards(sharded)


def test_shard_link_leaving_the_folder_is_refused(sharded):
    name = _first_shard(sharded)
    real = sharded.parent / "elsewhere.safetensors"
    (sharded / name).rename(real)
    os.symlink(real, sharded / name)
    with pytest.raises(FormatError, match=f"{name} is a link to .*elsewhere.safetensors, outside the checkpoint"):
        list_shards(sharded)


def test_shard_link_inside_the_folder_is_allowed(sharded):
    name = _first_shard(sharded)
    (sharded / "blobs").mkdir()
    (sharded / name).rename(sharded / "blobs" / "x")
    os.symlink("blobs/x", sharded / name)
    assert list_shards(sharded)["vision_tower.vision_model.post_layernorm.weight"] == sharded / name


def test_hugging_face_cache_links_into_blobs_are_allowed(sharded, tmp_path):
    files = {p.name: p for p in sharded.iterdir()}
    snapshot = populate_hf_cache(tmp_path / "hub", "google/gemma-3-4b-it", files)
    assert all((snapshot / n).is_symlink() for n in files)
    checkpoint = load_hf_folder(snapshot)
    check_tensors(checkpoint)
    assert len(checkpoint.tensors) == len(list(checkpoint.tensors))


def test_hugging_face_cache_link_into_another_repo_is_refused(sharded, tmp_path):
    files = {p.name: p for p in sharded.iterdir()}
    snapshot = populate_hf_cache(tmp_path / "hub", "google/gemma-3-4b-it", files)
    other = populate_hf_cache(tmp_path / "hub", "evil/weights", {"x.safetensors": sharded / _first_shard(sharded)})
    name = _first_shard(sharded)
    (snapshot / name).unlink()
    os.symlink(os.path.realpath(other / "x.safetensors"), snapshot / name)
    with pytest.raises(FormatError, match="outside the checkpoint folder and its Hugging Face cache blobs/"):
        list_shards(snapshot)


def test_fifo_shard_and_fifo_index_never_block(sharded):
    name = _first_shard(sharded)
    (sharded / name).unlink()
    os.mkfifo(sharded / name)
    with pytest.raises(FormatError, match=f"shard {name} is not a regular file"):
        list_shards(sharded)
    index = sharded / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(FormatError, match="index model.safetensors.index.json is not a regular file"):
        list_shards(sharded)


def test_missing_shard_and_malformed_index(sharded):
    name = _first_shard(sharded)
    (sharded / name).unlink()
    list_shards(sharded)  # a partial hub download may lack shards the tower does not need...
    with pytest.raises(WeightsError, match=f"shard {name} is listed but missing"):
        load_hf_folder(sharded)  # ...but this one holds vision tensors
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(FormatError, match="expected an object with a weight_map"):
        list_shards(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {}, "weight_map": {}}')
    with pytest.raises(FormatError, match="duplicate key 'weight_map'"):
        list_shards(sharded)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")
    with pytest.raises(WeightsError, match="never unpickles"):
        list_shards(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="no model.safetensors"):
        list_shards(folder)


# ------------------------------------------------------------------------------------------- checkpoint contents

def _load(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(resolve(folder), dtype=torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_with_the_tensor_name(tiny_state, tmp_path, bad):
    state = dict(tiny_state)
    w = state["vision_tower.encoder.layers.1.mlp.fc2.weight"].clone()
    w[3, 5] = bad
    state["vision_tower.encoder.layers.1.mlp.fc2.weight"] = w
    folder = write_hf_folder(tmp_path / "ckpt", state, TINY_VISION, TINY_PROJECTOR, dtype=torch.bfloat16)
    with pytest.raises(WeightsError, match=r"vision_tower\.vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight "
                                           r"\(vision_tower\.encoder\.layers\.1\.mlp\.fc2\.weight\) holds NaN or Inf"):
        _load(folder)


def test_guard_the_same_folder_loads_when_finite(tiny_state, tmp_path):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    model = _load(folder)
    got = model.state_dict()["vision_tower.encoder.layers.1.mlp.fc2.weight"]
    assert torch.equal(got, tiny_state["vision_tower.encoder.layers.1.mlp.fc2.weight"])


def test_integer_vision_tensor_is_refused(tiny_state, tmp_path):
    state = dict(tiny_state)
    state["vision_tower.post_layernorm.bias"] = torch.zeros(TINY_VISION.hidden_size, dtype=torch.int32)
    folder = tmp_path / "ckpt"
    write_hf_folder(folder, state, TINY_VISION, TINY_PROJECTOR)
    # write_hf_folder casts everything to one dtype; put the integer tensor back
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(TINY_VISION.hidden_size,
                                                                            dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="post_layernorm.bias must be a float tensor .*found I32"):
        _load(folder)


def _with_config(folder: Path, **vision_overrides) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(vision_overrides)
    (folder / "config.json").write_text(json.dumps(config))


def test_config_layer_count_is_checked_against_the_tensors(tiny_state, tmp_path):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    _with_config(folder, num_hidden_layers=3)  # the file holds 2 layers
    with pytest.raises(WeightsError, match=r"(?s)3-layer, width-64 model .* missing \(16\): "
                                           r"vision_tower\.encoder\.layers\.2\."):
        check_tensors(resolve(folder))
    _with_config(folder, num_hidden_layers=1)
    with pytest.raises(WeightsError, match=r"unexpected \(16\): vision_tower\.encoder\.layers\.1\."):
        check_tensors(resolve(folder))


def test_config_width_is_checked_against_the_tensors(tiny_state, tmp_path):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    _with_config(folder, intermediate_size=256)  # the file's MLPs are 128 wide
    with pytest.raises(WeightsError, match=r"wrong shape \(6\): vision_tower\.encoder\.layers\.0\.mlp\.fc1\.bias: "
                                           r"expected \(256,\), got \(128,\)"):
        check_tensors(resolve(folder))


def test_heads_must_divide_hidden(tiny_state, tmp_path):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    _with_config(folder, num_attention_heads=5)
    with pytest.raises(ConfigError, match="num_attention_heads must divide hidden_size: 64 is not a multiple of 5"):
        resolve(folder)


def test_truncated_weights_file_is_a_clear_error_not_a_bus_error(tiny_state, tmp_path):
    """Memory-mapping a file shorter than its header says, then touching the end, is SIGBUS; the header check
    refuses it first."""
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    path = folder / "model.safetensors"
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    with pytest.raises(FormatError, match="truncated or padded file"):
        _load(folder)


@pytest.mark.parametrize("change", ["truncated", "replaced"])
def test_a_file_changed_between_validation_and_mapping_is_refused(tiny_state, tmp_path, change):
    """The header is validated when the checkpoint is resolved, the file mapped when a tensor is first read: a file
    cut short in between would SIGBUS, one swapped for another would be read at the first one's offsets."""
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    path = folder / "model.safetensors"
    checkpoint = resolve(folder)
    if change == "truncated":
        os.truncate(path, path.stat().st_size - 1000)
    else:  # same size, another file: a new inode under the old name
        other = write_hf_folder(tmp_path / "other", {k: v + 1 for k, v in tiny_state.items()}, TINY_VISION,
                                TINY_PROJECTOR) / "model.safetensors"
        os.replace(other, path)
    with pytest.raises(WeightsError, match="model.safetensors: the file changed after its header was validated"):
        load_model(checkpoint, dtype=torch.float32)


def test_misaligned_tensors_load_as_copies(tiny_state, tmp_path):
    """The format lets data start at any byte (every writer pads the header to 8); a torch view needs alignment."""
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + n]), separators=(",", ":")).encode()
    header += b" " * ((1 - len(header)) % 4)  # data starts at 8 + len(header) = 1 (mod 4): every F32 misaligned
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    model = _load(folder)
    for name, got in model.state_dict().items():
        assert torch.equal(got, tiny_state[name]), name
        assert got.data_ptr() % 4 == 0, f"{name} left misaligned"


# -------------------------------------------------------------------------------- config.json, preprocessor config

@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
def test_config_files_are_read_only_if_regular_and_small(tiny_state, tmp_path, name):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    (folder / name).unlink()
    os.mkfifo(folder / name)  # a plain open() waits for a writer forever
    with pytest.raises(ConfigError, match=f"{name}: expected a regular file, found a FIFO"):
        without_blocking(lambda: resolve(folder), folder / name)
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")  # never ends
    with pytest.raises(ConfigError, match=f"{name}: expected a regular file, found a character device"):
        resolve(folder)
    (folder / name).unlink()
    (folder / name).write_text(json.dumps({"padding": " " * (9 << 20)}))  # valid JSON, but no config is 9 MB
    with pytest.raises(ConfigError, match="must be at most 8,388,608 bytes"):
        resolve(folder)


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),  # json.loads raises RecursionError, not ValueError
    ("{not json", "is not UTF-8 JSON"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("[1, 2]", "must be a JSON object, found an array"),
])
def test_malformed_config_files_are_config_errors(tiny_state, tmp_path, name, text, fragment):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    (folder / name).write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        resolve(folder)


@pytest.mark.parametrize("content, fragment", [
    ({"image_mean": ["a", "b", "c"]}, r"image_mean must be a list of 3 numbers, found \['a', 'b', 'c'\]"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be a list of 3 numbers"),
    ({"image_mean": [True, 0.5, 0.5]}, "image_mean must be a list of 3 numbers"),
    ({"image_mean": "0.5"}, "image_mean must be a list of 3 numbers"),
    ({"image_std": [math.nan, 1, 1]}, "image_std must be 3 finite numbers > 0"),  # all-NaN embeddings otherwise
    ({"image_std": [0, 1, 1]}, "image_std must be 3 finite numbers > 0"),
    ({"image_mean": [10**400, 0, 0]}, "image_mean must be 3 finite numbers"),  # beyond float range
    ({"resample": 1}, r"resample must be 2 \(bilinear\) or 3 \(bicubic\), found 1 \(lanczos\)"),
    ({"resample": "bicubic"}, "resample must be 2 .bilinear. or 3 .bicubic., found 'bicubic'"),
    ({"resample": True}, "resample must be 2 .bilinear. or 3 .bicubic., found True"),
])
def test_bad_preprocessor_values_are_config_errors(tiny_state, tmp_path, content, fragment):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    # allow_nan: json writes NaN, which Python's parser (and transformers) read back
    (folder / "preprocessor_config.json").write_text(json.dumps(content, allow_nan=True))
    with pytest.raises(ConfigError, match="preprocessor_config.json: " + fragment):
        resolve(folder)


def test_preprocessor_values_that_transformers_accepts_load(tiny_state, tmp_path):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    # one number for all channels, as transformers' normalize takes it; integers are numbers too
    (folder / "preprocessor_config.json").write_text('{"image_mean": 0.25, "image_std": [1, 2, 0.5], "resample": 3}')
    p = resolve(folder).preprocess
    assert (p.image_mean, p.image_std, p.resample) == ((0.25,) * 3, (1.0, 2.0, 0.5), "bicubic")


# ------------------------------------------------------------------------------------- ambiguous names in one file

def test_two_keys_for_one_tensor_are_refused(tiny_state, tmp_path):
    """The Hub layout's name and the transformers 4.52 one for the same tensor: which was meant is unknowable, so
    neither wins silently."""
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = torch.full((64,), 123.0)
    save_file(tensors, str(path))
    with pytest.raises(WeightsError, match=r"model\.vision_tower\.vision_model\.post_layernorm\.weight and "
                                           r"vision_tower\.vision_model\.post_layernorm\.weight are both "
                                           r"vision_tower\.post_layernorm\.weight"):
        resolve(folder)


def test_a_config_file_may_link_outside_the_folder(tiny_state, tmp_path):
    # A fixed name, so no downloaded file can point it elsewhere: unlike the shards an index names, it may be a
    # link to anywhere (a folder that shares one config.json, say), and loads as the file itself would.
    folder = write_hf_folder(tmp_path / "ckpt", tiny_state, TINY_VISION, TINY_PROJECTOR)
    shared = tmp_path / "shared-config.json"
    (folder / "config.json").rename(shared)
    (folder / "config.json").symlink_to(shared)
    model = _load(folder)
    for name, got in model.state_dict().items():
        assert torch.equal(got, tiny_state[name]), name
