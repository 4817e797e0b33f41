"""``encode --ray``: on a local 2-CPU Ray instance the job writes the same files and index records as the local job,
records a bad input and goes on, and resumes like it. Plus the resource defaults and the CLI's argument checks,
which need no cluster."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gemma3_vision.backends import resolve_backend
from gemma3_vision.cli import EXIT_CANNOT_RUN, EXIT_SOME_FAILED, EXIT_USAGE, main
from gemma3_vision.errors import ConfigError, OptionError
from gemma3_vision.jobs.output_folder import INDEX_NAME, TMP_DIR_NAME
from gemma3_vision.jobs.ray_encode import RayResources, plan_resources


def png(path: Path, seed: int, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def encode(*args: str):
    return CliRunner().invoke(main, ["encode", "-m", "random:tiny", *args])


def index_lines(out: Path) -> list[str]:
    """The index's records as text, less the main file's modification time (two folders written apart differ in
    it), which each input's last record must state as its file has it."""
    records = [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]
    last = {r["input"]: r for r in records}
    for r in records:
        if r["status"] == "ok":
            mtime = r.pop("output_mtime_ns")
            if last[r["input"]] is r:
                assert mtime == os.stat(out / r["output"]).st_mtime_ns, r
    return [json.dumps(r) for r in records]


def arrays(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*.npy"))}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # in the test extra: a missing Ray fails here rather than skipping

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    for i, size in enumerate([(40, 30), (64, 64), (25, 90), (120, 50)]):
        png(root / ("sub" if i % 2 else "") / f"im{i}.png", i, size)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG")  # fails to decode
    return root


@pytest.mark.slow  # ~35 s: Ray starts (~8-12 s), then a fresh actor per job (~7-10 s each) on 2 CPU cores
def test_ray_job_equals_local_job_file_by_file_and_resumes(ray_cluster, images, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    undecodable = os.fsdecode(b"caf\xe9.png")  # not UTF-8: travels to the workers and back as an escape
    png(images / undecodable, 7, (30, 30))
    # batch size 1 on both sides: the same images in every forward pass, so the arrays must be bit-identical.
    ran_local = encode(str(images), "-o", str(local), "-b", "1")
    ran_ray = encode(str(images), "-o", str(remote), "-b", "1", "--ray")
    for result in (ran_local, ran_ray):
        assert result.exit_code == EXIT_SOME_FAILED, result.output  # the bad input, recorded, not fatal
        assert "encoded 5, failed 1, skipped 0 in " in result.stderr, result.stderr
        assert f"failed: {images}/bad.jpg: " in result.stderr
    assert index_lines(remote) == index_lines(local)  # same records, same order, same job keys
    assert list(arrays(remote)) == list(arrays(local)) == [f"{undecodable}.npy", "im0.png.npy", "im2.png.npy",
                                                           "sub/im1.png.npy", "sub/im3.png.npy"]
    for name, path in arrays(local).items():
        a, b = np.load(path), np.load(arrays(remote)[name])
        assert a.shape == b.shape == (16, 96) and np.array_equal(a, b), f"{name}: max abs {np.abs(a - b).max()}"
    assert not (remote / TMP_DIR_NAME).exists()

    # Resume: one new image, one touched but unchanged (found by content hash), the bad one unchanged.
    before = {name: os.stat(p).st_mtime_ns for name, p in arrays(remote).items()}
    png(images / "sub" / "new.png", 9, (33, 47))
    os.utime(images / "im0.png", ns=(1, 1))
    again = encode(str(images), "-o", str(remote), "-b", "1", "--ray")
    assert again.exit_code == EXIT_SOME_FAILED, again.output
    assert ("encoded 1, failed 1 (1 unchanged since an earlier run), skipped 5 (5 already encoded) in "
            in again.stderr), again.stderr
    assert f"failed (unchanged since an earlier run): {images}/bad.jpg: " in again.stderr  # listed, with its reason
    lines = index_lines(remote)
    assert lines[:-1] == index_lines(local)  # nothing re-recorded
    new = json.loads(lines[-1])
    assert new["input"] == f"{images}/sub/new.png" and new["status"] == "ok" and new["output"] == "sub/new.png.npy"
    assert {name: os.stat(p).st_mtime_ns for name, p in arrays(remote).items() if name in before} == before

    # The local job resumes a Ray job's folder: the same keys, nothing left to do.
    local_resume = encode(str(images), "-o", str(remote), "-b", "1")
    assert "encoded 0, failed 1 (1 unchanged since an earlier run), skipped 6 (6 already encoded) in " in \
        local_resume.stderr, local_resume.stderr


@pytest.mark.slow  # ~7 s: one Ray job on the cluster started above
def test_ray_job_keeps_batch_size_layers_and_pooling(ray_cluster, images, tmp_path):
    (images / "bad.jpg").unlink()
    local, remote = tmp_path / "local", tmp_path / "ray"
    options = ["-b", "2", "--layers", "1", "--pool", "mean", "--no-project"]
    assert encode(str(images), "-o", str(local), *options).exit_code == 0
    # The Ray job encodes again over a local job with other layers: the driver removes their .layer0 files.
    assert encode(str(images), "-o", str(remote), "--layers", "0").exit_code == 0
    earlier = len(index_lines(remote))
    result = encode(str(images), "-o", str(remote), *options, "--ray")
    assert result.exit_code == 0, result.output
    assert index_lines(remote)[earlier:] == index_lines(local)
    assert len(arrays(local)) == 12 and list(arrays(remote)) == list(arrays(local))  # .npy, .layer1, .pooled each
    # Ray cuts batches by rows, the local job by images to encode, so a pass may hold other images: the same
    # fp32 math in another reduction order. Tolerance 1e-5 absolute (observed ~1e-6).
    for name, path in arrays(local).items():
        a, b = np.load(path), np.load(arrays(remote)[name])
        assert a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-5), f"{name}: max abs {np.abs(a - b).max()}"


@pytest.mark.slow  # ~10 s: one Ray job and its resume on the cluster started above
def test_ray_job_writes_shards_from_the_driver_as_the_local_job_does(ray_cluster, images, tmp_path):
    """Sharded, in float16, with layers and pooling: the driver writes the shards, and every input's arrays
    equal the local job's bit for bit (batch size 1: the same forward passes); a re-run finds everything done."""
    import torch

    import gemma3_vision as g3

    local, remote = tmp_path / "local", tmp_path / "ray"
    options = ["-b", "1", "--format", "safetensors", "--shard-size", "2", "--out-dtype", "float16",
               "--layers", "1", "--pool", "mean"]
    assert encode(str(images), "-o", str(local), *options).exit_code == EXIT_SOME_FAILED
    result = encode(str(images), "-o", str(remote), *options, "--ray")
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "encoded 4, failed 1, skipped 0 in " in result.stderr, result.stderr
    start = [line for line in result.stderr.splitlines() if line.startswith("model random:tiny, ")]
    backend = resolve_backend("auto", torch.device("cpu"))  # the actors' machine is this one
    assert len(start) == 1 and f" on cpu, backend {backend}; Ray: 1 actor; writing float16 safetensors shards of 2 " \
        "images" in start[0], result.stderr
    assert len(list((remote / "shards").glob("*.safetensors"))) == 2 and not list(remote.rglob("*.npy"))
    ours, theirs = g3.open_embeddings(remote), g3.open_embeddings(local)
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    for name, _ in theirs:
        a, b = ours.arrays(name), theirs.arrays(name)
        assert a.keys() == b.keys() == {"", "layer1", "pooled"}
        for k in a:
            assert a[k].dtype == torch.float16 and torch.equal(a[k], b[k]), f"{name} {k}"
    again = encode(str(images), "-o", str(remote), *options, "--ray")
    assert "encoded 0, failed 1 (1 unchanged since an earlier run), skipped 4 (4 already encoded)" in again.stderr


def test_resource_defaults():
    assert plan_resources({"CPU": 16, "GPU": 4}, None) == RayResources(4, 1, 1)  # one model per GPU
    assert plan_resources({"CPU": 16, "GPU": 4}, "cpu") == RayResources(3, 4, 0)  # GPUs declined
    assert plan_resources({"CPU": 2}, None) == RayResources(1, 1, 0)  # one CPU decodes, one encodes
    assert plan_resources({"CPU": 64}, None) == RayResources(14, 4, 0)  # 8 CPUs left for decoding
    assert plan_resources({"CPU": 8}, None, actors=2, cpus_per_actor=3) == RayResources(2, 3, 0)


@pytest.mark.parametrize(("cluster", "kwargs", "error", "match"), [
    ({"CPU": 8}, {"device": "cuda"}, OptionError, "has no GPUs"),
    ({"CPU": 1}, {}, ConfigError, "at least 2 are needed"),  # the cluster's fault, not an option's
    ({"CPU": 8}, {"actors": 2, "cpus_per_actor": 4}, OptionError, "leave no CPU for decoding"),
    ({"CPU": 2}, {"actors": 2}, OptionError, "leave no CPU for decoding"),
])
def test_resources_that_cannot_run_are_refused(cluster, kwargs, error, match):
    device = kwargs.pop("device", None)
    with pytest.raises(ConfigError, match=match) as caught:
        plan_resources(cluster, device, **kwargs)
    assert type(caught.value) is error


@pytest.mark.slow  # ~3 s on the cluster started above
def test_too_many_actors_is_a_usage_error(ray_cluster, images, tmp_path):
    result = encode(str(images), "-o", str(tmp_path / "out"), "--ray", "--ray-actors", "2")  # on 2 CPUs
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr == "error: 2 actors x 1 CPUs leave no CPU for decoding on a cluster of 2\n"


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "nonexistent.invalid:6379",
                                     "ray://nonexistent.invalid:10001"])
def test_an_unreachable_cluster_is_one_line_within_seconds(address, images, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, not the tests' cluster
    port = closed_port()
    address = address.format(port=port)
    start = time.perf_counter()
    result = encode(str(images), "-o", str(tmp_path / "out"), f"--ray={address}")
    seconds = time.perf_counter() - start
    print(f"{address}: {seconds:.1f} s: {result.stderr.strip()}")
    assert result.exit_code == EXIT_CANNOT_RUN, result.output
    assert seconds < 15  # Ray alone retries for minutes
    [line] = result.stderr.splitlines()
    reason = "refused the connection" if "127.0.0.1" in address else "does not resolve"
    assert line.startswith(f"error: cannot reach the Ray cluster at {address}: ") and reason in line, line
    assert not (tmp_path / "out").exists()


def test_a_cluster_ray_cannot_join_is_one_line(monkeypatch, images, tmp_path):
    import ray

    def init(**kwargs):
        raise ValueError("Ray Client requires pip package `ray[client]`. If you installed the minimal Ray (e.g. "
                         "`pip install ray`), please reinstall by executing `pip install ray[client]`.\nmore")

    with socket.socket() as server:  # answers, so the reachability check passes and ray.init is called
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", init)
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        result = encode(str(images), "-o", str(tmp_path / "out"), f"--ray={address}")
    assert result.exit_code == EXIT_CANNOT_RUN, result.output
    assert result.stderr == (f"error: cannot join the Ray cluster at {address}: Ray Client requires pip package "
                             "`ray[client]`. If you installed the minimal Ray (e.g. `pip install ray`), please "
                             "reinstall by executing `pip install ray[client]`.\n")


def test_cli_refuses_a_folder_taken_for_the_address(images, tmp_path):
    # `--ray photos/` would read photos/ as the cluster address: a usage error, not a connection attempt.
    result = encode("--ray", str(images), "-o", str(tmp_path / "out"))
    assert result.exit_code == EXIT_USAGE and "is not a Ray address" in result.output
    assert encode(str(images), "-o", str(tmp_path / "out"), "--ray-actors", "2").exit_code == EXIT_USAGE


def test_ray_is_imported_only_for_ray_jobs():
    code = "import sys, gemma3_vision.cli, gemma3_vision.jobs.ray_encode; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow  # ~10 s: Ray starts in the command's process, then one actor fails to load the model
def test_a_model_the_actors_cannot_load_stops_the_job_with_one_line(images, tmp_path):
    # Headers are fine, so the driver (which reads no weights) accepts it; each actor's strict load finds the NaN.
    # The command runs in its own process: Ray's raylet printed a failed actor constructor's traceback, about 100
    # lines, on the driver's own stdout, which a CliRunner in this process does not see.
    from conftest import TINY_PROJECTOR, TINY_VISION, random_state
    from format_fixtures import write_hf_folder

    state = dict(random_state("tiny"))
    name = "vision_tower.encoder.layers.1.mlp.fc2.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    folder = write_hf_folder(tmp_path / "ckpt", state, TINY_VISION, TINY_PROJECTOR)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "gemma3_vision", "encode", str(images), "-m", str(folder),
                          "-o", str(out), "--ray"], capture_output=True, text=True, timeout=180)
    assert run.returncode == EXIT_CANNOT_RUN, run.stderr
    assert run.stdout == ""
    # Ray's own token warning and core_worker note may come first (docs/ray.md); then the job's one line.
    lines = run.stderr.splitlines()
    assert len(lines) <= 3, run.stderr
    assert lines[-1].startswith("error: a Ray worker failed, the job stopped"), lines[-1]
    assert "WeightsError: " in lines[-1] and lines[-1].endswith(f"({name}) holds NaN or Inf values"), lines[-1]
    assert index_lines(out) == [] and not (out / TMP_DIR_NAME).exists()


def test_ray_data_console_shows_only_warnings_during_a_job():
    import ray.data

    from gemma3_vision.jobs.ray_encode import _quiet_ray_data

    context = ray.data.DataContext.get_current()
    before = (context.enable_progress_bars, context.print_on_execution_start)
    # Ray Data's console handler holds the stderr of its import (a CliRunner's, after the jobs above): read a buffer.
    [console] = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    err = io.StringIO()
    stream = console.setStream(err)
    log = logging.getLogger("ray.data._internal.execution.streaming_executor")
    try:
        with _quiet_ray_data(context):
            assert not context.enable_progress_bars and not context.print_on_execution_start
            log.info("Execution plan of Dataset ...")
            log.error("Full stack trace: ...")  # the job reports the failure itself, in one line
            log.warning("cannot be scheduled ...")
        log.info("after the job")
    finally:
        console.setStream(stream)
    assert "cannot be scheduled" in err.getvalue() and "after the job" in err.getvalue(), err.getvalue()
    assert "Execution plan" not in err.getvalue() and "Full stack trace" not in err.getvalue(), err.getvalue()
    assert (context.enable_progress_bars, context.print_on_execution_start) == before


class _FakeRay:
    """Stands in for the ray module in ``_join_cluster``: records what ``ray.init`` saw, and installs its own
    SIGTERM handler as the real one does."""

    def __init__(self) -> None:
        self.wait_time: str | None = "unset"

    def init(self, **kwargs: object) -> None:
        import signal

        self.wait_time = os.environ.get("RAY_gcs_server_port_wait_time_s")
        signal.signal(signal.SIGTERM, lambda *args: sys.exit(15))


@pytest.mark.parametrize("address", [None, "local", "gcs"])
def test_joining_bounds_only_a_running_clusters_gcs_and_keeps_our_sigterm_handler(monkeypatch, address):
    import signal

    from gemma3_vision.jobs.ray_encode import _join_cluster

    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = _FakeRay()

    def ours(*args: object) -> None: ...

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with socket.socket() as server:  # a port that answers, standing in for a cluster's GCS
            server.bind(("127.0.0.1", 0))
            server.listen()
            _join_cluster(ray, f"127.0.0.1:{server.getsockname()[1]}" if address == "gcs" else address)
        assert signal.getsignal(signal.SIGTERM) is ours  # ray.init's sys.exit(15) handler undone
    finally:
        signal.signal(signal.SIGTERM, before)
    # Ray starting a local cluster passes the variable on to its GCS and raylet, where it bounds the head's start
    assert ray.wait_time == ("1" if address == "gcs" else None)
    assert "RAY_gcs_server_port_wait_time_s" not in os.environ
