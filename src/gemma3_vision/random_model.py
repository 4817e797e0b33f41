"""Seeded random models (``random``, ``random:tiny``, ``random:gemma3-27b``...), for trying the tool without weights.

Drawing 420 M normal values takes seconds on a small CPU, so each tensor is instead a window of one seeded pool of
normal values (a prime length, so windows of different tensors do not line up), scaled per tensor. The weights are
deterministic, finite and of sensible scale; they are not a trained model, and every run says so.
"""

from __future__ import annotations

import zlib
from functools import lru_cache, partial

import torch

from .checkpoint import Checkpoint, TensorSource
from .config import PRESETS
from .errors import ModelNotFoundError
from .preprocess import PreprocessConfig
from .weights import expected_shapes

DEFAULT_PRESET = "gemma3-4b"
_POOL_SIZE = 4_194_301  # a prime just under 2**22
_SEED = 0


def is_random_name(name: str) -> bool:
    return name == "random" or name.startswith("random:")


@lru_cache(maxsize=1)
def _pool() -> torch.Tensor:
    g = torch.Generator().manual_seed(_SEED)
    return torch.randn(_POOL_SIZE, generator=g)


def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor by its role: unit-gain norms, small biases, fan-in scaled matrices."""
    if name.endswith("mm_soft_emb_norm.weight"):
        return 0.0, 0.1  # stored as w, applied as (1 + w)
    if "layer_norm" in name or "layernorm" in name:
        return (1.0, 0.1) if name.endswith(".weight") else (0.0, 0.02)
    if name.endswith(".bias") or name.endswith("position_embedding.weight"):
        return 0.0, 0.02
    if name.endswith("mm_input_projection_weight"):
        return 0.0, shape[0] ** -0.5  # (in, out)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return 0.0, fan_in**-0.5


def _make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Element i is ``pool[(start + i) % len(pool)] * std + mean``, ``start`` a hash of the name."""
    pool = _pool()
    n = 1
    for d in shape:
        n *= d
    start = zlib.crc32(name.encode()) % _POOL_SIZE
    mean, std = _std(name, shape)
    out = torch.empty(n)
    done = 0
    while done < n:  # pool windows, wrapping around, scaled straight into the output: one pass over its memory
        take = min(n - done, _POOL_SIZE - start)
        torch.mul(pool[start:start + take], std, out=out[done:done + take])
        done += take
        start = 0
    return (out.add_(mean) if mean else out).view(shape)


def random_checkpoint(name: str) -> Checkpoint:
    preset = name.partition(":")[2] or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ModelNotFoundError(
            f"unknown random model {name!r}: expected 'random' or 'random:NAME' with NAME one of {', '.join(PRESETS)}"
        )
    vision, projector = PRESETS[preset]
    tensors = {key: TensorSource(key, shape, "F32", key, partial(_make, key, shape))
               for key, shape in expected_shapes(vision, projector).items()}
    return Checkpoint(
        format="random", files=[], vision=vision, projector=projector,
        preprocess=PreprocessConfig(image_size=vision.image_size), tensors=tensors,
        description=f"random:{preset}",
    )
