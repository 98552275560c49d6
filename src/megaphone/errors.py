"""The error tree of the broker.

Every error a request can cause is a :class:`MegaphoneError`; each subclass knows its HTTP status
and its wire code, so the HTTP layer translates it once into ``{"code": ..., "message": ...}``::

    MegaphoneError
    ├── BadRequest            400 BAD_REQUEST
    ├── Unauthorized          401 UNAUTHORIZED
    ├── NotFound              404 NOT_FOUND
    ├── MethodNotAllowed      405 METHOD_NOT_ALLOWED
    ├── RequestTimeout        408 REQUEST_TIMEOUT
    ├── Busy                  409 BUSY
    ├── PayloadTooLarge       413 PAYLOAD_TOO_LARGE
    ├── BatchTooLarge         413 BATCH_TOO_LARGE
    ├── UriTooLong            414 URI_TOO_LONG
    ├── HeadersTooLarge       431 HEADERS_TOO_LARGE
    ├── NotImplementedHere    501 NOT_IMPLEMENTED
    ├── VersionNotSupported   505 HTTP_VERSION_NOT_SUPPORTED
    ├── WriteTimeout          503 TIMEOUT
    ├── Skipped               503 SKIPPED   (write-batch only, as a failure reason)
    ├── Unavailable           503 UNAVAILABLE
    │   └── StoreUnavailable  503 STORE_UNAVAILABLE
    │   ├── ShuttingDown      503 SHUTTING_DOWN
    │   └── Overloaded        503 OVERLOADED
    ├── ChannelLimit          503 CHANNEL_LIMIT
    └── InternalError         500 INTERNAL_SERVER_ERROR
"""

from __future__ import annotations

import orjson


class MegaphoneError(Exception):
    status: int = 500
    code: str = "INTERNAL_SERVER_ERROR"
    default_message: str = "internal server error"
    allow: str | None = None  # the Allow header of a 405

    def __init__(self, message: str | None = None, *, allow: str | None = None) -> None:
        self.message = message or self.default_message
        if allow is not None:
            self.allow = allow
        super().__init__(self.message)

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "message": self.message})

    def headers(self) -> bytes:
        """Extra response headers this error needs (``Allow``, ``WWW-Authenticate``)."""
        return b"allow: %b\r\n" % self.allow.encode() if self.allow else b""


class BadRequest(MegaphoneError):
    status, code, default_message = 400, "BAD_REQUEST", "bad request"


class Unauthorized(MegaphoneError):
    status, code, default_message = 401, "UNAUTHORIZED", "a valid bearer token is required"

    def headers(self) -> bytes:
        return b'www-authenticate: Bearer realm="megaphone"\r\n'


class NotFound(MegaphoneError):
    status, code, default_message = 404, "NOT_FOUND", "not found"


class MethodNotAllowed(MegaphoneError):
    status, code, default_message = 405, "METHOD_NOT_ALLOWED", "method not allowed"


class RequestTimeout(MegaphoneError):
    status, code, default_message = 408, "REQUEST_TIMEOUT", "request not received in time"


class Busy(MegaphoneError):
    status, code, default_message = 409, "BUSY", "channel already has a reader"


class NotAcceptable(MegaphoneError):
    status, code, default_message = 406, "NOT_ACCEPTABLE", "transport not enabled for this channel"


class AlreadyExists(MegaphoneError):
    status, code, default_message = 409, "ALREADY_EXISTS", "already exists"


class PayloadTooLarge(MegaphoneError):
    status, code, default_message = 413, "PAYLOAD_TOO_LARGE", "request body too large"


class BatchTooLarge(MegaphoneError):
    status, code, default_message = 413, "BATCH_TOO_LARGE", "write-batch too large"


class UriTooLong(MegaphoneError):
    status, code, default_message = 414, "URI_TOO_LONG", "request target too long"


class HeadersTooLarge(MegaphoneError):
    status, code, default_message = 431, "HEADERS_TOO_LARGE", "request headers too large"


class WriteTimeout(MegaphoneError):
    status, code, default_message = 503, "TIMEOUT", "channel buffer stayed full"


class Skipped(MegaphoneError):
    status, code, default_message = 503, "SKIPPED", "skipped after an earlier timeout"


class Unavailable(MegaphoneError):
    status, code, default_message = 503, "UNAVAILABLE", "service unavailable"


class StoreUnavailable(Unavailable):
    status, code, default_message = 503, "STORE_UNAVAILABLE", "the channel store is unreachable"


class ShuttingDown(Unavailable):
    status, code, default_message = 503, "SHUTTING_DOWN", "the server is shutting down"


class Overloaded(Unavailable):
    status, code, default_message = 503, "OVERLOADED", "the server is at a resource limit"


class UpgradeRequired(MegaphoneError):
    status, code, default_message = 426, "UPGRADE_REQUIRED", "unsupported WebSocket version"

    def headers(self) -> bytes:
        return b"sec-websocket-version: 13\r\n"


class NotImplementedHere(MegaphoneError):
    status, code, default_message = 501, "NOT_IMPLEMENTED", "not implemented"


class VersionNotSupported(MegaphoneError):
    status, code, default_message = (
        505,
        "HTTP_VERSION_NOT_SUPPORTED",
        "only HTTP/1.0 and HTTP/1.1 are supported",
    )


class ChannelLimit(MegaphoneError):
    status, code, default_message = 503, "CHANNEL_LIMIT", "this node holds its maximum of channels"


class InternalError(MegaphoneError):
    pass


__all__ = [
    "BadRequest",
    "BatchTooLarge",
    "Busy",
    "ChannelLimit",
    "HeadersTooLarge",
    "InternalError",
    "MegaphoneError",
    "MethodNotAllowed",
    "NotFound",
    "NotImplementedHere",
    "Overloaded",
    "PayloadTooLarge",
    "RequestTimeout",
    "ShuttingDown",
    "Skipped",
    "StoreUnavailable",
    "Unauthorized",
    "Unavailable",
    "UriTooLong",
    "VersionNotSupported",
    "WriteTimeout",
]
