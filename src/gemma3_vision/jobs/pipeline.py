"""The batch job behind ``gemma3-vision encode``: inputs → ``.npy`` files or safetensors shards, and an
``index.jsonl``.

Three stages overlap so the model never waits: a thread pool opens, hashes, decodes and preprocesses ahead of the
model (Pillow and hashlib release the GIL), the calling thread runs the model one batch at a time, and a writer
thread saves arrays (``shards.py``) and appends index records. A bad input becomes an ``error`` record; the job
carries on.

What makes it safe to kill and re-run is in ``output_folder.py``.

Memory stays flat in the number of inputs: discovery streams, only a bounded window of inputs is in flight, and
the resume state is one small bytes value per indexed input.
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..errors import Gemma3VisionError, ImageError
from ..model.preprocessing import (
    DEFAULT_MAX_PIXELS,
    PreprocessConfig,
    decode_image,
    one_line,
    open_regular_file,
    pil_to_input,
)
from .discovery import InputItem, is_pattern
from .output_folder import (
    ARRAY_NAME,
    OutputFolder,
    ResumeState,
    content_digest,
    fingerprint,
    in_tmp_dir,
    output_intact,
    short_hash,
)
from .shards import Encoded, NpyFiles, OutOfRange, ShardFiles, check_out_dtype, to_out_dtype

# ---------------------------------------------------------------------------------------------------------- job


@dataclass
class JobSummary:
    encoded: int = 0
    failed: int = 0  # failed in this run
    failed_before: int = 0  # unchanged inputs whose failure an earlier run recorded
    skipped: int = 0  # not regular files, links not followed, listed twice
    done_before: int = 0  # encoded by an earlier run, unchanged
    seconds: float = 0.0
    backend: str = ""  # the engine that ran the model (backends.BACKENDS), set by the caller that loaded it

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
        on = f" on {self.backend}" if self.backend else ""
        done = f"encoded {self.encoded}, {failed}, {skipped} in {self.seconds:.1f} s"
        if not self.encoded:
            return done + on  # a rate over no image says nothing
        return f"{done} ({speed_text(self.images_per_second)}){on}"


def speed_text(rate: float) -> str:
    """An encoding rate for the console. Under one image a second (a full tower in fp32 on a small CPU), seconds per
    image read better (a rate under 0.005 would print as 0.00)."""
    return f"{1 / rate:.1f} s/image" if 0 < rate < 1 else f"{rate:.2f} images/s"


# How long the writer waits for the next batch before looking at the queue again (see run_job's next_result).
_WRITER_POLL_S = 0.5


@dataclass
class _Prepared:
    item: InputItem
    output: str
    kind: str  # "encode", "error", "skip", "done", "failed_before", "duplicate"
    pixels: np.ndarray | None = None  # (V, S, S, 3) float32 for "encode": the image, then any extra views
    reason: str | None = None
    facts: dict[str, Any] | None = None  # bytes, mtime_ns, content: the resume key's ingredients
    extra: dict[str, Any] | None = None  # record fields from make_input, e.g. Pan & Scan crop boxes
    replaces: bytes = b""  # for "encode": ResumeState.written_of its prior, which the new main file must not match


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
    out_dtype: str = "float32",
    shard_size: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_failed_before: Callable[[str, str | None], None] | None = None,
    on_progress: Callable[[JobSummary], None] | None = None,
) -> JobSummary:
    """Encode every item, writing ``out_dir/<item.rel>.npy`` and one ``index.jsonl`` record per input.

    ``encode_batch`` maps float32 NHWC ``(B, S, S, 3)`` to an array ``(B, ...)``, or to named arrays each
    ``(B, ...)`` (``""`` the main one). ``make_input`` turns a decoded image into its views (default: the image
    alone, preprocessed); view 0 is saved as ``<item.rel>.npy`` (plus ``.NAME.npy`` for each other name), view
    ``j`` as ``.cropJ.npy`` (``.cropJ.NAME.npy``), and the record lists them under ``outputs``. ``job_key``
    identifies the model and every option that changes an output (see ``fingerprint``); resumed inputs must match
    it. Per-input failures are recorded and the job goes on; a failure of ``encode_batch`` itself stops the job
    (the model is broken, not the input), keeping everything recorded so far. ``on_record`` sees every appended
    record; ``on_failed_before(input, reason)`` every input that failed in an earlier run and is unchanged, so not
    tried or recorded again (``reason``: its ``error`` record's, None if that cannot be read back);
    ``on_progress`` the summary after each input.

    ``out_dtype`` (float32, float16, bfloat16) is what the arrays are written in; it must be in ``job_key``.
    ``shard_size``: write safetensors shards of that many images (``shards.ShardFiles``) instead of ``.npy``
    files; an image's record is appended once its shard is in place, and the last shard, however full, when the
    job ends or is interrupted.

    Raises:
        OptionError: bfloat16 without shards, or a shard size under 1.
        OutputError: the output folder cannot be used (not writable, or another job holds it).
    """
    check_out_dtype(out_dtype, shard_size is not None)
    folder = OutputFolder(out_dir, overwrite=overwrite)
    try:
        files: NpyFiles | ShardFiles = (NpyFiles(folder.dir, folder.save) if shard_size is None
                                        else ShardFiles(folder.dir, folder.tmp, shard_size))
    except BaseException:
        folder.close()
        raise
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
        return prepare_input(item, output, folder.dir, folder.state.prior(item.key) or b"", to_input, job_key,
                             error_key, exif_transpose, max_pixels)

    def next_result() -> tuple[list[_Prepared], dict[str, np.ndarray] | None] | None:
        # Waits in slices: a Ctrl-C or SIGTERM raised in the main thread inside Condition.notify (in put) can leave
        # a stale waiter first in line, whose release then takes the wake-up meant for this thread. A plain get()
        # then waited for ever with the final None in the queue (about 1 SIGTERM in 30); a timed one looks again.
        while True:
            try:
                return results.get(timeout=_WRITER_POLL_S)
            except queue.Empty:
                continue

    def writer() -> None:
        try:
            while (entry := next_result()) is not None:
                batch, outputs = entry
                for p, rows in split_outputs(batch, outputs):
                    done = finish_input(p, rows, job_key, error_key, out_dtype)
                    for rec in files.write(done) if isinstance(done, Encoded) else [done] if done else []:
                        record(rec)
                    if p.kind == "failed_before" and on_failed_before:
                        report_failed_before(folder, p.item, on_failed_before)
                    summary.count(p.kind)
                    if on_progress:
                        on_progress(summary)
            for rec in files.flush():  # the last shard, also after Ctrl-C or SIGTERM: its images are encoded
                record(rec)
        except BaseException as e:  # surfaced to the caller after the model loop stops
            writer_error.append(e)
            while next_result() is not None:  # drain so the producer never blocks on a full queue
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


def report_failed_before(folder: OutputFolder, item: InputItem,
                         on_failed_before: Callable[[str, str | None], None]) -> None:
    """Tell ``on_failed_before`` about an unchanged input that failed before, with its recorded reason."""
    on_failed_before(item.display, folder.earlier_failure(folder.state.prior(item.key) or b"", item.display))


def _name_outputs(items: Iterable[InputItem], state: ResumeState) -> Iterator[tuple[InputItem, str]]:
    """Each item with its output name: the one an earlier run gave it (kept through failures since, see
    ``ResumeState``), else its relative path plus ``.npy``,
    made distinct (case-insensitively) from every name taken so far and from every extra file those could have
    (``ResumeState.free``: beside ``a.png.npy``, an input named ``a.png.pooled`` is ``a.png.pooled~2.npy``). Inputs
    named twice (however spelled: ``InputItem.key``) come once. Inputs in a folder named like the temporary folder
    go one folder over (``.gemma3-vision-tmp~2/a.png.npy``): every job empties that folder."""
    seen: set[bytes] = set()
    for item in items:
        key = short_hash(item.key)
        if key in seen:
            yield item, ""
            continue
        seen.add(key)
        prior = state.prior(item.key)
        if prior is not None and (kept := ResumeState.output_of(prior)):
            yield item, kept
            continue
        base = item.rel or os.path.basename(item.display.rstrip("/")) or "input"
        if in_tmp_dir(base):  # only rel has folders, joined with "/"
            head, _, rest = base.partition("/")
            base = f"{head}~2/{rest}"
        name, n = base + ".npy", 1
        while not state.free(name):
            n += 1
            name = f"{base}~{n}.npy"
        state.take(name)
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
    (``b""`` when none). Reads ``out_dir`` only to check that a done input's output is intact.
    """
    try:
        return _prepare(item, output, out_dir, prior, to_input, job_key, error_key, exif_transpose, max_pixels)
    except Exception as e:  # a decoder bug on a hostile file must not end the job; record it
        return _Prepared(item, output, "error", reason=f"{type(e).__name__}: {one_line(e)}")


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
        if name and not ARRAY_NAME.fullmatch(name):  # output names are kept apart on this grammar
            raise RuntimeError(f"encode_batch returned an array named {name!r}: extra arrays are layerN or pooled")
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


def finish_input(p: _Prepared, rows: dict[str, np.ndarray] | None, job_key: str, error_key: str,
                 out_dtype: str = "float32") -> Encoded | dict[str, Any] | None:
    """What to write for one input: an encoded input's arrays in ``out_dtype`` with its record's fields
    (``rows``: each ``(V, ...)``, its views), handed to ``NpyFiles`` or ``ShardFiles``; the record of an input
    that failed or was skipped; None for inputs that get no new record (done or failed before, duplicates).

    An output ``out_dtype`` cannot hold (float16 beyond ±65504: ``shards.to_out_dtype``) makes the input fail:
    ``p.kind`` becomes ``error``, and its record says why.
    """
    named_input = {"input": p.item.display, "path": p.item.key}  # every record's first fields
    if p.kind == "encode":
        assert rows is not None
        try:
            arrays = to_out_dtype(_name_views(rows), out_dtype)
        except OutOfRange as e:
            p.kind, p.reason = "error", f"{p.item.display}: {e}"
        else:
            return Encoded(named_input, arrays, {**(p.extra or {}), **(p.facts or {}), "job": job_key},
                           output=p.output, replaces=p.replaces)
    if p.kind == "error":
        return {**named_input, "status": "error", "error": p.reason, **(p.facts or {}), "job": error_key}
    if p.kind == "skip":
        return {**named_input, "status": "skipped", "reason": p.reason}
    return None


def _prepare(item: InputItem, output: str, out_dir: Path, prior: bytes, to_input: MakeInput,
             job_key: str, error_key: str, exif_transpose: bool, max_pixels: int | None) -> _Prepared:
    """Decide what one input needs, reading as little as possible: skip, already done, or decode."""
    if not output:
        return _Prepared(item, output, "duplicate")
    if item.error is not None:  # discovery failed on it (a folder it cannot list): a failure every run, no facts
        return _Prepared(item, output, "error", reason=item.error)
    if item.skip is not None:
        same = prior.startswith(ResumeState.skipped(item.skip))
        return _Prepared(item, output, "skipped_before" if same else "skip", reason=item.skip)
    # What an unchanged input would be, and the key its record must carry.
    verdict, key = {ResumeState.OK: ("done", job_key), ResumeState.ERROR: ("failed_before", error_key)}.get(
        prior[:1], ("", ""))
    if verdict == "done" and not output_intact(out_dir / ResumeState.location_of(prior), prior):
        verdict = ""  # its output was deleted, or replaced by a re-encode whose record a kill cut off
    try:
        st = os.stat(item.path)
        facts: dict[str, Any] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "content": None}
    except OSError:
        facts = {"bytes": None, "mtime_ns": None, "content": None}  # missing: a failure until it appears
    if verdict and ResumeState.facts_key_of(prior) == short_hash(facts["bytes"], facts["mtime_ns"], key):
        return _Prepared(item, output, verdict)
    try:
        with _open(item) as f:
            st = os.fstat(f.fileno())
            facts = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "content": content_digest(f)}
            if verdict and ResumeState.content_key_of(prior) == short_hash(facts["content"], key):
                return _Prepared(item, output, verdict)  # touched, not changed
            f.seek(0)
            img = decode_image(f, item.display, exif_transpose=exif_transpose, max_pixels=max_pixels)
            pixels, extra = to_input(img)  # (V, S, S, 3) float32
    except Gemma3VisionError as e:
        return _Prepared(item, output, "error", reason=one_line(e), facts=facts)
    return _Prepared(item, output, "encode", pixels=pixels, facts=facts, extra=extra,
                     replaces=ResumeState.written_of(prior))


def _open(item: InputItem) -> BinaryIO:
    """``open_regular_file`` with the input named as the user spelled it (``nope/: cannot read``), as every other
    reason names it, not as ``Path`` normalised it (``nope``): messages name an input once, not twice."""
    if is_pattern(item.display):  # discovery hands on a pattern that matched nothing, so it is not a silent no-op
        raise ImageError(f"{item.display}: no file matches this pattern")
    try:
        return open_regular_file(item.path)
    except ImageError as e:
        reason, normalised = str(e), f"{item.path}: "
        if reason.startswith(normalised) and str(item.path) != item.display:
            raise ImageError(f"{item.display}: {reason.removeprefix(normalised)}") from None
        raise


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
