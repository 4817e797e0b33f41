"""Seeded random models (``random``, ``random:tiny``, ``random:gemma3-27b``...), for trying the tool without weights.

Writing 420 M fresh values costs seconds on a small CPU (page faults alone take over a second for 1.7 GB), more
than importing torch. So no tensor gets memory of its own: each is a window (a view) of a pool of normal values
already scaled for its role, and there is one pool per role (fan-in scaled matrices, norm weights, biases...), a
few tens of MB for the full tower, made in the dtype the model runs in. Windows of different tensors start at
different 64-byte aligned places, so every tensor differs from every other; the same name gives the same window,
so the weights are deterministic. They are finite and of sensible scale, but not a trained model, and every run
says so.

Because the tensors share their pools' storage, treat them as read-only (an in-place edit shows through other
tensors of the same model) and ``clone()`` them before ``safetensors.torch.save_file``, which refuses overlapping
tensors (``gemma3-vision convert`` writes tensor by tensor and needs nothing).
"""

from __future__ import annotations

import math
import zlib
from functools import partial

import torch

from ..errors import ModelNotFoundError, OptionError
from ..model.config import PRESETS
from ..model.preprocessing import PreprocessConfig
from .checkpoint import Checkpoint, TensorSource
from .weights import expected_shapes

DEFAULT_PRESET = "gemma3-4b"
_SEED = 0
_ALIGN = 16  # window starts, in elements: 64 bytes in fp32, so rows are as aligned as in a tensor of their own
_MIN_SPREAD = 1 << 16  # a pool holds its role's largest tensor plus a quarter (at least this): room for many starts
_STORED = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

Role = tuple[float, float]  # (mean, std)


def is_random_name(name: str) -> bool:
    return name == "random" or name.startswith("random:")


def _role(name: str, shape: tuple[int, ...]) -> Role:
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


def window_starts(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[Role, int]], dict[Role, int]]:
    """Each tensor's role and the start of its window in that role's pool, and each pool's length.

    A start is a hash of the name, aligned; one already taken in the same pool moves to the next free aligned
    place (in ``shapes``' order, so the layout is deterministic), which keeps every tensor distinct.
    """
    roles = {name: _role(name, shape) for name, shape in shapes.items()}
    largest: dict[Role, int] = {}
    for name, role in roles.items():
        largest[role] = max(largest.get(role, 0), math.prod(shapes[name]))
    lengths = {role: -(-(n + max(n // 4, _MIN_SPREAD)) // _ALIGN) * _ALIGN for role, n in largest.items()}
    taken: set[tuple[Role, int]] = set()
    starts: dict[str, tuple[Role, int]] = {}
    for name, role in roles.items():
        slots = (lengths[role] - math.prod(shapes[name])) // _ALIGN + 1  # more than the tensors: never all taken
        slot = zlib.crc32(name.encode()) % slots
        while (role, slot) in taken:
            slot = (slot + 1) % slots
        taken.add((role, slot))
        starts[name] = role, slot * _ALIGN
    return starts, lengths


class _Pools:
    """The pools of one random checkpoint, one after another in a single buffer made on first use (one allocation:
    fresh pages cost more than the arithmetic). Pool ``role`` holds ``normal[:length] * std + mean`` in ``dtype``,
    ``normal`` one seeded run of standard normal values, the same for every pool."""

    def __init__(self, lengths: dict[Role, int], dtype: torch.dtype):
        self.lengths, self.dtype = lengths, dtype
        self.offsets: dict[Role, int] = {}
        total = 0
        for role in sorted(lengths, key=lambda r: -lengths[r]):  # the longest first: it holds the normal values
            self.offsets[role], total = total, total + lengths[role]  # lengths are multiples of _ALIGN
        self.total = total
        self.buffer: torch.Tensor | None = None

    def _fill(self) -> torch.Tensor:
        buffer = torch.empty(self.total)  # float32, (total,)
        first, *rest = self.offsets  # first: the longest pool, at offset 0
        normal = buffer[:self.lengths[first]]
        torch.randn(normal.shape, generator=torch.Generator().manual_seed(_SEED), out=normal)
        for role in [*rest, first]:  # the normal values are scaled in place last, once the others are read off them
            mean, std = role
            begin = self.offsets[role]
            pool = buffer[begin:begin + self.lengths[role]]
            torch.mul(normal[:len(pool)], std, out=pool)
            if mean:
                pool.add_(mean)
        return buffer.to(self.dtype)

    def window(self, role: Role, start: int, shape: tuple[int, ...]) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = self._fill()
        begin = self.offsets[role] + start
        return self.buffer[begin:begin + math.prod(shape)].view(shape)


def random_checkpoint(name: str, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """``random[:preset]`` as a checkpoint whose tensors are windows of pools made in ``dtype`` (float32, bfloat16
    or float16): loading it in that dtype copies nothing. The values in bfloat16 are the float32 ones, rounded."""
    preset = name.partition(":")[2] or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ModelNotFoundError(
            f"unknown random model {name!r}: expected 'random' or 'random:NAME' with NAME one of {', '.join(PRESETS)}"
        )
    if dtype not in _STORED:
        raise OptionError(f"random weights are made in float32, bfloat16 or float16, got {dtype}")
    vision, projector = PRESETS[preset]
    shapes = expected_shapes(vision, projector)
    starts, lengths = window_starts(shapes)
    pools = _Pools(lengths, dtype)
    tensors = {key: TensorSource(key, shape, _STORED[dtype], key, partial(pools.window, *starts[key], shape))
               for key, shape in shapes.items()}
    return Checkpoint(
        format="random", files=[], vision=vision, projector=projector,
        preprocess=PreprocessConfig(image_size=vision.image_size), tensors=tensors,
        description=f"random:{preset}",
    )
