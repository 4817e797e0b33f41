"""How an encode job writes its arrays: one ``.npy`` file per array (``NpyFiles``), or safetensors shards of N
images each (``ShardFiles``, ``encode --format safetensors --shard-size N``), in the output dtype asked for.

Both take an encoded input as an ``Encoded`` (its arrays, already in the output dtype, and the fields of its
``ok`` record) and return the ``ok`` records that may now be appended to the index: ``NpyFiles`` at once, each
input's files renamed into place; ``ShardFiles`` only once the shard holding them is: a shard is written under
the temporary folder and renamed into ``OUT/shards/``, so it is complete or absent, and no record names an image
whose shard a kill could still lose. The images of a shard not yet written are simply encoded again on resume.
A shard is also synced to disk before its rename and its records (one ``fsync`` per shard, cheap per image), so
its records never outlive its bytes, even across a power cut; ``.npy`` files, one per array, are not synced.

A shard holds one tensor per array, keyed by the image's place in the shard and the array's suffix (``"3"``,
``"3.layer13"``, ``"3.crop1"``), and, in its metadata, the inputs' paths in that order, so that a shard read without
its index still says what it holds. Shards are named ``shards/<run>-<n>.safetensors``: ``run`` is the writer's
start time and a random part in hex, unique across runs and Ray drivers, and sorting by name sorts by run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OptionError
from .output_folder import extra_output, inside

OUT_DTYPES = ("float32", "float16", "bfloat16")
SHARD_DIR = "shards"
SHARD_FORMAT = "gemma3-vision shard 1"  # the metadata's "format"
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def check_out_dtype(out_dtype: str, sharded: bool) -> None:
    """Refuse an output dtype the layout cannot hold: ``.npy`` has no bfloat16.

    Raises:
        OptionError: an unknown dtype, or bfloat16 without shards.
    """
    if out_dtype not in OUT_DTYPES:
        raise OptionError(f"output dtype must be one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
    if out_dtype == "bfloat16" and not sharded:
        raise OptionError("bfloat16 outputs need safetensors shards (--format safetensors): .npy has no bfloat16")


class OutOfRange(ValueError):
    """An output holds values its output dtype cannot represent (float16 beyond ±65504)."""


def to_out_dtype(arrays: dict[str, np.ndarray], out_dtype: str) -> dict[str, torch.Tensor]:
    """Each float32 array as a contiguous tensor of ``out_dtype``, owning its memory (a shard's tensors must not
    share storage, and the rows are views of a batch's array).

    float16 refuses rather than saturates: a value clipped to 65504 changes the embedding's direction and norm with
    nothing to say so, and values that large mean float16 is the wrong dtype for this model's outputs (bfloat16
    has float32's range). The caller records the input as failed with this reason; the failure is tied to the job
    key, which holds the output dtype, so the same input is tried again under another one.

    Raises:
        OutOfRange: a float16 output beyond ±65504 (or a bfloat16 one beyond float32's range).
    """
    dtype = getattr(torch, out_dtype)
    out = {}
    for name, array in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype, copy=True)
        # Only what the cast made infinite: a float32 output is written as computed, as in float32 runs.
        if dtype != torch.float32 and not bool(torch.isfinite(t).all()) and np.isfinite(array).all():
            where = f"{name} output" if name else "output"
            raise OutOfRange(f"its {where} holds values up to {float(np.abs(array).max()):.6g}, beyond "
                             f"{out_dtype}'s range (±{FLOAT16_MAX:g} for float16); use --out-dtype bfloat16 or "
                             "float32")
        out[name] = t
    return out


@dataclass
class Encoded:
    """One encoded input, ready to write: its arrays in the output dtype (``""`` the main one, then ``layer13``,
    ``pooled``, ``crop1``, ``crop1.pooled``, ...), and its ``ok`` record's fields around where they went."""

    head: dict[str, Any]  # input, path: every record's first fields
    arrays: dict[str, torch.Tensor]
    tail: dict[str, Any] = field(default_factory=dict)  # crop boxes, the input's facts, the job key
    output: str = ""  # the main .npy name (NpyFiles)
    replaces: bytes = b""  # NpyFiles: the file id the new main file must not have (output_folder.save_npy)


class NpyFiles:
    """One ``.npy`` per array, written through the output folder's temporary folder and renamed into place.

    The main file is the input's commit point, the only file whose identity the record states and resume checks:
    the extra files are renamed into place before it, and the main file a previous record named is removed before
    the first of them. So while a main file that matches a record exists, the extra files that record lists are
    the ones written with it; a kill anywhere in between leaves no main file, or one the old record does not
    match, and the input is encoded again.
    """

    def __init__(self, out_dir: Path, save: Callable[[str, np.ndarray, bytes], None]):
        self.dir, self.save = out_dir, save

    def write(self, e: Encoded) -> list[dict[str, Any]]:
        files = {name: extra_output(e.output, name) if name else e.output for name in e.arrays}
        if len(files) > 1:
            with contextlib.suppress(FileNotFoundError):  # a first encoding: nothing to replace
                os.unlink(inside(self.dir, e.output))
        for name, t in e.arrays.items():
            if name:
                self.save(files[name], t.numpy(), b"")
        main = e.arrays[""]
        self.save(e.output, main.numpy(), e.replaces)
        st = os.stat(self.dir / e.output)
        extra = {"outputs": {k: v for k, v in files.items() if k}} if len(files) > 1 else {}
        return [{**e.head, "status": "ok", "output": e.output, "shape": list(main.shape),
                 "output_bytes": st.st_size, "output_mtime_ns": st.st_mtime_ns, **extra, **e.tail}]

    def flush(self) -> list[dict[str, Any]]:
        return []


class ShardFiles:
    """Safetensors shards of ``shard_size`` images, held in memory until full (a shard's bytes: ``shard_size``
    times one input's outputs, 2.6 MB for Gemma 3 4B soft tokens in float32) and written in one piece."""

    def __init__(self, out_dir: Path, tmp_dir: Path, shard_size: int):
        if shard_size < 1:
            raise OptionError(f"shard size must be at least 1 image, got {shard_size}")
        self.dir, self.tmp, self.size = out_dir, tmp_dir, shard_size
        self.run = f"{time.time_ns() // 1_000_000_000:x}{secrets.token_hex(4)}"
        self.count = 0  # shards written
        self._pending: list[Encoded] = []
        # safetensors creates its files readable by the owner only; a shard gets the mode an .npy file gets
        # (0o666 less the umask), read off a file made the usual way rather than by setting the umask to read it.
        probe = tmp_dir / f"{self.run}.mode"
        probe.touch()
        self.mode = stat.S_IMODE(os.stat(probe).st_mode)
        probe.unlink()

    def write(self, e: Encoded) -> list[dict[str, Any]]:
        self._pending.append(e)
        return self.flush() if len(self._pending) >= self.size else []

    def flush(self) -> list[dict[str, Any]]:
        """Write the images held so far as one shard; their records, each naming the shard and its keys."""
        if not self._pending:
            return []
        from safetensors.torch import save_file

        pending, self._pending = self._pending, []
        self.count += 1
        name = f"{SHARD_DIR}/{self.run}-{self.count:06d}.safetensors"
        tensors = {_key(i, suffix): t for i, e in enumerate(pending) for suffix, t in e.arrays.items()}
        metadata = {"format": SHARD_FORMAT, "inputs": json.dumps([e.head["path"] for e in pending])}
        tmp = self.tmp / f"{self.run}-{self.count:06d}.safetensors"
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, self.mode)
        _fsync(tmp)  # on disk before any record names it: durable across a power cut too, for one sync per shard
        target = inside(self.dir, name)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        with contextlib.suppress(OSError):  # the rename itself; a folder cannot be opened for it on Windows
            _fsync(target.parent)
        st = os.stat(target)
        records = []
        for i, e in enumerate(pending):
            keys = {suffix: _key(i, suffix) for suffix in e.arrays if suffix}
            records.append({**e.head, "status": "ok", "shard": name, "key": _key(i, ""),
                            "shape": list(e.arrays[""].shape), "output_bytes": st.st_size,
                            "output_mtime_ns": st.st_mtime_ns, **({"keys": keys} if keys else {}), **e.tail})
        return records


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key(i: int, suffix: str) -> str:
    return f"{i}.{suffix}" if suffix else str(i)
