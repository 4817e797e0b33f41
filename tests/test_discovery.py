"""Discovery and resume where the environment, not an image, is at fault: folders that cannot be listed, files
that cannot be opened, links to enclosing folders and link loops.

The shell of these tests may run as root, for whom permission bits change nothing: permission failures are made
by patching ``os.scandir`` and ``os.open`` to raise what the system would, for the chosen paths only.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma3_vision.jobs.discovery import discover
from gemma3_vision.jobs.output_folder import INDEX_NAME
from gemma3_vision.jobs.pipeline import run_job
from gemma3_vision.model.preprocessing import PreprocessConfig

SMALL = PreprocessConfig(image_size=28)


def fake_encode(pixels: np.ndarray) -> np.ndarray:
    return pixels.mean(axis=(1, 2))[:, None, :]  # (B, 1, 3)


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(path)
    return path


def job(args, out: Path, **kw):
    return run_job(discover(args, follow_symlinks=kw.pop("follow_symlinks", False)), out, fake_encode, SMALL,
                   job_key="model-a", **kw)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]


def refuse(monkeypatch, name: str, paths: set[Path], err: int = errno.EACCES) -> None:
    """Make ``os.<name>`` fail with ``err`` for ``paths``, as it would for a user without the permission."""
    real = getattr(os, name)

    def fake(path, *args, **kwargs):
        if not isinstance(path, int) and Path(os.fspath(path)).absolute() in paths:  # int: a descriptor
            raise OSError(err, os.strerror(err), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.fixture()
def top(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "top"
    png(root / "a.png", 1)
    png(root / "locked" / "b.png", 2)
    monkeypatch.chdir(tmp_path)
    return root


# ------------------------------------------------------------------------------------- folders that cannot be listed

@pytest.mark.parametrize("given", ["top", "top/locked"])
def test_a_folder_that_cannot_be_listed_is_a_failure_tried_again_next_run(top, tmp_path, monkeypatch, given):
    # Before: "skipped: top/locked: cannot list folder (Permission denied)" and a job that looked complete.
    refuse(monkeypatch, "scandir", {top / "locked"})
    out = tmp_path / "out"
    summary = job([given], out)
    assert summary.any_failed and summary.failed == 1 and summary.skipped == 0, summary.line()
    failed = [r for r in records(out) if r["status"] == "error"]
    assert [(r["input"], r["error"]) for r in failed] == [
        ("top/locked", "top/locked: cannot list folder (Permission denied)")]
    again = job([given], out)  # still locked: tried, and failed, again; not "unchanged since an earlier run"
    assert (again.failed, again.failed_before) == (1, 0)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    fixed = job([given], out)
    assert (fixed.encoded, fixed.failed, fixed.failed_before) == (1, 0, 0)
    assert records(out)[-1]["input"] == "top/locked/b.png" and records(out)[-1]["status"] == "ok"


# --------------------------------------------------------------------------- failures of the environment, retried

def test_a_file_that_could_not_be_opened_is_tried_again_though_unchanged(top, tmp_path, monkeypatch):
    # chmod changes neither size nor mtime: resume took the file for "unchanged since an earlier run" for good.
    image = top / "a.png"
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        refuse(m, "open", {image})
        first = job(["top/a.png"], out)
        assert records(out)[-1]["error"] == "top/a.png: cannot read (Permission denied)"
        again = job(["top/a.png"], out)
    assert (first.failed, again.failed, again.failed_before) == (1, 1, 0)
    fixed = job(["top/a.png"], out)
    assert (fixed.encoded, fixed.failed_before) == (1, 0) and records(out)[-1]["status"] == "ok"


@pytest.mark.parametrize("when", ["opening", "reading"])
def test_an_io_error_is_tried_again(top, tmp_path, monkeypatch, when):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        if when == "opening":
            refuse(m, "open", {top / "a.png"}, errno.EIO)
        else:
            def eio(f):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            m.setattr("gemma3_vision.jobs.pipeline.content_digest", eio)
        job(["top/a.png"], out)
        assert "Input/output error" in records(out)[-1]["error"]
        assert job(["top/a.png"], out).failed == 1
    assert job(["top/a.png"], out).encoded == 1


def test_an_index_from_before_the_fix_retries_its_permission_failures_and_not_its_corrupt_files(top, tmp_path):
    # Records as earlier versions wrote them (the same fields): a corrupt file and a file that could not be opened.
    (top / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    job(["top/bad.png"], out)
    corrupt = records(out)[0]
    assert corrupt["content"] is not None  # it was read: its failure is its content's
    st = os.stat(top / "a.png")
    denied = {"input": "top/a.png", "path": str(top / "a.png"), "status": "error",
              "error": "top/a.png: cannot read (Permission denied)", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
              "content": None, "job": corrupt["job"]}
    (out / INDEX_NAME).write_text(json.dumps(corrupt) + "\n" + json.dumps(denied) + "\n")
    summary = job(["top/bad.png", "top/a.png"], out)
    assert (summary.encoded, summary.failed, summary.failed_before) == (1, 0, 1), summary.line()


def test_empty_and_missing_files_still_count_as_unchanged_failures(top, tmp_path):
    # Neither was opened, yet each failure is told by the file's facts: size 0, or no file at all (when it
    # appears, its size and time differ from the record's None and it is tried).
    (top / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    job(["top/empty.png", "top/gone.png"], out)
    again = job(["top/empty.png", "top/gone.png"], out)
    assert (again.failed, again.failed_before) == (0, 2)
    png(top / "gone.png", 3)
    assert job(["top/empty.png", "top/gone.png"], out).encoded == 1


# ------------------------------------------------------------------------------------------------------------ links

def test_a_link_to_a_folder_above_is_called_a_cycle_with_or_without_follow_symlinks(top):
    # Without --follow-symlinks it said "(use --follow-symlinks)", which then refused it as a cycle.
    os.symlink("..", top / "locked" / "up")
    for follow in (False, True):
        items = {i.display: i.skip for i in discover(["top"], follow_symlinks=follow)}
        assert items["top/locked/up"] == "link to a folder above it (a cycle): not followed", follow
    os.symlink("../elsewhere", top / "side")
    (top.parent / "elsewhere").mkdir()
    side = {i.display: i.skip for i in discover(["top"])}["top/side"]
    assert side == "link to a folder: not followed (use --follow-symlinks)"  # where the hint does work


def test_a_link_loop_is_named_as_one_and_treated_as_a_broken_link(top, tmp_path):
    # Inside a folder it was "broken symbolic link to .../self.png", given directly "Too many levels of symbolic
    # links". Either way it leads nowhere: skipped in a folder, as a broken link is; a failure when named, as a
    # broken link named is (the user asked for that input). Both now say why.
    os.symlink("self.png", top / "self.png")
    os.symlink("gone.png", top / "dangling.png")
    items = {i.display: i.skip for i in discover(["top"])}
    assert items["top/self.png"] == "symbolic link loop (Too many levels of symbolic links): not followed"
    assert items["top/dangling.png"].startswith("broken symbolic link to ")
    out = tmp_path / "out"
    job(["top/self.png", "top/dangling.png"], out)
    assert [r["error"] for r in records(out)] == ["top/self.png: cannot read (Too many levels of symbolic links)",
                                                  "top/dangling.png: cannot read (No such file or directory)"]


def test_a_link_to_a_file_that_cannot_be_looked_at_is_a_failure_not_a_broken_link(top, tmp_path, monkeypatch):
    # Its image is there: the job must not look complete (as for a file that cannot be opened).
    os.symlink("locked/b.png", top / "b.png")
    refuse(monkeypatch, "stat", {top / "b.png"})
    assert {i.display: i.skip for i in discover(["top"])}["top/b.png"] is None
    summary = job(["top"], tmp_path / "out")
    assert summary.failed == 1 and records(tmp_path / "out")[1]["error"] == "top/b.png: cannot read (Permission denied)"


def test_a_link_leaving_the_folder_is_skipped_whether_or_not_its_target_can_be_looked_at(top, tmp_path, monkeypatch):
    # It is never read without --follow-symlinks, so a target out of reach must not fail the job either.
    png(tmp_path / "elsewhere" / "c.png", 3)
    os.symlink(tmp_path / "elsewhere" / "c.png", top / "c.png")
    reason = f"link to {tmp_path / 'elsewhere' / 'c.png'}, outside top: not followed (use --follow-symlinks)"
    assert {i.display: i.skip for i in discover(["top"])}["top/c.png"] == reason
    refuse(monkeypatch, "stat", {top / "c.png"})
    assert {i.display: i.skip for i in discover(["top"])}["top/c.png"] == reason
    assert {i.display: i.skip for i in discover(["top"], follow_symlinks=True)}["top/c.png"] is None  # then read
