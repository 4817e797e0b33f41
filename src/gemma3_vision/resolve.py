"""Turning a model argument into a ``Checkpoint``: one resolution order for ``--model`` and ``load()``.

1. an existing path: a folder (Hugging Face layout, SigLIP, MLX) or a file, its format detected by its bytes (GGUF
   magic, safetensors header), never by its extension (Ollama blobs have none);
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

from .checkpoint import Checkpoint
from .errors import ModelNotFoundError
from .random_model import is_random_name, random_checkpoint


def resolve(model: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Resolve ``model`` to a checkpoint whose tensors are not read yet.

    Args:
        model: a path, ``random[:preset]``, an Ollama name or a Hugging Face id.
        dtype: what a ``random`` model's weights are made in, so that loading them in it copies nothing. Files
            keep their stored dtypes.

    Raises:
        ModelNotFoundError: nothing matches ``model`` (the message says where it looked).
        WeightsError, ConfigError: the source exists but is not a valid Gemma 3 / SigLIP vision checkpoint.
    """
    path = Path(model)
    if path.exists():
        return load_path(path)
    name = str(model)
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


def sniff(path: Path) -> str | None:
    """'gguf' or 'safetensors' from a file's first bytes, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    return None


def load_path(path: Path) -> Checkpoint:
    # Each reader is imported only for its format: the gguf package alone takes ~0.3 s to import.
    from .format_safetensors import load_hf_folder

    if path.is_dir():
        return load_hf_folder(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: not a regular file or folder")
    kind = sniff(path)
    if kind == "gguf":
        from .format_gguf import load_gguf

        return load_gguf(path)
    if kind == "safetensors":
        if path.parent.joinpath("config.json").is_file():  # a weights file inside a Hugging Face folder
            return load_hf_folder(path.parent, weights=path)
        raise ModelNotFoundError(f"{path}: a safetensors file needs its config.json beside it (the head count and "
                                 "image size are not in the tensors); pass the folder that holds both")
    raise ModelNotFoundError(f"{path}: neither a GGUF file nor a safetensors file (by content), nor a checkpoint "
                             "folder")
