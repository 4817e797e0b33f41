"""``serve --ray``: two Ray Serve replicas of random:tiny on a local 2-CPU Ray instance (loopback only) both answer,
with the local service's results bit for bit; plus the replica plan and the command's checks, which need no
cluster."""

from __future__ import annotations

import asyncio
import functools
import socket
import time

import numpy as np
import pytest
from click.testing import CliRunner

from gemma3_vision.cli import EXIT_CANNOT_RUN, EXIT_USAGE, main
from gemma3_vision.errors import OptionError
from serve_fixtures import ServeSettings, b64, load_tiny, npy, png, serving

httpx = pytest.importorskip("httpx")

from gemma3_vision.serve.ray_serve import (  # noqa: E402  (after the serve extra's skip, which it needs)
    REPLICA_HEADER,
    ReplicaResources,
    build_app,
    default_replicas,
    plan_replicas,
    serve_with_ray,
)

SETTINGS = ServeSettings(model_name="random:tiny", max_batch_size=8, max_wait_ms=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_service():
    import ray  # in the test extra: a missing Ray fails here rather than skipping
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # The replicas load the model as the local test encoder does (load_tiny: CPU, the default dtype).
        service = serve_with_ray(functools.partial(build_app, "random:tiny", {"device": "cpu"}, SETTINGS),
                                 replicas=2, port=free_port())
        try:
            yield service
        finally:
            service.stop()
            serve.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.slow  # ~25-40 s on 2 CPU cores: Ray starts, then two replicas each import torch and load the model
def test_two_replicas_answer_with_the_local_services_results(ray_service):
    assert ray_service.resources == ReplicaResources(1, 0)  # the 2 CPUs shared out
    images = [png(30 + i, 41, seed=300 + i) for i in range(8)]
    with serving(load_tiny(), SETTINGS) as local, httpx.Client(base_url=local.url, timeout=30) as client:
        expected = [npy(client.post("/v1/encode", json={"images": [b64(image)]}).json()["data"][0]["tensors"]
                        ["embeddings"]["npy"]) for image in images]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=ray_service.url, timeout=60) as remote:
            return await asyncio.gather(*(remote.post("/v1/encode", json={"images": [b64(image)]})
                                          for image in images))

    replicas: set[str] = set()
    start = time.monotonic()
    while len(replicas) < 2:  # the proxy picks a replica per request: a few concurrent rounds reach both
        assert time.monotonic() - start < 30, f"only replicas {replicas} answered in 30 s"
        for response, want in zip(asyncio.run(send_all()), expected, strict=True):
            assert response.status_code == 200, response.text
            replicas.add(response.headers[REPLICA_HEADER])
            got = npy(response.json()["data"][0]["tensors"]["embeddings"]["npy"])
            assert got.shape == want.shape and np.array_equal(got, want), \
                f"max abs diff {np.abs(got - want).max()}"
    with httpx.Client(base_url=ray_service.url, timeout=30) as remote:
        assert remote.get("/ready").status_code == 200
        models = remote.get("/v1/models").json()["data"][0]
        assert (models["id"], models["source"], models["tokens_per_image"]) == ("random:tiny", "random:tiny", 16)
        assert "gemma3_vision" in remote.get("/metrics").text  # each replica's own metrics
        bad = remote.post("/v1/encode", json={"images": ["@@@"]})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request", bad.text


def test_replica_plan():
    assert plan_replicas({"CPU": 2}, None, 2) == ReplicaResources(1, 0)
    assert plan_replicas({"CPU": 16}, None, 2) == ReplicaResources(4, 0)  # at most 4 threads each
    assert plan_replicas({"CPU": 16, "GPU": 4}, None, 4) == ReplicaResources(1, 1)
    assert plan_replicas({"CPU": 16, "GPU": 4}, "cpu", 2) == ReplicaResources(4, 0)
    assert plan_replicas({"CPU": 8}, None, 2, cpus_per_replica=3) == ReplicaResources(3, 0)
    assert default_replicas({"CPU": 16, "GPU": 4}, None) == 4 and default_replicas({"CPU": 16}, None) == 1


@pytest.mark.parametrize(("cluster", "device", "replicas", "match"), [
    ({"CPU": 2}, None, 3, "do not fit"),
    ({"CPU": 8, "GPU": 2}, None, 3, "need a GPU each"),
    ({"CPU": 8}, "cuda", 1, "has no GPUs"),
    ({"CPU": 8}, None, 0, "at least 1"),
])
def test_replica_plans_that_cannot_run_are_refused(cluster, device, replicas, match):
    with pytest.raises(OptionError, match=match):
        plan_replicas(cluster, device, replicas)


def test_replicas_without_ray_is_a_usage_error():
    result = CliRunner().invoke(main, ["serve", "-m", "random:tiny", "--replicas", "2"])
    assert result.exit_code == EXIT_USAGE and "--replicas applies to --ray" in result.output, result.output


def test_an_unreachable_cluster_is_one_line_within_seconds(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    address = f"127.0.0.1:{free_port()}"  # bound and closed: refused
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["serve", "-m", "random:tiny", f"--ray={address}", "--replicas", "2"])
    assert time.perf_counter() - start < 15
    assert result.exit_code == EXIT_CANNOT_RUN, result.output
    # pytest shows the deprecation warnings that Ray Serve's import raises, which a user's console does not
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot reach the Ray cluster at {address}: ") and "refused" in line, line
