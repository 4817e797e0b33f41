"""Prometheus metrics of one service, in a registry of its own (two apps in one process never share counters).

Names follow Prometheus' naming guide: ``gemma3_vision_*``, the unit last (``_seconds``, ``_total``).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the service exports (``GET /metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gemma3_vision_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.images = Counter("gemma3_vision_images_encoded", "Images computed by the model (cache hits excluded)",
                              registry=r)
        self.views = Counter("gemma3_vision_views_encoded", "Views computed by the model (images and Pan & Scan "
                             "crops)", registry=r)
        self.queue_depth = Gauge("gemma3_vision_queue_depth", "Images admitted and not yet taken into a batch",
                                 registry=r)
        self.batch_size = Histogram("gemma3_vision_batch_size", "Views per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_wait = Histogram("gemma3_vision_queue_wait_seconds", "Time from queueing an image to its "
                                    "forward pass", buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("gemma3_vision_compute_seconds", "Time of one forward pass (one batch)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.total = Histogram("gemma3_vision_request_duration_seconds", "Time from a request's arrival to its "
                               "response, by route", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("gemma3_vision_cache_hits", "Images answered from the result cache", registry=r)
        self.cache_misses = Counter("gemma3_vision_cache_misses", "Images not found in the result cache",
                                    registry=r)
        self.coalesced = Counter("gemma3_vision_coalesced", "Images that joined an identical image already in "
                                 "flight instead of being computed again", registry=r)
        self.cache_bytes = Gauge("gemma3_vision_cache_bytes", "Bytes held by the result cache", registry=r)
        self.rejections = Counter("gemma3_vision_rejections", "Requests refused, by cause", ["cause"], registry=r)
        self.dropped = Counter("gemma3_vision_dropped_images", "Images dropped before computing: their client went "
                               "away or their deadline passed", registry=r)

    def observe_batch(self, views: int, images: int, seconds: float, waits: Sequence[float]) -> None:
        """One forward pass of ``views`` views from ``images`` images, after those queue waits."""
        self.batch_size.observe(views)
        self.compute.observe(seconds)
        self.images.inc(images)
        self.views.inc(views)
        for wait in waits:
            self.queue_wait.observe(wait)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
