"""Between the routes and the batcher: the cache, identical images computed once, decoding off the event loop,
deadlines and clients that go away.

``EncodeService(batcher, settings, metrics)``; ``await service.encode(images, digests, options, deadline=...,
gone=...)`` returns one ``ImageEncoding`` per image (tensors in the model's dtype, on the CPU) and how many came
from the cache. It runs on the event loop; everything heavy runs in its decode thread pool or the batcher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from ..api import Gemma3Vision, ImageEncoding
from ..errors import ImageError, OptionError
from ..jobs.job import EncodeOptions, check_options, job_key
from ..model.pan_and_scan import Box
from .batcher import Batcher, ComputeKey, Timing, WorkerDied
from .batcher import Overloaded as QueueFull
from .cache import ResultCache
from .codec import ImageOptions
from .metrics import Metrics
from .problems import (
    ClientGone,
    DeadlineExceeded,
    InvalidImage,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
)
from .settings import ServeSettings

T = TypeVar("T")
JOB_KEYS_KEPT = 256  # option sets whose job key is remembered (computing one hashes the model's identity)
log = logging.getLogger("gemma3_vision.serve")


@dataclass
class _InFlight:
    """One image being computed, shared by every request that sent the same bytes with the same options."""

    future: asyncio.Future[ImageEncoding]
    waiters: int = 0
    timing: Timing | None = None  # set with the result
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class EncodeService:
    """See the module docstring."""

    def __init__(self, batcher: Batcher, settings: ServeSettings, metrics: Metrics):
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics
        self.cache = ResultCache(settings.cache_bytes)
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.draining = False
        self.body_bytes = 0  # request bodies held, all requests together (``app.BodyBudget``)
        self._in_flight: dict[str, _InFlight] = {}
        self._job_keys: dict[ImageOptions, str] = {}

    @property
    def encoder(self) -> Gemma3Vision:
        encoder = self.batcher.encoder
        if encoder is None or not self.batcher.ready:
            raise Unavailable(self.not_ready_reason())
        return encoder

    @property
    def ready(self) -> bool:
        return self.batcher.ready and not self.draining

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the service is shutting down: send new requests elsewhere"
        if self.batcher.error is not None:
            e = self.batcher.error
            return f"the model worker has stopped ({type(e).__name__}: {e})"
        return "the model is loading"

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the decode thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def check(self, options: ImageOptions) -> None:
        """Raises InvalidRequest for options this model cannot take (no projector, a layer beyond its depth)."""
        try:
            self._job_key(options)
        except OptionError as e:
            raise InvalidRequest(str(e)) from None

    def _job_key(self, options: ImageOptions) -> str:
        key = self._job_keys.get(options)
        if key is None:
            encoder = self.encoder
            checked = check_options(encoder, EncodeOptions(project=options.project, layers=options.layers,
                                                           pan_and_scan=options.pan_and_scan,
                                                           exif_transpose=options.exif_transpose))
            if len(self._job_keys) >= JOB_KEYS_KEPT:  # clients choose the options: keep a bounded few
                self._job_keys.clear()
            key = self._job_keys[options] = job_key(encoder, checked)
        return key

    async def encode(self, images: list[bytes], digests: list[str], options: ImageOptions, *, deadline: float,
                     gone: asyncio.Event) -> tuple[list[ImageEncoding], int, Timing | None]:
        """Each image's encoding, from the cache, from an identical image in flight, or computed; how many came
        from the cache; and the longest queue wait and batch time among the computed images (None when none was).

        Raises:
            InvalidRequest, InvalidImage: bad options, or an image that cannot be decoded (the first one).
            Overloaded: the queue has no room for this request's new images now. PayloadTooLarge: it never will
                (more new images than --max-queue).
            DeadlineExceeded: ``deadline`` (``loop.time()``) passed first. ClientGone: ``gone`` was set first.
            Unavailable: draining, or the worker died.
        """
        # No draining check: a request admitted before draining began still finishes (``admit`` refuses new ones).
        self.check(options)
        common = self._job_key(options)
        keys = [f"{d}:{common}" for d in digests]
        results: list[ImageEncoding | None] = [self.cache.get(k) for k in keys]
        hits = sum(r is not None for r in results)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(keys) - hits)
        wanted: dict[str, int] = {}  # key → index of its first image, for each image not in the cache
        for i, (key, result) in enumerate(zip(keys, results, strict=True)):
            if result is None:
                wanted.setdefault(key, i)
        new = [key for key in wanted if key not in self._in_flight]
        self.metrics.coalesced.inc(len(wanted) - len(new))
        if len(new) > self.batcher.max_queue:  # no retry can make room: the request itself is too large
            raise PayloadTooLarge(f"expected at most {self.batcher.max_queue} images to compute per request (the "
                                  f"queue's size, --max-queue), found {len(new)}")
        if new:
            try:
                self.batcher.reserve(len(new))
            except QueueFull as e:
                raise Overloaded(str(e), e.retry_after) from None
            except WorkerDied:
                raise Unavailable(self.not_ready_reason()) from None
        for key in new:
            entry = self._in_flight[key] = _InFlight(asyncio.get_running_loop().create_future())
            entry.task = asyncio.create_task(self._compute(key, entry, images[wanted[key]], options))
        entries = {key: self._in_flight[key] for key in wanted}
        for entry in entries.values():
            entry.waiters += 1
        try:
            done = await self._wait(entries, wanted, deadline, gone)
        finally:
            for key, entry in entries.items():
                entry.waiters -= 1
                if entry.waiters == 0 and not entry.future.done():
                    self._abandon(key, entry)
                elif entry.future.done() and not entry.future.cancelled():
                    entry.future.exception()  # seen: a second bad image of a refused request is not logged
        encodings = [r if r is not None else done[k] for r, k in zip(results, keys, strict=True)]
        timings = [entry.timing for entry in entries.values() if entry.timing is not None]
        timing = Timing(max(t.queue_s for t in timings), max(t.compute_s for t in timings)) if timings else None
        return encodings, hits, timing

    async def _wait(self, entries: dict[str, _InFlight], index: dict[str, int], deadline: float,
                    gone: asyncio.Event) -> dict[str, ImageEncoding]:
        """Every entry's result, or the first failure (naming its image by ``index``), ``DeadlineExceeded`` or
        ``ClientGone``."""
        loop = asyncio.get_running_loop()
        pending: dict[asyncio.Future[Any], str] = {entry.future: key for key, entry in entries.items()}
        results: dict[str, ImageEncoding] = {}
        gone_wait: asyncio.Future[Any] = asyncio.ensure_future(gone.wait())
        try:
            while pending:
                left = deadline - loop.time()
                if left <= 0:
                    raise DeadlineExceeded(f"the request's deadline of {self.settings.timeout:g} s passed with "
                                           f"{len(pending)} image(s) not yet computed (queue: "
                                           f"{self.batcher.queue_depth} images)")
                done, _ = await asyncio.wait([*pending, gone_wait], timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if gone_wait in done:
                    raise ClientGone
                for future in done:
                    key = pending.pop(future)
                    try:
                        results[key] = future.result()
                    except (InvalidImage, InvalidRequest) as e:
                        raise type(e)(f"image {index[key]}: {e.message}") from None
        finally:
            gone_wait.cancel()
        return results

    def _abandon(self, key: str, entry: _InFlight) -> None:
        """No request waits for this image any more: stop it (the batcher drops it if not yet computed)."""
        if self._in_flight.get(key) is entry:
            del self._in_flight[key]
        if entry.task is not None:
            entry.task.cancel()

    async def _compute(self, key: str, entry: _InFlight, data: bytes, options: ImageOptions) -> None:
        """Decode ``data`` in the pool, run it through the batcher, and settle ``entry`` (cached on success)."""
        submitted = False
        try:
            encoder = self.encoder
            size, views, boxes = await self.run(self._prepare, encoder, data, options)
            future = self.batcher.submit(views, ComputeKey(options.project, options.layers))
            submitted = True
            computed, timing = await asyncio.wrap_future(future)
            entry.timing = timing
            encoding = ImageEncoding(size, [replace(v, box=b) for v, b in zip(computed, boxes, strict=True)])
            self.cache.put(key, encoding)
            self.metrics.cache_bytes.set(self.cache.bytes)
            entry.future.set_result(encoding)
        except asyncio.CancelledError:
            entry.future.cancel()
            raise
        except ImageError as e:
            entry.future.set_exception(InvalidImage(str(e)))
        except OptionError as e:
            entry.future.set_exception(InvalidRequest(str(e)))
        except WorkerDied as e:
            entry.future.set_exception(Unavailable(str(e)))
        except Unavailable as e:
            entry.future.set_exception(e)
        except Exception as e:  # a bug: the request gets a 500 (never a traceback), the log gets the details
            log.exception("encoding an image failed")
            entry.future.set_exception(e)
        finally:
            if not submitted:
                self.batcher.release(1)
            if self._in_flight.get(key) is entry:
                del self._in_flight[key]

    def _prepare(self, encoder: Gemma3Vision, data: bytes,
                 options: ImageOptions) -> tuple[tuple[int, int], np.ndarray, list[Box]]:
        """One image's bytes → ``(width, height)``, float32 views ``(V, S, S, 3)`` and their boxes, with the
        library's decoding and checks (allow-listed formats, bomb limit, truncation)."""
        return encoder.prepare(data, encoder.preprocess_config, options.pan_and_scan,
                               exif_transpose=options.exif_transpose, max_pixels=self.settings.max_pixels)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

