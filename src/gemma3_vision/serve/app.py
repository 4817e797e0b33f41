"""The HTTP layer: routes, request limits, authentication, errors as JSON, request metrics.

``create_app(encoder, settings=None, *, on_fatal=None) -> FastAPI`` (``None``: ``ServeSettings()``)

- ``encoder``: a loaded ``Gemma3Vision``, or a callable returning one (loaded by the model worker after the
  server starts listening: ``/health`` answers at once and ``/ready`` says 503 until the model is loaded).
- ``on_fatal(error)``: called from the worker thread if the model worker dies (``server.run`` stops the server).
- ``app.state.service`` is the ``EncodeService`` (``.batcher``, ``.metrics``, ``.cache``, ``.draining``).

Every error is ``{"error": {"type", "message"}}`` with one status code per type (``problems.py``); an unexpected
failure is a 500 with a generic message, its details in the server's log, never in the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api import Gemma3Vision, ImageEncoding
from .batcher import Batcher, Timing
from .codec import (
    SAFETENSORS_TYPE,
    EmbeddingsRequest,
    EncodeRequest,
    ImageOptions,
    check_count,
    digest,
    embeddings_json,
    encode_body,
    image_options,
    parse_embeddings,
    parse_encode,
    response_bound,
    validation_message,
    wants_safetensors,
)
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics
from .problems import (
    ClientGone,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestProblem,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from .service import EncodeService
from .settings import ServeSettings

log = logging.getLogger("gemma3_vision.serve")

ROUTES = ("/v1/embeddings", "/v1/encode", "/v1/models", "/health", "/ready", "/metrics")
CLIENT_CLOSED = 499  # nginx's code for a request whose client went away: logged and counted, never sent


def error_response(problem: RequestProblem) -> Response:
    body = json.dumps({"error": {"type": problem.type, "message": problem.message}}).encode()
    return Response(body, status_code=problem.status, media_type="application/json", headers=problem.headers)


def create_app(encoder: Gemma3Vision | Callable[[], Gemma3Vision], settings: ServeSettings | None = None, *,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The service as an ASGI app (see the module docstring)."""
    settings = settings if settings is not None else ServeSettings()
    metrics = Metrics()
    batcher = Batcher(encoder, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                      max_queue=settings.max_queue, metrics=metrics, on_fatal=on_fatal)
    service = EncodeService(batcher, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:  # uvicorn has let the in-flight requests finish: the queue is empty or theirs is abandoned
            service.draining = True
            await asyncio.to_thread(batcher.close, settings.timeout)
            service.close()

    app = FastAPI(title="gemma3-vision", summary="Gemma 3 image embeddings over HTTP", lifespan=lifespan,
                  docs_url=None if settings.api_key else "/docs", redoc_url=None,
                  openapi_url=None if settings.api_key else "/openapi.json")
    app.state.service = service
    app.state.settings = settings

    @app.exception_handler(RequestProblem)
    async def on_problem(request: Request, problem: RequestProblem) -> Response:  # noqa: RUF029
        metrics.rejections.labels(problem.cause).inc()
        return error_response(problem)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> Response:  # noqa: RUF029
        problem: RequestProblem = {404: NotFound(f"no route {request.url.path}; routes: {', '.join(ROUTES)}"),
                                   405: MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
                                   }.get(e.status_code, InvalidRequest(str(e.detail)))
        if e.status_code not in (404, 405):
            problem.status = e.status_code
        return await on_problem(request, problem)

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, e: ClientGone) -> Response:  # noqa: RUF029
        metrics.rejections.labels("client_gone").inc()
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception) -> Response:  # noqa: RUF029
        log.exception("request to %s failed", request.url.path)
        metrics.rejections.labels("internal_error").inc()
        body = {"error": {"type": "internal_error", "message": f"internal error ({type(e).__name__}); the "
                          "server's log has the details"}}
        return Response(json.dumps(body).encode(), status_code=500, media_type="application/json")

    def admit(request: Request) -> float:
        """Refuse early, before reading the body; the request's deadline in ``loop.time()``."""
        if not service.ready:
            raise Unavailable(service.not_ready_reason())
        if batcher.queue_depth >= settings.max_queue:
            raise Overloaded(f"the queue is full ({batcher.queue_depth} of {settings.max_queue} images)",
                             batcher.retry_after())
        return asyncio.get_running_loop().time() + settings.timeout

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingsRequest))
    async def embeddings(request: Request) -> Response:
        """OpenAI-compatible: one vector per image, the mean of its projected soft tokens (float32)."""
        deadline = admit(request)
        body = await read_body(request, settings.max_body_bytes, deadline)
        # One trip to the thread pool each way: parse, check, decode base64 and hash; then pool and write JSON.
        req, images, digests = await service.run(parse_embeddings, body, settings.max_images)
        encoder = service.encoder
        width = encoder.projector_config.text_hidden_size if encoder.has_projector else None
        if req.dimensions is not None and req.dimensions != width:
            raise InvalidRequest(f"dimensions: this model gives {width}-dimensional embeddings, found a request "
                                 f"for {req.dimensions} (leave it out)")
        encodings, hits, timing = await encode_watching(request, images, digests, ImageOptions(), deadline)
        tokens = len(encodings) * encoder.tokens_per_image()
        out = await service.run(embeddings_json, settings.model_name, encodings, req.encoding_format, tokens)
        return Response(out, media_type="application/json",
                        headers=cache_headers(hits, len(encodings)) | server_timing(timing))

    @app.post("/v1/encode", openapi_extra=_body_schema(EncodeRequest, multipart=True))
    async def encode(request: Request) -> Response:
        """Each image's token matrix (and layers, pooled vectors, Pan & Scan crops): JSON with a base64 ``.npy`` per
        tensor, or one safetensors body."""
        deadline = admit(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "multipart/form-data"):
            raise UnsupportedMediaType(f"expected application/json or multipart/form-data, found "
                                       f"{content_type or 'no content type'}")
        body = await read_body(request, settings.max_body_bytes, deadline)
        if content_type == "application/json":
            req, images, digests = await service.run(parse_encode, body, settings.max_images)
        else:
            req, images = await read_multipart(request, body)
            check_count(len(images), settings.max_images)
            digests = await service.run(lambda: [digest(image) for image in images])
        safetensors = wants_safetensors(req.format or request.query_params.get("format"),
                                        request.headers.get("accept", ""))
        if req.dtype == "bfloat16" and not safetensors:
            raise InvalidRequest("dtype bfloat16 comes only as safetensors, since .npy has no bfloat16: ask for "
                                 f"format=safetensors (or Accept: {SAFETENSORS_TYPE}), or dtype float32 / float16")
        if req.normalize and req.pool is None:
            raise InvalidRequest("normalize applies to pooled vectors: set pool to mean as well")
        try:
            options = image_options(req)
        except ValueError as e:  # OptionError from PanAndScanConfig
            raise InvalidRequest(str(e)) from None
        check_response_size(req, len(images), safetensors, options)
        encodings, hits, timing = await encode_watching(request, images, digests, options, deadline)
        tokens = sum(len(e.views) for e in encodings) * service.encoder.tokens_per_image(project=options.project)
        out = await service.run(encode_body, settings.model_name, encodings, req, safetensors, tokens)
        return Response(out, media_type=SAFETENSORS_TYPE if safetensors else "application/json",
                        headers=cache_headers(hits, len(encodings)) | server_timing(timing))

    def check_response_size(req: EncodeRequest, n_images: int, safetensors: bool, options: ImageOptions) -> None:
        """A 413 before any decoding or compute for a response that would pass --max-response-mb."""
        service.check(options)  # a layer beyond the model's depth is a 400 first
        size = response_bound(service.encoder, req, n_images, safetensors)
        if size > settings.max_response_bytes:
            sent = "base64 .npy in JSON" if not safetensors else "safetensors"
            crops = f", each with up to {req.pan_and_scan_max_num_crops} Pan & Scan crops" if req.pan_and_scan else ""
            raise PayloadTooLarge(
                f"expected a response of at most {settings.max_response_bytes:,} bytes (--max-response-mb), found "
                f"{size:,} bytes of tensors ({sent}) for {n_images} image(s){crops}: ask for fewer images or layers, "
                "a smaller dtype (float16), or safetensors instead of JSON, or raise --max-response-mb")

    async def read_multipart(request: Request, body: bytes) -> tuple[EncodeRequest, list[bytes]]:
        """A multipart body's file parts (the images, in order) and its other fields (the options)."""
        async def replay() -> Message:  # noqa: RUF029
            return {"type": "http.request", "body": body, "more_body": False}

        parsed = Request(request.scope, receive=replay)
        try:
            form = await parsed.form(max_files=settings.max_body_bytes, max_fields=100)
        except Exception as e:  # starlette's MultiPartException, or the HTTPException it becomes inside an app
            raise InvalidRequest(f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
        try:
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            fields: dict[str, Any] = {}
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields.setdefault(name, []).append(value)
            flat = {name: values if name == "layers" and len(values) > 1 else values[-1]
                    for name, values in fields.items()}
            if "images" in flat:
                raise InvalidRequest("a multipart request sends its images as file parts, not an images field")
            try:
                req = EncodeRequest.model_validate(flat)
            except ValidationError as e:
                raise InvalidRequest(validation_message(e)) from None
            images = [await f.read() for f in files]
        finally:
            await form.close()
        return req, images

    async def encode_watching(request: Request, images: list[bytes], digests: list[str], options: ImageOptions,
                              deadline: float) -> tuple[list[ImageEncoding], int, Timing | None]:
        """``service.encode``, dropping the request if its client disconnects meanwhile."""
        gone = asyncio.Event()
        watcher = asyncio.create_task(watch_disconnect(request.receive, gone))
        try:
            return await service.encode(images, digests, options, deadline=deadline, gone=gone)
        finally:
            watcher.cancel()

    @app.get("/v1/models")
    async def models() -> Response:  # noqa: RUF029
        """What is loaded: the source, dtype, device, backend and output size."""
        encoder = service.encoder
        projector = encoder.projector_config
        entry = {
            "id": settings.model_name, "object": "model", "created": started, "owned_by": "gemma3-vision",
            "source": encoder.checkpoint.description, "format": encoder.checkpoint.format,
            "dtype": str(encoder.dtype).removeprefix("torch."),
            "compute_dtype": str(encoder.model.vision_tower.compute_dtype or encoder.dtype).removeprefix("torch."),
            "device": str(encoder.device), "backend": encoder.backend.name, "image_size": encoder.image_size,
            "tokens_per_image": encoder.tokens_per_image(),
            "dimensions": projector.text_hidden_size if encoder.has_projector else None,
            "hidden_size": encoder.vision_config.hidden_size, "random_weights": encoder.checkpoint.is_random,
        }
        return json_response({"object": "list", "data": [entry]})

    @app.get("/health")
    async def health() -> Response:  # noqa: RUF029
        """The process is alive (no key needed)."""
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:  # noqa: RUF029
        """The model is loaded and the worker serving; 503 while loading, draining or after the worker died."""
        if not service.ready:
            raise Unavailable(service.not_ready_reason())
        return json_response({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:  # noqa: RUF029
        return Response(metrics.exposition(), media_type=METRICS_TYPE)

    started = int(time.time())
    app.add_middleware(BodyBudget, service=service)  # type: ignore[arg-type]  # inside auth: keyless bodies go unread
    if settings.api_key:
        app.add_middleware(BearerAuth, key=settings.api_key, metrics=metrics)  # type: ignore[arg-type]
    app.add_middleware(RequestMetrics, metrics=metrics)  # type: ignore[arg-type]  # outermost: counts 401s too
    return app


def json_response(data: Any) -> Response:
    return Response(json.dumps(data).encode(), media_type="application/json")


def cache_headers(hits: int, images: int) -> dict[str, str]:
    """``X-Cache: hit`` when every image came from the cache, ``miss`` when none did, else ``partial``."""
    state = "hit" if hits == images else "miss" if hits == 0 else "partial"
    return {"X-Cache": state, "X-Cache-Hits": f"{hits}/{images}"}


def server_timing(timing: Timing | None) -> dict[str, str]:
    """``Server-Timing`` (the W3C header), in ms: ``queue``, the longest any of the request's computed images waited
    for its batch to start, and ``compute``, the longest model time of their batches. None when every image came
    from the cache."""
    if timing is None:
        return {}
    return {"Server-Timing": f"queue;dur={1e3 * timing.queue_s:.2f}, compute;dur={1e3 * timing.compute_s:.2f}"}


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The request body, refused past ``limit`` bytes (413, by Content-Length before any is read) or when it has
    not all arrived by ``deadline`` (408: a slow client)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest(f"Content-Length must be a number of bytes, found {declared[:40]!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(f"expected a body of at most {limit:,} bytes (--max-body-mb), found "
                                  f"Content-Length {int(declared):,}")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"expected a body of at most {limit:,} bytes (--max-body-mb), found more")
            chunks.append(chunk)

    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(collect(), max(0.0, deadline - loop.time()))
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within the deadline ({size:,} bytes received)") \
            from None
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


async def watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """Set ``gone`` when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def _body_schema(model: Any, *, multipart: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its own body (off the event loop)."""
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "description": "image files as file "
                                                     "parts (any field name), options as fields"}}
    return {"requestBody": {"required": True, "content": content}}


class RequestMetrics:
    """Pure ASGI middleware: requests by route and status, and their total time."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.total.labels(route).observe(time.perf_counter() - started)


class BearerAuth:
    """Pure ASGI middleware: every route but ``/health`` needs ``Authorization: Bearer <key>``, compared in constant
    time."""

    def __init__(self, app: ASGIApp, key: str, metrics: Metrics):
        self.app = app
        self.expected = key.encode()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        # The scheme is case-insensitive (RFC 9110, 11.1); the key is compared in constant time.
        if hmac.compare_digest(token.strip(), self.expected) and scheme.lower() == b"bearer":
            await self.app(scope, receive, send)
            return
        self.metrics.rejections.labels("unauthorized").inc()
        problem = Unauthorized("wrong API key in the Authorization header" if given else
                               "this server needs an API key: send Authorization: Bearer <key>")
        await error_response(problem)(scope, receive, send)


class BodyBudget:
    """Pure ASGI middleware: the request bodies held at once, all requests together, stay within
    ``--max-bodies-mb``. Each request's bytes count from their arrival until its answer (they are parsed, then
    decoded, meanwhile); a chunk past the budget refuses its request with 429, so many concurrent uploads, slow
    ones included, cannot grow memory without bound."""

    def __init__(self, app: ASGIApp, service: EncodeService):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = 0
        service = self.service

        async def counted() -> Message:
            nonlocal held
            message = await receive()
            size = len(message.get("body", b""))
            if size:
                limit = service.settings.max_bodies_bytes
                if service.body_bytes + size > limit:
                    raise Overloaded(f"the server holds {service.body_bytes:,} bytes of request bodies, at most "
                                     f"{limit:,} (--max-bodies-mb); this chunk adds {size:,}", 1)
                service.body_bytes += size
                held += size
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            service.body_bytes -= held
