"""The ``encode`` command: exit codes, one line per failure, inputs from lists and stdin, and a job killed with
SIGKILL that resumes without losing or duplicating work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gemma3_vision.backends import resolve_backend
from gemma3_vision.cli import (
    EXIT_CANNOT_RUN,
    EXIT_NOTHING_FOUND,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    main,
)
from gemma3_vision.jobs.output_folder import INDEX_NAME, LOCK_NAME, TMP_DIR_NAME, OutputFolder


def png(path: Path, seed: int = 0, size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]


def encode(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["encode", "-m", "random:tiny", *args], input=input)


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    png(root / "a.png", 1)
    png(root / "sub" / "b.png", 2)
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def test_some_inputs_failed_exits_3_with_one_line_each(images, tmp_path):
    result = encode(str(images), "-o", str(tmp_path / "out"))
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1 and failures[0].startswith(f"failed: {images}/sub/broken.jpg: "), result.stderr
    assert "encoded 2, failed 1, skipped 0 in " in result.stderr
    assert "Traceback" not in result.output


def test_everything_encoded_exits_0_and_a_rerun_skips_it(images, tmp_path):
    (images / "sub" / "broken.jpg").unlink()
    out = tmp_path / "out"
    assert encode(str(images), "-o", str(out)).exit_code == EXIT_OK
    again = encode(str(images), "-o", str(out))
    assert again.exit_code == EXIT_OK
    assert "encoded 0, failed 0, skipped 2 (2 already encoded)" in again.stderr
    assert len(records(out)) == 2


def test_unchanged_failures_keep_exit_3_on_rerun(images, tmp_path):
    out = tmp_path / "out"
    encode(str(images), "-o", str(out))
    again = encode(str(images), "-o", str(out))
    assert again.exit_code == EXIT_SOME_FAILED
    assert "failed 1 (1 unchanged since an earlier run)" in again.stderr
    assert len(records(out)) == 3


def test_a_rerun_lists_each_unchanged_failure_with_its_reason(images, tmp_path, monkeypatch):
    monkeypatch.chdir(images.parent)
    out = tmp_path / "out"
    first = encode("images", "nope/", "-o", str(out))
    broken = "corrupt or truncated image (OSError: Truncated File Read)"
    assert [line for line in first.stderr.splitlines() if line.startswith("failed")] == [
        f"failed: images/sub/broken.jpg: {broken}",
        "failed: nope/: cannot read (No such file or directory)"], first.stderr  # each input named once
    again = encode("./images", "nope/", "-o", str(out))  # spelled another way: still the same inputs
    assert again.exit_code == EXIT_SOME_FAILED
    assert [line for line in again.stderr.splitlines() if line.startswith("failed")] == [
        f"failed (unchanged since an earlier run): ./images/sub/broken.jpg: {broken}",
        "failed (unchanged since an earlier run): nope/: cannot read (No such file or directory)"], again.stderr
    assert "encoded 0, failed 2 (2 unchanged since an earlier run), skipped 2 (2 already encoded)" in again.stderr


def test_overwrite_encodes_everything_again(images, tmp_path):
    out = tmp_path / "out"
    encode(str(images), "-o", str(out))
    result = encode(str(images), "-o", str(out), "--overwrite")
    assert "encoded 2, failed 1, skipped 0" in result.stderr
    assert [r["status"] for r in records(out)][3:4] == ["overwrite"] and len(records(out)) == 7


def test_a_start_line_then_plain_progress_lines_with_a_total_when_stderr_is_no_terminal(images, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("GEMMA3_VISION_PROGRESS_SECONDS", "0")  # a line per input, not every 5 s
    result = encode(str(images), "-o", str(tmp_path / "out"), "--dtype", "float32")
    lines = result.stderr.splitlines()
    backend = resolve_backend("auto", torch.device("cpu"))  # openvino where the extra is installed on x86-64
    assert f"model random:tiny, float32 on cpu, backend {backend}; writing float32 .npy files" in lines, result.stderr
    progress = [line for line in lines if line.startswith("progress: ")]
    # The total is counted while the model loads, so it is known from the first line on.
    assert progress[0].startswith("progress: 1/3 inputs (33%), ") and " left" in progress[0], progress
    assert progress[-1].startswith("progress: 3/3 inputs (100%), "), progress
    assert "\r" not in result.stderr and "\x1b" not in result.stderr


def test_progress_lines_without_a_total_and_durations_read_as_a_person_would():
    import io

    from gemma3_vision.jobs.pipeline import JobSummary
    from gemma3_vision.jobs.progress import Progress, duration

    assert [duration(s) for s in (12.4, 187, 3725)] == ["12 s", "3 min 07 s", "1 h 02 min"]
    progress = Progress(io.StringIO(), terminal=False, interval=0)
    summary = JobSummary(encoded=3, done_before=7)
    assert progress.line(summary, 2.0) == "progress: 10 inputs, 1.50 images/s"  # stdin: no total
    progress.set_total(40)
    assert progress.line(summary, 2.0) == "progress: 10/40 inputs (25%), 1.50 images/s, about 6 s left"
    assert progress.line(JobSummary(encoded=1), 4.0) == "progress: 1/40 inputs (2%), 4.0 s/image, about 2 min 36 s left"


@pytest.mark.parametrize("files", [[], ["a.HEIC", "b.heic", "notes.txt"]])
def test_nothing_to_encode_exits_4_names_what_was_left_out_and_writes_nothing(tmp_path, files):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"x")
    result = encode(str(folder), "-o", str(tmp_path / "out"))
    assert result.exit_code == EXIT_NOTHING_FOUND, result.output
    assert result.stderr.startswith("warning: nothing to encode: no input found"), result.stderr
    if files:
        assert "(2 .heic, 1 .txt), left out" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists(), "no lock file, no empty index"


def test_shard_and_dtype_options_that_do_not_fit_are_usage_errors(images, tmp_path):
    out = str(tmp_path / "out")
    result = encode(str(images), "-o", out, "--shard-size", "10")
    assert result.exit_code == EXIT_USAGE and "--shard-size applies to safetensors shards" in result.stderr
    result = encode(str(images), "-o", out, "--out-dtype", "bfloat16")
    assert result.exit_code == EXIT_USAGE and ".npy has no bfloat16" in result.stderr
    assert not (tmp_path / "out").exists()


def test_inputs_from_a_list_file_and_stdin(images, tmp_path, monkeypatch):
    monkeypatch.chdir(images)
    (tmp_path / "list.txt").write_text("a.png\nsub/b.png\n")
    out = tmp_path / "out"
    result = encode("--from-file", str(tmp_path / "list.txt"), "-o", str(out))
    assert result.exit_code == EXIT_OK, result.output
    assert [r["input"] for r in records(out)] == ["a.png", "sub/b.png"]
    result = encode("-", "-o", str(tmp_path / "out2"), input="sub/b.png\n'*.png'\n")
    assert result.exit_code == EXIT_SOME_FAILED  # the quoted name does not exist
    assert [r["status"] for r in records(tmp_path / "out2")] == ["ok", "error"]
    assert records(tmp_path / "out2")[1]["error"] == "'*.png': no file matches this pattern"
    result = encode("*.png", "-o", str(tmp_path / "out3"))  # a pattern the shell did not expand
    assert [r["input"] for r in records(tmp_path / "out3")] == ["a.png"]


def test_usage_errors_exit_2(tmp_path):
    assert encode("-o", str(tmp_path / "out")).exit_code == EXIT_USAGE  # no inputs at all
    assert encode("-", "--from-file", "-", "-o", str(tmp_path / "out")).exit_code == EXIT_USAGE
    assert encode("x.png", "-o", str(tmp_path / "o"), "--batch-size", "0").exit_code == EXIT_USAGE


def test_a_job_that_cannot_run_exits_1_with_one_line(images, tmp_path):
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{not json")
    result = CliRunner().invoke(main, ["encode", str(images), "-m", str(bad_model), "-o", str(tmp_path / "o")])
    assert result.exit_code == EXIT_CANNOT_RUN
    assert result.stderr.startswith(f"error: {bad_model / 'config.json'}: config is not UTF-8 JSON")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # nothing written before the model loads
    (tmp_path / "file").write_text("")
    result = encode(str(images), "-o", str(tmp_path / "file" / "out"))
    assert result.exit_code == EXIT_CANNOT_RUN
    assert "cannot use as the output folder" in result.stderr


def test_an_index_naming_a_file_outside_the_folder_is_ignored_with_a_warning(images, tmp_path):
    # A crafted index: a.png "encoded" into ../victim.txt, with a pooled file beside it. Taken at its word, the job
    # would remove the old main file and write both outside OUT.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    record = {"input": str(images / "a.png"), "status": "ok", "output": "../victim.txt",
              "outputs": {"pooled": "../victim.txt.pooled.npy"}, "job": "old"}
    (out / INDEX_NAME).write_text(json.dumps(record) + "\n")
    result = encode(str(images / "a.png"), "-o", str(out), "--pool", "mean")
    assert result.exit_code == EXIT_OK, result.output
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "images", "out", "victim.txt"]
    assert f"warning: {out / INDEX_NAME}: 1 line ignored" in result.stderr
    assert records(out)[-1]["output"] == "a.png.npy" and (out / "a.png.pooled.npy").is_file()


@pytest.mark.parametrize("pool", [False, True])  # True: the old main file is removed first
def test_a_link_in_the_output_folder_never_leads_writes_or_removals_outside(images, tmp_path, pool):
    # An output folder handed over with a link in it, and an index naming a file through the link: every name is
    # fine as a string, yet the file lies outside OUT.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.png.npy").write_bytes(b"precious")
    (victim / "a.png.pooled.npy").write_bytes(b"precious too")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lnk").symlink_to(victim)
    record = {"input": str(images / "a.png"), "path": str(images / "a.png"), "status": "ok",
              "output": "lnk/a.png.npy", "outputs": {"pooled": "lnk/a.png.pooled.npy"}, "job": "old"}
    (out / INDEX_NAME).write_text(json.dumps(record) + "\n")
    result = encode(str(images / "a.png"), "-o", str(out), *(["--pool", "mean"] if pool else []))
    result.stderr_bytes = b"".join(  # without random:tiny's warning, which comes first
        line for line in result.stderr_bytes.splitlines(keepends=True) if b"RANDOM weights" not in line)
    line = one_line_error(result)
    assert line.startswith(f"error: {out / 'lnk' / 'a.png.npy'}: its folder leads outside {out} (to {victim})"), line
    assert (victim / "a.png.npy").read_bytes() == b"precious"
    assert (victim / "a.png.pooled.npy").read_bytes() == b"precious too"
    assert sorted(p.name for p in victim.iterdir()) == ["a.png.npy", "a.png.pooled.npy"]


def one_line_error(result, code: int = EXIT_CANNOT_RUN) -> str:
    """The single ``error: ...`` line of a command that could not run, checked to be all it printed besides
    encode's start line (``model ..., backend ...``), and its exit code ``code``."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("model ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["encode", "show", "bench"])
def test_a_bad_device_is_a_usage_error_with_one_line(tmp_path, command):
    args = {"encode": ["encode", "x.png", "-m", "random:tiny", "-o", str(tmp_path / "o")],
            "show": ["show", "x.png", "-m", "random:tiny", "-o", str(tmp_path / "o.png")],
            "bench": ["bench", "--preset", "tiny", "--no-reference", "--no-compile"]}[command]
    line = one_line_error(CliRunner().invoke(main, [*args, "--device", "bogus"]), EXIT_USAGE)
    assert line == "error: device must be cpu, cuda or cuda:N (N a GPU index), got 'bogus'"


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_where_there_is_none_is_a_usage_error_with_one_line(tmp_path, monkeypatch, device):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["encode", "x.png", "-m", "random:tiny", "-o", str(tmp_path / "o"),
                                       "--device", device])
    assert one_line_error(result, EXIT_USAGE).startswith(
        f"error: device '{device}' asked for, but CUDA is not available on this machine (")
    assert not (tmp_path / "o").exists()


def test_a_gpu_index_this_machine_lacks_is_a_usage_error_with_one_line(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = CliRunner().invoke(main, ["encode", "x.png", "-m", "random:tiny", "-o", str(tmp_path / "o"),
                                       "--device", "cuda:2"])
    assert one_line_error(result, EXIT_USAGE) == ("error: device must be one of cuda:0..cuda:1 on this machine (2 GPUs), "
                                      "got 'cuda:2'")


@pytest.mark.parametrize("layers", ["3", "30"])  # 0: click refuses it (IntRange)
def test_bench_layers_beyond_the_presets_depth_are_a_usage_error(layers):
    result = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--layers", layers, "--no-reference",
                                       "--no-compile"])
    assert one_line_error(result, EXIT_USAGE) == f"error: layers must be in 1..2 (the tiny tower's depth), got {layers}"


def test_an_unknown_bench_preset_is_a_usage_error():
    result = CliRunner().invoke(main, ["bench", "--preset", "nope", "--no-reference", "--no-compile"])
    assert result.exit_code == EXIT_USAGE and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--preset': 'nope' is not one of 'gemma3-4b', 'gemma3-12b', 'gemma3-27b', "
        "'tiny'.")


def test_the_api_refuses_a_bad_device_and_preset_with_config_errors(monkeypatch):
    import torch

    import gemma3_vision as g3
    from gemma3_vision.tools.bench import run_benchmark

    with pytest.raises(g3.ConfigError, match=r"^device must be cpu, cuda or cuda:N \(N a GPU index\), got 'bogus'$"):
        g3.load("random:tiny", device="bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(g3.ConfigError, match=r"^device 'cuda' asked for, but CUDA is not available"):
        g3.load("random:tiny", device=torch.device("cuda"))
    with pytest.raises(g3.ConfigError, match=r"^preset must be one of gemma3-4b, .*, got 'nope'$"):
        run_benchmark(preset="nope")


def test_every_error_class_is_exported_from_the_package():
    # Callers catch what the library raises (OutputError from an encode job, say) by importing it from the package.
    import inspect

    import gemma3_vision
    from gemma3_vision import errors

    classes = [name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == errors.__name__]
    assert "OutputError" in classes
    missing = [name for name in classes
               if name not in gemma3_vision.__all__ or getattr(gemma3_vision, name, None) is not vars(errors)[name]]
    assert not missing, f"not exported from gemma3_vision: {missing}"


def test_every_export_is_what_its_module_defines_whatever_was_imported_first():
    # An export named like a submodule would be replaced by that module once anything imported it (the import
    # system sets the package attribute): `gemma3_vision.preprocess` was the module after load().
    import importlib
    import pkgutil

    import gemma3_vision

    modules = {m.name for m in pkgutil.walk_packages(gemma3_vision.__path__, "gemma3_vision.")}
    for name in modules - {"gemma3_vision.__main__"}:  # __main__ runs the CLI
        importlib.import_module(name)  # every one, in case one is imported before an export
    submodules = {name.split(".")[1] for name in modules}  # what an import sets on the package: the first level
    lazy = gemma3_vision._LAZY
    clashes = sorted(set(lazy) & submodules)
    assert not clashes, f"exports named like a submodule: {clashes}"
    for name, module in lazy.items():
        value = getattr(gemma3_vision, name)
        assert value is getattr(importlib.import_module(f"gemma3_vision.{module}"), name), name


def test_a_folder_held_by_another_job_exits_1(images, tmp_path):
    out = tmp_path / "out"
    held = OutputFolder(out)
    try:
        result = encode(str(images), "-o", str(out))
    finally:
        held.close()
    assert result.exit_code == EXIT_CANNOT_RUN
    assert "another encode job is writing to this folder" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = CliRunner().invoke(main, ["--debug", "encode", "x.png", "-m", str(tmp_path), "-o", str(tmp_path)])
    assert result.exit_code != 0 and type(result.exception).__name__ == "ConfigError"


# ------------------------------------------------------------------------------------------------ kill and resume

def encode_command(root: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """``encode ROOT -o OUT`` with random:tiny as a subprocess: the command and its environment. One thread each:
    the job must last long enough to be stopped in the middle, and torch's thread pool only adds spinning on a busy
    machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "gemma3_vision", "encode", str(root), "-m", "random:tiny", "-o", str(out),
           "--workers", "1"]
    return cmd, env


def signal_once_three_are_done(cmd: list[str], env: dict[str, str], out: Path, sig: int) -> tuple[int, str]:
    """Run ``cmd`` and send it ``sig`` once OUT's index holds 3 ok records: (its exit code, its stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            index = out / INDEX_NAME
            if index.exists() and index.read_bytes().count(b'"status": "ok"') >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stderr


def test_sigkill_mid_job_then_rerun_encodes_every_image_exactly_once(tmp_path):
    """SIGKILL once some records are in; then: no partial file under a final name, and the re-run finishes the
    rest: each good image exactly one ok record, each bad one exactly one error record, no temporary left."""
    root = tmp_path / "in"
    blobs = []
    for seed in range(4):
        png(tmp_path / f"seed{seed}.png", seed, size=(192, 144))
        blobs.append((tmp_path / f"seed{seed}.png").read_bytes())
    root.mkdir()
    good = [f"{i:04d}.png" for i in range(400)]
    for i, name in enumerate(good):
        (root / name).write_bytes(blobs[i % 4])
    bad = {"0100-bad.png": b"", "0200-bad.jpg": b"<html>", "0300-bad.png": blobs[0][:500]}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    out = tmp_path / "out"
    cmd, env = encode_command(root, out)
    code, stderr = signal_once_three_are_done(cmd, env, out, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job ended before it was killed: {stderr!r}"

    lines = (out / INDEX_NAME).read_bytes().split(b"\n")
    before = [json.loads(line) for line in lines[:-1]]  # every complete line parses; the last may be torn
    assert 3 <= sum(r["status"] == "ok" for r in before) < len(good)
    for path in out.rglob("*.npy"):
        if TMP_DIR_NAME not in path.parts:
            assert np.load(path).shape == (16, 96), f"{path} is not a complete array"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == EXIT_SOME_FAILED, rerun.stderr
    assert "already encoded" in rerun.stderr.splitlines()[-1]
    final = records(out)
    by_status: dict[str, list[str]] = {"ok": [], "error": []}
    for r in final:
        by_status[r["status"]].append(r["input"].rsplit("/", 1)[1])
    assert sorted(by_status["ok"]) == good, "every good image exactly once"
    assert sorted(by_status["error"]) == sorted(bad), "every bad image exactly once"
    assert sorted(p.name for p in out.rglob("*.npy")) == sorted(f"{n}.npy" for n in good)
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME, LOCK_NAME, *(f"{n}.npy" for n in good)])
    for r in final:
        if r["status"] == "ok":
            assert np.load(out / r["output"]).shape == (16, 96)


def test_sigkill_mid_sharded_job_loses_no_recorded_image_and_leaves_no_torn_shard(tmp_path):
    """As above, writing safetensors shards of 7: every ok record names a complete shard holding its key, no torn
    shard lies under shards/, and the re-run encodes each good image exactly once over both runs (images of a
    shard whose records the kill cut off are encoded again, into a new shard)."""
    from safetensors import safe_open

    root = tmp_path / "in"
    png(tmp_path / "seed.png", 0, size=(192, 144))
    root.mkdir()
    good = [f"{i:04d}.png" for i in range(120)]
    for name in good:
        (root / name).write_bytes((tmp_path / "seed.png").read_bytes())
    bad = {"0050-bad.png": b"", "0100-bad.jpg": b"<html>"}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    out = tmp_path / "out"
    cmd, env = encode_command(root, out)
    cmd += ["--format", "safetensors", "--shard-size", "7"]
    code, stderr = signal_once_three_are_done(cmd, env, out, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job ended before it was killed: {stderr!r}"

    def check_shards() -> None:
        for path in (out / "shards").iterdir():  # every file there is a whole shard
            with safe_open(path, framework="np") as f:
                assert all(f.get_tensor(k).shape == (16, 96) for k in f.keys()), path

    lines = (out / INDEX_NAME).read_bytes().split(b"\n")
    before = [json.loads(line) for line in lines[:-1]]
    assert 3 <= sum(r["status"] == "ok" for r in before) < len(good)
    check_shards()
    for r in before:
        if r["status"] == "ok":
            with safe_open(out / r["shard"], framework="np") as f:
                assert r["key"] in f.keys()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == EXIT_SOME_FAILED, rerun.stderr
    final = records(out)
    ok = sorted(r["input"].rsplit("/", 1)[1] for r in final if r["status"] == "ok")
    assert ok == good, "every good image exactly once over both runs"
    assert sorted(r["input"].rsplit("/", 1)[1] for r in final if r["status"] == "error") == sorted(bad)
    check_shards()
    assert not (out / TMP_DIR_NAME).exists() and not list(out.rglob("*.npy"))
    import gemma3_vision as g3

    emb = g3.open_embeddings(out)
    assert len(emb) == len(good) and all(t.shape == (16, 96) for _, t in emb)


def test_sigterm_mid_job_unwinds_like_ctrl_c_and_the_rerun_finishes(tmp_path):
    """SIGTERM (a scheduler preempting the job) once some records are in: one line, exit 143, no traceback, the
    temporary folder gone, every index line complete; the re-run encodes the rest."""
    root = tmp_path / "in"
    for i in range(300):
        png(root / f"{i:04d}.png", i % 4, size=(96, 72))
    out = tmp_path / "out"
    cmd, env = encode_command(root, out)
    code, stderr = signal_once_three_are_done(cmd, env, out, signal.SIGTERM)
    assert code == EXIT_TERMINATED, f"exit {code}: {stderr!r}"
    assert stderr.splitlines()[-1] == "terminated" and "Traceback" not in stderr, stderr
    assert not (out / TMP_DIR_NAME).exists()
    assert (out / INDEX_NAME).read_bytes().endswith(b"\n")  # unwound between records, none torn
    done = sum(r["status"] == "ok" for r in records(out))
    assert 3 <= done < 300
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    assert sorted(r["input"].rsplit("/", 1)[1] for r in records(out)) == [f"{i:04d}.png" for i in range(300)]


def test_control_characters_in_names_are_escaped_and_each_name_is_given_once(tmp_path, monkeypatch):
    # A newline split the failed: line in two; ESC and CR were written raw (a name could recolour the terminal or
    # overwrite the line); a name with a whitespace run, or a listed path with spaces around it, was given twice
    # (its reason folds whitespace, so the de-duplication missed it).
    monkeypatch.chdir(tmp_path)
    names = ["a\nb.png", "c\x1b[31mred.png", "d\rfailed: fake.png", "e  f.png", "g\x9bh\x7f.png"]
    for name in names:
        (tmp_path / "imgs").mkdir(exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    os.mkfifo(tmp_path / "imgs" / "p\n\x1b.png")  # skipped lines name files too
    (tmp_path / "list.txt").write_text("  imgs/l.png  \n")
    shown = ["imgs/a\\nb.png", "imgs/c\\x1b[31mred.png", "imgs/d\\rfailed: fake.png", "imgs/e  f.png",
             "imgs/g\\x9bh\\x7f.png"]
    for run, prefix in [(1, "failed: "), (2, "failed (unchanged since an earlier run): ")]:
        result = encode("imgs", "--from-file", "list.txt", "-o", "out")
        assert result.exit_code == EXIT_SOME_FAILED, result.output
        assert not any(c in result.stderr for c in "\r\x1b\x7f\x9b"), repr(result.stderr)
        failed = [line for line in result.stderr.splitlines() if line.startswith("failed")]
        assert len(failed) == 6, failed  # one line each: no name split one
        for line, name in zip(failed, shown, strict=False):
            assert line.startswith(f"{prefix}{name}: not an image"), (run, line)
        # the listed path is missing (it has spaces around it); named once, as spelled
        assert failed[5] == f"{prefix}  imgs/l.png  : cannot read (No such file or directory)", (run, failed[5])
    first = encode("imgs", "-o", "out2").stderr.splitlines()
    assert "skipped: imgs/p\\n\\x1b.png: a FIFO, not a regular file: not opened" in first, first


def test_a_folder_that_cannot_be_listed_fails_the_job(images, tmp_path, monkeypatch):
    # It was "skipped: ...: cannot list folder (Permission denied)" with exit 0, though its images were never read.
    # As root, permission bits change nothing: os.scandir refuses the folder as it would for a user without them.
    scandir = os.scandir

    def refuse(path=".", *args):
        if not isinstance(path, int) and Path(os.fspath(path)) == images / "sub":  # int: a descriptor
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refuse)
    result = encode(str(images), "-o", str(tmp_path / "out"))
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert f"failed: {images}/sub: cannot list folder (Permission denied)" in result.stderr.splitlines()
    assert "encoded 1, failed 1, skipped 0 in " in result.stderr
    assert records(tmp_path / "out")[-1]["status"] == "error"
