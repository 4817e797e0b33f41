"""Ollama model names (``gemma3:4b``, ``namespace/model:tag``, ``host/namespace/model:tag``) → the local GGUF blob.

Ollama's store (OL ``envconfig/config.go``, ``types/model/name.go``, ``manifest/paths.go``): the root is
``$OLLAMA_MODELS`` or ``~/.ollama/models``; a manifest lives at ``manifests/<host>/<namespace>/<model>/<tag>`` and its
``application/vnd.ollama.image.model`` layer (plus ``...projector`` for a separately imported mmproj) names a blob
``blobs/sha256-<hex>``. Nothing here talks to a server or the network.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, ModelNotFoundError
from ..safe_io import json_type, read_json_object
from .checkpoint import Checkpoint
from .format_gguf import load_gguf

DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
# One path segment: what Ollama's name parts allow. No '/', no '..', so a name can never leave the store.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,349}(:[0-9]{1,5})?")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


@dataclass(frozen=True)
class OllamaModel:
    name: OllamaName
    manifest: Path
    model_blob: Path
    projector_blob: Path | None


def store_root() -> Path:
    """``$OLLAMA_MODELS``, else ``~/.ollama/models`` (read at call time)."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def parse_name(name: str) -> OllamaName | None:
    """``[host/][namespace/]model[:tag]`` → its four parts with Ollama's defaults; None if not such a name."""
    rest, tag = name, DEFAULT_TAG
    slash = name.rfind("/")
    if ":" in name[slash + 1:]:
        rest, _, tag = name.rpartition(":")
    parts = rest.split("/")
    if len(parts) == 1:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, (namespace, model) = DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        return None
    if not (_HOST.fullmatch(host) and _PART.fullmatch(namespace) and _PART.fullmatch(model)
            and _PART.fullmatch(tag)) or ".." in (host, namespace, model, tag):
        return None
    return OllamaName(host, namespace, model, tag)


def is_ollama_only_name(name: str) -> bool:
    """Names a Hugging Face repo id cannot be: a ``:tag``, a bare model name or a host/namespace/model path."""
    parsed = parse_name(name)
    if parsed is None:
        return False
    return ":" in name.rsplit("/", 1)[-1] or "/" not in name or name.count("/") == 2


def find_model(name: str, root: Path | None = None) -> OllamaModel | None:
    """The pulled model ``name`` in the local store, or None when it is not there (or not an Ollama name).

    Raises:
        FormatError: the manifest exists but is not a valid Ollama manifest, or names a blob that is missing.
    """
    parsed = parse_name(name)
    if parsed is None:
        return None
    root = root or store_root()
    manifest = root / "manifests" / parsed.host / parsed.namespace / parsed.model / parsed.tag
    if not manifest.is_file():
        return None
    layers = read_json_object(manifest, "Ollama manifest").get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{manifest}: not an Ollama manifest: expected a list of layers, found {json_type(layers)}")
    model = _layer_blob(root, manifest, layers, MODEL_LAYER)
    if model is None:
        raise FormatError(f"{manifest}: no {MODEL_LAYER} layer (only GGUF models are supported, not "
                          "safetensors 'tensor' layers)")
    return OllamaModel(parsed, manifest, model, _layer_blob(root, manifest, layers, PROJECTOR_LAYER))


def _layer_blob(root: Path, manifest: Path, layers: list, media_type: str) -> Path | None:
    layer = next((x for x in layers if isinstance(x, dict) and x.get("mediaType") == media_type), None)
    if layer is None:
        return None
    digest = layer.get("digest")
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise FormatError(f"{manifest}: {media_type} layer digest must be sha256:<64 hex>, found {digest!r}")
    blob = root / "blobs" / f"sha256-{m.group(1)}"
    try:
        st = os.stat(blob)
    except OSError:
        raise FormatError(f"{manifest}: names blob {blob.name}, which is missing from {root / 'blobs'} "
                          "(an interrupted pull? run `ollama pull` again)") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{blob}: expected a regular file")
    size = layer.get("size")
    if isinstance(size, int) and size != st.st_size:
        raise FormatError(f"{blob}: the manifest says {size:,} bytes, the blob holds {st.st_size:,} "
                          "(an interrupted pull?)")
    return blob


def not_pulled_error(name: str, root: Path | None = None) -> ModelNotFoundError:
    root = root or store_root()
    parsed = parse_name(name)
    where = f" (looked for {root / 'manifests' / parsed.host / parsed.namespace / parsed.model / parsed.tag})" \
        if parsed else ""
    return ModelNotFoundError(f"Ollama model {name!r} is not pulled in the store {root}{where}; run "
                              f"`ollama pull {name}` or set OLLAMA_MODELS to the store that holds it")


def load_ollama(model: OllamaModel) -> Checkpoint:
    """The checkpoint of a pulled model: its projector layer when it has one (a separately imported mmproj),
    else the model blob, which for official gemma3 tags holds the vision tensors beside the text model."""
    blob = model.projector_blob or model.model_blob
    checkpoint = load_gguf(blob, description=f"ollama:{model.name}")
    checkpoint.files = [model.manifest, *checkpoint.files]
    return checkpoint
