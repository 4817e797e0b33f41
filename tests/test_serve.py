"""gemma3-vision serve: every route over real HTTP on the loopback interface, the official openai client, results
bit-identical to ``encode`` (the Python call and the command), the cache, the limits and their JSON errors."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gemma3_vision.api import pool_rows
from gemma3_vision.cli import main
from serve_fixtures import ServeSettings, b64, bomb_png, load_tiny, npy, png, serving, wait_ready

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def encoder():
    return load_tiny()


@pytest.fixture(scope="module")
def server(encoder):
    settings = ServeSettings(model_name="random:tiny", max_body_mb=1, max_images=4, max_batch_size=8,
                             max_wait_ms=20)
    with serving(encoder, settings) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def error_of(response) -> dict:
    """The JSON error body every failure has; nothing else in it."""
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_health_ready_models_and_metrics(client, encoder):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == "random:tiny" and model["source"] == "random:tiny"
    assert (model["dtype"], model["device"], model["backend"]) == (str(encoder.dtype)[6:], "cpu",
                                                                    encoder.backend.name)
    assert model["dimensions"] == encoder.projector_config.text_hidden_size
    assert model["tokens_per_image"] == encoder.tokens_per_image()
    client.post("/v1/embeddings", json={"input": b64(png(20, 30, seed=90))})
    text = client.get("/metrics").text
    for name in ("gemma3_vision_requests_total{route=\"/v1/embeddings\",status=\"200\"}",
                 "gemma3_vision_images_encoded_total", "gemma3_vision_queue_depth", "gemma3_vision_batch_size_bucket",
                 "gemma3_vision_queue_wait_seconds_bucket", "gemma3_vision_compute_seconds_bucket",
                 "gemma3_vision_request_duration_seconds_bucket", "gemma3_vision_cache_hits_total",
                 "gemma3_vision_cache_misses_total", "gemma3_vision_rejections_total"):
        assert name in text, name


def test_openai_client_gets_the_mean_of_the_soft_tokens(server, encoder):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    images = [png(30, 40, seed=1), png(50, 20, seed=2)]
    expected = pool_rows(encoder.encode(images))  # (2, D) float32
    for fmt in ("float", "base64"):  # the client asks for base64 by default and decodes it itself
        kwargs = {"encoding_format": fmt} if fmt == "float" else {}
        result = client.embeddings.create(model="random:tiny", input=[b64(images[0]),
                                          "data:image/png;base64," + b64(images[1])], **kwargs)
        got = torch.tensor([d.embedding for d in result.data], dtype=torch.float32)
        assert torch.equal(got, expected), f"{fmt}: max abs diff {(got - expected).abs().max().item()}"
        assert result.usage.prompt_tokens == 2 * encoder.tokens_per_image()
        assert [d.index for d in result.data] == [0, 1]


def test_encode_route_is_bit_identical_to_the_python_api(client, encoder):
    images = [png(40, 70, seed=3), png(112, 112, seed=4, fmt="JPEG")]
    expected = encoder.encode(images, layers=[1], pool="mean")
    response = client.post("/v1/encode", json={"images": [b64(i) for i in images], "layers": [1], "pool": "mean"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    for item, want in zip(data, expected, strict=True):
        assert item["size"] == list(want.size)
        for name, tensor in (("embeddings", want.embeddings), ("layer1", want.layers[1]), ("pooled", want.pooled)):
            got = npy(item["tensors"][name]["npy"])
            assert item["tensors"][name]["shape"] == list(got.shape) and got.dtype == np.float32
            assert np.array_equal(got, tensor.float().numpy()), \
                f"{name}: max abs diff {np.abs(got - tensor.float().numpy()).max()}"


def test_encode_route_equals_the_encode_command(client, tmp_path: Path):
    """Multipart uploads of the files, JSON and safetensors answers, against the .npy files `encode` writes."""
    safetensors = pytest.importorskip("safetensors.numpy")
    files = {"wide.png": png(60, 240, seed=5), "small.jpg": png(30, 20, seed=6, fmt="JPEG")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["encode", str(tmp_path / "wide.png"), str(tmp_path / "small.jpg"), "--model",
                                       "random:tiny", "--device", "cpu", "--out", str(out), "--layers", "2",
                                       "--pool", "mean", "--pan-and-scan", "--pan-and-scan-min-crop-size", "32"])
    assert result.exit_code == 0, result.output
    options = {"layers": "2", "pool": "mean", "pan_and_scan": "true", "pan_and_scan_min_crop_size": "32"}
    upload = [("image", (name, data)) for name, data in files.items()]
    as_json = client.post("/v1/encode", files=upload, data=options)
    as_st = client.post("/v1/encode", files=upload, data=options, headers={"Accept": "application/vnd.safetensors"})
    assert as_json.status_code == 200 and as_st.status_code == 200, (as_json.text, as_st.text)
    tensors = safetensors.load(as_st.content)
    compared = 0
    for i, name in enumerate(files):
        item = as_json.json()["data"][i]
        assert len(item["boxes"]) > 1 or name != "wide.png", "the wide image should have Pan & Scan crops"
        for key, spec in item["tensors"].items():
            stem = name if key == "embeddings" else f"{name}.{key}"
            written = np.load(out / f"{stem}.npy", allow_pickle=False)
            for got in (npy(spec["npy"]), tensors[f"{i}.{key}"]):
                assert got.dtype == written.dtype and np.array_equal(got, written), \
                    f"{stem}: max abs diff {np.abs(got - written).max()}"
                compared += 1
    assert compared >= 2 * 2 * 3


def test_output_dtypes(client, encoder):
    safetensors = pytest.importorskip("safetensors.torch")
    image = png(30, 30, seed=7)
    want = encoder.encode([image])[0]
    f16 = client.post("/v1/encode", json={"images": [b64(image)], "dtype": "float16"}).json()
    got = npy(f16["data"][0]["tensors"]["embeddings"]["npy"])
    assert got.dtype == np.float16 and np.array_equal(got, want.to(torch.float16).numpy())
    refused = client.post("/v1/encode", json={"images": [b64(image)], "dtype": "bfloat16"})
    assert refused.status_code == 400 and "safetensors" in error_of(refused)["message"]
    bf16 = client.post("/v1/encode?format=safetensors", json={"images": [b64(image)], "dtype": "bfloat16"})
    assert bf16.headers["content-type"] == "application/vnd.safetensors"
    got_bf16 = safetensors.load(bf16.content)["0.embeddings"]
    assert got_bf16.dtype == torch.bfloat16 and torch.equal(got_bf16, want.to(torch.bfloat16))


def test_cache_hits_are_marked_and_identical(client):
    body = {"images": [b64(png(33, 44, seed=8))]}
    first = client.post("/v1/encode", json=body)
    second = client.post("/v1/encode", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.json()["data"] == second.json()["data"]
    # Server-Timing: the computed image's wait for its batch and the batch's model time; nothing for a hit.
    timing = dict(re.findall(r"(\w+);dur=([0-9.]+)", first.headers["server-timing"]))
    assert set(timing) == {"queue", "compute"} and float(timing["compute"]) > 0, first.headers["server-timing"]
    assert "server-timing" not in second.headers
    other_options = client.post("/v1/encode", json={**body, "layers": [0]})
    assert other_options.headers["x-cache"] == "miss"  # the options are part of the key


def histogram(h) -> tuple[float, float]:
    """A prometheus histogram's (count, sum) so far."""
    samples = {s.name.rsplit("_", 1)[-1]: s.value for s in h.collect()[0].samples}
    return samples["count"], samples["sum"]


def test_concurrent_requests_are_batched_and_exact(server, encoder):
    """Twelve concurrent single-image requests share forward passes (max_wait_ms 20) and each gets exactly the
    result of its image encoded alone."""
    images = [png(25 + i, 31, seed=100 + i) for i in range(12)]
    expected = torch.stack([pool_rows(encoder.encode([image]))[0] for image in images])
    passes_before, views_before = histogram(server.service.metrics.batch_size)

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": b64(image)})
                                          for image in images))

    responses = asyncio.run(run_all())
    got = torch.tensor([r.json()["data"][0]["embedding"] for r in responses], dtype=torch.float32)
    assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max().item()}"
    passes, views = histogram(server.service.metrics.batch_size)
    assert views - views_before == len(images)
    assert passes - passes_before < len(images), "concurrent images should share forward passes"


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"input": "@@@"}, 400, "invalid_request"),  # not base64
    ({"input": "https://example.com/cat.png"}, 400, "invalid_request"),  # URLs are never fetched
    ({"input": "/etc/passwd"}, 400, "invalid_request"),  # nor paths read
    ({"input": "data:text/plain;base64,aGVsbG8="}, 400, "invalid_request"),
    ({"input": 5}, 400, "invalid_request"),
    ({"input": []}, 400, "invalid_request"),
    ({"input": [b64(png(8, 8))] * 5}, 413, "payload_too_large"),  # max_images 4
    ({"input": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)}, 422, "invalid_image"),
    ({"input": b64(png(40, 40, seed=9)[:300])}, 422, "invalid_image"),  # truncated
    ({"input": b64(bomb_png())}, 422, "invalid_image"),
    ({"input": b64(png(8, 8)), "dimensions": 7}, 400, "invalid_request"),
])
def test_bad_requests_get_json_errors(client, body, status, kind):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["type"] == kind
    text = json.dumps(body)
    if len(text) > 100:  # an image was sent: its bytes never come back
        assert text[20:60] not in response.text


def test_transport_errors(client):
    assert client.post("/v1/embeddings", content=b"{\"input\": [").status_code == 400
    too_big = client.post("/v1/encode", json={"images": ["A" * (1024 * 1024 + 8)]})
    assert too_big.status_code == 413 and error_of(too_big)["type"] == "payload_too_large"
    assert client.post("/v1/encode", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert error_of(client.get("/v1/nothing"))["type"] == "not_found"
    assert error_of(client.get("/v1/encode"))["type"] == "method_not_allowed"
    assert client.post("/v1/encode", json={"images": [b64(png(8, 8))], "layers": [99]}).status_code == 400
    assert client.post("/v1/encode", json={"images": [b64(png(8, 8))], "normalize": True}).status_code == 400
    assert client.post("/v1/encode", json={"images": [b64(png(8, 8))], "pan_and_scan": True,
                                           "pan_and_scan_max_num_crops": 1000}).status_code == 400
    metrics = client.get("/metrics").text
    assert 'gemma3_vision_rejections_total{cause="too_large"}' in metrics


def test_api_key(encoder):
    settings = ServeSettings(model_name="random:tiny", api_key="s3cret")
    with serving(encoder, settings) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        assert client.get("/health").status_code == 200  # the one open route
        body = {"input": b64(png(10, 10))}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path, kwargs in (("GET", "/ready", {}), ("GET", "/metrics", {}), ("GET", "/v1/models", {}),
                                         ("POST", "/v1/embeddings", {"json": body}),
                                         ("POST", "/v1/encode", {"json": {"images": [body["input"]]}}),
                                         ("GET", "/docs", {}), ("GET", "/nowhere", {})):
                response = client.request(method, path, headers=headers, **kwargs)
                assert response.status_code == 401, (path, headers, response.status_code)
                assert error_of(response)["type"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/ready", headers=ok).status_code == 200
        assert client.get("/ready", headers={"Authorization": "bearer s3cret"}).status_code == 200  # any case
        assert client.get("/ready", headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert client.post("/v1/embeddings", json=body, headers=ok).status_code == 200


class Gate:
    """An encoder copy whose forward passes wait until ``open`` is set; counts the images it computes."""

    def __init__(self, encoder):
        self.encoder = copy.copy(encoder)
        self.open = threading.Event()
        self.computed = 0
        real = self.encoder.encode_views

        def encode_views(pixels, **kwargs):
            assert self.open.wait(30)
            self.computed += len(pixels)
            return real(pixels, **kwargs)

        self.encoder.encode_views = encode_views


def test_full_queue_gets_429_and_deadline_504(encoder):
    gate = Gate(encoder)
    settings = ServeSettings(model_name="random:tiny", max_queue=2, timeout=1.0, max_wait_ms=0)
    with serving(gate.encoder, settings) as running:
        async def scenario():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/embeddings", json={"input": b64(png(9, 9, seed=1))}))
                while gate.encoder is not None and running.service.batcher.queue_depth == 0 and not first.done():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # the worker holds the first, gated
                queued = asyncio.create_task(client.post("/v1/embeddings",
                                                         json={"input": [b64(png(9, 9, seed=2)),
                                                                         b64(png(9, 9, seed=3))]}))
                while running.service.batcher.queue_depth < 2 and not queued.done():
                    await asyncio.sleep(0.01)
                full = await client.post("/v1/embeddings", json={"input": b64(png(9, 9, seed=4))})
                return full, await first, await queued

        full, first, queued = asyncio.run(scenario())
        gate.open.set()
        assert full.status_code == 429 and full.headers["retry-after"].isdigit(), full.text
        assert error_of(full)["type"] == "overloaded"
        assert first.status_code == 504 and error_of(first)["type"] == "timeout"
        assert queued.status_code == 504
        with httpx.Client(base_url=running.url, timeout=30) as client:
            wait_ready(client)
            for _ in range(3000):  # the gated batch finishes (a first OpenVINO forward compiles), then the
                if running.service.batcher.queue_depth == 0:  # abandoned images leave the queue
                    break
                time.sleep(0.01)
            assert client.post("/v1/embeddings", json={"input": b64(png(9, 9, seed=5))}).status_code == 200


def test_client_gone_is_dropped_before_compute(encoder):
    """A request whose client disconnects while its image waits for the model is never computed."""
    gate = Gate(encoder)
    settings = ServeSettings(model_name="random:tiny", max_wait_ms=0)
    with serving(gate.encoder, settings) as running:
        async def scenario():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                blocker = asyncio.create_task(client.post("/v1/embeddings", json={"input": b64(png(9, 9, seed=1))}))
                await asyncio.sleep(0.2)
                reader, writer = await asyncio.open_connection("127.0.0.1", int(running.url.rsplit(":", 1)[1]))
                body = json.dumps({"input": b64(png(9, 9, seed=2))}).encode()
                writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                while running.service.batcher.queue_depth < 1:
                    await asyncio.sleep(0.01)
                writer.close()  # gone while queued behind the gated batch
                await asyncio.sleep(0.3)
                gate.open.set()
                return await blocker

        assert asyncio.run(scenario()).status_code == 200
        with httpx.Client(base_url=running.url, timeout=30) as client:
            assert client.post("/v1/embeddings", json={"input": b64(png(9, 9, seed=3))}).status_code == 200
            assert gate.computed == 2, "the image of the client that left was computed"
            assert "gemma3_vision_dropped_images_total 1.0" in client.get("/metrics").text


def test_identical_images_in_flight_are_computed_once(encoder):
    gate = Gate(encoder)
    with serving(gate.encoder, ServeSettings(model_name="random:tiny", max_wait_ms=0)) as running:
        image = b64(png(12, 12, seed=21))

        async def scenario():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/embeddings", json={"input": image}))
                await asyncio.sleep(0.2)  # the first is in the gated forward pass, or queued for it
                second = asyncio.create_task(client.post("/v1/embeddings", json={"input": [image, image]}))
                await asyncio.sleep(0.2)
                gate.open.set()
                return await first, await second

        first, second = asyncio.run(scenario())
        assert first.status_code == second.status_code == 200
        vectors = [first.json()["data"][0]["embedding"], *(d["embedding"] for d in second.json()["data"])]
        assert vectors[0] == vectors[1] == vectors[2]
        assert gate.computed == 1, f"the same image was computed {gate.computed} times"


def test_worker_death_gives_503_and_exit_code_1(encoder, unused_port):
    from serve_fixtures import run

    broken = copy.copy(encoder)

    def fail(pixels, **kwargs):
        raise RuntimeError("simulated device failure")

    broken.encode_views = fail
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run(broken, ServeSettings(), port=unused_port,
                                                                log_level="critical")))
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{unused_port}", timeout=30) as client:
        wait_ready_or_up(client)
        response = client.post("/v1/embeddings", json={"input": b64(png(9, 9))})
        assert response.status_code == 503 and "simulated device failure" in error_of(response)["message"]
    thread.join(30)
    assert codes == [1]


def test_a_model_that_cannot_load_is_the_commands_error(unused_port):
    from gemma3_vision.errors import ModelNotFoundError
    from serve_fixtures import run

    def loader():
        raise ModelNotFoundError("no model called nothing-here")

    with pytest.raises(ModelNotFoundError):
        run(loader, ServeSettings(), port=unused_port, log_level="critical")


def wait_ready_or_up(client) -> None:
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_base64_embedding_bytes_are_float32_little_endian(client, encoder):
    image = png(21, 21, seed=11)
    response = client.post("/v1/embeddings", json={"input": b64(image), "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), "<f4")
    assert np.array_equal(vector, pool_rows(encoder.encode([image]))[0].numpy())


def test_batched_results_own_their_storage(encoder):
    """An image's tensors from a batch of two hold only that image's rows: the cache, which counts an entry's own
    bytes, would otherwise keep each whole batch alive."""
    from gemma3_vision.serve import Batcher, ComputeKey
    from gemma3_vision.serve.metrics import Metrics

    metrics = Metrics()
    batcher = Batcher(encoder, max_batch_size=2, max_wait_ms=5000, metrics=metrics)
    batcher.start()
    try:
        size = encoder.image_size
        views = np.random.default_rng(0).random((2, 1, size, size, 3), dtype=np.float32)  # 2 images of 1 view
        batcher.reserve(2)
        futures = [batcher.submit(v, ComputeKey(project=True, layers=(1,))) for v in views]
        results = [f.result(timeout=60)[0] for f in futures]  # each (views, timing)
    finally:
        batcher.close(60)
    assert metrics.registry.get_sample_value("gemma3_vision_batch_size_sum") == 2, "not one batch of two"
    for (view,) in results:
        for name, t in (("embeddings", view.embeddings), *((f"layer{i}", h) for i, h in view.layers.items())):
            held = t.untyped_storage().nbytes()
            assert held == t.nbytes, f"{name} holds {held} bytes of storage for {t.nbytes} bytes of its own"


def test_more_new_images_than_the_queue_holds_is_413_not_429(encoder):
    """Retrying cannot help a request that needs more queue slots than there are: 413, not 429 + Retry-After."""
    settings = ServeSettings(model_name="random:tiny", max_queue=2, max_images=4)
    with serving(encoder, settings) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        wait_ready(client)
        images = [b64(png(9, 9, seed=40 + i)) for i in range(3)]
        response = client.post("/v1/embeddings", json={"input": images})
        assert response.status_code == 413, response.text
        assert error_of(response)["type"] == "payload_too_large"
        assert client.post("/v1/embeddings", json={"input": images[:2]}).status_code == 200


def test_remembered_option_keys_stay_bounded(client, server, monkeypatch):
    """Each request may choose new options (a Pan & Scan ratio is any number): what is kept per option set stays
    bounded."""
    from gemma3_vision.serve import service as service_module

    monkeypatch.setattr(service_module, "JOB_KEYS_KEPT", 2)
    for i in range(4):
        response = client.post("/v1/encode", json={"images": [b64(png(9, 9))], "pan_and_scan": True,
                                                   "pan_and_scan_min_ratio": 1.5 + i})
        assert response.status_code == 200, response.text
    assert len(server.service._job_keys) <= 2


def test_bodies_held_at_once_are_bounded(encoder):
    """Many uploads at once cannot grow memory without bound: while one client's body all but fills the budget (it
    sends slowly), another request is refused with 429; once the first client leaves, its bytes are given back."""
    settings = ServeSettings(model_name="random:tiny", max_body_mb=1, max_bodies_mb=1, timeout=30)
    with serving(encoder, settings) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        wait_ready(client)
        port = int(running.url.rsplit(":", 1)[1])
        image = {"input": b64(png(9, 9, seed=50))}
        slow = socket.create_connection(("127.0.0.1", port))
        try:
            slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (1024 * 1024) + b" " * (1024 * 1024 - 64))
            for _ in range(500):  # until the server holds the slow body
                if running.service.body_bytes >= 1024 * 1024 - 64:
                    break
                time.sleep(0.01)
            refused = client.post("/v1/embeddings", json=image)
            assert refused.status_code == 429, refused.text
            assert error_of(refused)["type"] == "overloaded" and refused.headers["retry-after"] == "1"
        finally:
            slow.close()
        for _ in range(500):  # the slow client left: its bytes are given back
            if running.service.body_bytes == 0:
                break
            time.sleep(0.01)
        assert running.service.body_bytes == 0
        assert client.post("/v1/embeddings", json=image).status_code == 200


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_response_over_max_response_mb_is_413_before_compute(client, encoder, fmt):
    """The limit is the response's tensor bytes (each base64 .npy in JSON), measured here from a real response: a
    limit of exactly that answers 200, one byte less a 413 that names the size, the limit and what to change, and
    computes nothing."""
    request = {"images": [b64(png(20, 30, seed=70)), b64(png(30, 20, seed=71))], "layers": [0, 1, 1],
               "pool": "mean", "dtype": "float16", "format": fmt}
    answer = client.post("/v1/encode", json=request)
    assert answer.status_code == 200, answer.text
    if fmt == "npy":  # JSON with a base64 .npy per tensor
        size = sum(len(t["npy"]) for image in answer.json()["data"] for t in image["tensors"].values())
    else:
        from safetensors.torch import load

        size = sum(t.numel() * t.element_size() for t in load(answer.content).values())
    fresh = {**request, "images": [b64(png(20, 30, seed=72)), b64(png(30, 20, seed=73))]}  # never computed
    for limit, status in ((size - 1, 413), (size, 200)):
        settings = ServeSettings(model_name="random:tiny", max_response_mb=limit / 2**20)
        with serving(encoder, settings) as running, httpx.Client(base_url=running.url, timeout=30) as limited:
            wait_ready(limited)
            response = limited.post("/v1/encode", json=fresh)
            assert response.status_code == status, response.text
            if status == 413:
                error = error_of(response)
                assert error["type"] == "payload_too_large"
                assert f"{size - 1:,} bytes (--max-response-mb)" in error["message"], error
                assert f"found {size:,} bytes" in error["message"], error
                assert "fewer images or layers" in error["message"], error
                assert "gemma3_vision_images_encoded_total 0.0" in limited.get("/metrics").text
