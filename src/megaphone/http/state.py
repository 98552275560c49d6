"""What all connections of one HTTP server share: limits, budgets, read timers, output flushing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from megaphone.core import eager
from megaphone.core.transports import Transport

if TYPE_CHECKING:
    from megaphone.http.app import Router
    from megaphone.http.connection import HttpProtocol
    from megaphone.http.sinks.base import StreamSink
    from megaphone.metrics import Metrics

log = logging.getLogger("megaphone.http")

TIMER_SLACK = 0.002  # a timer may fire this much before its time (the loop's clock ticks in ms)
REFUSAL_LOG_SECONDS = 10.0  # at most one warning this often about refused connections


class HttpLimits:
    __slots__ = (
        "keepalive_timeout",
        "max_body",
        "max_buffered",
        "max_connections",
        "max_headers",
        "max_pipeline_bytes",
        "max_url",
        "request_timeout",
    )

    def __init__(
        self,
        *,
        max_url: int,
        max_headers: int,
        max_body: int,
        request_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        max_pipeline_bytes: int,
        max_buffered: int,
    ) -> None:
        self.max_url = max_url
        self.max_headers = max_headers
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections  # open connections served at once
        self.max_pipeline_bytes = max_pipeline_bytes  # queued requests of one connection
        self.max_buffered = max_buffered  # request body bytes held by all connections


class HttpServerState:
    """What all connections of one server share."""

    def __init__(
        self,
        api: Router,
        limits: HttpLimits,
        reads: ReadOptions,
        *,
        inline: bool,
        metrics: Metrics,
    ) -> None:
        self.api = api
        self.metrics = metrics
        # one access line per request at debug (checked once: the hot path pays a bool)
        self.access_log = log.isEnabledFor(logging.DEBUG)
        self.limits = limits
        self.reads = reads
        self.connections: set[HttpProtocol] = set()  # served (at most max_connections)
        self.refused: set[HttpProtocol] = set()  # refused, still draining until they close
        self.refused_connections = 0  # since the start
        self.refusal_log_interval = REFUSAL_LOG_SECONDS
        self._refused_unlogged = 0  # since the last warning
        self._refusal_logged_at = -REFUSAL_LOG_SECONDS
        # request body bytes held across connections: bodies arriving (a Content-Length is
        # reserved whole when the head is complete, chunks are counted as they come) and
        # bodies of requests queued but not handled yet
        self.buffered_request_bytes = 0
        # answer bytes held for clients that do not read them (the output buffer of each
        # connection whose writing is paused), plus answers reserved while being built
        # (write-batch): the same budget, so that slow clients cannot pile answers up either
        self.held_output_bytes = 0
        api.room_for_answer = self.room_for_answer
        api.release_answer = self.release_answer
        self.shutting_down = False
        # inline when the store never needs a task to make progress (memory); else a task
        self.start = eager.start if inline else eager.in_task
        self._all_closed: asyncio.Event | None = None
        # one FIFO of deadlines per read window length, and one for heartbeats (see DelayQueue)
        self.windows = {
            transport: DelayQueue(seconds, _end_read)
            for transport, seconds in reads.windows.items()
        }
        self.heartbeats = DelayQueue(reads.heartbeat, _beat)
        self._unflushed: list[HttpProtocol] = []

    def room_for_answer(self, size: int) -> bool:
        """Reserve ``size`` bytes for an answer being built; False when the budget is full.
        The caller gives them back with ``release_answer`` once the answer is written."""
        if self.buffered_request_bytes + self.held_output_bytes + size > self.limits.max_buffered:
            return False
        self.held_output_bytes += size
        return True

    def release_answer(self, size: int) -> None:
        self.held_output_bytes -= size

    def flush_later(self, connection: HttpProtocol) -> None:
        """Send ``connection``'s output once this turn of the loop is over. All the responses
        and events of a turn then leave in one burst, one ``send`` per connection: events for
        the same reader share it, and the peers are woken together rather than one by one."""
        if not self._unflushed:
            connection.loop.call_soon(self._flush)
        self._unflushed.append(connection)

    def _flush(self) -> None:
        connections, self._unflushed = self._unflushed, []
        for connection in connections:
            connection.flush()

    def refuse(self, connection: HttpProtocol) -> None:
        """Count a connection refused at ``max_connections``; warn at most once an interval,
        with how many were refused since the last warning."""
        self.refused.add(connection)
        self.refused_connections += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= self.refusal_log_interval:
            log.warning(
                "connection limit reached: refusing new connections",
                extra={
                    "refused": self._refused_unlogged,
                    "max_connections": self.limits.max_connections,
                },
            )
            self._refused_unlogged = 0
            self._refusal_logged_at = now

    def remove(self, connection: HttpProtocol) -> None:
        self.refused.discard(connection)
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def wait_closed(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for every connection to close; True if they did."""
        if not self.connections:
            return True
        self._all_closed = asyncio.Event()
        try:
            async with asyncio.timeout(grace):
                await self._all_closed.wait()
        except TimeoutError:
            return False
        return True

    def close_timers(self) -> None:
        for queue in (*self.windows.values(), self.heartbeats):
            queue.close()


class ReadOptions:
    """How long each transport's read may stay open, and the streams' keep-alive timing."""

    __slots__ = ("heartbeat", "sse_retry_millis", "windows")

    def __init__(
        self, *, windows: dict[Transport, float], heartbeat: float, sse_retry_millis: int
    ) -> None:
        self.windows = windows  # seconds a read stays open at most, per transport
        self.heartbeat = heartbeat  # seconds between heartbeats (SSE, WebSocket, opt-in NDJSON)
        self.sse_retry_millis = sse_retry_millis  # EventSource's reconnection delay


class DelayQueue:
    """Calls ``fire(item)`` ``delay`` seconds after ``add(item)``. Every item gets the same delay,
    so deadlines arrive in order: a FIFO and one timer for the oldest entry, instead of a timer per
    item (which each idle reader would hold for its whole window). Used for the end of read
    windows and for heartbeats.

    An entry is a ``[deadline, item]`` list; an item that is done early clears itself from its
    entry, so the entry left in the FIFO until its deadline keeps nothing else alive.
    """

    __slots__ = ("_entries", "_fire", "_loop", "_timer", "window")

    def __init__(self, delay: float, fire: Callable[[Any], None]) -> None:
        self.window = delay
        self._fire = fire
        self._entries: deque[list[Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, item: Any) -> list[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        entry: list[Any] = [loop.time() + self.window, item]
        self._entries.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry[0], self._expire)
        return entry

    def _expire(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time() + TIMER_SLACK
        entries = self._entries
        fire = self._fire
        while entries and entries[0][0] <= now:
            item = entries.popleft()[1]
            if item is not None:
                try:
                    fire(item)  # may add an entry (a connection's next read, the next beat)
                except Exception:
                    log.exception("a read's timer failed")
        if entries and self._timer is None:
            self._timer = self._loop.call_at(entries[0][0], self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entries.clear()


def _end_read(sink: StreamSink) -> None:
    sink.finish()


def _beat(sink: StreamSink) -> None:
    sink.beat()
