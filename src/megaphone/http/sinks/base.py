"""A read in progress, whatever its framing: the lifecycle every transport shares.

The store pushes whole serialised events (NDJSON lines) into a sink while it is writable
(:class:`megaphone.store.base.ReadSink`); the sink frames them for its transport and writes them to
its connection. A read ends in one of four ways (:class:`EndReason`); the response is completed only
once the reader lease is released, so that the client's next read (clients reconnect at once) does
not find the channel still taken. A client that goes away aborts the read without writing.

Subclasses say how the bytes look: the response head (:meth:`StreamSink.head`), what follows it
at once (:meth:`StreamSink.opening`), events (:meth:`StreamSink.frame`), heartbeats and the end.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, ClassVar

from megaphone.core.transports import Transport
from megaphone.http import wire
from megaphone.store.base import ResumeStatus, Subscription

if TYPE_CHECKING:
    from megaphone.http.connection import HttpProtocol
    from megaphone.http.state import DelayQueue, HttpServerState
    from megaphone.http.types import ReadStream, Request


class EndReason(enum.Enum):
    WINDOW = "window ended"  # the read's time is over: reconnect with the cursor
    FULL = "replay window full"  # as many unconfirmed events as allowed: reconnect with the cursor
    GONE = "channel gone"  # deleted or expired: the next read gets 404
    SHUTDOWN = "server shutting down"  # reconnect, to this node once it is back or to another


def event_id(line: bytes) -> bytes:
    """The ``eid`` of a serialised event ``{"sid":…,"eid":"…",…}``. The sid before it is a JSON
    string, in which a quote is always escaped, so the first ``,"eid":"`` is the field."""
    start = line.index(b',"eid":"') + 8
    return line[start : line.index(b'"', start)]


class StreamSink:
    transport: ClassVar[Transport]
    content_type: ClassVar[bytes] = wire.NDJSON
    status: ClassVar[int] = 200  # of the response, once attached (metrics, access lines)

    __slots__ = (
        "_beats",
        "_started",
        "beat_entry",
        "chunked",
        "connection",
        "cors",
        "done",
        "heartbeats",
        "keep_alive",
        "subscription",
        "window",
    )

    def __init__(self, connection: HttpProtocol, request: Request, read: ReadStream) -> None:
        self.connection = connection
        self.chunked = not request.http10
        self.cors = request.cors
        # a close-delimited stream (HTTP/1.0) ends with the connection
        self.keep_alive = connection.keep_alive_for(request) and self.chunked
        self.heartbeats = self.wants_heartbeats(read)
        self.done = False
        self._started = False
        self.subscription: Subscription | None = None
        self.window: list[object] | None = None  # our entry in the window's DelayQueue
        self.beat_entry: list[object] | None = None  # our entry in the heartbeats' DelayQueue
        self._beats: DelayQueue | None = None

    # --- what subclasses frame ------------------------------------------------------------------

    def wants_heartbeats(self, read: ReadStream) -> bool:
        return True

    def head(self, status: ResumeStatus) -> bytes:
        """The response head."""
        # a chunked stream on a connection that closes afterwards says so up front
        extra = b"" if self.keep_alive or not self.chunked else b"connection: close\r\n"
        if status is not ResumeStatus.NONE:
            extra += b"megaphone-resume: %b\r\n" % status.value.encode()
        return wire.stream_head(
            chunked=self.chunked, content_type=self.content_type, extra=extra + self.cors
        )

    def opening(self, status: ResumeStatus) -> bytes:
        """Body bytes sent right after the head (unframed)."""
        return b""

    def frame(self, lines: list[bytes]) -> bytes:
        """Events as body bytes (unframed)."""
        raise NotImplementedError

    def heartbeat(self) -> bytes:
        """A heartbeat as body bytes (unframed)."""
        raise NotImplementedError

    def body(self, data: bytes) -> bytes:
        """Body bytes as they go on the connection: a chunk, or as they are (HTTP/1.0)."""
        return wire.chunk(data) if self.chunked else data

    def closing(self, reason: EndReason) -> bytes:
        """What ends the response."""
        return wire.LAST_CHUNK if self.chunked else b""

    # --- the lifecycle ------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return not self.done and not self.connection.write_paused

    def _start(self) -> None:
        self._started = True
        subscription = self.subscription
        status = subscription.status if subscription is not None else ResumeStatus.NONE
        opening = self.opening(status)
        self.connection.write(self.head(status) + (self.body(opening) if opening else b""))

    def deliver(self, lines: list[bytes]) -> None:
        if not self._started:
            self._start()
        self.connection.write(self.body(self.frame(lines)))
        self.connection.state.metrics.sample_latency(lines[-1])

    def attached(self, subscription: Subscription, state: HttpServerState) -> None:
        self.subscription = subscription
        if self.done:  # the channel went away (or the client) while we attached
            subscription.close()
            return
        if not self._started:
            self._start()
        self.window = state.windows[self.transport].add(self)
        if self.heartbeats:
            self._beats = state.heartbeats
            self.beat_entry = self._beats.add(self)
        subscription.start()  # replayed events, then pending ones, then live

    def beat(self) -> None:
        """A heartbeat is due (called by the heartbeats' DelayQueue)."""
        self.beat_entry = None
        if self.done or self._beats is None:
            return
        if self._started and not self.connection.write_paused:
            self.connection.write(self.body(self.heartbeat()))
        self.beat_entry = self._beats.add(self)

    def end(self) -> None:
        self.finish(EndReason.GONE)

    def window_full(self) -> None:
        self.finish(EndReason.FULL)  # the client reconnects with its cursor, which confirms

    def finish(self, reason: EndReason = EndReason.WINDOW) -> None:
        """End the read cleanly."""
        if self.done:
            return
        released = self._stop()
        if released is None:
            self._complete(reason)
        else:
            released.add_done_callback(lambda _: self._complete(reason))

    def _complete(self, reason: EndReason) -> None:
        if self.connection.closed:
            return
        if not self._started:
            self._start()
        self.connection.write(self.closing(reason))
        self.connection.stream_finished(self.keep_alive)

    def abort(self) -> None:
        """The client is gone: detach without writing anything."""
        if not self.done:
            self._stop()

    def _stop(self) -> asyncio.Future[None] | None:
        self.done = True
        if self.window is not None:
            self.window[1] = None  # the entry waits for its deadline holding nothing
            self.window = None
        if self.beat_entry is not None:
            self.beat_entry[1] = None
            self.beat_entry = None
        self._beats = None
        subscription, self.subscription = self.subscription, None  # no cycle left for the GC
        if subscription is not None:
            return subscription.close()
        return None

    def received(self, data: bytes) -> None:
        """Bytes from the client after an upgrade (WebSocket only)."""
