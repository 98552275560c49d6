"""The client's exceptions: every lower-level error is translated once, at the boundary.

::

    MegaphoneClientError             anything this client raises on purpose
    ├── TransportError               the network: connect, read, write, timeouts
    ├── DecodingError                a read's line is not an event, or the model refuses a body
    └── HTTPStatusError              an error answer (status, code, message)
        ├── BadRequestError          400: malformed address, stream id, body, cursor
        ├── UnauthorizedError        401: missing or wrong producer token
        ├── ChannelNotFoundError     404: unknown (expired, deleted) channel or agent
        ├── BusyError                409: the channel already has a reader
        ├── ChannelFullError         503 TIMEOUT: the buffer stayed full for the write timeout
        ├── UnavailableError         any other 503 (UNAVAILABLE, OVERLOADED, SHUTTING_DOWN, ...)
        └── ServerError              any other 5xx (500, a proxy's 502, ...)

Other statuses (405, 408, 413, 414, 431, ...) raise ``HTTPStatusError`` itself, with the server's
``code``. The original exception, when there is one, is chained (``raise ... from exc``).
"""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "BusyError",
    "ChannelFullError",
    "ChannelNotFoundError",
    "DecodingError",
    "HTTPStatusError",
    "MegaphoneClientError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
]


class MegaphoneClientError(Exception):
    """Base class of every error this client raises."""


class TransportError(MegaphoneClientError):
    """The request did not get an answer: connection refused or cut, a timeout elapsed."""


class DecodingError(MegaphoneClientError):
    """A read delivered a line that is not an event, or a body that ``model`` refuses."""


class HTTPStatusError(MegaphoneClientError):
    """The server answered with an error status; ``code`` and ``message`` come from its body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BadRequestError(HTTPStatusError):
    """400: the request was malformed (address, stream id, body, cursor)."""


class UnauthorizedError(HTTPStatusError):
    """401: the server requires a producer token and this one is missing or wrong."""


class ChannelNotFoundError(HTTPStatusError):
    """404: the channel (or its agent) does not exist, or no longer does."""


class BusyError(HTTPStatusError):
    """409: another reader is attached to the channel."""


class ChannelFullError(HTTPStatusError):
    """503 TIMEOUT: the channel's buffer stayed full for the server's write timeout.

    Nothing was written. Nobody drained the channel in time: the caller decides whether to retry
    (``write(..., retries=n)`` does it with back-off) or give up. ``retry_after`` is the server's
    ``Retry-After`` hint in seconds when it sent one, else ``None``.
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.retry_after = retry_after


class UnavailableError(HTTPStatusError):
    """503 other than TIMEOUT: warming up, overloaded, shutting down, at its channel limit."""


class ServerError(HTTPStatusError):
    """Any other 5xx."""
