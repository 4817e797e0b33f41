"""Turning a model argument into a ``Checkpoint``: one resolution order for ``--model`` and ``load()``.

1. an existing path: a folder (Hugging Face layout, SigLIP, MLX) or a file, its format detected by its bytes (GGUF
   magic, safetensors header), not by its extension (Ollama blobs have none); a name shaped like a path that does
   not exist (``./x``, ``~/x``, ``x.gguf``) stops here, as no such file;
2. a ``random[:preset]`` model;
3. an Ollama model name (``gemma3:4b``, ``namespace/model:tag``) pulled in the local store;
4. a Hugging Face hub id (``org/name``): the local cache first, then only the files the tower needs.

The format readers are imported when a model needs them: ``gguf`` alone takes 0.2-0.3 s to import, a tenth of a
``random`` model's start-up.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from ..errors import FormatError, ModelNotFoundError
from .checkpoint import Checkpoint
from .random_model import is_random_name, random_checkpoint


def resolve(model: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Resolve ``model`` to a checkpoint whose tensors are not read yet.

    Args:
        model: a path, ``random[:preset]``, an Ollama name or a Hugging Face id.
        dtype: what a ``random`` model's weights are made in, so that loading them in it copies nothing. Files
            keep their stored dtypes.

    Raises:
        ModelNotFoundError: nothing matches ``model`` (the message says where it looked).
        FormatError: an existing file that is neither GGUF nor safetensors, or a broken one.
        WeightsError, ConfigError: the source exists but is not a valid Gemma 3 / SigLIP vision checkpoint.
    """
    path = Path(model).expanduser()
    if path.exists():
        return load_path(path)
    name = str(model)
    if not isinstance(model, str) or looks_like_path(name):  # a Path object is a path whatever it holds
        raise ModelNotFoundError(f"no such file: {os.path.expanduser(name)} (named like a file, so not looked up "
                                 "as an Ollama or Hugging Face model)")
    if is_random_name(name):
        return random_checkpoint(name, dtype)
    from . import hub, ollama
    from .format_safetensors import load_hf_folder

    found = ollama.find_model(name)
    if found is not None:
        return ollama.load_ollama(found)
    if ollama.is_ollama_only_name(name):
        raise ollama.not_pulled_error(name)
    if hub.is_repo_id(name):
        checkpoint = load_hf_folder(hub.fetch(name))
        checkpoint.description = f"hf:{name}"
        return checkpoint
    raise ModelNotFoundError(
        f"model {name!r} not found: expected an existing checkpoint folder or file, 'random[:preset]', an Ollama "
        f"model pulled in {ollama.store_root()}, or a Hugging Face id 'org/name'"
    )


FILE_SUFFIXES = (".gguf", ".safetensors", ".json")


def looks_like_path(name: str) -> bool:
    """A model name only a file or folder can have. Hugging Face ids (``org/name.v2``: dots are allowed) and Ollama
    names never start with ``/ ./ ../ ~`` or end with a separator, and none ending ``.gguf``, ``.safetensors`` or
    ``.json`` could load: a hub repo is fetched as config.json plus safetensors shards."""
    seps = tuple(sep for sep in (os.sep, os.altsep) if sep)
    return (name.startswith(("./", "../", "~")) or name.endswith(seps) or os.path.isabs(name)
            or any(sep in name for sep in seps if sep != "/")  # a backslash on Windows
            or name.lower().endswith(FILE_SUFFIXES))


def sniff(path: Path) -> tuple[str | None, bytes]:
    """'gguf' or 'safetensors' by a file's first bytes, else None; and those bytes (for messages).

    Content decides; the extension only claims a file whose bytes are neither, so that a broken ``.safetensors``
    file gets the safetensors validator's reason (a header length over the limit, a file cut short), not "unknown".
    A u64 header length under 4 GiB followed by ``{`` is taken as an attempted safetensors file too.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None, b""
    if head[:4] == b"GGUF":
        return "gguf", head
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 32:
        return "safetensors", head
    suffix = path.suffix.lower()
    return {".safetensors": "safetensors", ".gguf": "gguf"}.get(suffix), head


def load_path(path: Path) -> Checkpoint:
    # Each reader is imported only for its format: the gguf package alone takes ~0.3 s to import.
    from .format_safetensors import load_hf_folder

    if path.is_dir():
        return load_hf_folder(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: not a regular file or folder")
    kind, head = sniff(path)
    if kind == "gguf":
        from .format_gguf import load_gguf

        return load_gguf(path)
    if kind == "safetensors":
        if path.parent.joinpath("config.json").is_file():  # a weights file inside a Hugging Face folder
            return load_hf_folder(path.parent, weights=path)
        from .format_safetensors import read_header

        read_header(path)  # a broken file is reported as such, before the missing config
        raise ModelNotFoundError(f"{path}: a safetensors file needs its config.json beside it (the head count and "
                                 "image size are not in the tensors); pass the folder that holds both")
    hint = (f" (the Hugging Face checkpoint beside it loads by naming its folder, {path.parent})"
            if path.parent.joinpath("config.json").is_file() else "")
    raise FormatError(f"{path}: expected a GGUF file (starting b'GGUF') or a safetensors file (a u64 header "
                      f"length, then '{{'), or a checkpoint folder; found {path.stat().st_size:,} bytes starting "
                      f"{head!r}{hint}")
