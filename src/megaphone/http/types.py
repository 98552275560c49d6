"""The seam between the endpoints (:mod:`megaphone.http.app`) and the connection layer
(:mod:`megaphone.http.connection`): a parsed request, and one result contract for every handler.

A handler answers a :class:`Request` with a :class:`Result`, at once or through a coroutine. A
result knows how it goes out (:meth:`Result.respond`): a :class:`Reply` is a complete response, a
:class:`ReadStream` hands the connection a read, which one of the sinks of
:mod:`megaphone.http.sinks` frames (NDJSON, SSE, WebSocket, long-poll). The connection never
inspects what a handler returned.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from megaphone.core.transports import Transport
from megaphone.http import wire

if TYPE_CHECKING:
    from megaphone.http.connection import HttpProtocol

JSON = wire.JSON


class Request:
    __slots__ = (
        "body",
        "cors",
        "endpoint",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "path",
        "query",
        "started",
        "upgrade",
    )

    def __init__(self) -> None:
        self.cors = b""  # CORS response headers for this request's origin
        self.method = b""
        self.path = b""
        self.query = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.http10 = False
        self.keep_alive = True
        self.upgrade = False  # the parser saw a protocol upgrade (Connection: upgrade + Upgrade)
        self.endpoint = ""  # the route's name once routed (metrics and logs)
        self.started = 0.0  # loop time of its first byte (only while access lines are logged)


class Result:
    """What a handler answers."""

    __slots__ = ()

    def respond(self, connection: HttpProtocol, request: Request) -> None:
        raise NotImplementedError


class Reply(Result):
    """A complete response. ``framed`` is the whole response pre-built for the common case
    (HTTP/1.1, keep-alive, no CORS): the hot path's answer is framed once, not per request."""

    __slots__ = ("body", "content_type", "extra", "framed", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = JSON,
        extra: bytes = b"",
        *,
        prebuilt: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra
        self.framed = (
            wire.response(status, body, content_type=content_type, extra=extra)
            if prebuilt
            else None
        )

    def respond(self, connection: HttpProtocol, request: Request) -> None:
        connection.send_reply(request, self)


class ReadStream(Result):
    """Attach a reader to ``consumer`` and stream its events with ``transport``."""

    __slots__ = ("after", "consumer", "heartbeat", "transport", "ws_key")

    def __init__(
        self,
        consumer: str,
        after: str | None,
        transport: Transport = Transport.NDJSON,
        *,
        heartbeat: bool = False,
        ws_key: bytes = b"",
    ) -> None:
        self.consumer = consumer
        self.after = after
        self.transport = transport
        self.heartbeat = heartbeat  # NDJSON's opt-in heartbeats (SSE and WebSocket always beat)
        self.ws_key = ws_key  # Sec-WebSocket-Key of an upgrade

    def respond(self, connection: HttpProtocol, request: Request) -> None:
        connection.start_read(request, self)


# a handler is a coroutine function, or (the hot path) a function that answers at once with a
# Result or hands back the coroutine that will
Handler = Callable[[Request, list[str]], Coroutine[Any, Any, Result] | Result]
