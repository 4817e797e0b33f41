"""Ollama model names through a temporary store (OLLAMA_MODELS): manifest → blob, projector layers, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_PROJECTOR, TINY_VISION
from format_fixtures import write_mmproj, write_ollama_blob, write_ollama_store
from gemma3_vision.checkpoints import ollama
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.errors import FormatError, ModelNotFoundError, WeightsError


@pytest.fixture
def store(tmp_path, monkeypatch):
    root = tmp_path / "ollama-models"
    root.mkdir()
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


@pytest.mark.parametrize("name, parts", [
    ("gemma3", ("registry.ollama.ai", "library", "gemma3", "latest")),
    ("gemma3:4b", ("registry.ollama.ai", "library", "gemma3", "4b")),
    ("gemma3:27b-it-qat", ("registry.ollama.ai", "library", "gemma3", "27b-it-qat")),
    ("me/vision:v1", ("registry.ollama.ai", "me", "vision", "v1")),
    ("hf.co/unsloth/gemma-3-4b-it-GGUF:Q4_K_M", ("hf.co", "unsloth", "gemma-3-4b-it-GGUF", "Q4_K_M")),
    ("localhost:11434/me/m:t", ("localhost:11434", "me", "m", "t")),
])
def test_names_parse_with_ollama_defaults(name, parts):
    parsed = ollama.parse_name(name)
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == parts


@pytest.mark.parametrize("name", ["../gemma3", "a/../b", "gemma3:..", "a/b/c/d", "gemma3:", ":4b", "x/.."])
def test_names_that_could_leave_the_store_are_not_names(name):
    assert ollama.parse_name(name) is None


def test_store_root_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ollama.store_root() == tmp_path / ".ollama" / "models"


def test_pulled_model_loads_from_its_blob(store, tmp_path, tiny_state):
    blob = write_ollama_blob(tmp_path / "src.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    manifest = write_ollama_store(store, "gemma3:tiny", blob)
    ck = resolve("gemma3:tiny")
    assert ck.format == "gguf-ollama"
    assert ck.description == "ollama:registry.ollama.ai/library/gemma3:tiny"
    assert ck.files[0] == manifest and ck.files[1].name.startswith("sha256-")
    for name, want in tiny_state.items():
        if name.endswith("mm_soft_emb_norm.weight"):
            continue  # stored as 1 + w: covered in test_format_gguf
        assert torch.equal(ck.tensors[name].read().float(), want if want.dim() < 2 else want.half().float()), name


def test_projector_layer_is_used_when_present(store, tmp_path, tiny_state):
    text_only = write_ollama_blob(tmp_path / "text.gguf", None, TINY_VISION, TINY_PROJECTOR)
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    write_ollama_store(store, "imported:latest", text_only, projector=mmproj)
    ck = resolve("imported")
    assert ck.format == "gguf-mmproj" and len(ck.files) == 2


def test_not_pulled_names_the_store(store):
    with pytest.raises(ModelNotFoundError, match=f"not pulled in the store {store}.*ollama pull gemma3:12b"):
        resolve("gemma3:12b")
    with pytest.raises(ModelNotFoundError, match="registry.ollama.ai/library/gemma3/latest"):
        resolve("gemma3")


def test_text_only_model_says_so(store, tmp_path):
    blob = write_ollama_blob(tmp_path / "1b.gguf", None, TINY_VISION, TINY_PROJECTOR)
    write_ollama_store(store, "gemma3:1b", blob)
    with pytest.raises(WeightsError, match="no vision tensors .*gemma3:1b"):
        resolve("gemma3:1b")


def test_broken_manifests_are_format_errors(store, tmp_path, tiny_state):
    blob = write_ollama_blob(tmp_path / "b.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    manifest = write_ollama_store(store, "m:t", blob)
    good = json.loads(manifest.read_text())

    def with_layer(**changes):
        data = json.loads(json.dumps(good))
        data["layers"][0].update(changes)
        manifest.write_text(json.dumps(data))

    with_layer(digest="sha256:../../etc/passwd")  # a digest must be 64 hex digits, nothing else
    with pytest.raises(FormatError, match="digest must be sha256:<64 hex>"):
        resolve("m:t")
    with_layer(digest="sha256:" + "f" * 64)  # an interrupted pull: the blob is not there
    with pytest.raises(FormatError, match="missing from"):
        resolve("m:t")
    with_layer(size=good["layers"][0]["size"] + 1)
    with pytest.raises(FormatError, match="interrupted pull"):
        resolve("m:t")
    with_layer(mediaType="application/vnd.ollama.image.tensor")
    with pytest.raises(FormatError, match="no application/vnd.ollama.image.model layer"):
        resolve("m:t")
    manifest.write_text("{not json")
    with pytest.raises(FormatError, match="Ollama manifest is not UTF-8 JSON"):
        resolve("m:t")


@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "Ollama manifest nests too deeply"),  # RecursionError, not a ValueError
    ('{"layers": {}}', "expected a list of layers, found an object"),
    ('{"layers": [], "layers": []}', "duplicate key 'layers'"),
    ("[]", "Ollama manifest must be a JSON object, found an array"),
])
def test_hostile_manifest_json_is_a_format_error(store, tmp_path, tiny_state, text, fragment):
    blob = write_ollama_blob(tmp_path / "b.gguf", tiny_state, TINY_VISION, TINY_PROJECTOR)
    manifest = write_ollama_store(store, "m:t", blob)
    manifest.write_text(text)
    with pytest.raises(FormatError, match=fragment):
        resolve("m:t")


def test_blob_path_given_directly_is_detected_by_magic(tmp_path, tiny_state):
    blob = write_ollama_blob(tmp_path / ("sha256-" + "a" * 64), tiny_state, TINY_VISION, TINY_PROJECTOR)
    assert resolve(blob).format == "gguf-ollama"
