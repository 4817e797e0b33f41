"""The encode job without a model: discovery, records, resuming, locking, and memory that stays flat."""

from __future__ import annotations

import io
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma3_vision.errors import OutputError
from gemma3_vision.jobs.discovery import discover, input_key, read_list
from gemma3_vision.jobs.output_folder import (
    INDEX_NAME,
    LOCK_NAME,
    TMP_DIR_NAME,
    OutputFolder,
    ResumeState,
    load_index,
    short_hash,
)
from gemma3_vision.jobs.pipeline import JobSummary, run_job
from gemma3_vision.model.preprocessing import PreprocessConfig, pil_to_input

SMALL = PreprocessConfig(image_size=28)


def fake_encode(pixels: np.ndarray) -> np.ndarray:
    """(B, 28, 28, 3) → (B, 2, 3): per-image channel means and maxima, so outputs depend on the pixels."""
    return np.stack([pixels.mean(axis=(1, 2)), pixels.max(axis=(1, 2))], axis=1)


def png(path: Path, seed: int = 0, size: tuple[int, int] = (6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="PNG")  # whatever the suffix: explicit files keep any
    return path


def job(args, out: Path, **kw):
    follow = kw.pop("follow_symlinks", False)
    kw.setdefault("job_key", "model-a")
    return run_job(discover(args, follow_symlinks=follow), out, kw.pop("encode", fake_encode), SMALL, **kw)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]


def displays(args, **kw) -> list[str]:
    return [item.display for item in discover(args, **kw)]


@pytest.fixture()
def tree(tmp_path) -> Path:
    """root/ with images at two depths, non-images, an upper-case suffix, and two bad files."""
    root = tmp_path / "root"
    png(root / "b.png", 1)
    png(root / "a.png", 2)
    png(root / "sub" / "c.png", 3)
    png(root / "sub" / "deeper" / "d.png", 4)
    png(root / "UPPER.PNG", 5)
    (root / "notes.txt").write_text("not an image")
    (root / "bad.jpg").write_bytes(b"not a jpeg at all")
    (root / "sub" / "empty.png").write_bytes(b"")
    return root


# ---------------------------------------------------------------------------------------------------- discovery

def test_folders_recurse_in_sorted_order_keeping_image_suffixes(monkeypatch, tree):
    expected = ["root/UPPER.PNG", "root/a.png", "root/b.png", "root/bad.jpg", "root/sub/c.png",
                "root/sub/deeper/d.png", "root/sub/empty.png"]
    monkeypatch.chdir(tree.parent)
    assert displays(["root"]) == expected
    assert displays(["root/"]) == expected  # a trailing slash names the same inputs
    assert [i.rel for i in discover(["root"])][:2] == ["UPPER.PNG", "a.png"]


def test_explicit_files_are_taken_whatever_their_suffix(monkeypatch, tree):
    monkeypatch.chdir(tree)
    items = list(discover(["notes.txt", "sub/c.png", "missing.png"]))
    assert [(i.display, i.rel, i.skip) for i in items] == [
        ("notes.txt", "notes.txt", None), ("sub/c.png", "c.png", None), ("missing.png", "missing.png", None)]


def test_glob_patterns(monkeypatch, tree):
    monkeypatch.chdir(tree.parent)
    assert displays(["root/*.png"]) == ["root/a.png", "root/b.png"]  # case-sensitive, as in the shell
    assert displays(["root/**/*.png"]) == ["root/a.png", "root/b.png", "root/sub/c.png",
                                           "root/sub/deeper/d.png", "root/sub/empty.png"]
    assert displays(["root/s?b/[cd].png"]) == ["root/sub/c.png"]
    monkeypatch.chdir(tree)
    assert displays(["*.png"]) == ["a.png", "b.png"]
    assert displays([str(tree / "sub" / "*.png")]) == [str(tree / "sub" / "c.png"), str(tree / "sub" / "empty.png")]
    assert displays(["nowhere/*.png"]) == ["nowhere/*.png"]  # fails later as a missing input


def test_glob_matching_a_folder_skips_it_with_a_reason(monkeypatch, tree):
    (tree / "album.png").mkdir()
    monkeypatch.chdir(tree)
    items = {i.display: i.skip for i in discover(["*.png"])}
    assert items["album.png"] == "a folder, not a regular file: not opened"
    assert items["a.png"] is None


def test_lists_from_a_file_and_from_stdin(tmp_path):
    (tmp_path / "list.txt").write_text("a.png\n\n  \nsub dir/b c.png\r\nlast.png")
    assert list(read_list(str(tmp_path / "list.txt"))) == ["a.png", "sub dir/b c.png", "last.png"]
    assert list(read_list("-", stdin=io.StringIO("x.png\ny.png\n"))) == ["x.png", "y.png"]


def test_links_leaving_the_folder_are_not_followed_unless_asked(monkeypatch, tree, tmp_path):
    outside = png(tmp_path / "outside" / "o.png", 9)
    os.symlink(outside, tree / "out.png")
    os.symlink(tree / "a.png", tree / "in.png")  # inside the tree: followed
    os.symlink(tmp_path / "outside", tree / "linkdir")
    os.symlink(tmp_path / "nothing.png", tree / "broken.png")
    monkeypatch.chdir(tree.parent)
    items = {i.display: i.skip for i in discover(["root"])}
    assert items["root/in.png"] is None
    assert "outside root: not followed (use --follow-symlinks)" in items["root/out.png"]
    assert items["root/linkdir"] == "link to a folder: not followed (use --follow-symlinks)"
    assert items["root/broken.png"].startswith("broken symbolic link")
    followed = {i.display: i.skip for i in discover(["root"], follow_symlinks=True)}
    assert followed["root/out.png"] is None and followed["root/linkdir/o.png"] is None


def test_link_cycles_are_never_followed(monkeypatch, tree):
    os.symlink("..", tree / "sub" / "up")
    monkeypatch.chdir(tree.parent)
    items = [(i.display, i.skip) for i in discover(["root"], follow_symlinks=True)]
    assert ("root/sub/up", "link to a folder above it (a cycle): not followed") in items
    assert len(items) == len({d for d, _ in items}) == 8


@pytest.mark.parametrize("target", ["parent", "top", "filesystem root"])
def test_links_to_folders_above_the_input_folder_are_cycles_too(monkeypatch, tree, target):
    # root/sub/x -> a folder above root: root is inside it, so following the link would encode root again (or, for
    # /, walk the whole file system)
    os.symlink({"parent": tree.parent, "top": "../../..", "filesystem root": "/"}[target], tree / "sub" / "x")
    monkeypatch.chdir(tree.parent)
    items = [(i.display, i.skip) for i in discover(["root"], follow_symlinks=True)]
    assert ("root/sub/x", "link to a folder above it (a cycle): not followed") in items
    assert len(items) == 8, items


def test_a_followed_link_brings_its_own_folders_above(monkeypatch, tree, tmp_path):
    # root/far -> other/deep; other/deep/back -> other, which is above deep: a cycle once far is followed
    deep = tmp_path / "other" / "deep"
    png(deep / "e.png", 5)
    os.symlink(tmp_path / "other", deep / "back")
    os.symlink(deep, tree / "far")
    monkeypatch.chdir(tree.parent)
    items = dict((i.display, i.skip) for i in discover(["root"], follow_symlinks=True))
    assert items["root/far/e.png"] is None
    assert items["root/far/back"] == "link to a folder above it (a cycle): not followed"
    assert not any(d.startswith("root/far/back/") for d in items), sorted(items)


def test_special_files_are_skipped_never_opened(monkeypatch, tree, tmp_path):
    os.mkfifo(tree / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "sock.png"))
        monkeypatch.chdir(tree.parent)
        items = {i.display: i.skip for i in discover(["root", "root/pipe.jpg", "/dev/null"])}
    assert items["root/pipe.jpg"] == "a FIFO, not a regular file: not opened"
    assert items["root/sock.png"] == "a socket, not a regular file: not opened"
    assert items["/dev/null"] == "a character device, not a regular file: not opened"


# --------------------------------------------------------------------------------------------------- the job


def test_a_lost_wake_up_does_not_hang_the_job(monkeypatch, tree, tmp_path):
    # A signal-raised exception (Ctrl-C, SIGTERM) inside Condition.notify can leave a stale waiter that takes the
    # writer's wake-up: the job then hung in join() with the final None queued. Simulated: every put notifies no one.
    class LossyQueue(queue.Queue):
        def put(self, item, block=True, timeout=None):
            with self.mutex:
                self._put(item)

    monkeypatch.setattr(queue, "Queue", LossyQueue)
    finished = []
    runner = threading.Thread(target=lambda: finished.append(job([str(tree)], tmp_path / "out")), daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert finished and finished[0].encoded > 0, "run_job still waiting after 30 s"


def test_the_summary_gives_a_slow_rate_as_seconds_per_image():
    fast = JobSummary(encoded=89, seconds=5.0)
    assert fast.line() == "encoded 89, failed 0, skipped 0 in 5.0 s (17.80 images/s)"
    slow = JobSummary(encoded=3, seconds=620.6)  # 0.0048 images/s, which would print as 0.00
    assert slow.line() == "encoded 3, failed 0, skipped 0 in 620.6 s (206.9 s/image)"
    nothing = JobSummary(skipped=2, seconds=1.0)  # no rate: over no image it would read "0.00 images/s"
    assert nothing.line() == "encoded 0, failed 0, skipped 2 in 1.0 s"
    assert JobSummary(skipped=2, seconds=1.0, backend="torch").line() == "encoded 0, failed 0, skipped 2 in 1.0 s on torch"


def test_every_input_gets_one_record_and_the_job_goes_on(monkeypatch, tree, tmp_path):
    out = tmp_path / "out"
    os.mkfifo(tree / "pipe.png")
    monkeypatch.chdir(tree.parent)
    summary = job(["root", "root/missing.png"], out, batch_size=2)
    assert (summary.encoded, summary.failed, summary.skipped) == (5, 3, 1)
    by_input = {r["input"]: r for r in records(out)}
    assert len(by_input) == len(records(out)) == 9
    assert by_input["root/pipe.png"]["status"] == "skipped"
    assert "not an image in an allowed format" in by_input["root/bad.jpg"]["error"]
    assert "empty file" in by_input["root/sub/empty.png"]["error"]
    assert "cannot read (No such file or directory)" in by_input["root/missing.png"]["error"]
    for r in by_input.values():
        if r["status"] == "ok":
            array = np.load(out / r["output"])
            assert array.shape == (2, 3) == tuple(r["shape"])
    assert (out / "sub" / "deeper" / "d.png.npy").is_file()
    assert not (out / TMP_DIR_NAME).exists()
    assert summary.line().startswith("encoded 5, failed 3, skipped 1 in ")


def test_outputs_equal_the_model_applied_to_each_image_alone(tree, tmp_path):
    from gemma3_vision.model.preprocessing import preprocess_one

    out = tmp_path / "out"
    job([str(tree)], out, batch_size=3)
    for r in records(out):
        if r["status"] == "ok":
            expected = fake_encode(preprocess_one(r["input"], SMALL)[None])[0]
            np.testing.assert_array_equal(np.load(out / r["output"]), expected)


def test_rerun_appends_nothing_and_counts_what_was_done(tree, tmp_path):
    out = tmp_path / "out"
    first = job([str(tree)], out)
    lines = (out / INDEX_NAME).read_bytes()
    second = job([str(tree)], out)
    assert (out / INDEX_NAME).read_bytes() == lines
    assert (second.encoded, second.failed, second.done_before, second.failed_before) == (0, 0, 5, 2)
    assert second.any_failed and first.any_failed  # unchanged failures still fail the job
    assert "failed 2 (2 unchanged since an earlier run), skipped 5 (5 already encoded)" in second.line()


def test_resume_notices_what_changed(tree, tmp_path):
    out = tmp_path / "out"
    job([str(tree)], out)
    n = len(records(out))
    os.utime(tree / "a.png", ns=(1, 1))  # touched, same bytes: still done (found by content hash)
    png(tree / "b.png", 99)  # new content: encoded again into the same file
    (out / "sub" / "c.png.npy").unlink()  # output deleted: encoded again
    png(tree / "bad.jpg", 7)  # the bad file was fixed: encoded now
    summary = job([str(tree)], out)
    new = records(out)[n:]
    assert sorted(r["input"].rsplit("/", 1)[1] for r in new) == ["b.png", "bad.jpg", "c.png"]
    assert all(r["status"] == "ok" for r in new)
    assert {r["output"] for r in new} == {"b.png.npy", "bad.jpg.npy", "sub/c.png.npy"}
    assert (summary.encoded, summary.done_before) == (3, 3)


SPELLINGS = [  # (working folder under tmp_path, argument): one folder, written as users write it
    ("", "root"), ("", "./root"), ("", "root//"), ("", "root/sub/../"), ("", "ABS"), ("elsewhere", "../root")]


def test_an_input_is_one_input_however_its_path_is_spelled(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    job(["root"], out)
    index = (out / INDEX_NAME).read_bytes()
    for cwd, arg in SPELLINGS[1:]:
        monkeypatch.chdir(tmp_path / cwd)
        summary = job([str(tree) if arg == "ABS" else arg], tmp_path / "out")
        assert (summary.encoded, summary.failed, summary.done_before, summary.failed_before) == (0, 0, 5, 2), arg
        assert (out / INDEX_NAME).read_bytes() == index, f"{arg} from {cwd or '.'}: records appended"
    assert not [name for name in npy_files(out) if "~" in name]
    # Files given one by one, from a list, in one run with two spellings: the second spelling is the same input.
    monkeypatch.chdir(tmp_path)
    summary = job(read_list("-", io.StringIO("./root/a.png\nroot/b.png\n" + f"{tree}/b.png\n")), out)
    assert (summary.encoded, summary.done_before, summary.skipped) == (0, 2, 1)  # b.png twice: once
    # A changed file is recorded with the spelling used now, into the file it had.
    png(tree / "a.png", 99)
    assert job(["./root"], out).encoded == 1
    new = records(out)[-1]
    assert (new["input"], new["output"], new["path"]) == ("./root/a.png", "a.png.npy", str(tree / "a.png"))


def test_an_index_from_before_records_stated_their_path_resumes_encoding_nothing(tree, tmp_path, monkeypatch):
    # Records as versions before "path" wrote them: the input only, relative to the working folder of that run.
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    job(["root"], out)
    old = [json.dumps({k: v for k, v in r.items() if k != "path"}) + "\n" for r in records(out)]
    (out / INDEX_NAME).write_text("".join(old))
    for arg in ["root", "./root", str(tree)]:  # the same spelling, and others of it from the same folder
        summary = job([arg], out)
        assert (summary.encoded, summary.failed, summary.done_before, summary.failed_before) == (0, 0, 5, 2), arg
    assert (out / INDEX_NAME).read_text() == "".join(old)
    assert not [name for name in npy_files(out) if "~" in name]


def test_unchanged_failures_are_reported_with_their_recorded_reason(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    job(["root"], out)
    reasons = {r["input"]: r["error"] for r in records(out) if r["status"] == "error"}
    assert sorted(reasons) == ["root/bad.jpg", "root/sub/empty.png"]
    told: list[tuple[str, str | None]] = []
    summary = job(["root"], out, on_failed_before=lambda name, reason: told.append((name, reason)))
    assert summary.failed_before == 2 and told == list(reasons.items())
    # Spelled another way, the reason names the input as it is spelled now.
    told.clear()
    job(["./root"], out, on_failed_before=lambda name, reason: told.append((name, reason)))
    assert told == [("./" + name, "./" + reason) for name, reason in reasons.items()]
    assert all(reason.startswith("root/") for reason in reasons.values())


def test_a_missing_input_is_named_once_in_its_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job(["nope/", "./gone.png", "x//gone.png"], tmp_path / "out")
    assert [(r["input"], r["error"]) for r in records(tmp_path / "out")] == [
        ("nope/", "nope/: cannot read (No such file or directory)"),
        ("./gone.png", "./gone.png: cannot read (No such file or directory)"),
        ("x//gone.png", "x//gone.png: cannot read (No such file or directory)")]


def test_a_different_model_or_option_encodes_again(tree, tmp_path):
    out = tmp_path / "out"
    job([str(tree)], out)
    assert job([str(tree)], out, job_key="model-b").encoded == 5
    assert job([str(tree)], out, job_key="model-b").encoded == 0


def test_a_raised_pixel_limit_retries_what_it_refused(tmp_path):
    big = png(tmp_path / "in" / "big.png", size=(100, 100))
    out = tmp_path / "out"
    assert job([str(big)], out, max_pixels=5000).failed == 1
    assert job([str(big)], out, max_pixels=5000).failed_before == 1
    assert job([str(big)], out, max_pixels=None).encoded == 1


def test_overwrite_redoes_everything_after_a_marker_keeping_the_earlier_records(tree, tmp_path):
    out = tmp_path / "out"
    job([str(tree)], out)
    old = (out / INDEX_NAME).read_bytes()
    summary = job([str(tree)], out, overwrite=True)
    assert (summary.encoded, summary.failed, summary.done_before) == (5, 2, 0)
    assert (out / INDEX_NAME).read_bytes().startswith(old)
    assert records(out)[7:] == [{"status": "overwrite"}, *records(out)[8:]] and len(records(out)) == 15
    summary = job([str(tree)], out)  # what the overwrite recorded counts
    assert (summary.encoded, summary.failed_before, summary.done_before) == (0, 2, 5)
    assert sorted(p.name for p in out.glob("*.npy")) == ["UPPER.PNG.npy", "a.png.npy", "b.png.npy"]


def test_torn_last_line_is_cut_before_appending(tree, tmp_path):
    out = tmp_path / "out"
    job([str(tree)], out)
    complete = records(out)
    ok = next(r for r in complete if r["status"] == "ok")
    (out / ok["output"]).unlink()  # so the rerun appends a record after the torn tail
    with open(out / INDEX_NAME, "ab") as f:
        f.write(b'{"input": "torn", "sta')  # a kill in the middle of a write
    state, good_end = load_index(out / INDEX_NAME)
    assert len(state) == 7 and good_end < (out / INDEX_NAME).stat().st_size
    assert job([str(tree)], out).encoded == 1
    assert records(out)[:7] == complete and records(out)[7]["input"] == ok["input"]


def test_stale_temporaries_are_removed_and_a_second_job_is_refused(tree, tmp_path):
    out = tmp_path / "out"
    (out / TMP_DIR_NAME).mkdir(parents=True)
    (out / TMP_DIR_NAME / "123-4.npy").write_bytes(b"half a file")
    held = OutputFolder(out)
    try:
        assert not (out / TMP_DIR_NAME / "123-4.npy").exists()
        with pytest.raises(OutputError, match="another encode job is writing to this folder"):
            job([str(tree)], out)
    finally:
        held.close()
    assert job([str(tree)], out).encoded == 5


def test_the_temporary_folder_goes_while_the_lock_is_held(tmp_path, monkeypatch):
    """Removed after unlocking, it could be another job's: one that took the lock in between and writes there."""
    fcntl = pytest.importorskip("fcntl")  # without flock there is no lock to hold
    import shutil

    out = tmp_path / "out"
    folder = OutputFolder(out)
    real_rmtree, held = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        fd = os.open(out / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    folder.close()
    assert held == [True] and not (out / TMP_DIR_NAME).exists()
    OutputFolder(out).close()  # and released after


def test_unusable_output_folder_is_an_output_error(tree, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot use as the output folder"):
        job([str(tree)], tmp_path / "file" / "out")


def test_inputs_named_twice_come_once_and_colliding_names_stay_distinct(tmp_path):
    png(tmp_path / "x" / "pic.png", 1)
    png(tmp_path / "y" / "pic.png", 2)
    png(tmp_path / "y" / "PIC.png", 3)  # same name on a case-insensitive disk
    args = [str(tmp_path / "x" / "pic.png"), str(tmp_path / "y" / "pic.png"), str(tmp_path / "y" / "PIC.png"),
            str(tmp_path / "x" / "pic.png")]
    out = tmp_path / "out"
    summary = job(args, out)
    assert (summary.encoded, summary.skipped) == (3, 1)
    names = [r["output"] for r in records(out)]
    assert names == ["pic.png.npy", "pic.png~2.npy", "PIC.png~3.npy"]
    # A later job with one more colliding input keeps the earlier names and takes a fresh one
    png(tmp_path / "z" / "pic.png", 4)
    job([*args, str(tmp_path / "z" / "pic.png")], out)
    assert records(out)[-1]["output"] == "pic.png~4.npy"


# -------------------------------------------------------------------------------------------- extra output files

def with_extras(*names: str):
    """``fake_encode`` plus extra arrays ``names`` (``layer13``, ``pooled``), each offset so files differ."""
    def encode(pixels: np.ndarray) -> dict[str, np.ndarray]:
        main = fake_encode(pixels)
        return {"": main, **{name: main + i + 1 for i, name in enumerate(names)}}
    return encode


def two_views(img: Image.Image) -> tuple[np.ndarray, dict]:
    """A ``MakeInput`` with one crop, as Pan & Scan makes them: files ``.crop1.npy``, ``.crop1.layer13.npy``..."""
    view = pil_to_input(img, SMALL)  # (S, S, 3)
    return np.stack([view, view / 2]), {}


def files_of(record: dict) -> list[str]:
    return [record["output"], *record.get("outputs", {}).values()]


def npy_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))


def test_encoding_again_removes_extra_files_the_input_no_longer_has(tmp_path, monkeypatch):
    png(tmp_path / "in" / "a.png", 1)
    png(tmp_path / "in" / "b.png", 2)
    out = tmp_path / "out"
    job([str(tmp_path / "in")], out, encode=with_extras("layer13", "pooled"), make_input=two_views)
    assert len(npy_files(out)) == 2 * 6  # per input: main, layer13, pooled, crop1, crop1.layer13, crop1.pooled

    # Each removal happens once the input's new record is the index's last line and every file it lists exists;
    # only the main file goes before, so that no record counts the input as done while its extras are replaced.
    real_unlink, removed, replaced = os.unlink, [], []

    def unlink(path, *args, **kwargs):
        if "dir_fd" not in kwargs and Path(path).is_relative_to(out):
            name = Path(path).relative_to(out).as_posix()
            if name == "a.png.npy":
                assert records(out)[-1]["input"] == f"{tmp_path}/in/b.png" and not replaced
                replaced.append(name)
            else:
                last = records(out)[-1]
                assert last["input"] == f"{tmp_path}/in/a.png" and all((out / f).is_file() for f in files_of(last))
                removed.append(name)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    # Only a.png, with another model and fewer outputs: its old layer13 and crop files go, b.png keeps all of its.
    summary = job([str(tmp_path / "in" / "a.png")], out, job_key="model-b", encode=with_extras("pooled"))
    assert summary.encoded == 1 and replaced == ["a.png.npy"]
    assert sorted(removed) == ["a.png.crop1.layer13.npy", "a.png.crop1.npy", "a.png.crop1.pooled.npy",
                               "a.png.layer13.npy"]
    assert npy_files(out) == ["a.png.npy", "a.png.pooled.npy", *(f"b.png.{s}npy" for s in (
        "crop1.layer13.", "crop1.", "crop1.pooled.", "layer13.", "", "pooled."))]
    np.testing.assert_array_equal(np.load(out / "a.png.pooled.npy"), np.load(out / "a.png.npy") + 1)


def test_overwrite_removes_the_extra_files_named_by_earlier_records(tmp_path):
    png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    job([str(tmp_path / "in")], out, encode=with_extras("layer13"))
    job([str(tmp_path / "in")], out, overwrite=True)
    assert npy_files(out) == ["a.png.npy"]
    assert "outputs" in records(out)[0] and "outputs" not in records(out)[-1]


def test_overwrite_killed_or_failing_loses_no_inputs_naming(tmp_path, monkeypatch):
    a, b = png(tmp_path / "in" / "a.png", 1), png(tmp_path / "in" / "b.png", 2)
    out = tmp_path / "out"
    job([str(a), str(b)], out, encode=with_extras("layer13"))
    a.write_bytes(b"corrupt now")
    real_append = OutputFolder.append

    def append(self, record):
        real_append(self, record)
        if record.get("input") == str(a):
            raise Killed  # a's error is recorded, b not reached

    monkeypatch.setattr(OutputFolder, "append", append)
    with pytest.raises(Killed):
        job([str(a), str(b)], out, overwrite=True)
    monkeypatch.undo()
    assert [r["status"] for r in records(out)] == ["ok", "ok", "overwrite", "error"]
    # Overwritten again and killed again, before its first input's record: the first marker's records still name.
    monkeypatch.setattr(OutputFolder, "append", lambda self, r: kill() if "input" in r else real_append(self, r))
    with pytest.raises(Killed):
        job([str(a), str(b)], out, overwrite=True)
    monkeypatch.undo()
    assert [r["status"] for r in records(out)] == ["ok", "ok", "overwrite", "error", "overwrite"]
    # A plain run then: b, which the overwrite never reached, is not done; a failed in it and is retried.
    png(a, 3)
    summary = job([str(a), str(b)], out)
    assert (summary.encoded, summary.done_before) == (2, 0)
    assert npy_files(out) == ["a.png.npy", "b.png.npy"]  # both names kept, both layer13 files dropped
    np.testing.assert_array_equal(np.load(out / "a.png.npy"), expected(a))


@pytest.mark.parametrize("reverse", [False, True])
def test_no_input_is_named_like_another_inputs_extra_file(tmp_path, reverse):
    # Explicit files keep any suffix: each of these names is also an extra file of a.png (or of a.png.crop1).
    names = ["a.png", "a.png.layer13", "a.png.crop1", "a.png.crop1.layer13"]
    args = [str(png(tmp_path / "in" / name, seed)) for seed, name in enumerate(names)]
    out = tmp_path / "out"
    job(args[::-1] if reverse else args, out, encode=with_extras("layer13"), make_input=two_views)
    written = [f.casefold() for r in records(out) for f in files_of(r)]
    assert len(written) == 4 * 4 and len(set(written)) == len(written), written
    assert npy_files(out) == sorted(written)
    for r in records(out):  # each main file holds its own image, overwritten by no other input's extras
        expected = fake_encode(pil_to_input(Image.open(r["input"]), SMALL)[None])[0]
        np.testing.assert_array_equal(np.load(out / r["output"]), expected, err_msg=r["input"])


def test_an_input_named_like_a_later_inputs_extra_file_keeps_its_file(tmp_path):
    crop_named = str(png(tmp_path / "in" / "x.png.crop1", 1))
    out = tmp_path / "out"
    job([crop_named], out)  # x.png.crop1.npy: the name x.png's crop would get
    job([str(png(tmp_path / "in" / "x.png", 2)), crop_named], out, job_key="pas", make_input=two_views)
    assert [r["output"] for r in records(out)] == ["x.png.crop1.npy", "x.png~2.npy", "x.png.crop1.npy"]
    assert npy_files(out) == ["x.png.crop1.crop1.npy", "x.png.crop1.npy", "x.png~2.crop1.npy", "x.png~2.npy"]


def test_resume_state_keeps_extra_names_only_for_inputs_that_have_them():
    base = {"status": "ok", "bytes": 1, "mtime_ns": 2, "content": "c", "job": "k"}
    state = ResumeState()
    state.add({**base, "input": "plain.png", "output": "plain.png.npy"})
    # Listed, but not files this library names (a hand-edited index): ignored, so never removed.
    odd = {"pooled": "../../elsewhere.npy", "mine": "a.png.mine.npy", "layer\u0663": "a.png.layer\u0663.npy"}
    state.add({**base, "input": "a.png", "output": "a.png.npy", "outputs": {
        "layer13": "a.png.layer13.npy", "crop1.pooled": "a.png.crop1.pooled.npy", **odd}})
    assert len(state.prior(input_key("plain.png"))) == 1 + 16 + 8 + len("plain.png.npy")  # nothing stored for extras
    assert state.output_of(state.prior(input_key("a.png"))) == "a.png.npy"
    assert state.extras_of(state.prior(input_key("a.png"))) == ["layer13", "crop1.pooled"]
    new = {**base, "input": "a.png", "output": "a.png.npy", "outputs": {"layer13": "a.png.layer13.npy"}}
    assert state.stale_outputs(new) == ["a.png.crop1.pooled.npy"]
    # A failure, then a skip: the input keeps its name and its last ok record's extras, and nothing more.
    state.add({**base, "input": "a.png", "status": "error"})
    state.add({"input": "a.png", "status": "skipped", "reason": "a FIFO"})
    assert state.output_of(state.prior(input_key("a.png"))) == "a.png.npy"
    assert state.stale_outputs(new) == ["a.png.crop1.pooled.npy"]
    state.add({**base, "input": "never-ok.png", "status": "error"})
    assert state.prior(input_key("never-ok.png")) is not None and state.output_of(state.prior(input_key("never-ok.png"))) == ""
    assert len(state.prior(input_key("never-ok.png"))) == 1 + 16 + 8  # + where its record is, for its reason


def test_stale_names_that_may_be_another_inputs_file_are_kept():
    # A folder named before output names avoided extra files: a.png's extras share names with other inputs.
    base = {"status": "ok", "bytes": 1, "mtime_ns": 2, "content": "c", "job": "k"}
    state = ResumeState()
    state.add({**base, "input": "a.png", "output": "a.png.npy", "outputs": {
        "layer13": "a.png.layer13.npy", "crop1.pooled": "a.png.crop1.pooled.npy", "pooled": "a.png.pooled.npy"}})
    state.add({**base, "input": "a.png.layer13", "output": "a.png.layer13.npy"})  # its main file
    state.add({**base, "input": "a.png.crop1", "output": "a.png.crop1.npy"})  # may own a.png.crop1.pooled.npy
    assert state.stale_outputs({**base, "input": "a.png", "output": "a.png.npy"}) == ["a.png.pooled.npy"]


# ----------------------------------------------------------------------------------------------- hostile index

def ok_record(display: str, output: str, **extra) -> str:
    return json.dumps({"input": display, "status": "ok", "output": output, "bytes": 1, "mtime_ns": 2,
                       "content": "c", "job": "old", **extra}) + "\n"


def files_outside(root: Path, out: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_relative_to(out)}


@pytest.mark.parametrize("hostile", ["../victim.npy", "sub/../../victim.npy", "ABS", f"{TMP_DIR_NAME}/a.png.npy",
                                     f"{TMP_DIR_NAME.upper()}/a.png.npy", "../victim.txt", ""])
def test_an_index_naming_files_outside_the_folder_never_touches_them(tmp_path, hostile):
    # A crafted index claims a.png was encoded into a file outside OUT (or into the job's own temporary folder,
    # which every job empties), with an extra file, so that re-encoding it would also remove that file first.
    a = png(tmp_path / "in" / "a.png", 1)
    (tmp_path / "victim.npy").write_bytes(b"precious")
    (tmp_path / "victim.txt").write_bytes(b"precious")
    (tmp_path / "victim.pooled.npy").write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    hostile = str(tmp_path / "victim.npy") if hostile == "ABS" else hostile
    (out / INDEX_NAME).write_text(ok_record(str(a), hostile, outputs={"pooled": hostile[:-4] + ".pooled.npy"}))
    before = files_outside(tmp_path, out)
    with pytest.warns(UserWarning, match=f"{INDEX_NAME}: 1 line ignored"):
        summary = job([str(a)], out, encode=with_extras("pooled"))
    assert files_outside(tmp_path, out) == before
    assert summary.encoded == 1 and records(out)[-1]["output"] == "a.png.npy"
    assert npy_files(out) == ["a.png.npy", "a.png.pooled.npy"]
    np.testing.assert_array_equal(np.load(out / "a.png.npy"), expected(a))
    with pytest.warns(UserWarning, match="1 line ignored"):  # the line stays; the input's new record counts
        assert job([str(a)], out, encode=with_extras("pooled")).done_before == 1


def test_resume_state_ignores_ok_records_naming_what_the_library_never_writes():
    state = ResumeState()
    state.add({"input": "a.png", "status": "ok", "output": "a.png.npy", "job": "k"})
    for output in ["../a.npy", "/abs/a.npy", "x/../../a.npy", "a.png", "a.png.npy\0", 7,
                   f"{TMP_DIR_NAME}/a.png.npy", f"./{TMP_DIR_NAME}/a.npy"]:
        state.add({"input": "a.png", "status": "ok", "output": output, "job": "other"})
    assert state.bad_lines == 8 and state.output_of(state.prior(input_key("a.png"))) == "a.png.npy"  # the last good word
    assert ResumeState.facts_key_of(state.prior(input_key("a.png"))) == short_hash(None, None, "k")
    state.add({"input": "b.png", "status": "ok", "output": f"{TMP_DIR_NAME}.npy", "job": "k"})  # beside it: fine
    assert state.output_of(state.prior(input_key("b.png"))) == f"{TMP_DIR_NAME}.npy"


def test_deeply_nested_index_lines_are_bad_lines(tmp_path):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    job([str(a)], out)
    with open(out / INDEX_NAME, "a") as f:
        f.write("[" * 100_000 + "\n" + "{" * 100_000 + "\n")
    state, good_end = load_index(out / INDEX_NAME)
    assert (len(state), state.bad_lines, good_end) == (1, 2, (out / INDEX_NAME).stat().st_size)
    with pytest.warns(UserWarning, match="2 lines ignored"):
        assert job([str(a)], out).done_before == 1
    assert not (out / TMP_DIR_NAME).exists()


def test_an_input_folder_with_a_subfolder_named_like_the_temporary_folder(tmp_path):
    # Its outputs would go into OUT/.gemma3-vision-tmp/, which every job empties: they go one folder over.
    png(tmp_path / "in" / TMP_DIR_NAME / "a.png", 1)
    png(tmp_path / "in" / "b.png", 2)
    out = tmp_path / "out"
    assert job([str(tmp_path / "in")], out).encoded == 2
    assert npy_files(out) == [f"{TMP_DIR_NAME}~2/a.png.npy", "b.png.npy"]
    assert not (out / TMP_DIR_NAME).exists()
    assert job([str(tmp_path / "in")], out).done_before == 2
    state = ResumeState()
    assert state.free(f"{TMP_DIR_NAME}.npy") and state.free(f"{TMP_DIR_NAME}~2/a.png.npy")
    assert not state.free(f"{TMP_DIR_NAME}/a.png.npy") and not state.free(f"{TMP_DIR_NAME.upper()}/a.png.npy")


# ---------------------------------------------------------------------------------------------- failures, kills

class Killed(BaseException):
    """A ``kill -9`` at a chosen point of the writer: the job stops there and the folder stays as it is."""


def kill(*args, **kwargs):
    raise Killed


def expected(image: Path) -> np.ndarray:
    return fake_encode(pil_to_input(Image.open(image), SMALL)[None])[0]


def test_an_input_keeps_its_name_through_failures_and_drops_its_last_ok_records_extras(tmp_path):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    job([str(a)], out, encode=with_extras("layer13", "pooled"))
    a.write_bytes(b"corrupt now")
    assert job([str(a)], out).failed == 1
    # The last good output stays, named only by the ok record the error superseded.
    assert npy_files(out) == ["a.png.layer13.npy", "a.png.npy", "a.png.pooled.npy"]
    a.unlink()
    os.mkfifo(a)
    assert job([str(a)], out).skipped == 1
    a.unlink()
    png(a, 2)
    assert job([str(a)], out, encode=with_extras("pooled")).encoded == 1
    assert records(out)[-1]["output"] == "a.png.npy"
    assert npy_files(out) == ["a.png.npy", "a.png.pooled.npy"]  # the old layer13 file went after the new record
    np.testing.assert_array_equal(np.load(out / "a.png.npy"), expected(a))


@pytest.mark.parametrize("coarse_clock", [False, True])
def test_a_reencode_killed_before_its_record_is_encoded_again(tmp_path, monkeypatch, coarse_clock):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    job([str(a)], out)
    written = os.stat(out / "a.png.npy").st_mtime_ns
    if coarse_clock:  # the new file gets the old one's time, as when both fall in one tick of a 1-2 s clock
        real_save = np.save

        def save(f, array):
            real_save(f, array)
            f.flush()
            os.utime(f.fileno(), ns=(written, written))

        monkeypatch.setattr(np, "save", save)
    monkeypatch.setattr(OutputFolder, "append", kill)  # after the main file's rename, before its record
    with pytest.raises(Killed):
        job([str(a)], out, job_key="model-b", encode=lambda p: fake_encode(p) + 100)
    monkeypatch.undo()
    assert len(records(out)) == 1 and np.load(out / "a.png.npy").min() > 99  # old record, new file
    assert job([str(a)], out).encoded == 1  # the old model again: not taken as done
    np.testing.assert_array_equal(np.load(out / "a.png.npy"), expected(a))


def test_a_reencode_killed_among_its_extra_files_is_encoded_again(tmp_path, monkeypatch):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    job([str(a)], out, encode=with_extras("layer13"))
    first = {name: np.load(out / name) for name in npy_files(out)}
    real_save = OutputFolder.save

    def save(self, rel, array, *args):
        if rel == "a.png.npy":
            raise Killed  # the extra file is in place, the main file not yet
        real_save(self, rel, array, *args)

    monkeypatch.setattr(OutputFolder, "save", save)
    with pytest.raises(Killed):
        job([str(a)], out, job_key="model-b", encode=lambda p: {k: v + 100 for k, v in with_extras("layer13")(p).items()})
    monkeypatch.undo()
    assert np.load(out / "a.png.layer13.npy").min() > 99  # the old record lists a file of the new model
    assert job([str(a)], out, encode=with_extras("layer13")).encoded == 1
    assert npy_files(out) == list(first)
    for name, array in first.items():
        np.testing.assert_array_equal(np.load(out / name), array, err_msg=name)


def test_an_ok_record_states_its_main_file_and_older_records_need_it_only_to_exist(tmp_path):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    job([str(a)], out)
    record, st = records(out)[0], os.stat(out / "a.png.npy")
    assert (record["output_bytes"], record["output_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    os.utime(out / "a.png.npy", ns=(1, 1))  # no longer the file the record wrote: encoded again
    assert job([str(a)], out).encoded == 1
    # An index written before records stated their file: the file need only exist, as then.
    old = [{k: v for k, v in r.items() if k not in ("output_bytes", "output_mtime_ns")} for r in records(out)]
    (out / INDEX_NAME).write_text("".join(json.dumps(r) + "\n" for r in old))
    os.utime(out / "a.png.npy", ns=(1, 1))
    assert job([str(a)], out).done_before == 1


def test_extra_arrays_must_be_named_as_the_library_names_them(tree, tmp_path):
    with pytest.raises(RuntimeError, match="array named 'mine'"):
        job([str(tree / "a.png")], tmp_path / "out", encode=lambda p: {"": fake_encode(p), "mine": p[:, 0, 0]})


def test_bad_inputs_do_not_shrink_batches(tmp_path):
    """Throughput does not drop with bad inputs: every forward pass gets a full batch."""
    for i in range(12):
        png(tmp_path / "in" / f"{i:02d}-good.png", i)
        (tmp_path / "in" / f"{i:02d}-bad.png").write_bytes(b"junk")
    sizes = []

    def counting(pixels):
        sizes.append(len(pixels))
        return fake_encode(pixels)

    summary = job([str(tmp_path / "in")], tmp_path / "out", batch_size=4, encode=counting)
    assert sizes == [4, 4, 4] and (summary.encoded, summary.failed) == (12, 12)


def test_a_model_failure_stops_the_job_and_keeps_what_was_recorded(tree, tmp_path):
    calls = []

    def failing(pixels):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return fake_encode(pixels)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="out of memory"):
        job([str(tree)], out, batch_size=2, encode=failing)
    assert sum(r["status"] == "ok" for r in records(out)) == 2
    assert not (out / TMP_DIR_NAME).exists()
    summary = job([str(tree)], out, batch_size=2)
    assert (summary.encoded, summary.done_before) == (3, 2)


# ------------------------------------------------------------------------------------------------------ memory

def test_discovery_streams(tmp_path):
    """Peak traced memory while walking 4,000 files in 40 folders stays far below what a list of them costs.
    Measured in a fresh interpreter: in this one, other tests' threads may allocate during the window."""
    root = tmp_path / "many"
    for d in range(40):
        (root / f"d{d:02d}").mkdir(parents=True)
        for i in range(100):
            (root / f"d{d:02d}" / f"{i:03d}.jpg").touch()
    script = (
        "import sys, tracemalloc\n"
        "from gemma3_vision.jobs.discovery import discover\n"
        "tracemalloc.start()\n"
        "n = sum(1 for _ in discover([sys.argv[1]]))\n"
        "print(n, tracemalloc.get_traced_memory()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, check=True,
                         timeout=120)
    n, peak = map(int, out.stdout.split())
    assert n == 4000
    materialised = 4000 * 300  # an InputItem with its Path and strings is a few hundred bytes
    assert peak < materialised / 4, f"peak {peak / 1e3:.0f} kB while walking 4,000 files"


def test_resume_state_for_100k_inputs_is_compact_and_quick(tmp_path):
    """The resume state of a 100,000-input index: under 300 bytes an input, loaded in well under a minute."""
    index = tmp_path / INDEX_NAME
    template = ('{"input": "photos/%06d.jpg", "status": "ok", "output": "%06d.jpg.npy", "shape": [256, 2560], '
                '"bytes": 123456, "mtime_ns": %d, "content": "bacc23b71f39e9170470cee69f84fb2e", "job": "k"}\n')
    index.write_text("".join(template % (i, i, 1_700_000_000_000_000_000 + i) for i in range(100_000)))
    start = time.perf_counter()
    state, good_end = load_index(index)
    seconds = time.perf_counter() - start
    assert len(state) == 100_000 and good_end == index.stat().st_size
    assert state.output_of(state.prior(input_key("photos/099999.jpg"))) == "099999.jpg.npy"
    assert state.prior(input_key("photos/100000.jpg")) is None
    size = (sys.getsizeof(state._last) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in state._last.items())
            + sys.getsizeof(state.taken) + sum(sys.getsizeof(k) for k in state.taken) + sys.getsizeof(state._owners))
    assert size / 100_000 < 300, f"{size / 100_000:.0f} bytes an input"
    assert seconds < 60, f"loading took {seconds:.1f} s"
