"""One sink per read transport; :func:`make` picks it. See :mod:`megaphone.http.sinks.base`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaphone.core.transports import Transport
from megaphone.http.sinks.base import EndReason, StreamSink
from megaphone.http.sinks.longpoll import LongPollSink
from megaphone.http.sinks.ndjson import NdjsonSink
from megaphone.http.sinks.sse import SseSink
from megaphone.http.sinks.websocket import WebSocketSink

if TYPE_CHECKING:
    from megaphone.http.connection import HttpProtocol
    from megaphone.http.types import ReadStream, Request

__all__ = ["EndReason", "StreamSink", "make"]

SINKS: dict[Transport, type[StreamSink]] = {
    Transport.NDJSON: NdjsonSink,
    Transport.SSE: SseSink,
    Transport.WEBSOCKET: WebSocketSink,
    Transport.LONG_POLL: LongPollSink,
}


def make(connection: HttpProtocol, request: Request, read: ReadStream) -> StreamSink:
    return SINKS[read.transport](connection, request, read)
