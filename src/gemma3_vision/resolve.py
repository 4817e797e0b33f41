"""Turning a model argument into a ``Checkpoint``: one resolution order for ``--model`` and ``load()``.

1. an existing path (file or folder; the format is detected by content, not by extension);
2. a ``random[:preset]`` model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import ModelNotFoundError
from .format_safetensors import load_hf_folder
from .random_model import is_random_name, random_checkpoint


def resolve(model: str | os.PathLike) -> Checkpoint:
    """Resolve ``model`` to a checkpoint whose tensors are not read yet.

    Raises:
        ModelNotFoundError: nothing matches ``model``.
        WeightsError, ConfigError: the source exists but is not a valid Gemma 3 / SigLIP vision checkpoint.
    """
    path = Path(model)
    if path.exists():
        return load_path(path)
    name = str(model)
    if is_random_name(name):
        return random_checkpoint(name)
    raise ModelNotFoundError(
        f"model {name!r} not found: expected a checkpoint folder or file, or 'random[:preset]'"
    )


def load_path(path: Path) -> Checkpoint:
    if path.is_dir():
        return load_hf_folder(path)
    if path.is_file() and path.parent.joinpath("config.json").is_file():
        return load_hf_folder(path.parent)  # a weights file inside a Hugging Face folder
    raise ModelNotFoundError(f"{path}: not a checkpoint folder (config.json + safetensors)")
