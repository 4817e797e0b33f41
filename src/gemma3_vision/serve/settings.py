"""The service's settings: one frozen dataclass, filled from ``gemma3-vision serve``'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..model.preprocessing import DEFAULT_MAX_PIXELS

API_KEY_ENV = "GEMMA3_VISION_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """Limits and knobs of one service (``docs/serving.md`` explains each)."""

    model_name: str = "gemma3-vision"  # what /v1/models and every response call the model (the --model argument)
    max_batch_size: int = 8  # views per forward pass
    max_wait_ms: float = 5.0  # how long the worker waits for more images once it has one
    max_queue: int = 256  # images admitted and not yet computed; beyond it, 429
    max_body_mb: float = 32.0  # request body; beyond it, 413
    max_bodies_mb: float = 256.0  # request bodies held at once, all requests together (at least one body); then 429
    max_images: int = 32  # images per request; beyond it, 413
    max_response_mb: float = 512.0  # largest /v1/encode response, bounded before any compute; beyond it, 413
    timeout: float = 120.0  # seconds from a request's arrival to its answer; then 504 (408 while its body arrives)
    cache_mb: float = 256.0  # result cache; 0 turns it off
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb limit, checked from the image header
    decode_threads: int = min(4, os.cpu_count() or 1)  # threads decoding and preprocessing images

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_bodies_bytes(self) -> int:
        return int(max(self.max_bodies_mb, self.max_body_mb) * 1024 * 1024)

    @property
    def max_response_bytes(self) -> int:
        return int(self.max_response_mb * 1024 * 1024)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 1024 * 1024)
