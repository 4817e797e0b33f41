"""gemma3-vision serve under load: valid requests mixed with hostile ones, and SIGTERM on a real server process.

Loopback only, bounded in count and time (each test a few seconds on 2 cores)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from gemma3_vision.api import pool_rows
from serve_fixtures import ServeSettings, b64, bomb_png, load_tiny, png, serving

httpx = pytest.importorskip("httpx")

VALID = 40  # valid single-image requests
CONCURRENCY = 16


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def raw_request(port: int, body: bytes, *, send_fraction: float = 1.0, pause: float = 0.0,
                      pieces: int = 1, read: bool = True) -> int | None:
    """POST /v1/embeddings over a bare socket: ``send_fraction`` of the body in ``pieces`` with ``pause`` between
    them; then the status code, or None when ``read`` is False (the client hangs up instead)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        part = body[:int(len(body) * send_fraction)]
        step = max(1, len(part) // pieces)
        for i in range(0, len(part), step):
            writer.write(part[i:i + step])
            await writer.drain()
            await asyncio.sleep(pause)
        if not read:
            return None
        status_line = await asyncio.wait_for(reader.readline(), 30)
        return int(status_line.split()[1])
    finally:
        writer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's RSS from /proc (Linux)")
def test_mixed_valid_and_hostile_load():
    """Every valid request gets its exact embedding and every bad one a 4xx JSON error; no 5xx, /ready stays 200,
    and the process's memory stays bounded."""
    encoder = load_tiny()
    images = [png(20 + i % 7, 24 + i % 5, seed=1000 + i) for i in range(VALID)]
    expected = torch.stack([pool_rows(encoder.encode([image]))[0] for image in images])  # each image alone
    settings = ServeSettings(model_name="random:tiny", max_body_mb=1, max_images=4, timeout=3.0, max_queue=128,
                             max_batch_size=8, max_wait_ms=2)
    hostile = {  # name: (JSON body or raw bytes, expected status)
        "bad base64": ({"input": "not*base64"}, 400),
        "truncated png": ({"input": b64(png(64, 64, seed=7)[:500])}, 422),
        "decompression bomb": ({"input": b64(bomb_png())}, 422),
        "oversized body": ({"input": "A" * (1536 * 1024)}, 413),
        "wrong json": (b'{"input": [', 400),
        "wrong type": ({"input": {"image": "x"}}, 400),
        "too many images": ({"input": [b64(images[0])] * 5}, 413),
        "garbage bytes": ({"input": b64(os.urandom(4096))}, 422),
    }
    with serving(encoder, settings) as running:
        port = int(running.url.rsplit(":", 1)[1])
        rss_before = rss_mb()

        async def scenario():
            limits = httpx.Limits(max_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=running.url, timeout=30, limits=limits) as client:
                ready_codes: list[int] = []
                rss_peak = [rss_before]
                stop = asyncio.Event()

                async def watch():
                    while not stop.is_set():
                        ready_codes.append((await client.get("/ready")).status_code)
                        rss_peak[0] = max(rss_peak[0], rss_mb())
                        await asyncio.sleep(0.05)

                async def valid(i):
                    return await client.post("/v1/embeddings", json={"input": b64(images[i])})

                async def bad(body):
                    if isinstance(body, bytes):
                        return await client.post("/v1/embeddings", content=body,
                                                 headers={"content-type": "application/json"})
                    return await client.post("/v1/embeddings", json=body)

                async def chunked_oversize():  # no Content-Length: the limit is counted as the body streams
                    async def chunks():
                        for _ in range(24):
                            yield b"A" * 65536
                    return await client.post("/v1/embeddings", content=chunks(),
                                             headers={"content-type": "application/json"})

                slow_body = json.dumps({"input": b64(images[0])}).encode()
                watcher = asyncio.create_task(watch())
                tasks = {f"valid {i}": valid(i) for i in range(VALID)}
                for round_ in range(2):
                    tasks.update({f"{name} {round_}": bad(body) for name, (body, _) in hostile.items()})
                tasks["chunked oversize"] = chunked_oversize()
                tasks["disconnects mid-body"] = raw_request(port, slow_body, send_fraction=0.5, read=False)
                tasks["disconnects after body"] = raw_request(port, slow_body, read=False)
                tasks["slow client"] = raw_request(port, slow_body, pieces=5, pause=0.2)
                tasks["stalled client"] = raw_request(port, slow_body, send_fraction=0.3, pause=0.1)
                results = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
                await asyncio.sleep(0.2)
                stop.set()
                await watcher
                metrics = (await client.get("/metrics")).text
                return results, ready_codes, rss_peak[0], metrics

        results, ready_codes, rss_peak, metrics = asyncio.run(scenario())

    for i in range(VALID):
        response = results[f"valid {i}"]
        assert response.status_code == 200, response.text
        got = torch.tensor(response.json()["data"][0]["embedding"], dtype=torch.float32)
        assert torch.equal(got, expected[i]), f"valid {i}: max abs diff {(got - expected[i]).abs().max().item()}"
    for name, (_, status) in hostile.items():
        for round_ in range(2):
            response = results[f"{name} {round_}"]
            assert response.status_code == status, (name, response.status_code, response.text[:200])
            assert set(response.json()["error"]) == {"type", "message"}
    assert results["chunked oversize"].status_code == 413
    assert results["slow client"] == 200
    assert results["stalled client"] == 408  # its body never completed within --timeout
    assert ready_codes and set(ready_codes) == {200}, "/ready left 200 under load"
    statuses = [line for line in metrics.splitlines() if line.startswith("gemma3_vision_requests_total{")]
    assert not [line for line in statuses if 'status="5' in line], statuses
    assert rss_peak - rss_before < 300, f"RSS grew by {rss_peak - rss_before:.0f} MB under load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_0():
    """A real ``gemma3-vision serve`` process: requests waiting in its batcher when SIGTERM arrives are answered,
    later ones are refused, and the process exits 0 within the documented bound."""
    port = free_port()
    timeout = 10
    command = [sys.executable, "-m", "gemma3_vision", "serve", "--model", "random:tiny", "--device", "cpu",
               "--port", str(port), "--max-wait-ms", "1500", "--max-batch-size", "64", "--timeout", str(timeout),
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    images = [png(30, 30, seed=2000 + i) for i in range(6)]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                in_flight = [asyncio.create_task(client.post("/v1/embeddings", json={"input": b64(image)}))
                             for image in images]
                await asyncio.sleep(0.5)  # all queued: the worker gathers for 1.5 s
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.3)
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                        late = (await fresh.post("/v1/embeddings", json={"input": b64(images[0])})).status_code
                except httpx.TransportError:
                    late = "refused"
                return await asyncio.gather(*in_flight), late, signalled

        responses, late, signalled = asyncio.run(scenario())
        code = process.wait(timeout=timeout + 15)
        stopped_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    encoder = load_tiny()
    for image, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text
        got = torch.tensor(response.json()["data"][0]["embedding"], dtype=torch.float32)
        assert torch.equal(got, pool_rows(encoder.encode([image]))[0])
    assert late in (503, "refused"), late
    assert code == 0, process.stderr.read().decode() if process.stderr else code
    assert stopped_after < timeout + 5, f"exit took {stopped_after:.1f} s"
