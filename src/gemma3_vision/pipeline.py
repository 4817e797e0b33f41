"""The batch job behind ``gemma3-vision encode``: inputs → ``.npy`` files and an ``index.jsonl``.

Three stages overlap so the model never waits: a thread pool decodes and preprocesses ahead of the model (Pillow
releases the GIL while decoding and resizing), the calling thread runs the model one batch at a time, and a writer
thread saves arrays and appends index records. A bad input becomes an ``error`` record; the job carries on.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Gemma3VisionError
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, preprocess_one

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"})
INDEX_NAME = "index.jsonl"


@dataclass(frozen=True)
class InputItem:
    """One image to encode: where it is, and where its output goes (relative to the output folder)."""

    path: Path
    display: str  # as the user would recognise it: the argument, or argument/relative path
    output: str  # relative .npy path under the output folder


@dataclass
class JobSummary:
    encoded: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason); the first few only

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"encoded {self.encoded}, failed {self.failed}, skipped {self.skipped} "
                f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)")


def discover(arguments: Iterable[str]) -> Iterator[InputItem]:
    """Files as given; folders recursed in sorted order, keeping image files by suffix. Output names mirror the
    paths relative to each argument, and are made distinct when two inputs would collide."""
    used: set[str] = set()
    for arg in arguments:
        root = Path(arg)
        if root.is_dir():
            for path in _walk(root):
                rel = path.relative_to(root).as_posix()
                yield InputItem(path, f"{arg.rstrip('/')}/{rel}", _unique(rel + ".npy", used))
        else:
            yield InputItem(root, arg, _unique(root.name + ".npy", used))


def _walk(root: Path) -> Iterator[Path]:
    """Image files under root, depth first, names sorted, so the order is the same on every run."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            yield path


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name[:-len('.npy')]}~{n}.npy"
    used.add(candidate)
    return candidate


@dataclass
class _Decoded:
    item: InputItem
    pixels: np.ndarray | None  # (S, S, 3) float32, or None when it failed
    error: str | None


class _IndexWriter:
    """Appends one JSON record per line, flushed at once, so a killed job loses at most the line being written."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write to a temporary name in the same folder, then rename: a kill never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def run_job(
    items: Iterable[InputItem],
    out_dir: Path,
    encode_batch: Callable[[np.ndarray], np.ndarray],
    preprocess_config: PreprocessConfig,
    *,
    batch_size: int = 1,
    exif_transpose: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> JobSummary:
    """Encode every item, writing ``out_dir/<item.output>`` and one ``index.jsonl`` record per item.

    ``encode_batch`` maps float32 NHWC ``(B, S, S, 3)`` to an array ``(B, ...)``. Per-input failures are recorded
    and skipped; a failure of ``encode_batch`` itself stops the job (the model is broken, not the input).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = JobSummary()
    index = _IndexWriter(out_dir / INDEX_NAME)
    results: queue.Queue[tuple[list[_Decoded], np.ndarray | None] | None] = queue.Queue(maxsize=4)
    writer_error: list[BaseException] = []

    def decode(item: InputItem) -> _Decoded:
        try:
            pixels = preprocess_one(item.path, preprocess_config, exif_transpose=exif_transpose,
                                    max_pixels=max_pixels)
            return _Decoded(item, pixels, None)
        except Gemma3VisionError as e:
            return _Decoded(item, None, _one_line(e))
        except Exception as e:  # a decoder bug on a hostile file must not end the job; record it
            return _Decoded(item, None, f"{type(e).__name__}: {_one_line(e)}")

    def record_failure(d: _Decoded) -> None:
        summary.failed += 1
        if len(summary.failures) < 20:
            summary.failures.append((d.item.display, d.error or ""))
        index.write({"input": d.item.display, "status": "error", "error": d.error})

    def writer() -> None:
        try:
            while (entry := results.get()) is not None:
                batch, outputs = entry
                row = 0
                for d in batch:
                    if d.pixels is None:
                        record_failure(d)
                        continue
                    assert outputs is not None
                    array = outputs[row]
                    row += 1
                    save_npy(out_dir / d.item.output, array)
                    index.write({"input": d.item.display, "status": "ok", "output": d.item.output,
                                 "shape": list(array.shape)})
                    summary.encoded += 1
                if on_progress:
                    on_progress(len(batch))
        except BaseException as e:  # surfaced to the caller after the model loop stops
            writer_error.append(e)
            while results.get() is not None:  # drain so the producer never blocks on a full queue
                pass

    start = time.perf_counter()
    writer_thread = threading.Thread(target=writer, name="gemma3-vision-writer", daemon=True)
    writer_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemma3-vision-decode") as pool:
            for batch in _batches(_prefetch(pool, decode, items, ahead=max(2 * batch_size, 4)), batch_size):
                good = [d.pixels for d in batch if d.pixels is not None]
                outputs = encode_batch(np.stack(good)) if good else None
                results.put((batch, outputs))
                if writer_error:
                    break
    finally:
        results.put(None)
        writer_thread.join()
        index.close()
    if writer_error:
        raise writer_error[0]
    summary.seconds = time.perf_counter() - start
    return summary


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[InputItem], _Decoded], items: Iterable[InputItem],
              ahead: int) -> Iterator[_Decoded]:
    """``map(fn, items)`` in order, keeping ``ahead`` calls in flight; never materialises the whole input list."""
    pending: list[Future[_Decoded]] = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def _batches(decoded: Iterator[_Decoded], batch_size: int) -> Iterator[list[_Decoded]]:
    """Groups holding ``batch_size`` decodable images each (failed inputs ride along without taking a slot)."""
    batch: list[_Decoded] = []
    good = 0
    for d in decoded:
        batch.append(d)
        good += d.pixels is not None
        if good == batch_size:
            yield batch
            batch, good = [], 0
    if batch:
        yield batch


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
