"""What a model argument that names nothing usable gets: a missing path is "no such file" (never an Ollama or hub
lookup), an existing file of no known format is a FormatError saying what was expected and what was found."""

from __future__ import annotations

import os
import struct

import pytest

from gemma3_vision.checkpoints.resolve import looks_like_path, resolve
from gemma3_vision.errors import FormatError, ModelNotFoundError


@pytest.fixture(autouse=True)
def no_stores(tmp_path, monkeypatch):
    """Empty Ollama store, offline Hugging Face cache: a name that reached either would say so."""
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", ["missing.gguf", "models/missing.gguf", "org/weights.safetensors", "MODEL.GGUF",
                                  "ckpt/config.json", "./gemma3", "../gemma3", "/nonexistent/gemma3", "models/",
                                  "~/nonexistent-gemma3-vision-model"])
def test_a_missing_path_is_no_such_file(name):
    with pytest.raises(ModelNotFoundError, match="no such file: ") as info:
        resolve(name)
    assert os.path.expanduser(name) in str(info.value)
    assert "Ollama model" not in str(info.value) and "Hugging Face cache" not in str(info.value)


def test_names_that_are_not_paths():
    for name in ("google/gemma-3-4b-it", "org/model.v2", "gemma3", "gemma3:4b", "library/gemma3:27b-it-qat",
                 "registry.ollama.ai/library/gemma3:4b", "random:tiny"):
        assert not looks_like_path(name), name


def test_a_path_object_is_a_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file: "):
        resolve(tmp_path / "gemma3")  # as a string, "gemma3" would be an Ollama name


@pytest.mark.parametrize("name, data, found", [
    ("junk.bin", b"hello, world\n", "13 bytes starting b'hello, world\\n'"),
    ("x.txt", b"", "0 bytes starting b''"),
    ("config.json", b'{"model_type": "gemma3"}', "24 bytes starting b'{\"model_type\": \"' (the Hugging Face "
                                                 "checkpoint beside it loads by naming its folder"),
])
def test_a_file_of_no_known_format_is_a_format_error(tmp_path, name, data, found):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(FormatError, match="expected a GGUF file .* or a safetensors file") as info:
        resolve(tmp_path / name)
    assert found in str(info.value), info.value


@pytest.mark.parametrize("name, data, reason", [
    # A lying header length: the same reason as inside a checkpoint folder.
    ("model.safetensors", struct.pack("<Q", 2**64 - 1) + b"{}", "header length 18,446,744,073,709,551,615 exceeds"),
    ("model.safetensors", b"\x01\x02\x03", "must be at least 8 bytes, found 3"),
    ("weights.bin", struct.pack("<Q", 100_000_001) + b"{}", "header length 100,000,001 exceeds the 100,000,000"),
    ("weights.bin", struct.pack("<Q", 1 << 20) + b"{}", "header claims 1,048,576 bytes but the file holds 2"),
    ("mmproj.gguf", b"GGML" + bytes(40), "not a GGUF file: magic must be b'GGUF', found b'GGML'"),
])
def test_a_broken_weights_file_gets_its_format_reason(tmp_path, name, data, reason):
    """Named alone (no config.json beside it), as in a folder."""
    (tmp_path / name).write_bytes(data)
    with pytest.raises(FormatError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        resolve(str(tmp_path / name))


def test_a_valid_loose_safetensors_file_still_asks_for_its_config(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(ModelNotFoundError, match="needs its config.json beside it"):
        resolve(tmp_path / "w.safetensors")
