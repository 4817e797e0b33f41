"""Finding the inputs of an encode job: files, folders, globs and lists, streamed in a deterministic order.

Folders are walked depth first with names sorted, so every run sees the same order. Links that leave a folder and
links to folders are not followed unless asked, broken links, link loops and links to a folder above never are;
FIFOs, sockets and devices are reported as skipped without ever being opened (a FIFO would block, ``/dev/zero``
never ends). A folder that cannot be listed is an input that fails, not one skipped: its images were never seen,
so the job must not look complete.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..model.preprocessing import (
    file_kind,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif",
                            ".tiff"})
_GLOB_MAGIC = frozenset("*?[")


def is_pattern(arg: str) -> bool:
    """Whether ``arg`` is taken as a glob pattern: it names no existing path and holds ``*``, ``?`` or ``[``."""
    return bool(_GLOB_MAGIC & set(arg)) and not os.path.lexists(arg)


@dataclass(frozen=True)
class InputItem:
    """One input: where it is, how the user would recognise it, and its path under the output folder (less
    ``.npy``). ``skip`` is set when discovery decided, without opening it, that it must not be read; ``error``
    when discovery already failed on it (a folder it cannot list), with the reason, input named first.

    ``key``, the input's identity in ``index.jsonl`` (its records' ``path``), is ``input_key(path)`` unless given:
    the same file named ``photos/a.png``, ``./photos/a.png``, ``photos//a.png`` or by its absolute path, from any
    working folder, is one input, and resumes as one."""

    path: Path
    display: str  # the argument, or argument/relative path, as the user spelled it: records' "input", messages
    rel: str  # relative path that names the output
    skip: str | None = None
    key: str = ""
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", input_key(self.path))


def input_key(path: str | os.PathLike[str], cwd: str | None = None) -> str:
    """An input's identity: its absolute path, normalised (``./``, ``//``, ``a/..``) but with links kept.

    Not ``realpath``: two links to one file are two inputs, each with its own output, as discovery names them
    (``b.png -> a.png`` in a folder gives ``b.png.npy``). Lexical ``..`` may take ``link/../a.png`` for
    ``./a.png``; that only picks which record resume compares the file with, and a file whose size and time, or
    content, differ from that record's is encoded again. ``cwd``: the working folder, if already known (what
    ``os.path.abspath`` asks the system for on every call).
    """
    path = os.fspath(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(cwd or os.getcwd(), path))  # abspath


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


def discover(arguments: Iterable[str], *, follow_symlinks: bool = False,
             left_out: collections.Counter[str] | None = None) -> Iterator[InputItem]:
    """Every input named by ``arguments``, lazily and in a deterministic order.

    - a file (or a link the user named): taken as is, whatever its suffix;
    - a folder: recursed depth first with names sorted, keeping image suffixes; links leaving the folder and links to
      folders are skipped with a reason unless ``follow_symlinks``; links to a folder above (cycles), broken links
      and link loops always are (named as arguments, these two fail: the user asked for them);
    - a pattern with ``*``, ``?``, ``[`` or ``**`` that names no existing path: matched below its fixed leading
      folder, in the same order (matching nothing, it is handed on and fails: "no file matches this pattern");
    - anything else: an input that will fail with "cannot read".

    FIFOs, sockets, devices and folders met where an image is expected are skipped with a reason; nothing is opened.
    A folder that cannot be listed, the argument itself or one below it, is an input with ``error`` set.
    ``left_out`` counts the files a folder walk left out for their suffix, by suffix (``.heic``; ``""`` none).
    """
    for arg in arguments:
        if os.path.isdir(arg):
            yield from _walk(Path(arg), _display_root(arg), follow_symlinks, pattern=None, left_out=left_out)
        elif is_pattern(arg):
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


def _folders_up(real: str, known: dict[str, tuple[int, int] | None]) -> frozenset[tuple[int, int]]:
    """The identities (device, inode) of the folder ``real`` (a path with links resolved) and of every folder above
    it up to the root of the file system: a link to any of them leads back into a folder being walked. ``known``:
    the identities found so far in this walk, by real path (links into one tree share their folders above)."""
    found = set()
    while True:
        if real not in known:
            try:
                st = os.stat(real)
                known[real] = (st.st_dev, st.st_ino)
            except OSError:  # a folder above that cannot be looked at: nothing above it is known either
                known[real] = None
        ident = known[real]
        if ident is None:
            break
        found.add(ident)
        parent = os.path.dirname(real)
        if parent == real:
            break
        real = parent
    return frozenset(found)


def _walk(root: Path, root_display: str, follow_symlinks: bool, pattern: list[str] | None,
          left_out: collections.Counter[str] | None = None) -> Iterator[InputItem]:
    """Depth first, names sorted. An explicit stack, so no tree is too deep; one folder's entries at a time."""
    real_root = os.path.realpath(root)

    def item(path: str, rel: str, skip: str | None = None) -> InputItem:
        display = rel if not root_display else f"{root_display.rstrip('/')}/{rel}"
        return InputItem(Path(path), display, rel, skip)

    def unlisted(path: str, rel: str, e: OSError) -> InputItem:
        """A folder whose images cannot be seen: a failure (the job must not look complete), retried next run."""
        display = (f"{root_display.rstrip('/')}/{rel}" if root_display else rel).rstrip("/") or root_display or "."
        return InputItem(Path(path), display, rel, error=f"{display}: cannot list folder ({e.strerror or e})")

    def wanted(rel_parts: list[str], name: str) -> bool:
        if pattern is None:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES:
                return True
            if left_out is not None:
                left_out[suffix] += 1
            return False
        return _match(rel_parts, pattern, full=True)

    try:
        os.stat(root)
    except OSError as e:
        yield unlisted(str(root), "", e)
        return
    # Each frame: (entries left, relative parts of this folder, identities of this folder and of every folder above
    # it, links resolved: the folders a followed link must not lead back into, or the walk would loop or repeat)
    stack: list[tuple[Iterator[os.DirEntry[str]], list[str], frozenset[tuple[int, int]]]] = []

    def push(path: str, rel_parts: list[str], ancestors: frozenset[tuple[int, int]]) -> Iterator[InputItem]:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield unlisted(path, "/".join(rel_parts), e)
            return
        stack.append((iter(entries), rel_parts, ancestors))

    known: dict[str, tuple[int, int] | None] = {}  # for _folders_up
    yield from push(str(root), [], _folders_up(real_root, known))
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
            inside = target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)
            outside = f"link to {target}, outside {root_display or '.'}: not followed (use --follow-symlinks)"
            try:
                st = os.stat(entry.path)
            except OSError as e:
                if not wanted(parts, entry.name):
                    continue
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    yield item(entry.path, rel, f"broken symbolic link to {target}: not followed")
                elif e.errno == errno.ELOOP:  # leads nowhere, as a broken link does; named as an input, it fails
                    yield item(entry.path, rel, f"symbolic link loop ({e.strerror}): not followed")
                elif not inside and not follow_symlinks:  # never read, so its target's permissions do not matter
                    yield item(entry.path, rel, outside)
                else:  # its target is there but cannot be looked at (permission, I/O): the reader fails on it
                    yield item(entry.path, rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if pattern is not None and not _match(parts, pattern, full=False):
                    continue
                if ident in ancestors:  # first: --follow-symlinks would not follow it either
                    yield item(entry.path, rel, "link to a folder above it (a cycle): not followed")
                elif not follow_symlinks:
                    yield item(entry.path, rel, "link to a folder: not followed (use --follow-symlinks)")
                else:
                    yield from push(entry.path, parts, ancestors | _folders_up(target, known))
                continue
            if not wanted(parts, entry.name):
                continue
            if not inside and not follow_symlinks:
                yield item(entry.path, rel, outside)
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
                yield unlisted(entry.path, rel, e)
                continue
            yield from push(entry.path, parts, ancestors | {(st.st_dev, st.st_ino)})
        elif wanted(parts, entry.name):
            try:
                regular = entry.is_file(follow_symlinks=False)
                mode = 0 if regular else entry.stat(follow_symlinks=False).st_mode
            except OSError:
                regular, mode = True, 0  # vanished or unreadable: the reader reports it
            yield item(entry.path, rel, None if regular else f"{file_kind(mode)}, not a regular file: not opened")
