"""The on-disk cache of OpenVINO models: the IR (``ov.save_model``) and the CPU plugin's compiled blob, per key.

Layout under ``cache_root()`` (``$GEMMA3_VISION_CACHE/openvino``, default ``~/.cache/gemma3-vision/openvino``)::

    <key digest>/model.xml, model.bin   the IR, written once
    <key digest>/compiled/              OpenVINO's CACHE_DIR for this IR: the compiled blob
    <key digest>/key.json               what the digest was made of (to read; never parsed back)

The key holds everything the IR depends on: the weights' identity (``output_folder.checkpoint_identity``: the
files' paths, sizes and mtimes; a random model's preset and seed), the run dtype, the image size, the hidden
layers given as outputs, OpenVINO's version and ``openvino_graph.GRAPH_VERSION``. A changed checkpoint or upgrade
gets another digest, so a stale entry is never read; it ages out instead.

An entry is written in a temporary folder beside the others and renamed into place whole, so a reader sees a whole
entry or none (two processes writing the same entry: the second rename fails and its copy is dropped). The compiled
blob is written by OpenVINO, which drops a blob it cannot read and compiles again. Entries are used from the disk
(the blob, when present, is read without reading the IR). After a write the least recently used entries are removed
until the cache holds at most ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The cache's default size bound: a full Gemma 3 tower's IR is 0.8 GB (bf16 weights) or 1.7 GB (fp32), and its
# compiled blob about as much again.
DEFAULT_MAX_BYTES = 8 * 2**30
ENV_MAX_BYTES = "GEMMA3_VISION_OPENVINO_CACHE_MAX_BYTES"
XML = "model.xml"
COMPILED = "compiled"
KEY = "key.json"


def cache_root() -> Path:
    """``$GEMMA3_VISION_CACHE/openvino``, or ``~/.cache/gemma3-vision/openvino``."""
    base = os.environ.get("GEMMA3_VISION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gemma3-vision")
    return Path(base) / "openvino"


def max_bytes() -> int:
    """The size bound: ``$GEMMA3_VISION_OPENVINO_CACHE_MAX_BYTES`` or ``DEFAULT_MAX_BYTES``."""
    value = os.environ.get(ENV_MAX_BYTES)
    return int(value) if value and value.isdigit() else DEFAULT_MAX_BYTES


def digest(key: dict[str, Any]) -> str:
    """The entry's folder name: a digest of the key's JSON (non-JSON values by ``repr``)."""
    text = json.dumps(key, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def entry_size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())


def touch(entry: Path) -> None:
    """Mark ``entry`` as used now: the LRU order is key.json's mtime."""
    now = time.time_ns()  # not the file system's clock, which can tick in milliseconds
    try:
        os.utime(entry / KEY, ns=(now, now))
    except OSError:  # removed meanwhile by another process's eviction: it is only an order
        pass


def evict(root: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries (and left-over temporary folders) until ``root`` holds at most
    ``limit`` bytes; ``keep`` (the entry just used) stays even if it alone is larger. Returns what was removed."""
    if not root.is_dir():
        return []
    removed = []
    entries = []
    for path in root.iterdir():
        if path.name.startswith(".tmp-"):
            if time.time() - path.stat().st_mtime > 3600:  # a writer that died; a live one takes seconds
                shutil.rmtree(path, ignore_errors=True)
            continue
        if path.is_dir():
            used = (path / KEY).stat().st_mtime if (path / KEY).exists() else 0.0
            entries.append((used, path, entry_size(path)))
    total = sum(size for _, _, size in entries)
    for _, path, size in sorted(entries):  # oldest first
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        total -= size
    return removed


def cached_ir(key: dict[str, Any], write: Callable[[Path], None], root: Path | None = None,
              limit: int | None = None) -> tuple[Path, bool]:
    """The entry folder for ``key``, written by ``write(xml_path)`` on a miss. Returns ``(entry, hit)``.

    ``write`` saves the IR at the path it is given (inside a temporary folder, renamed into place when done).
    """
    root = root or cache_root()
    entry = root / digest(key)
    if (entry / XML).is_file() and (entry / KEY).is_file():
        touch(entry)
        return entry, True
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(tmp / XML)
        (tmp / COMPILED).mkdir()
        (tmp / KEY).write_text(json.dumps(key, sort_keys=True, indent=1, default=repr), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process put the same entry in place first: use theirs
            if not (entry / XML).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    touch(entry)
    evict(root, max_bytes() if limit is None else limit, keep=entry)
    return entry, False
