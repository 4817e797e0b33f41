"""What every format reader returns: configs plus lazily readable tensors under the canonical names.

Canonical names are the Hugging Face SigLIP / Gemma 3 names under two roots, ``vision_tower.`` (e.g.
``vision_tower.encoder.layers.3.mlp.fc1.weight``) and ``multi_modal_projector.`` (``mm_input_projection_weight``,
``mm_soft_emb_norm.weight``). Each format maps onto them through one table; nothing is read until ``read()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import WeightsError
from ..model.config import ProjectorConfig, VisionConfig
from ..model.preprocessing import PreprocessConfig

TOWER = "vision_tower."
PROJECTOR = "multi_modal_projector."


@dataclass
class TensorSource:
    """One tensor of a checkpoint, not yet read."""

    name: str  # canonical name
    shape: tuple[int, ...]  # canonical (torch) shape, after any layout fix
    stored_dtype: str  # as the file stores it: "BF16", "F32", "Q8_0", ...
    source_name: str  # the name in the file
    read: Callable[[], torch.Tensor]  # returns the canonical tensor, layout and conventions already undone


@dataclass
class Checkpoint:
    """A model source resolved to configs and tensors, before anything large is read."""

    format: str  # "hf-safetensors", "siglip-safetensors", "mlx-safetensors", "gguf-mmproj", "random", ...
    files: list[Path]  # config and weight files: they identify the model (an output folder's job key)
    vision: VisionConfig
    projector: ProjectorConfig | None
    preprocess: PreprocessConfig
    tensors: dict[str, TensorSource]
    conventions: list[str] = field(default_factory=list)  # conventions undone while mapping, for `info`
    unexpected: list[str] = field(default_factory=list)  # file names that map to nothing: a strict-load error
    description: str = ""  # what the user named, for messages
    # Also read, listed by `info`: preprocessor config, shard index. Not in `files`, whose identity an output folder
    # resumes by (the preprocessing they set is in its key already).
    extra_files: list[Path] = field(default_factory=list)
    # Called once every tensor has been read: drops open files (a later read opens them again).
    release: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def is_random(self) -> bool:
        return self.format == "random"

    def detached(self) -> Checkpoint:
        """This checkpoint without its readers (closures over files, which pickle refuses): what a pickled model
        carries, its weights being in the model. Reading a tensor of it raises ``WeightsError``."""
        tensors = {name: replace(t, read=AlreadyRead(self.description, name)) for name, t in self.tensors.items()}
        return replace(self, tensors=tensors, release=_nothing)


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class AlreadyRead:
    """The reader of a detached checkpoint's tensor."""

    description: str
    name: str

    def __call__(self) -> torch.Tensor:
        raise WeightsError(f"{self.description}: {self.name} was read when the model loaded, and this copy of the "
                           "model (made by pickle or copy) reads no files: load the model again to read it")
