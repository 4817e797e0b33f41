"""Reading an encode job's output folder back: ``open_embeddings(OUT)``.

It reads ``index.jsonl`` once, keeping, per input, only where its last ``ok`` record starts (an input whose last
record is a failure has no embedding); each array is read when asked for, from its ``.npy`` (``np.load`` with
``allow_pickle=False``, memory-mapped for ``framework="np"``) or from its safetensors shard (``safe_open``, which
memory-maps the shard and reads one tensor). Both layouts, and folders holding both, read the same way::

    emb = gemma3_vision.open_embeddings("out")
    for name, tokens in emb:            # (input, main output), in index order
        ...
    list(emb.inputs())                  # the inputs alone
    tokens = emb["photos/cat.jpg"]      # by the input as given to encode, or by its path
    emb.arrays("photos/cat.jpg")        # {"": tokens, "layer13": ..., "pooled": ..., "crop1": ...}

Only names this library writes are followed (``output_folder.is_output_name``, ``is_shard_name``), and never out of
the folder (``output_folder.inside``): an index is data, and a crafted one must not make the reader open any file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors import SafetensorError

from ..errors import DamagedOutputError, Gemma3VisionError, InputNotFoundError, OptionError
from .discovery import input_key
from .output_folder import (
    INDEX_NAME,
    extra_output,
    inside,
    is_output_name,
    is_shard_name,
    record_key,
    short_hash,
)

Array = Any  # torch.Tensor for framework="pt", np.ndarray for "np"


def open_embeddings(out_dir: str | os.PathLike[str], *, framework: str = "pt") -> Embeddings:
    """Open an encode job's output folder for reading.

    Args:
        out_dir: the folder ``encode --out`` wrote (``.npy`` files, safetensors shards or both, and the index).
        framework: ``"pt"`` for torch tensors (any output dtype), ``"np"`` for numpy arrays (memory-mapped
            ``.npy``; no bfloat16).

    Raises:
        DamagedOutputError: the folder has no readable ``index.jsonl``.
        OptionError: an unknown framework.
    """
    return Embeddings(Path(out_dir), framework)


class Embeddings:
    """The embeddings of an output folder, by input. Iterating gives ``(input, main output)`` pairs lazily; ``[name]``
    one main output; ``arrays(name)`` every array of an input; ``record(name)`` its index record."""

    def __init__(self, out_dir: Path, framework: str = "pt"):
        if framework not in ("pt", "np"):
            raise OptionError(f"framework must be 'pt' or 'np', got {framework!r}")
        self.dir, self.framework = out_dir, framework
        self._by_path: dict[bytes, int] = {}  # h(record path) -> offset of the input's last ok record
        self._by_input: dict[bytes, int] = {}  # h(record input, as given to encode) -> offset of an ok record
        try:
            self._index: BinaryIO = open(out_dir / INDEX_NAME, "rb")  # noqa: SIM115  (closed by close)
        except OSError as e:
            raise DamagedOutputError(f"{out_dir}: cannot read {INDEX_NAME} ({e.strerror or e}): not the output "
                                     "folder of an encode job, or damaged") from None
        self._scan()
        self._shard: tuple[str, Any] | None = None  # the shard read last, kept open: iteration goes shard by shard

    def _scan(self) -> None:
        cwd = os.getcwd()
        offset = 0
        for line in self._index:
            if not line.endswith(b"\n"):
                break  # torn by a kill: never acted on, as a job resuming the folder ignores it
            at, offset = offset, offset + len(line)
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(record, dict) or (key := record_key(record, cwd)) is None:
                continue  # an overwrite line, or a bad one: names no input
            status = record.get("status")
            if status == "ok" and (is_output_name(record.get("output")) or is_shard_name(record.get("shard"))):
                self._by_path[short_hash(key)] = at
                if isinstance(name := record.get("input"), str):
                    self._by_input[short_hash(name)] = at
            elif status in ("error", "skipped"):
                self._by_path.pop(short_hash(key), None)  # its last word: no embedding, whatever came before

    # ------------------------------------------------------------------------------------------------ lookup

    def __len__(self) -> int:
        return len(self._by_path)

    def __iter__(self) -> Iterator[tuple[str, Array]]:
        for at in sorted(self._by_path.values()):
            record = self._read_record(at)
            yield record["input"], self._load(record, "")

    def inputs(self) -> Iterator[str]:
        """The inputs with an embedding, in index order, as given to encode; nothing else is read."""
        for at in sorted(self._by_path.values()):
            yield self._read_record(at)["input"]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def __getitem__(self, name: str) -> Array:
        return self._load(self.record(name), "")

    def record(self, name: str) -> dict[str, Any]:
        """The ``ok`` record of the input ``name``: as given to encode (``photos/cat.jpg``), or its path.

        Raises:
            InputNotFoundError: no input of that name has an embedding here.
        """
        at = self._find(name)
        if at is None:
            raise InputNotFoundError(f"{name}: no embedding in {self.dir} (not in its index, or its last record "
                                     "is a failure)")
        return self._read_record(at)

    def arrays(self, name: str) -> dict[str, Array]:
        """Every array of the input ``name``: ``""`` its main output, then ``layerN``, ``pooled``, ``cropJ``,
        ``cropJ.pooled``, ... as ``encode --layers/--pool/--pan-and-scan`` wrote them."""
        record = self.record(name)
        suffixes = record.get("keys") if "shard" in record else record.get("outputs")
        return {"": self._load(record, ""),
                **{suffix: self._load(record, suffix) for suffix in (suffixes if isinstance(suffixes, dict) else {})}}

    def _find(self, name: str) -> int | None:
        at = self._by_input.get(short_hash(name))
        if at is not None:  # still its input's last word? (a later record may have given the path another name)
            key = record_key(self._read_record(at))
            if key is not None and self._by_path.get(short_hash(key)) == at:
                return at
        return self._by_path.get(short_hash(input_key(name)))

    def _read_record(self, at: int) -> dict[str, Any]:
        self._index.seek(at)
        return json.loads(self._index.readline())  # parsed once already: a dict with an input

    # -------------------------------------------------------------------------------------------------- read

    def _load(self, record: dict[str, Any], suffix: str) -> Array:
        """The array ``suffix`` (``""`` the main one) of an ok record, checked against the record's shape."""
        name = record["input"]
        try:
            array = self._from_shard(record, suffix) if "shard" in record else self._from_npy(record, suffix)
        except Gemma3VisionError:
            raise
        except (OSError, ValueError, EOFError, SafetensorError) as e:  # numpy's and safetensors' for bad files
            where = record.get("shard") or record.get("output")
            raise DamagedOutputError(f"{self.dir / str(where)}: cannot read {suffix or 'the output'} of {name} "
                                     f"({' '.join(str(e).split()) or type(e).__name__})") from None
        if not suffix and list(array.shape) != record.get("shape"):
            raise DamagedOutputError(f"{name}: its output in {self.dir} is {tuple(array.shape)}, its index record "
                                     f"says {tuple(record.get('shape') or ())}")
        return array

    def _from_npy(self, record: dict[str, Any], suffix: str) -> Array:
        output = record["output"]
        rel = extra_output(output, suffix) if suffix else output
        if suffix and (record.get("outputs") or {}).get(suffix) != rel or not is_output_name(rel):
            raise DamagedOutputError(f"{record['input']}: its index record lists no {suffix!r} array")
        path = inside(self.dir, rel)
        if self.framework == "np":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        import torch

        return torch.from_numpy(np.load(path, allow_pickle=False))

    def _from_shard(self, record: dict[str, Any], suffix: str) -> Array:
        shard = record["shard"]
        key = record.get("key") if not suffix else (record.get("keys") or {}).get(suffix)
        if not isinstance(key, str):
            raise DamagedOutputError(f"{record['input']}: its index record lists no {suffix or 'main'!r} key")
        if self._shard is None or self._shard[0] != shard:
            from safetensors import safe_open

            self._shard = None
            self._shard = (shard, safe_open(inside(self.dir, shard), framework=self.framework))
        handle = self._shard[1]
        if key not in handle.keys():
            raise DamagedOutputError(f"{self.dir / shard}: no tensor {key!r}, which the index names for "
                                     f"{record['input']}")
        if self.framework == "np" and handle.get_slice(key).get_dtype() == "BF16":
            raise OptionError(f"{record['input']}: its outputs are bfloat16, which numpy lacks: "
                              "open_embeddings(..., framework='pt')")
        return handle.get_tensor(key)

    def close(self) -> None:
        self._index.close()
        self._shard = None

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
