"""``gemma3-vision serve``: Gemma 3 image embeddings over HTTP, batched, bounded and observable.

Install with ``pip install "gemma3-vision[serve]"`` (FastAPI, uvicorn, prometheus_client, python-multipart). Three
layers, each a module with one job:

- ``app.create_app(encoder, settings=None, *, on_fatal=None) -> FastAPI``: routes, limits, auth, errors as JSON,
  metrics. ``encoder`` is a loaded ``gemma3_vision.Gemma3Vision`` or a callable returning one; ``settings`` a
  ``ServeSettings`` (None: the defaults).
- ``service.EncodeService``: the cache, identical images computed once, decoding in a thread pool, deadlines.
- ``batcher.Batcher(encoder, *, max_batch_size=8, max_wait_ms=5.0, max_queue=256, metrics=None, on_fatal=None)``:
  the queue and the one worker thread that owns the model.

``server.run(encoder, settings, *, host, port, log_level) -> int`` runs it under uvicorn with the documented
shutdown; ``ServeSettings`` (``settings.py``) holds every limit. The routes, options and status codes are in
``docs/serving.md``.
"""

from __future__ import annotations

from .app import create_app
from .batcher import Batcher, ComputeKey
from .server import run
from .settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "Batcher", "ComputeKey", "ServeSettings", "create_app", "run"]
