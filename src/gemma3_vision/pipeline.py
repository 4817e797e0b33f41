"""The batch job behind ``gemma3-vision encode``: inputs → ``.npy`` files and an ``index.jsonl``.

Three stages overlap so the model never waits: a thread pool opens, hashes, decodes and preprocesses ahead of the
model (Pillow and hashlib release the GIL), the calling thread runs the model one batch at a time, and a writer
thread saves arrays and appends index records. A bad input becomes an ``error`` record; the job carries on.

What makes the job safe to kill and re-run:

- every ``.npy`` is written under ``OUT/.gemma3-vision-tmp/`` and renamed into place, and its ``ok`` record is
  appended only after the rename: an ``ok`` record always names a complete file;
- records are appended one ``write`` per line to an ``O_APPEND`` descriptor; a torn last line (a kill mid-write)
  is dropped on the next run before anything is appended;
- on the next run each input is looked up in the index by what the user named it: it is skipped when its last
  record has the same job key (model identity and output-affecting options) and either the same size and
  modification time, or the same content hash; an ``ok`` record also needs its output file to exist. Unchanged
  inputs that failed are not retried (same bytes, same failure) but still count as failed;
- a lock file keeps two jobs from writing one folder, and the temporary folder is emptied when a job starts.

Memory stays flat in the number of inputs: discovery streams, only a bounded window of inputs is in flight, and
the resume state is one small bytes value per indexed input.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import hashlib
import json
import os
import queue
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from .checkpoint import Checkpoint
from .errors import Gemma3VisionError, OutputError
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    PreprocessConfig,
    decode_image,
    file_kind,
    open_regular_file,
    pil_to_input,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif",
                            ".tiff"})
INDEX_NAME = "index.jsonl"
PREVIOUS_INDEX_NAME = "index.jsonl.prev"
TMP_DIR_NAME = ".gemma3-vision-tmp"
LOCK_NAME = ".gemma3-vision.lock"
_GLOB_MAGIC = frozenset("*?[")


# ----------------------------------------------------------------------------------------------------- discovery

@dataclass(frozen=True)
class InputItem:
    """One input: where it is, how the user would recognise it, and its path under the output folder (less
    ``.npy``). ``skip`` is set when discovery decided, without opening it, that it must not be read."""

    path: Path
    display: str  # the argument, or argument/relative path: the input's identity in index.jsonl
    rel: str  # relative path that names the output
    skip: str | None = None


def read_list(source: str, stdin: TextIO | None = None) -> Iterator[str]:
    """Paths from a list file, one per line (``-`` reads standard input); blank lines are ignored."""
    if source == "-":
        yield from _lines(stdin or sys.stdin)
        return
    with open(source, encoding="utf-8", errors="surrogateescape") as f:
        yield from _lines(f)


def _lines(f: TextIO) -> Iterator[str]:
    for line in f:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def discover(arguments: Iterable[str], *, follow_symlinks: bool = False) -> Iterator[InputItem]:
    """Every input named by ``arguments``, lazily and in a deterministic order.

    - a file (or a link the user named): taken as is, whatever its suffix;
    - a folder: recursed depth first with names sorted, keeping image suffixes; links leaving the folder, links to
      folders and broken links are skipped with a reason unless ``follow_symlinks`` (cycles are never followed);
    - a pattern with ``*``, ``?``, ``[`` or ``**`` that names no existing path: matched below its fixed leading
      folder, in the same order (matching nothing, it fails like a missing file);
    - anything else: an input that will fail with "cannot read".

    FIFOs, sockets, devices and folders met where an image is expected are skipped with a reason; nothing is opened.
    """
    for arg in arguments:
        if os.path.isdir(arg):
            yield from _walk(Path(arg), _display_root(arg), follow_symlinks, pattern=None)
        elif not os.path.lexists(arg) and _GLOB_MAGIC & set(arg):
            matched = False
            for item in _glob(arg, follow_symlinks):
                matched = True
                yield item
            if not matched:  # recorded as a missing input, so a mistyped pattern is not a silent no-op
                yield InputItem(Path(arg), arg, Path(arg).name)
        else:
            path = Path(arg)
            yield InputItem(path, arg, path.name, _special_file_reason(path))


def _display_root(arg: str) -> str:
    return arg.rstrip("/\\") or arg


def _special_file_reason(path: Path) -> str | None:
    """Why an existing non-regular file must not be opened; None for regular files and missing paths."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # reported by the reader, with the OS's reason
    if stat.S_ISREG(mode):
        return None
    return f"{file_kind(mode)}, not a regular file: not opened"


def _glob(pattern: str, follow_symlinks: bool) -> Iterator[InputItem]:
    parts = pattern.replace(os.sep, "/").split("/")
    fixed = 0  # leading components without wildcards: the folder to walk
    while fixed < len(parts) - 1 and not _GLOB_MAGIC & set(parts[fixed]):
        fixed += 1
    base = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
    if os.path.isdir(base or "."):
        yield from _walk(Path(base or "."), base, follow_symlinks, pattern=[p for p in parts[fixed:] if p])


def _match(parts: list[str], pattern: list[str], *, full: bool) -> bool:
    """Glob-match path components; ``**`` spans any number of them. ``full=False``: could a path strictly below
    ``parts`` match? As in the shell, wildcards do not match names starting with a dot."""
    if not parts:
        return all(p == "**" for p in pattern) if full else bool(pattern)
    if not pattern:
        return False
    head, name = pattern[0], parts[0]
    if name.startswith(".") and not head.startswith("."):
        return False
    if head == "**":
        return _match(parts, pattern[1:], full=full) or _match(parts[1:], pattern, full=full)
    return fnmatch.fnmatchcase(name, head) and _match(parts[1:], pattern[1:], full=full)


def _walk(root: Path, root_display: str, follow_symlinks: bool, pattern: list[str] | None) -> Iterator[InputItem]:
    """Depth first, names sorted. An explicit stack, so no tree is too deep; one folder's entries at a time."""
    real_root = os.path.realpath(root)

    def item(path: str, rel: str, skip: str | None = None) -> InputItem:
        display = rel if not root_display else f"{root_display.rstrip('/')}/{rel}"
        return InputItem(Path(path), display, rel, skip)

    def wanted(rel_parts: list[str], name: str) -> bool:
        if pattern is None:
            return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        return _match(rel_parts, pattern, full=True)

    try:
        root_stat = os.stat(root)
    except OSError as e:
        yield item(str(root), "", f"cannot list folder ({e.strerror or e})")
        return
    # Each frame: (entries left, relative parts of this folder, identities of the folders above and this one)
    stack: list[tuple[Iterator[os.DirEntry[str]], list[str], frozenset[tuple[int, int]]]] = []

    def push(path: str, rel_parts: list[str], ancestors: frozenset[tuple[int, int]]) -> Iterator[InputItem]:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            rel = "/".join(rel_parts)
            yield item(path, rel, f"cannot list folder ({e.strerror or e})")
            return
        stack.append((iter(entries), rel_parts, ancestors))

    yield from push(str(root), [], frozenset({(root_stat.st_dev, root_stat.st_ino)}))
    while stack:
        entries, rel_parts, ancestors = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        parts = [*rel_parts, entry.name]
        rel = "/".join(parts)
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_link = is_dir = False
        if is_link:
            target = os.path.realpath(entry.path)
            try:
                st = os.stat(entry.path)
            except OSError:
                if wanted(parts, entry.name):
                    yield item(entry.path, rel, f"broken symbolic link to {target}: not followed")
                continue
            inside = target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if pattern is not None and not _match(parts, pattern, full=False):
                    continue
                if not follow_symlinks:
                    yield item(entry.path, rel, "link to a folder: not followed (use --follow-symlinks)")
                elif ident in ancestors:
                    yield item(entry.path, rel, "link to a folder above it (a cycle): not followed")
                else:
                    yield from push(entry.path, parts, ancestors | {ident})
                continue
            if not wanted(parts, entry.name):
                continue
            if not inside and not follow_symlinks:
                yield item(entry.path, rel, f"link to {target}, outside {root_display or '.'}: not followed "
                                            "(use --follow-symlinks)")
                continue
            yield item(entry.path, rel, None if stat.S_ISREG(st.st_mode) else
                       f"link to {file_kind(st.st_mode)}, not a regular file: not opened")
        elif is_dir:
            if pattern is not None and not _match(parts, pattern, full=False):
                if _match(parts, pattern, full=True):
                    yield item(entry.path, rel, "a folder, not a regular file: not opened")
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                yield item(entry.path, rel, f"cannot list folder ({e.strerror or e})")
                continue
            yield from push(entry.path, parts, ancestors | {(st.st_dev, st.st_ino)})
        elif wanted(parts, entry.name):
            try:
                regular = entry.is_file(follow_symlinks=False)
                mode = 0 if regular else entry.stat(follow_symlinks=False).st_mode
            except OSError:
                regular, mode = True, 0  # vanished or unreadable: the reader reports it
            yield item(entry.path, rel, None if regular else f"{file_kind(mode)}, not a regular file: not opened")


# ------------------------------------------------------------------------------------------------------ identity

def fingerprint(*parts: Any) -> str:
    """A short, stable hex digest of JSON-able parts (dataclasses and paths included)."""
    data = json.dumps(parts, sort_keys=True, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                      else str(o))
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def checkpoint_identity(checkpoint: Checkpoint) -> dict[str, Any]:
    """What identifies a model cheaply: its name, format and configs, and each file's name, size and mtime
    (a re-downloaded or converted file is taken as a different model; nothing is hashed)."""
    files = []
    for path in checkpoint.files:
        try:
            st = os.stat(path)
            files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([os.path.abspath(path), None, None])
    return {"description": checkpoint.description, "format": checkpoint.format, "vision": checkpoint.vision,
            "projector": checkpoint.projector, "preprocess": checkpoint.preprocess,
            "conventions": checkpoint.conventions, "files": files}


def _h8(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _content_digest(f: Any) -> str:
    return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


# -------------------------------------------------------------------------------------------------- resume state

class ResumeState:
    """The index's last word per input, compactly: ``{h(input): status + h(size, mtime, job) + h(content, job) +
    output}`` (about 100 bytes an input), plus the set of output names already taken."""

    OK, ERROR, SKIPPED = b"o", b"e", b"s"

    def __init__(self) -> None:
        self._last: dict[bytes, bytes] = {}
        self.taken: set[bytes] = set()  # h(casefolded output name)
        self.bad_lines = 0

    def __len__(self) -> int:
        return len(self._last)

    def add(self, record: dict[str, Any]) -> None:
        status, name = record.get("status"), record.get("input")
        if not isinstance(name, str):
            self.bad_lines += 1
            return
        if status == "ok" and isinstance(record.get("output"), str):
            output = record["output"]
            self.taken.add(_h8(output.casefold()))
            value = (self.OK + _h8(record.get("bytes"), record.get("mtime_ns"), record.get("job"))
                     + _h8(record.get("content"), record.get("job")) + output.encode("utf-8", "surrogatepass"))
        elif status == "error":
            value = (self.ERROR + _h8(record.get("bytes"), record.get("mtime_ns"), record.get("job"))
                     + _h8(record.get("content"), record.get("job")))
        elif status == "skipped":
            value = self.SKIPPED + _h8(record.get("reason"))
        else:
            self.bad_lines += 1
            return
        self._last[_h8(name)] = value

    def prior(self, display: str) -> bytes | None:
        return self._last.get(_h8(display))

    @staticmethod
    def output_of(prior: bytes) -> str:
        return prior[17:].decode("utf-8", "surrogatepass")


def load_index(path: Path) -> tuple[ResumeState, int]:
    """Read ``index.jsonl`` line by line. Returns the state and the byte length of its complete lines (a torn last
    line, from a kill mid-write, lies beyond it)."""
    state = ResumeState()
    good_end = 0
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return state, 0
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn: never acted on, cut before appending
            good_end += len(line)
            try:
                record = json.loads(line)
            except ValueError:
                state.bad_lines += 1
                continue
            if isinstance(record, dict):
                state.add(record)
            else:
                state.bad_lines += 1
    return state, good_end


class OutputFolder:
    """The output folder held for one job: locked, torn index tail cut, stale temporaries removed."""

    def __init__(self, out_dir: Path, *, overwrite: bool = False):
        self.dir = out_dir
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{out_dir}: cannot use as the output folder ({e.strerror or e})") from None
        try:
            import fcntl

            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): one job per folder is then the user's to ensure
            pass
        except OSError:
            os.close(self._lock)
            raise OutputError(f"{out_dir}: another encode job is writing to this folder") from None
        try:
            self.tmp = out_dir / TMP_DIR_NAME
            shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed job; no job holds the lock
            self.tmp.mkdir()
            index = out_dir / INDEX_NAME
            self.state, good_end = load_index(index)
            if overwrite:
                if index.exists():
                    os.replace(index, out_dir / PREVIOUS_INDEX_NAME)
                self.done = ResumeState()  # nothing counts as done; the names already taken stay taken
                self.done.taken = self.state.taken
            else:
                self.done = self.state
            self._index = os.open(index, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if not overwrite and os.fstat(self._index).st_size > good_end:
                os.ftruncate(self._index, good_end)  # drop only the torn partial line
        except OSError as e:
            self.close()
            raise OutputError(f"{out_dir}: cannot use as the output folder ({e.strerror or e}: "
                              f"{e.filename or ''})") from None
        self._counter = 0

    def append(self, record: dict[str, Any]) -> None:
        """One record, one ``write`` call; ASCII JSON, so undecodable file names survive as escapes."""
        os.write(self._index, (json.dumps(record) + "\n").encode("ascii"))

    def save(self, rel: str, array: np.ndarray) -> None:
        """Write ``rel`` (a safe relative path) through the temporary folder, then rename into place."""
        self._counter += 1
        save_npy(self.dir, rel, array, self.tmp / f"{os.getpid()}-{self._counter}.npy")

    def close(self) -> None:
        for fd in ("_index", "_lock"):
            if hasattr(self, fd):
                os.close(getattr(self, fd))
                delattr(self, fd)
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)


def save_npy(out_dir: Path, rel: str, array: np.ndarray, tmp: Path) -> None:
    """Write ``out_dir/rel`` by saving to ``tmp`` (a unique name on the same file system) and renaming it into
    place: a reader, or a later run, never sees a partial file."""
    with open(tmp, "wb") as f:
        np.save(f, array)
    target = out_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------------- job

@dataclass
class JobSummary:
    encoded: int = 0
    failed: int = 0  # failed in this run
    failed_before: int = 0  # unchanged inputs whose failure an earlier run recorded
    skipped: int = 0  # not regular files, links not followed, listed twice
    done_before: int = 0  # encoded by an earlier run, unchanged
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.failed_before)

    def count(self, kind: str) -> None:
        """Count one input by its ``_Prepared.kind``."""
        name = {"encode": "encoded", "error": "failed", "done": "done_before",
                "failed_before": "failed_before"}.get(kind, "skipped")  # skip, skipped_before, duplicate
        setattr(self, name, getattr(self, name) + 1)

    def line(self) -> str:
        failed = f"failed {self.failed + self.failed_before}"
        if self.failed_before:
            failed += f" ({self.failed_before} unchanged since an earlier run)"
        skipped = f"skipped {self.skipped + self.done_before}"
        if self.done_before:
            skipped += f" ({self.done_before} already encoded)"
        return (f"encoded {self.encoded}, {failed}, {skipped} in {self.seconds:.1f} s "
                f"({self.images_per_second:.2f} images/s)")


@dataclass
class _Prepared:
    item: InputItem
    output: str
    kind: str  # "encode", "error", "skip", "done", "failed_before", "duplicate"
    pixels: np.ndarray | None = None  # (V, S, S, 3) float32 for "encode": the image, then any extra views
    reason: str | None = None
    facts: dict[str, Any] | None = None  # bytes, mtime_ns, content: the resume key's ingredients
    extra: dict[str, Any] | None = None  # record fields from make_input, e.g. Pan & Scan crop boxes


# One decoded image → float32 (V, S, S, 3) views (the image first) and extra index-record fields.
MakeInput = Callable[[Image.Image], tuple[np.ndarray, dict[str, Any]]]
# Views → one array (V, ...), or named arrays each (V, ...): "" the main output, e.g. "layer13", "pooled".
EncodeBatch = Callable[[np.ndarray], np.ndarray | dict[str, np.ndarray]]


def run_job(
    items: Iterable[InputItem],
    out_dir: Path,
    encode_batch: EncodeBatch,
    preprocess_config: PreprocessConfig,
    *,
    make_input: MakeInput | None = None,
    job_key: str = "",
    batch_size: int = 1,
    exif_transpose: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    overwrite: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> JobSummary:
    """Encode every item, writing ``out_dir/<item.rel>.npy`` and one ``index.jsonl`` record per input.

    ``encode_batch`` maps float32 NHWC ``(B, S, S, 3)`` to an array ``(B, ...)``, or to named arrays each
    ``(B, ...)`` (``""`` the main one). ``make_input`` turns a decoded image into its views (default: the image
    alone, preprocessed); view 0 is saved as ``<item.rel>.npy`` (plus ``.NAME.npy`` for each other name), view
    ``j`` as ``.cropJ.npy`` (``.cropJ.NAME.npy``), and the record lists them under ``outputs``. ``job_key`` identifies the model
    and every option that changes an output (see ``fingerprint``); resumed inputs must match it. Per-input
    failures are recorded and the job goes on; a failure of ``encode_batch`` itself stops the job (the model is
    broken, not the input), keeping everything recorded so far. ``on_record`` sees every appended record.

    Raises:
        OutputError: the output folder cannot be used (not writable, or another job holds it).
    """
    folder = OutputFolder(out_dir, overwrite=overwrite)
    error_key = error_key_for(job_key, max_pixels, exif_transpose)
    summary = JobSummary()
    results: queue.Queue[tuple[list[_Prepared], dict[str, np.ndarray] | None] | None] = queue.Queue(maxsize=4)
    writer_error: list[BaseException] = []

    to_input = make_input or functools.partial(plain_input, config=preprocess_config)

    def record(rec: dict[str, Any]) -> None:
        folder.append(rec)
        if on_record:
            on_record(rec)

    def prepare(item: InputItem, output: str) -> _Prepared:
        return prepare_input(item, output, folder.dir, folder.done.prior(item.display) or b"", to_input, job_key,
                             error_key, exif_transpose, max_pixels)

    def writer() -> None:
        try:
            while (entry := results.get()) is not None:
                batch, outputs = entry
                for p, rows in split_outputs(batch, outputs):
                    rec = finish_input(p, rows, folder.save, job_key, error_key)
                    if rec is not None:
                        record(rec)
                    summary.count(p.kind)
        except BaseException as e:  # surfaced to the caller after the model loop stops
            writer_error.append(e)
            while results.get() is not None:  # drain so the producer never blocks on a full queue
                pass

    start = time.perf_counter()
    writer_thread = threading.Thread(target=writer, name="gemma3-vision-writer", daemon=True)
    writer_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemma3-vision-decode") as pool:
            named = _name_outputs(items, folder.state)
            prepared = _prefetch(pool, prepare, named, ahead=max(2 * batch_size, 2 * workers, 4))
            for batch in _batches(prepared, batch_size):
                results.put((batch, encode_prepared(encode_batch, batch)))
                if writer_error:
                    break
    finally:
        results.put(None)
        writer_thread.join()
        folder.close()
    if writer_error:
        raise writer_error[0]
    summary.seconds = time.perf_counter() - start
    return summary


def _name_outputs(items: Iterable[InputItem], state: ResumeState) -> Iterator[tuple[InputItem, str]]:
    """Each item with its output name: the one an earlier run gave it, else its relative path plus ``.npy``,
    made distinct (case-insensitively) from every name taken so far. Inputs named twice come once."""
    seen: set[bytes] = set()
    for item in items:
        key = _h8(item.display)
        if key in seen:
            yield item, ""
            continue
        seen.add(key)
        prior = state.prior(item.display)
        if prior is not None and prior[:1] == ResumeState.OK:
            yield item, ResumeState.output_of(prior)
            continue
        base = item.rel or os.path.basename(item.display.rstrip("/")) or "input"
        name, n = base + ".npy", 1
        while _h8(name.casefold()) in state.taken:
            n += 1
            name = f"{base}~{n}.npy"
        state.taken.add(_h8(name.casefold()))
        yield item, name


def error_key_for(job_key: str, max_pixels: int | None, exif_transpose: bool) -> str:
    """The key of ``error`` records: decoding failures also depend on the decoder's limits; outputs do not."""
    return fingerprint(job_key, max_pixels, exif_transpose)


def plain_input(img: Image.Image, config: PreprocessConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """The default ``MakeInput``: the image alone, preprocessed, ``(1, S, S, 3)``."""
    return pil_to_input(img, config)[None], {}


def prepare_input(item: InputItem, output: str, out_dir: Path, prior: bytes, to_input: MakeInput, job_key: str,
                  error_key: str, exif_transpose: bool, max_pixels: int | None) -> _Prepared:
    """Decide what one input needs and decode it if it must be encoded; never raises.

    ``output`` is its name from ``_name_outputs`` (``""``: named twice), ``prior`` its ``ResumeState.prior``
    (``b""`` when none). Reads ``out_dir`` only to check that a done input's output still exists.
    """
    try:
        return _prepare(item, output, out_dir, prior, to_input, job_key, error_key, exif_transpose, max_pixels)
    except Exception as e:  # a decoder bug on a hostile file must not end the job; record it
        return _Prepared(item, output, "error", reason=f"{type(e).__name__}: {_one_line(e)}")


def encode_prepared(encode_batch: EncodeBatch, batch: list[_Prepared]) -> dict[str, np.ndarray] | None:
    """Encode the views of a batch's ``encode`` inputs in one call: named arrays each ``(views, ...)``, in
    order; None when the batch has nothing to encode."""
    good = [p.pixels for p in batch if p.kind == "encode" and p.pixels is not None]
    if not good:
        return None
    pixels = np.concatenate(good)  # (views, S, S, 3)
    encoded = encode_batch(pixels)
    outputs = encoded if isinstance(encoded, dict) else {"": encoded}
    for name, array in outputs.items():
        if len(array) != len(pixels):
            raise RuntimeError(f"encode_batch returned {len(array)} rows of {name or 'output'} "
                               f"for {len(pixels)} images")
    return outputs


def split_outputs(batch: list[_Prepared], outputs: dict[str, np.ndarray] | None,
                  ) -> Iterator[tuple[_Prepared, dict[str, np.ndarray] | None]]:
    """Each input of a batch with its rows of ``encode_prepared``'s outputs (each ``(V, ...)``); None for
    inputs that were not encoded."""
    row = 0
    for p in batch:
        rows = None
        if p.kind == "encode":
            assert outputs is not None and p.pixels is not None
            views = len(p.pixels)
            rows = {name: a[row:row + views] for name, a in outputs.items()}
            row += views
        yield p, rows


def finish_input(p: _Prepared, rows: dict[str, np.ndarray] | None, save: Callable[[str, np.ndarray], None],
                 job_key: str, error_key: str) -> dict[str, Any] | None:
    """Save an encoded input's arrays (``rows``: each ``(V, ...)``, its views) and return the index record of
    any input, or None for inputs that get no new record (done or failed before, duplicates)."""
    if p.kind == "encode":
        assert rows is not None
        named = _name_views(rows)
        files = {name: p.output if not name else f"{p.output[:-len('.npy')]}.{name}.npy" for name in named}
        for name, array in named.items():  # extra arrays first: the main one marks it done
            if name:
                save(files[name], array)
        save(p.output, named[""])
        extra = {"outputs": {k: v for k, v in files.items() if k}} if len(files) > 1 else {}
        return {"input": p.item.display, "status": "ok", "output": p.output, "shape": list(named[""].shape),
                **extra, **(p.extra or {}), **(p.facts or {}), "job": job_key}
    if p.kind == "error":
        return {"input": p.item.display, "status": "error", "error": p.reason, **(p.facts or {}),
                "job": error_key}
    if p.kind == "skip":
        return {"input": p.item.display, "status": "skipped", "reason": p.reason}
    return None


def _prepare(item: InputItem, output: str, out_dir: Path, prior: bytes, to_input: MakeInput,
             job_key: str, error_key: str, exif_transpose: bool, max_pixels: int | None) -> _Prepared:
    """Decide what one input needs, reading as little as possible: skip, already done, or decode."""
    if not output:
        return _Prepared(item, output, "duplicate")
    if item.skip is not None:
        same = prior == ResumeState.SKIPPED + _h8(item.skip)
        return _Prepared(item, output, "skipped_before" if same else "skip", reason=item.skip)
    # What an unchanged input would be, and the key its record must carry.
    verdict, key = {ResumeState.OK: ("done", job_key), ResumeState.ERROR: ("failed_before", error_key)}.get(
        prior[:1], ("", ""))
    if verdict == "done" and not (out_dir / output).is_file():
        verdict = ""  # its output was deleted: encode it again
    try:
        st = os.stat(item.path)
        facts: dict[str, Any] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "content": None}
    except OSError:
        facts = {"bytes": None, "mtime_ns": None, "content": None}  # missing: a failure until it appears
    if verdict and prior[1:9] == _h8(facts["bytes"], facts["mtime_ns"], key):
        return _Prepared(item, output, verdict)
    try:
        with open_regular_file(item.path) as f:
            st = os.fstat(f.fileno())
            facts = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "content": _content_digest(f)}
            if verdict and prior[9:17] == _h8(facts["content"], key):
                return _Prepared(item, output, verdict)  # touched, not changed
            f.seek(0)
            img = decode_image(f, item.display, exif_transpose=exif_transpose, max_pixels=max_pixels)
            pixels, extra = to_input(img)  # (V, S, S, 3) float32
    except Gemma3VisionError as e:
        return _Prepared(item, output, "error", reason=_one_line(e), facts=facts)
    return _Prepared(item, output, "encode", pixels=pixels, facts=facts, extra=extra)


def _name_views(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One input's rows ``{name: (V, ...)}`` → ``{name: row 0, "cropJ.name": row J}``, as ``ImageEncoding.arrays``
    names them."""
    named: dict[str, np.ndarray] = {}
    views = len(next(iter(arrays.values())))
    for j in range(views):
        for name, rows in arrays.items():
            prefix = f"crop{j}" if j else ""
            named[".".join(part for part in (prefix, name) if part)] = rows[j]
    return named


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[InputItem, str], _Prepared],
              items: Iterable[tuple[InputItem, str]], ahead: int) -> Iterator[_Prepared]:
    """``map(fn, items)`` in order, keeping ``ahead`` calls in flight; never materialises the whole input list."""
    pending: collections.deque[Future[_Prepared]] = collections.deque()
    for item, output in items:
        pending.append(pool.submit(fn, item, output))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(prepared: Iterator[_Prepared], batch_size: int) -> Iterator[list[_Prepared]]:
    """Groups holding ``batch_size`` images to encode each; every other input rides along without a slot, so bad
    or already-done inputs never shrink a batch."""
    batch: list[_Prepared] = []
    good = 0
    for p in prepared:
        batch.append(p)
        good += p.kind == "encode"
        if good == batch_size:
            yield batch
            batch, good = [], 0
        elif len(batch) >= 256:  # a long run of done or bad inputs: let them through, keep the images waiting
            yield [q for q in batch if q.kind != "encode"]
            batch = [q for q in batch if q.kind == "encode"]
    if batch:
        yield batch


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
