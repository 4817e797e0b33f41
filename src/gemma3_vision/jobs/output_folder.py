"""The output folder of an encode job: its lock, its append-only index, atomic ``.npy`` writes, and the resume
state read back from the index.

What makes the job safe to kill and re-run:

- every ``.npy`` and every safetensors shard is written under ``OUT/.gemma3-vision-tmp/`` and renamed into place,
  and its ``ok`` records are appended only after the rename: an ``ok`` record always names a complete file. The record states the main
  file's size and modification time as they were after the rename, and the input counts as done only while the
  file (for an input in a shard, the shard) still has them: a re-encode killed between its rename and its record leaves the old record naming a file
  that is no longer the one it wrote, and that file is encoded again rather than taken as done
  (``output_intact``; ``shards.NpyFiles`` says why the main file speaks for the extras);
- records are appended one ``write`` per line to an ``O_APPEND`` descriptor; a torn last line (a kill mid-write)
  is dropped on the next run before anything is appended;
- on the next run each input is looked up in the index by its absolute path (``discovery.input_key``: records'
  ``path``; records from before they stated it by their ``input`` taken from the working folder, which for the same
  spelling is what that run meant), so ``a.png``, ``./a.png`` and ``/abs/a.png`` are one input. It is skipped when
  its last record has the same job key (model identity and output-affecting options) and either the same size and
  modification time, or the same content hash; an ``ok`` record also needs its output file to be intact.
  Unchanged inputs that failed are not retried (same bytes, same failure) but still count as failed, and their
  reason is read back from the index (``OutputFolder.earlier_failure``); except those whose bytes were never read
  (``never_read``: a file that could not be opened), which are tried on every run;
- an input encoded again (a new job key, or new bytes) drops the extra files of its previous ``ok`` record that the
  new one does not list, and only once the new record is appended (``OutputFolder.append``); an input moved into
  a shard drops all its ``.npy`` files, and a shard that no input's last ``ok`` record names any more is removed
  the same way (``ResumeState.shard_users``);
- output names are assigned so that no input's file, main or extra, can be another input's (``ResumeState.free``),
  and an input keeps its name, and its last ``ok`` record's extra files to drop, through failures since;
- ``--overwrite`` appends an ``overwrite`` record instead of starting a new index: every record before it still
  names its input's files (so re-encoding drops stale extras, even after a kill mid-run or a failure), but none
  counts as done;
- a lock file keeps two jobs from writing one folder; the temporary folder is emptied when a job starts and
  removed before the job lets the lock go.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path, PurePath
from typing import Any, BinaryIO, TypeGuard

import numpy as np

from ..checkpoints.checkpoint import Checkpoint
from ..errors import OutputError
from ..model.preprocessing import without_name
from .discovery import input_key

# Shard names are checked here by the same rule as in ``shards`` (which imports this module).
_SHARD_NAME = re.compile(r"shards/[0-9a-f]{8,40}-\d{6,}\.safetensors", re.ASCII)


def is_shard_name(name: object) -> TypeGuard[str]:
    """Whether an index record's ``shard`` is a name this library gives: ``shards/<hex>-<n>.safetensors``."""
    return isinstance(name, str) and _SHARD_NAME.fullmatch(name) is not None


INDEX_NAME = "index.jsonl"
TMP_DIR_NAME = ".gemma3-vision-tmp"  # starts with ".": is_output_name's fast path relies on it
LOCK_NAME = ".gemma3-vision.lock"


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
            "projector": checkpoint.projector, "preprocess": checkpoint.preprocess.identity(),
            "conventions": checkpoint.conventions, "files": files}


def short_hash(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()


def content_digest(f: Any) -> str:
    return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


# What an ok record states of its main file, as os.stat saw it right after the rename (which keeps both): the
# input counts as done only while the file still has them (``output_intact``). Records from before they stated
# them get NO_FILE_ID, and their file need only exist, so such folders resume without encoding again.
NO_FILE_ID = bytes(8)


def file_id(st: os.stat_result) -> bytes:
    return short_hash(st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------------------- names

# What an extra array of an input is called after its main output's stem (``a.png.npy`` → ``a.png.layer13.npy``),
# as ``pipeline._name_views`` names them: ``layer13``, ``pooled``, and for Pan & Scan crops ``crop1``,
# ``crop1.layer13``, ``crop1.pooled``. Naming outputs relies on this being all there is (``ResumeState.free``).
ARRAY_NAME = re.compile(r"layer\d+|pooled", re.ASCII)
EXTRA_SUFFIX = re.compile(r"(?:crop\d+\.)?(?:layer\d+|pooled)|crop\d+", re.ASCII)


def extra_output(output: str, suffix: str) -> str:
    """The file of the extra array ``suffix`` of the input whose main output is ``output``."""
    return f"{output.removesuffix('.npy')}.{suffix}.npy"


def _name_parts(name: str) -> list[str]:
    """The folders and file of a relative output name, as ``PurePath(name).parts`` gives them (no empty or ``.``
    parts), by string operations: ``load_index`` checks every ``ok`` record's name, and ``PurePath`` made loading
    a 200,000-record index 30% slower."""
    if os.altsep:  # Windows: either separator
        name = name.replace(os.altsep, os.sep)
    return [part for part in name.split(os.sep) if part not in ("", ".")]


def in_tmp_dir(name: str) -> bool:
    """Whether the relative output name ``name`` lies in the temporary folder, which every job empties. In any
    case: on a case-insensitive disk ``.GEMMA3-VISION-TMP/`` is that folder."""
    parts = _name_parts(name)
    return len(parts) > 1 and parts[0].casefold() == TMP_DIR_NAME.casefold()


def is_output_name(output: object) -> TypeGuard[str]:
    """Whether an index record's ``output`` is a name this library could have given: a ``.npy`` file inside the
    folder, not in its temporary folder. Anything else comes from a hand-edited or crafted index, and writing or
    removing it could reach any file the job may write."""
    if not (isinstance(output, str) and output.endswith(".npy") and "\0" not in output):
        return False
    if os.path.isabs(output) or (os.name == "nt" and (output.startswith(("/", "\\")) or os.path.splitdrive(output)[0])):
        return False  # /x; on Windows also \\x and C:x (from Python 3.13 on, isabs no longer says so of \\x)
    if ".." not in output and not output.startswith("."):
        # the usual name, decided fast: no part can be "..", nor can the first be TMP_DIR_NAME, which starts "."
        return True
    return ".." not in _name_parts(output) and not in_tmp_dir(output)


def _owners(name: str) -> Iterator[str]:
    """The main output names whose extra files could be called ``name``: ``a.png.crop1.pooled.npy`` could be
    ``a.png.crop1.npy``'s pooled vector or ``a.png.npy``'s crop 1 pooled vector. Usually none (``a.png.npy``)."""
    head, dot, last = name.removesuffix(".npy").rpartition(".")
    if not (dot and EXTRA_SUFFIX.fullmatch(last)):
        return  # the usual case, checked first: every indexed name comes through here
    yield head + ".npy"
    rest, dot, crop = head.rpartition(".")
    if dot and EXTRA_SUFFIX.fullmatch(f"{crop}.{last}"):
        yield rest + ".npy"


# -------------------------------------------------------------------------------------------------- resume state

def record_key(record: dict[str, Any], cwd: str | None = None) -> str | None:
    """The identity (``discovery.input_key``) of the input of an index record; None if it names none. Records from
    before they stated ``path`` are taken by their ``input``, resolved against the working folder (``cwd``, if
    known): for the same spelling from the same folder, what that run's input was."""
    path, name = record.get("path"), record.get("input")
    if isinstance(path, str):
        return path
    return input_key(name, cwd) if isinstance(name, str) else None


def never_read(record: dict[str, Any]) -> bool:
    """Whether an ``error`` record is of a file that was there and not empty, yet whose bytes were never read (no
    content hash): opening it failed (permission denied, an I/O error).

    Such a failure is the environment's, not the image's, and fixing it (``chmod``, a parent folder's permission,
    an ACL, a remount) changes neither the file's size nor its modification time, nor even, for a parent folder
    or a disk, its ``st_ctime``. So it is never taken as unchanged: the input is tried on every run, at the cost of
    one ``open`` that fails fast. A missing file (no size: once there, its facts differ) and an empty one are told
    by their facts, and a file that was read failed on its content: those stay failed while unchanged. A failure
    while reading leaves a record without facts, which the file's, once read again, never match. Records of
    earlier versions hold the same fields, so their permission failures are retried too."""
    return record.get("content") is None and record.get("bytes") not in (None, 0)


class ResumeState:
    """The index's last word per input, compactly: ``{h(record_key): status + two 8-byte keys [+ the error
    record's offset in the index] [+ h(main file's size, mtime) + output [+ NUL-separated extra suffixes, only for
    inputs that have extras]]}`` (about 100 bytes an input), plus the output names already taken.

    The keys are ``h(size, mtime, job)`` and ``h(content, job)`` (``h(reason)`` and zeros for ``skipped``, zeros
    for ``OVERWRITTEN``). An ``error`` value also holds where its record starts in ``index.jsonl``, so the reason
    of an unchanged failure can be read back when it is reported, rather than kept for every input. The naming
    part (the second bracket) is an ``ok`` record's; an ``error`` or ``skipped`` record keeps the one its input
    had, so an input keeps its output name, and the extra files to drop, through failures. An ``overwrite``
    record (``--overwrite``) turns every input so far ``OVERWRITTEN``: naming kept, keys matching nothing, so none
    counts as done or failed before. An ``ok`` record whose output is not a name this library gives
    (``is_output_name``) is ignored, a bad line: its input keeps what it had. An ``ok`` record of an input
    written into a shard (``shard``, checked by ``is_shard_name``) keeps the shard's name and id in the naming
    part, no suffixes (``location_of``; ``output_of`` is then ``""``)."""

    OK, ERROR, SKIPPED, OVERWRITTEN = b"o", b"e", b"s", b"w"
    OVERWRITE_RECORD = {"status": "overwrite"}
    # A value's layout: status (1 byte) | facts key (8) | content key (8) | [ERROR only: record's offset (8)] |
    # naming: main file's id (8) | output [| NUL suffix]...
    _FACTS, _CONTENT, _KEYS, _OFFSET = slice(1, 9), slice(9, 17), 17, slice(17, 25)
    NO_OFFSET = 2**64 - 1  # an error record added without its place in the index (``add`` called directly)
    RETRY = bytes(16)  # the keys of an error that says nothing of the file (``never_read``): they match no input

    def __init__(self) -> None:
        self._last: dict[bytes, bytes] = {}
        # For each shard, how many inputs' last ``ok`` records name it (kept through --overwrite, whose records
        # still name their files). At zero (every image in it encoded again elsewhere, or failed since) the shard
        # is no input's any more and is removed (``stale_outputs``).
        self.shard_users: collections.Counter[bytes] = collections.Counter()
        self.taken: set[bytes] = set()  # h(casefolded output name)
        # h(casefolded N) for each name N that a taken name could be an extra file of (``a.png.npy`` once
        # ``a.png.pooled.npy`` is taken): only inputs named like extra files add to it.
        self._owners: set[bytes] = set()
        self.bad_lines = 0
        self._cwd = os.getcwd()  # resolves old records' inputs (record_key), asked for once, not per record

    def __len__(self) -> int:
        return len(self._last)

    def add(self, record: dict[str, Any], offset: int | None = None) -> None:
        """Take ``record`` as its input's last word; ``offset``: where its line starts in ``index.jsonl``."""
        status, name = record.get("status"), record_key(record, self._cwd)
        if status == "overwrite":
            self.overwrite()
            return
        if name is None:
            self.bad_lines += 1
            return
        key = short_hash(name)
        output = record.get("output")
        if status == "ok" and is_output_name(output):
            self.take(output)
            size, mtime = record.get("output_bytes"), record.get("output_mtime_ns")
            written = short_hash(size, mtime) if type(size) is int and type(mtime) is int else NO_FILE_ID
            value = (self.OK + short_hash(record.get("bytes"), record.get("mtime_ns"), record.get("job"))
                     + short_hash(record.get("content"), record.get("job"))
                     + written + output.encode("utf-8", "surrogatepass"))
            outputs = record.get("outputs")
            if isinstance(outputs, dict):  # only suffixes whose file is the one this library would name
                suffixes = [k for k, v in outputs.items()
                            if isinstance(k, str) and EXTRA_SUFFIX.fullmatch(k) and v == extra_output(output, k)]
                value += b"".join(b"\0" + k.encode("ascii") for k in suffixes)
        elif status == "ok" and is_shard_name(shard := record.get("shard")):
            # Written into a shard: the shard is its file, with nothing of its own to remove when encoded again.
            size, mtime = record.get("output_bytes"), record.get("output_mtime_ns")
            value = (self.OK + short_hash(record.get("bytes"), record.get("mtime_ns"), record.get("job"))
                     + short_hash(record.get("content"), record.get("job"))
                     + short_hash(size, mtime) + shard.encode("ascii"))
        elif status == "error":
            at = self.NO_OFFSET if offset is None else offset
            keys = (short_hash(record.get("bytes"), record.get("mtime_ns"), record.get("job"))
                    + short_hash(record.get("content"), record.get("job")) if not never_read(record)
                    else self.RETRY)
            value = self.ERROR + keys + at.to_bytes(8, "little") + self._naming(key)
        elif status == "skipped":
            value = self.skipped(record.get("reason")) + self._naming(key)
        else:  # an unknown status, or an ok record naming a file elsewhere: never acted on
            self.bad_lines += 1
            return
        if value.endswith(b".safetensors") or (key in self._last and self._last[key].endswith(b".safetensors")):
            self._count_shard_users(self._last.get(key, b""), value)
        self._last[key] = value

    def _count_shard_users(self, old: bytes, new: bytes) -> None:
        before, after = self._shard_of(old), self._shard_of(new)
        if before != after:
            if before:
                self.shard_users[before] -= 1
            if after:
                self.shard_users[after] += 1

    @classmethod
    def _shard_of(cls, value: bytes) -> bytes:
        """The shard a value's naming part names (a shard's naming has no suffixes: it ends the value), or b""."""
        if not value.endswith(b".safetensors"):
            return b""
        return cls._naming_of(value)[8:]

    def overwrite(self) -> None:
        """What an ``overwrite`` record means: nothing indexed so far counts as done or failed before."""
        blank = self.OVERWRITTEN + bytes(self._KEYS - 1)
        for key, value in self._last.items():
            self._last[key] = blank + self._naming_of(value)

    def _naming(self, key: bytes) -> bytes:
        """The naming part an ``error`` or ``skipped`` record keeps: its input's ``.npy`` names, not its shard (a
        shard is kept only for inputs whose last word is an ``ok`` record naming it)."""
        last = self._last.get(key)
        naming = self._naming_of(last) if last else b""
        return b"" if naming.endswith(b".safetensors") else naming

    def prior(self, key: str) -> bytes | None:
        """The last word of the input whose ``record_key`` (``InputItem.key``) is ``key``; None if it has none."""
        return self._last.get(short_hash(key))

    @classmethod
    def _naming_of(cls, prior: bytes) -> bytes:
        """The naming part of a prior: file id, output, suffixes; ``b""`` if its input never had an ``ok`` record."""
        return prior[cls._KEYS + 8:] if prior[:1] == cls.ERROR else prior[cls._KEYS:]

    @classmethod
    def error_offset_of(cls, prior: bytes) -> int | None:
        """Where the ``error`` record of an input that failed starts in ``index.jsonl``; None if not known."""
        if prior[:1] != cls.ERROR:
            return None
        offset = int.from_bytes(prior[cls._OFFSET], "little")
        return None if offset == cls.NO_OFFSET else offset

    @classmethod
    def skipped(cls, reason: object) -> bytes:
        """What a prior starts with when its record skipped the input for ``reason``."""
        return cls.SKIPPED + short_hash(reason) + bytes(8)

    @classmethod
    def facts_key_of(cls, prior: bytes) -> bytes:
        """``h(size, mtime, job)`` of the input as its last record saw it."""
        return prior[cls._FACTS]

    @classmethod
    def content_key_of(cls, prior: bytes) -> bytes:
        """``h(content, job)`` of the input as its last record saw it."""
        return prior[cls._CONTENT]

    @classmethod
    def location_of(cls, prior: bytes) -> str:
        """The file holding the main output of the input's last ``ok`` record: its ``.npy`` or its shard; ``""``
        if it never had one."""
        return cls._naming_of(prior)[8:].split(b"\0", 1)[0].decode("utf-8", "surrogatepass")

    @classmethod
    def output_of(cls, prior: bytes) -> str:
        """The main ``.npy`` name of the input's last ``ok`` record; ``""`` if it never had one, or its last
        ``ok`` record put it in a shard."""
        location = cls.location_of(prior)
        return "" if is_shard_name(location) else location

    @classmethod
    def written_of(cls, prior: bytes) -> bytes:
        """``file_id`` of the main file as the input's last ``ok`` record wrote it: ``NO_FILE_ID`` for records
        from before records stated it, ``b""`` if the input never had an ``ok`` record."""
        return cls._naming_of(prior)[:8]

    @classmethod
    def extras_of(cls, prior: bytes) -> list[str]:
        """The extra suffixes (``layer13``, ``crop1.pooled``) the input's last ``ok`` record listed."""
        return [k.decode("ascii") for k in cls._naming_of(prior)[8:].split(b"\0")[1:]]

    def take(self, output: str) -> None:
        key = output.casefold()
        self.taken.add(short_hash(key))
        self._owners.update(short_hash(owner) for owner in _owners(key))

    def free(self, output: str) -> bool:
        """Whether a new input may be called ``output``: no input has it, and neither is it an extra file of an
        input (``a.png.pooled.npy`` could be ``a.png.npy``'s) nor are that input's extra files another input's.
        Decided by name alone, so it holds for the extras of any job, earlier or later, and any crop count. Never
        a name in the temporary folder (an input folder's own ``.gemma3-vision-tmp/``), whose files a job removes;
        every name ends in ``.npy``, so none is the index's or the lock's."""
        key = output.casefold()
        return (not in_tmp_dir(key)
                and short_hash(key) not in self.taken and short_hash(key) not in self._owners
                and not any(short_hash(owner) in self.taken for owner in _owners(key)))

    def stale_outputs(self, record: dict[str, Any]) -> list[str]:
        """The extra files that ``record``'s input had by its previous ``ok`` record (the last one, whatever
        failures followed it) and has no longer: those ``record`` (a new ``ok`` record, same output name) does not
        list; all its ``.npy`` files when ``record`` puts it in a shard; its shard when it was the last input the
        shard held (counted in ``shard_users``, which this call updates: one call per new record, of any status). Never a name that is, or could be an extra file of, another input's output (possible only in folders
        named before ``free`` was so strict)."""
        key = record_key(record)
        prior = self.prior(key) if key is not None else None
        if prior is not None and (shard := self._shard_of(prior)) and record.get("shard") != shard.decode():
            # Its shard holds one image fewer that any input names; the last one out removes it.
            self.shard_users[shard] -= 1
            return [shard.decode("ascii")] if self.shard_users[shard] == 0 else []
        if record.get("status") != "ok":
            return []
        if prior is not None and is_shard_name(record.get("shard")) and (old := self.output_of(prior)):
            # Now in a shard: its .npy files are no input's any more. Its name stays taken (by the old record).
            return [old] + [name for suffix in self.extras_of(prior)
                            if self._only_of(name := extra_output(old, suffix), old)]
        output = record.get("output")
        if not isinstance(output, str) or prior is None or self.output_of(prior) != output:
            return []
        if PurePath(output).is_absolute() or ".." in PurePath(output).parts:
            return []  # a hand-edited index: never delete outside the folder
        now = set(record.get("outputs", {}).values())
        return [name for suffix in self.extras_of(prior)
                if (name := extra_output(output, suffix)) not in now and self._only_of(name, output)]

    def _only_of(self, name: str, output: str) -> bool:
        key, own = name.casefold(), output.casefold()
        return short_hash(key) not in self.taken and not any(
            short_hash(owner) in self.taken for owner in _owners(key) if owner != own)


def output_intact(path: Path, prior: bytes) -> bool:
    """Whether ``path``, the main file of the ``ok`` prior ``prior``, is still the file that record wrote."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    written = ResumeState.written_of(prior)
    return stat.S_ISREG(st.st_mode) and (written == NO_FILE_ID or file_id(st) == written)


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
            offset, good_end = good_end, good_end + len(line)
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested thousands deep
                state.bad_lines += 1
                continue
            if isinstance(record, dict):
                state.add(record, offset)
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
        self._counter = 0  # names this job's temporary files
        self._reader: BinaryIO | None = None  # the index, opened to read back reasons (``earlier_failure``)
        try:
            self.tmp = out_dir / TMP_DIR_NAME
            shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed job; no job holds the lock
            self.tmp.mkdir()
            index = out_dir / INDEX_NAME
            self.state, good_end = load_index(index)
            if n := self.state.bad_lines:
                warnings.warn(f"{index}: {n} line{'s' * (n > 1)} ignored (not a record this library writes: "
                              "damaged or edited by hand)", stacklevel=2)
            self._index = os.open(index, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if os.fstat(self._index).st_size > good_end:
                os.ftruncate(self._index, good_end)  # drop only the torn partial line
            if overwrite and len(self.state):
                # Not a fresh index: the records so far still name each input's files, which a kill before the
                # input's turn, or its failure, must not lose; this record only stops them counting as done.
                self.append(ResumeState.OVERWRITE_RECORD)
                self.state.overwrite()
        except OSError as e:
            self.close()
            raise OutputError(f"{out_dir}: cannot use as the output folder ({e.strerror or e}: "
                              f"{e.filename or ''})") from None
        except BaseException:
            self.close()
            raise

    def append(self, record: dict[str, Any]) -> None:
        """One record, one ``write`` call; ASCII JSON, so undecodable file names survive as escapes. Then removes
        what the input's previous ``ok`` record named and this one makes stale (``ResumeState.stale_outputs``): the
        extra files it does not list, and a shard no input names any more.

        Removing only now is the safe order: until the new record is appended, the old one is the input's last
        word and every file it names exists; a kill before the removals can only leave files that no current
        record names (orphans, never removed later), never a current record naming a missing file.
        """
        os.write(self._index, (json.dumps(record) + "\n").encode("ascii"))
        if record.get("status") in ("ok", "error", "skipped"):
            for name in self.state.stale_outputs(record):
                with contextlib.suppress(FileNotFoundError):  # removed by hand already
                    os.unlink(inside(self.dir, name))

    def earlier_failure(self, prior: bytes, display: str) -> str | None:
        """Why the input whose prior is ``prior`` failed, as its ``error`` record says, with ``display`` in place
        of the input as that record spelled it; None if the prior is no error or its record cannot be read back.

        Read from the index on demand: the resume state keeps only the record's offset, so a nightly job over an
        index of millions pays for the reasons of the unchanged failures it reports, not for every input.
        """
        offset = ResumeState.error_offset_of(prior)
        if offset is None:
            return None
        try:
            if self._reader is None:
                self._reader = open(self.dir / INDEX_NAME, "rb")  # noqa: SIM115  (closed by close)
            self._reader.seek(offset)
            record = json.loads(self._reader.readline())
        except (OSError, ValueError, RecursionError):
            return None
        reason = record.get("error") if isinstance(record, dict) else None
        if not isinstance(reason, str):
            return None
        name = record.get("input")
        rest = without_name(name, reason) if isinstance(name, str) else None
        return reason if rest is None else f"{display}: {rest}"

    def save(self, rel: str, array: np.ndarray, unlike: bytes = b"") -> None:
        """Write ``rel`` (a safe relative path) through the temporary folder, then rename into place."""
        self._counter += 1
        save_npy(self.dir, rel, array, self.tmp / f"{os.getpid()}-{self._counter}.npy", unlike=unlike)

    def close(self) -> None:
        # The temporary folder goes before the lock: once unlocked, the folder may be another job's, writing there.
        if hasattr(self, "_index"):
            os.close(self._index)
            del self._index
        if (reader := getattr(self, "_reader", None)) is not None:
            reader.close()
            self._reader = None
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)
            del self.tmp
        if hasattr(self, "_lock"):
            os.close(self._lock)
            del self._lock


def inside(out_dir: Path, rel: str) -> Path:
    """``out_dir/rel``, once sure that its folder, links followed, lies inside ``out_dir``: a name can be checked
    (``is_output_name``), but a folder handed over with a link in it (``OUT/sub -> /elsewhere``) would still lead
    writes and removals out. The file itself may be a link: a rename or an unlink replaces the link, not what it
    points to.

    Raises:
        OutputError: the folder leads outside ``out_dir``.
    """
    target = out_dir / rel
    root, folder = os.path.realpath(out_dir), os.path.realpath(target.parent)
    if folder != root and not folder.startswith(root.rstrip(os.sep) + os.sep):
        raise OutputError(f"{target}: its folder leads outside {out_dir} (to {folder}) through a symbolic link; "
                          "refusing to write or remove files there")
    return target


def save_npy(out_dir: Path, rel: str, array: np.ndarray, tmp: Path, *, unlike: bytes = b"") -> None:
    """Write ``out_dir/rel`` by saving to ``tmp`` (a unique name on the same file system) and renaming it into
    place: a reader, or a later run, never sees a partial file.

    ``unlike``: the ``file_id`` that the input's last record states for the file this one replaces. The new file
    must not have it, or a kill before the new record would leave the old record taking the new file for its own.
    Two files of one size get one id only when written within one tick of the file system's clock: a tick is 1 s
    on ext3 and HFS+, 2 s on FAT, a few ms on ext4. The new file's modification time is then moved 2 s on, before
    the rename, so that it differs on all of them.
    """
    with open(tmp, "wb") as f:
        np.save(f, array)
    if unlike not in (b"", NO_FILE_ID) and file_id(st := os.stat(tmp)) == unlike:
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    target = inside(out_dir, rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
