"""Running the service: uvicorn around ``create_app``, with the shutdown and failure rules of ``docs/serving.md``.

``run(encoder, settings, *, host="127.0.0.1", port=8000, log_level="info") -> int`` serves until SIGTERM or
Ctrl-C and returns the process's exit code.

- SIGTERM / SIGINT: ``/ready`` turns 503 and new requests get 503 at once; uvicorn stops listening, lets the
  requests in flight finish (each ends by its deadline, ``--timeout``), then the worker finishes its batch and stops.
  The exit code is 0, within ``--timeout`` + one batch's compute + about 1 s. A second Ctrl-C stops at once.
- The model worker dies (the model raised): waiting requests get 503, the server stops and the exit code is 1.
- The model cannot be loaded: its error is raised here, once the server has stopped (the command line prints it
  on one line).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from ..api import Gemma3Vision
from .app import create_app
from .settings import ServeSettings

EXIT_OK = 0
EXIT_WORKER_DIED = 1
SHUTDOWN_MARGIN_S = 1.0  # beyond --timeout, for the last responses to be written


def run(encoder: Gemma3Vision | Callable[[], Gemma3Vision], settings: ServeSettings, *, host: str = "127.0.0.1",
        port: int = 8000, log_level: str = "info") -> int:
    """Serve ``encoder`` (or load it with this callable once listening) until a signal; the exit code."""
    import uvicorn

    fatal: list[BaseException] = []

    def on_fatal(error: BaseException) -> None:  # from the worker thread: uvicorn polls should_exit every 0.1 s
        fatal.append(error)
        server.should_exit = True

    app = create_app(encoder, settings, on_fatal=on_fatal)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            service.draining = True  # before anything else: /ready says 503 and new work is refused
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.timeout + SHUTDOWN_MARGIN_S + 0.999))
    server = Server(config)
    # uvicorn handles SIGTERM/SIGINT while it runs, then restores the handlers it found and raises the signal
    # again: with these no-op handlers in place, a graceful stop ends here and the process exits 0.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _after_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if fatal:
        if service.batcher.encoder is None:  # the model never loaded: that error is the command's error
            raise fatal[0]
        return EXIT_WORKER_DIED
    return EXIT_OK


def _after_shutdown(signum: int, frame: FrameType | None) -> None:
    """The signal uvicorn raises again once it has shut down gracefully: already handled."""
