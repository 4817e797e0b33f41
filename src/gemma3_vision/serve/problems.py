"""The errors a request can get: each one type, one status code and a message (``{"error": {"type", "message"}}``).

Messages say what was expected and what was found; they never hold a traceback or the bytes of an image.
"""

from __future__ import annotations


class RequestProblem(Exception):
    """A request the service answers with an error status."""

    status = 400
    type = "invalid_request"
    cause = "invalid_request"  # the label of gemma3_vision_rejections_total

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(RequestProblem):
    """Malformed JSON, a wrong field, bad base64, an option the model cannot take: 400."""


class Unauthorized(RequestProblem):
    status, type, cause = 401, "unauthorized", "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(RequestProblem):
    status, type, cause = 404, "not_found", "not_found"


class MethodNotAllowed(RequestProblem):
    status, type, cause = 405, "method_not_allowed", "method_not_allowed"


class RequestTimeout(RequestProblem):
    """The client did not send its body within the deadline (a slow client): 408."""

    status, type, cause = 408, "request_timeout", "slow_client"


class PayloadTooLarge(RequestProblem):
    """A body over --max-body-mb, or more images than --max-images: 413."""

    status, type, cause = 413, "payload_too_large", "too_large"


class UnsupportedMediaType(RequestProblem):
    status, type, cause = 415, "unsupported_media_type", "invalid_request"


class InvalidImage(RequestProblem):
    """Bytes that are not an image in an allowed format, truncated, or over the decompression-bomb limit: 422."""

    status, type, cause = 422, "invalid_image", "invalid_image"


class Overloaded(RequestProblem):
    """The queue is full: 429 with Retry-After."""

    status, type, cause = 429, "overloaded", "overloaded"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class Unavailable(RequestProblem):
    """Starting, draining, or the model worker has stopped: 503."""

    status, type, cause = 503, "unavailable", "unavailable"


class DeadlineExceeded(RequestProblem):
    """The request's deadline (--timeout) passed before its images were computed: 504."""

    status, type, cause = 504, "timeout", "timeout"


class ClientGone(Exception):
    """The client closed its connection: nothing is sent back."""
