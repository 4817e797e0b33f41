"""Helpers of the service tests: a real uvicorn server on the loopback interface, in a thread, and test images."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

import gemma3_vision as g3  # noqa: E402
from gemma3_vision.serve import ServeSettings, create_app, run  # noqa: E402

__all__ = ["ServeSettings", "create_app", "run"]  # the tests import the service from here, after the skip


def load_tiny() -> g3.Gemma3Vision:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return g3.load("random:tiny", device="cpu")


def png(h: int, w: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An image file of seeded noise."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def npy(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def bomb_png() -> bytes:
    """A small PNG whose header claims 30000 x 30000 pixels (900 M, over the 89 M limit)."""
    import struct
    import zlib

    data = bytearray(png(8, 8))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", 30000, 30000)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


class Running:
    """A served app: its base URL, the uvicorn server and the app (``app.state.service``)."""

    def __init__(self, url: str, server: Any, app: Any):
        self.url, self.server, self.app = url, server, app

    @property
    def service(self) -> Any:
        return self.app.state.service


@contextlib.contextmanager
def serving(encoder: Any, settings: ServeSettings | None = None, *,
            on_fatal: Callable[[BaseException], None] | None = None) -> Iterator[Running]:
    """``create_app(encoder, settings)`` under uvicorn on 127.0.0.1 (a free port), stopped on exit."""
    app = create_app(encoder, settings or ServeSettings(model_name="random:tiny"), on_fatal=on_fatal)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{port}", server, app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


def wait_ready(client: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.02)
