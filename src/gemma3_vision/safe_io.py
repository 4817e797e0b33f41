"""Opening files named by untrusted input (images, checkpoint files) and parsing their small JSON files.

One place for both, so every reader refuses the same things: a FIFO blocks ``open`` forever, ``/dev/zero`` never
ends, and deeply nested JSON overflows the parser's recursion (a ``RecursionError``, not a ``ValueError``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import FormatError

MAX_CONFIG_BYTES = 8 << 20  # config.json, preprocessor_config.json, an Ollama manifest: a few KB in practice
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
_BINARY = getattr(os, "O_BINARY", 0)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a FIFO", "a socket", ..."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, error: type[Exception] = FormatError, *,
                 allow_empty: bool = True) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file, without ever blocking.

    The kind is checked with ``stat`` before opening (opening a device can itself have effects), and again with
    ``fstat`` on the descriptor, opened non-blocking, since the path may have been swapped in between.

    Raises:
        error: missing or unreadable, not a regular file, or (unless ``allow_empty``) empty.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: expected a regular file, found {file_kind(st.st_mode)}")
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _BINARY)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size == 0 and not allow_empty):
        os.close(fd)
        found = "an empty file (0 bytes)" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
        raise error(f"{path}: expected a non-empty regular file, found {found}")
    return os.fdopen(fd, "rb")


def parse_json(path: str | os.PathLike, raw: bytes, what: str, error: type[Exception] = FormatError) -> Any:
    """Strict JSON: UTF-8, no duplicate keys (a second entry could hide behind the first), bounded nesting."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise error(f"{path}: {what} has a duplicate key {k!r}")
            d[k] = v
        return d

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: {what} is not UTF-8 JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: {what} nests too deeply for the JSON parser") from None


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = FormatError, *,
              max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A small JSON file from an untrusted source: regular files only, at most ``max_bytes``, parsed strictly.

    Raises:
        error: not a regular file, larger than ``max_bytes``, or not strict UTF-8 JSON.
    """
    with open_regular(path, error) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"{path}: {what} must be at most {max_bytes:,} bytes, found more")
    return parse_json(Path(path), raw, what, error)


def read_json_object(path: str | os.PathLike, what: str, error: type[Exception] = FormatError, *,
                     max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """``read_json`` for a file that must hold a JSON object."""
    data = read_json(path, what, error, max_bytes=max_bytes)
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object, found {json_type(data)}")
    return data


def json_type(value: Any) -> str:
    """A JSON value's kind, for messages: "an array", "a string", ..."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
