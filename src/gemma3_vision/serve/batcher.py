"""The batching layer: one worker thread owns the model and runs the images of concurrent requests together.

``Batcher(encoder, *, max_batch_size=8, max_wait_ms=5.0, max_queue=256, metrics=None, on_fatal=None)``

- ``encoder`` is a loaded ``Gemma3Vision``, or a callable that returns one: the worker thread then loads the model
  itself, and ``ready`` turns true once it has.
- ``reserve(n)`` admits ``n`` images or raises ``Overloaded``: at most ``max_queue`` images wait between admission
  and the model (decoding, or queued for it). ``release(n)`` gives back what was admitted but will not be submitted.
- ``submit(views, key)`` queues one image's views, float32 NHWC ``(V, S, S, 3)``, and returns a
  ``concurrent.futures.Future`` of its ``ViewEncoding`` list and its ``Timing``. Cancelling that future before the worker takes it
  drops the image (its client went away): it is never computed. The image's reservation ends when it is taken.
- ``close()`` lets the worker finish what is queued, then stops it.

The worker waits for a first image, then gathers more for at most ``max_wait_ms`` until the batch holds
``max_batch_size`` views (an image with more views than that runs alone, in chunks). Images in one batch share the
compute options (``ComputeKey``: project, layers); others wait for a batch of their own, in arrival order. On a
CPU an image's result does not depend on its batch (the tower runs a CPU batch image by image and the projector
each image alone: docs/python-api.md), so a batched result equals ``Gemma3Vision.encode`` of the image alone.

If the model raises, the worker is dead: every waiting future fails with ``WorkerDied``, ``ready`` turns false,
and ``on_fatal(error)`` is called (the server then exits non-zero). A dead worker never leaves a request waiting.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..api import Gemma3Vision, ViewEncoding

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("gemma3_vision.serve")


class Overloaded(Exception):
    """The queue holds ``max_queue`` images already: try again later."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class WorkerDied(Exception):
    """The model worker has stopped (the model raised, or it could not be loaded): nothing more will be computed."""


@dataclass(frozen=True)
class ComputeKey:
    """What a forward pass computes beyond the tower output; images in one batch share it."""

    project: bool = True
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Timing:
    """Where one image's time went in the worker: waiting for its batch to start, and the batch's model time."""

    queue_s: float
    compute_s: float


Computed = tuple[list[ViewEncoding], Timing]  # what a submitted image's future gives


@dataclass
class _Work:
    views: np.ndarray  # (V, S, S, 3) float32
    key: ComputeKey
    future: concurrent.futures.Future[Computed]
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """The queue and the worker thread that owns the model (see the module docstring)."""

    def __init__(self, encoder: Gemma3Vision | Callable[[], Gemma3Vision], *, max_batch_size: int = 8,
                 max_wait_ms: float = 5.0, max_queue: int = 256, metrics: Metrics | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self._loader = encoder if callable(encoder) and not isinstance(encoder, Gemma3Vision) else None
        self.encoder: Gemma3Vision | None = encoder if isinstance(encoder, Gemma3Vision) else None
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.error: BaseException | None = None  # why the worker died
        self._queue: collections.deque[_Work] = collections.deque()
        self._cond = threading.Condition()
        self._admitted = 0  # images reserved and not yet taken by the worker (queued or still decoding)
        self._closing = False
        self._loaded = threading.Event()
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="gemma3-vision-model", daemon=True)

    # --- the request side (any thread) ---

    @property
    def ready(self) -> bool:
        """The model is loaded and the worker is serving."""
        return self._loaded.is_set() and self.error is None and self._thread.is_alive() and not self._closing

    @property
    def queue_depth(self) -> int:
        """Images admitted and not yet taken into a batch."""
        return self._admitted

    def reserve(self, n: int) -> None:
        """Admit ``n`` images, or raise ``Overloaded`` (``WorkerDied`` once the worker is gone)."""
        with self._cond:
            self._check_alive()
            if self._admitted + n > self.max_queue:
                raise Overloaded(f"the queue holds {self._admitted} of at most {self.max_queue} images; this "
                                 f"request adds {n}", self.retry_after())
            self._admitted += n
            self._gauge()

    def release(self, n: int) -> None:
        """Give back ``n`` admitted images that will not be submitted (a cache hit, a bad image, a client gone)."""
        with self._cond:
            self._admitted -= n
            self._gauge()

    def submit(self, views: np.ndarray, key: ComputeKey) -> concurrent.futures.Future[Computed]:
        """Queue one admitted image's views ``(V, S, S, 3)``; the future gives one ``ViewEncoding`` per view, and
        the image's ``Timing``."""
        future: concurrent.futures.Future[Computed] = concurrent.futures.Future()
        with self._cond:
            self._check_alive()
            self._queue.append(_Work(views, key, future))
            self._cond.notify()
        return future

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued images, then stop the worker (waiting at most ``timeout`` seconds)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise WorkerDied(f"the model worker has stopped ({type(self.error).__name__}: {self.error})")
        if self._closing:
            raise WorkerDied("the service is shutting down")

    def retry_after(self) -> int:
        """Seconds until the queue has drained, by the recent rate; at least 1."""
        return max(1, round(self._admitted * self._seconds_per_image))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._admitted)

    # --- the worker thread ---

    def _run(self) -> None:
        try:
            if self.encoder is None:
                assert self._loader is not None
                self.encoder = self._loader()
            self._loaded.set()
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._compute(batch)
        except BaseException as e:  # the model raised, or could not be loaded: nothing can run any more
            if self.encoder is not None:  # a load error is the caller's to report (server.run raises it)
                log.error("model worker stopped: %s: %s", type(e).__name__, e)
            self._die(e)

    def _next_batch(self) -> list[_Work] | None:
        """Wait for a first image, then gather images with its compute key for at most ``max_wait``, up to
        ``max_batch_size`` views. None once closing with nothing left."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.perf_counter() + self.max_wait
            while True:
                batch, views = self._take_locked()
                if views >= self.max_batch_size or self._closing:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                for work in reversed(batch):  # back at the head, in order, until the wait is over
                    self._queue.appendleft(work)
                self._cond.wait(left)
            taken = [w for w in batch if w.future.set_running_or_notify_cancel()]  # a cancelled one is dropped
            if self.metrics is not None and len(taken) < len(batch):
                self.metrics.dropped.inc(len(batch) - len(taken))
            self._admitted -= len(batch)
            self._gauge()
            return taken

    def _take_locked(self) -> tuple[list[_Work], int]:
        """Take the head image and the queued images that share its key, while they fit in one batch."""
        head = self._queue.popleft()
        batch, views, kept = [head], len(head.views), collections.deque[_Work]()
        while self._queue:
            work = self._queue.popleft()
            if work.key == head.key and views + len(work.views) <= self.max_batch_size:
                batch.append(work)
                views += len(work.views)
            else:
                kept.append(work)
        self._queue.extendleft(reversed(kept))
        return batch, views

    def _compute(self, batch: list[_Work]) -> None:
        if not batch:
            return
        key = batch[0].key
        started = time.perf_counter()
        pixels = torch.from_numpy(np.concatenate([w.views for w in batch]))  # (sum V, S, S, 3)
        views: list[ViewEncoding] = []
        try:
            self._forward(pixels, key, views)
        except BaseException as e:
            for work in batch:
                work.future.set_exception(WorkerDied(f"the model worker has stopped ({type(e).__name__}: {e})"))
            raise
        elapsed = time.perf_counter() - started
        start = 0
        for work in batch:
            work.future.set_result((views[start:start + len(work.views)], Timing(started - work.queued_at, elapsed)))
            start += len(work.views)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(batch)
        if self.metrics is not None:
            self.metrics.observe_batch(len(pixels), len(batch), elapsed, [started - w.queued_at for w in batch])

    def _forward(self, pixels: torch.Tensor, key: ComputeKey, views: list[ViewEncoding]) -> None:
        """Append one ``ViewEncoding`` per row of ``pixels`` ``(V, S, S, 3)``, its tensors on the CPU."""
        assert self.encoder is not None
        for i in range(0, len(pixels), self.max_batch_size):  # more than one chunk only for one many-view image
            for view in self.encoder.encode_views(pixels[i:i + self.max_batch_size], project=key.project,
                                                  layers=key.layers):
                views.append(ViewEncoding(view.box, own_cpu(view.embeddings),
                                          {j: own_cpu(h) for j, h in view.layers.items()}))

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            waiting = list(self._queue)
            self._queue.clear()
        message = f"the model worker has stopped ({type(error).__name__}: {error})"
        for work in waiting:
            if not work.future.done():
                work.future.set_exception(WorkerDied(message))
        if self.on_fatal is not None:
            self.on_fatal(error)


def own_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU in storage of its own: a view's row of a batch tensor would otherwise keep the whole batch
    alive in the cache, which counts only the row's bytes."""
    t = t.cpu()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
