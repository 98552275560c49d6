"""The public server: a lean HTTP/1.x protocol on uvloop + httptools.

One :class:`HttpProtocol` per connection. httptools parses; this module is the glue: keep-alive and
pipelining (requests answered in order), ``Expect: 100-continue``, limits on the request target,
headers and body, timeouts for slow or idle clients, and streamed reads (chunked for HTTP/1.1,
close-delimited for HTTP/1.0, as nginx's default upstream protocol needs).

Requests that finish without waiting (most writes, creates) are answered inline without a task
(:func:`megaphone.core.eager.start`); only a request that really waits gets one, and that task is
cancelled if the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn, cast

import httptools

from megaphone.core import eager
from megaphone.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    MegaphoneError,
    NotImplementedHere,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UriTooLong,
    VersionNotSupported,
)
from megaphone.http import wire
from megaphone.http.app import WRITTEN, Api, ReadRequest, Request, Result
from megaphone.store.base import ResumeStatus, Subscription

if TYPE_CHECKING:
    from megaphone.core.broker import Broker

log = logging.getLogger("megaphone.http")
WRITTEN_RESPONSE = wire.response(WRITTEN[0], WRITTEN[1], content_type=WRITTEN[2], extra=WRITTEN[3])

MAX_PIPELINE = 32
HEAD_SLACK = 64  # request line and blank line framing, on top of the target and header limits
LINGER_SECONDS = 5.0  # the most we keep draining a client after refusing its request
OUTPUT_HIGH_WATER = 16_384  # bytes of unsent output before a connection's writing pauses
TIMER_SLACK = 0.002  # a timer may fire this much before its time (the loop's clock ticks in ms)
PIPELINE_HEAD_BYTES = 256  # what a queued request's head counts against max_pipeline_bytes
REFUSAL_LOG_SECONDS = 10.0  # at most one warning this often about refused connections
# httptools reports these as plain parse errors (llhttp's reasons): a well-formed version other
# than the ones llhttp knows (HTTP/1.2, HTTP/3.0), and the HTTP/2 connection preface
UNSUPPORTED_VERSION_REASONS = frozenset({"Invalid HTTP version", "Pause on PRI/Upgrade"})


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

    def __init__(self, api: Api, broker: Broker, limits: HttpLimits) -> None:
        self.api = api
        self.broker = broker
        self.limits = limits
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
        self.start = eager.start if broker.store.runs_inline else eager.in_task
        self._all_closed: asyncio.Event | None = None
        self.windows = ReadWindows(broker.poll_duration)
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


class ReadWindows:
    """Ends each read when its window is over. Every read on a server gets the same window, so
    deadlines arrive in order: a FIFO and one timer for the oldest entry, instead of a timer per
    read (which an idle reader would hold for the whole window).

    An entry is a ``[deadline, stream]`` list; a read that ends early clears its stream from the
    entry, so the entry left in the FIFO until its deadline keeps nothing else alive.
    """

    __slots__ = ("_entries", "_loop", "_timer", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._entries: deque[list[Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, stream: NdjsonStream) -> list[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        entry: list[Any] = [loop.time() + self.window, stream]
        self._entries.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry[0], self._expire)
        return entry

    def _expire(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time() + TIMER_SLACK
        entries = self._entries
        while entries and entries[0][0] <= now:
            stream = entries.popleft()[1]
            if stream is not None:
                try:
                    stream.finish()  # may start the connection's next read (a new entry)
                except Exception:
                    log.exception("ending a read failed")
        if entries and self._timer is None:
            self._timer = self._loop.call_at(entries[0][0], self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entries.clear()


class NdjsonStream:
    """A read in progress: the channel pushes whole events, we frame them as chunks."""

    __slots__ = (
        "_started",
        "chunked",
        "cors",
        "done",
        "keep_alive",
        "protocol",
        "subscription",
        "window",
    )

    def __init__(
        self, protocol: HttpProtocol, *, chunked: bool, keep_alive: bool, cors: bytes = b""
    ) -> None:
        self.protocol = protocol
        self.chunked = chunked
        self.cors = cors
        self.keep_alive = keep_alive and chunked
        self.done = False
        self._started = False
        self.subscription: Subscription | None = None
        self.window: list[Any] | None = None  # our entry in ReadWindows

    @property
    def writable(self) -> bool:
        return not self.done and not self.protocol.write_paused

    def _start(self) -> None:
        self._started = True
        # a chunked stream on a connection that closes afterwards says so up front
        extra = b"" if self.keep_alive or not self.chunked else b"connection: close\r\n"
        subscription = self.subscription
        if subscription is not None and subscription.status is not ResumeStatus.NONE:
            extra += b"megaphone-resume: %b\r\n" % subscription.status.value.encode()
        self.protocol.write(wire.stream_head(chunked=self.chunked, extra=extra + self.cors))

    def deliver(self, lines: list[bytes]) -> None:
        if not self._started:
            self._start()
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        self.protocol.write(wire.chunk(data) if self.chunked else data)

    def attached(self, subscription: Subscription, windows: ReadWindows) -> None:
        self.subscription = subscription
        if self.done:  # the channel went away while we attached
            subscription.close()
            return
        if not self._started:
            self._start()
        self.window = windows.add(self)
        subscription.start()  # replayed events, then pending ones, then live

    def end(self) -> None:
        self.finish()

    def window_full(self) -> None:
        self.finish()  # the client reconnects with its cursor, which confirms the window

    def finish(self) -> None:
        """End the read cleanly (window over, channel deleted, or shutdown)."""
        if self.done:
            return
        released = self._stop()
        if released is None:
            self._complete()
        else:
            # end the response only once the lease is released, so that the client's next read
            # (clients reconnect at once) does not find the channel still taken
            released.add_done_callback(lambda _: self._complete())

    def _complete(self) -> None:
        if not self._started:
            self._start()
        if self.chunked:
            self.protocol.write(wire.LAST_CHUNK)
        self.protocol.stream_finished(self.keep_alive)

    def abort(self) -> None:
        """The client is gone: detach without writing anything."""
        if not self.done:
            self._stop()

    def _stop(self) -> asyncio.Future[None] | None:
        self.done = True
        if self.window is not None:
            self.window[1] = None  # the entry waits for its deadline holding nothing
            self.window = None
        subscription, self.subscription = self.subscription, None  # no cycle left for the GC
        if subscription is not None:
            return subscription.close()
        return None


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_abort_timer",
        "_body",
        "_body_charge",
        "_body_size",
        "_chunked",
        "_continue_pending",
        "_fatal_error",
        "_head_received",
        "_header_bytes",
        "_held_output",
        "_idle",
        "_in_head",
        "_out",
        "_parse_error",
        "_stall_timer",
        "_timer_at",
        "_url",
        "_url_bytes",
        "busy",
        "close_when_idle",
        "closed",
        "deadline",
        "limits",
        "loop",
        "parser",
        "queue",
        "queued_bytes",
        "reading_paused",
        "request",
        "state",
        "stream",
        "task",
        "timer",
        "transport",
        "write_paused",
    )

    def __init__(self, state: HttpServerState) -> None:
        self.state = state
        self.limits = state.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request: Request | None = None
        self._url: list[bytes] = []
        self._url_bytes = 0
        self._header_bytes = 0
        self._body: list[bytes] | None = None
        self._body_size = 0  # of the request arriving
        self._body_charge = 0  # of it, counted in state.buffered_request_bytes
        self._held_output = 0  # output buffered while writing is paused, in state.held_output
        self._chunked = False  # its body is chunked (counted as it comes)
        self._parse_error: MegaphoneError | None = None
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_received = 0  # bytes received while a head was incomplete
        self._continue_pending = False  # a 100 Continue owed once the requests before are done
        self._fatal_error: MegaphoneError | None = None  # answered once the queue is done
        self.queue: list[Request] = []  # pipelined requests, at most MAX_PIPELINE
        # their bodies plus PIPELINE_HEAD_BYTES each; reading pauses above max_pipeline_bytes
        self.queued_bytes = 0
        self.busy = False
        self.task: asyncio.Task[object] | None = None
        self.stream: NdjsonStream | None = None
        self.write_paused = False
        self.reading_paused = False
        self.closed = False
        self.close_when_idle = False
        # the request or keep-alive timeout: a deadline (0: none), checked by a timer that is
        # moved only when it must fire sooner, so a request costs no timer of its own
        self.deadline = 0.0
        self._idle = False  # the deadline is the keep-alive one: a request resets it
        self.timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when ``timer`` fires
        self._abort_timer: asyncio.TimerHandle | None = None  # after close: abort if not flushed
        self._out: list[bytes] | None = None  # written this turn of the loop, not yet sent
        self._stall_timer: asyncio.TimerHandle | None = None  # armed while writing is paused

    # --- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # what the kernel does not take waits in our buffer: past this, writing pauses (and the
        # buffer counts in the I/O budget), so a client that does not read holds little
        self.transport.set_write_buffer_limits(high=OUTPUT_HIGH_WATER)
        state = self.state
        if len(state.connections) >= self.limits.max_connections:
            self._refuse()
            return
        state.connections.add(self)
        # a new connection's first request must be complete this long after the accept
        self._arm(self.limits.request_timeout)

    def _refuse(self) -> None:
        """At ``max_connections``: answer 503 at once and close (draining what the client
        sends meanwhile, so that the answer is not lost to a reset)."""
        self.state.refuse(self)
        error = Overloaded(
            f"the server holds its maximum of {self.limits.max_connections} connections"
        )
        self._fatal_error = error
        self.write(wire.error_response(error, keep_alive=False))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out = None
        state = self.state
        state.remove(self)
        # the request bodies this connection still held leave the server's budget
        held = self._body_charge + sum(len(request.body) for request in self.queue)
        state.buffered_request_bytes -= held
        state.held_output_bytes -= self._held_output
        self._body_charge = self.queued_bytes = self._held_output = 0
        for timer in (self.timer, self._abort_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self._abort_timer = self._stall_timer = None
        self.deadline = 0.0
        # the parser holds us as its callbacks: break the cycle so that a closed connection is
        # freed by reference counting, not left to the cyclic GC (whose pauses show under churn)
        del self.parser
        if self.stream is not None:
            self.stream.abort()
            self.stream = None
        if self.task is not None:
            self.task.cancel()
        self.queue.clear()

    def eof_received(self) -> bool | None:
        if self.closed:
            return False  # we were only draining (see close)
        if self.stream is not None:
            # a reader that hung up: stop taking events out of its channel now
            self.stream.abort()
            self.stream = None
            return False
        if self.busy or self.queue:
            self.close_when_idle = True
            return True  # answer what was asked, then close
        # answers written in this turn of the loop may still wait for its flush (flush_later):
        # close() sends them first, where a bare False would let the transport drop them
        self.close()
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self._held_output = self.transport.get_write_buffer_size()
            self.state.held_output_bytes += self._held_output
        # a client that takes nothing for a whole request timeout is gone or hostile
        self._stall_timer = self.loop.call_later(self.limits.request_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.state.held_output_bytes -= self._held_output  # down to the low-water mark
        self._held_output = 0
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self.stream is not None:
            if self.stream.subscription is not None:
                self.stream.subscription.resume()
        else:
            self._process_queue()

    def data_received(self, data: bytes) -> None:
        if self._fatal_error is not None:
            return  # the byte stream is unusable: what follows is dropped
        head_before = self.request if self._in_head else None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # no protocol upgrades (yet): answer what was parsed, then close
            self.close_when_idle = True
        except (httptools.HttpParserError, httptools.HttpParserCallbackError) as exc:
            self._fatal(self._parse_error or _framing_error(exc))
            return
        if self._in_head and self.request is head_before:
            # all of ``data`` belongs to a head that is still incomplete. httptools buffers a
            # header line until it ends, so on_header cannot count a line that never ends:
            # count the raw bytes instead
            self._head_received += len(data)
            if self._head_received > self.limits.max_url + self.limits.max_headers + HEAD_SLACK:
                self._fatal(HeadersTooLarge(f"headers larger than {self.limits.max_headers} bytes"))
                return
        self._process_queue()
        if (
            (self.queue or self.busy)
            and not self.reading_paused
            and self._pipeline_full()
            and self.transport
        ):
            self.reading_paused = True
            self.transport.pause_reading()

    def _pipeline_full(self) -> bool:
        """Too much is waiting behind the request in progress: MAX_PIPELINE requests, or
        more than max_pipeline_bytes queued (the body arriving behind them included). Only
        asked while something is ahead of the queue (a busy connection or a queue), so that
        a request alone is always read to its end."""
        return (
            len(self.queue) >= MAX_PIPELINE
            or self.queued_bytes + self._body_size > self.limits.max_pipeline_bytes
        )

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = Request()
        self._url = []
        self._url_bytes = 0
        self._header_bytes = 0
        self._body = None
        self._body_size = 0
        self._in_head = True
        self._head_received = 0
        self._continue_pending = False
        # the request timeout runs from the first byte after a keep-alive wait, but from the
        # accept on a new connection (armed in connection_made: it is not moved)
        if not self.busy and (self._idle or not self.deadline):
            self._arm(self.limits.request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_url:
            self._raise(UriTooLong(f"request target longer than {self.limits.max_url} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        if size > self.limits.max_headers:
            self._raise(HeadersTooLarge(f"headers larger than {self.limits.max_headers} bytes"))
        headers = self.request.headers  # type: ignore[union-attr] # set in on_message_begin
        key = name.lower()
        if key in headers:
            headers[key] += b", " + value
        else:
            headers[key] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        request = self.request
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":  # llhttp also takes 0.9 and 2.0 (in HTTP/1 syntax)
                self._raise(VersionNotSupported(f"HTTP/{version} is not supported"))
            request.http10 = True
        request.keep_alive = parser.should_keep_alive()
        headers = request.headers
        host = headers.get(b"host")
        if host is None:
            if not request.http10:
                self._raise(BadRequest("an HTTP/1.1 request needs a Host header"))
        elif b"," in host:  # more than one (joined by on_header); never in one valid value
            self._raise(BadRequest("more than one Host header"))
        coding = headers.get(b"transfer-encoding")
        self._chunked = coding is not None
        if coding is not None and coding.lower() != b"chunked":
            # llhttp reads "gzip, chunked" as chunked, and rejects most others only after
            # this callback: refuse before any of the body is read
            self._raise(NotImplementedHere("only Transfer-Encoding: chunked is supported"))
        try:
            url = httptools.parse_url(self._url[0] if len(self._url) == 1 else b"".join(self._url))
        except httptools.HttpParserInvalidURLError:
            self._raise(BadRequest("malformed request target"))
        request.path = url.path or b""
        request.query = url.query or b""
        self._url.clear()  # not kept for the life of a read
        length = headers.get(b"content-length")
        if length is not None and length != b"0" and length.isdigit():
            size = int(length)
            if size > self.limits.max_body:
                self._raise(
                    PayloadTooLarge(f"request body larger than {self.limits.max_body} bytes")
                )
            # the whole body is reserved now, so that it is refused before it is read
            state = self.state
            if state.buffered_request_bytes + size > self.limits.max_buffered:
                self._raise(_over_budget(self.limits.max_buffered))
            state.buffered_request_bytes += size
            self._body_charge = size
        expect = headers.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                self._raise(BadRequest("unsupported Expect header"))
            if not request.http10:
                # not in the middle of an earlier response: owed until the queue is done
                self._continue_pending = True
                if not self.busy and not self.queue:
                    self._send_continue()

    def on_body(self, body: bytes) -> None:
        size = len(body)
        self._body_size += size
        if self._body_size > self.limits.max_body:
            self._raise(PayloadTooLarge(f"request body larger than {self.limits.max_body} bytes"))
        if self._chunked:  # no length announced: counted as it comes
            state = self.state
            state.buffered_request_bytes += size
            self._body_charge += size
            if state.buffered_request_bytes > self.limits.max_buffered:
                self._raise(_over_budget(self.limits.max_buffered))
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        request = self.request
        assert request is not None
        parts = self._body
        if parts is not None:
            request.body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._body = None
        # the body's charge (its length) now goes with the queued request
        self.queued_bytes += self._body_size + PIPELINE_HEAD_BYTES
        self._body_size = self._body_charge = 0
        self.request = None
        self._continue_pending = False  # the body came anyway
        self.queue.append(request)
        self._disarm()

    def _send_continue(self) -> None:
        self._continue_pending = False
        self.write(wire.CONTINUE)

    def _raise(self, error: MegaphoneError) -> NoReturn:
        self._parse_error = error
        raise error

    # --- requests -----------------------------------------------------------------------------

    def _process_queue(self) -> None:
        while self.queue and not self.busy and not self.write_paused and not self.closed:
            request = self.queue.pop(0)
            size = len(request.body)
            self.queued_bytes -= size + PIPELINE_HEAD_BYTES
            self.state.buffered_request_bytes -= size  # handled now: released
            self._handle(request)
        if self.busy or self.closed:
            return
        if (
            self.reading_paused
            and self._fatal_error is None
            and not (self.queue and self._pipeline_full())
            and self.transport
        ):
            self.reading_paused = False
            self.transport.resume_reading()
        if not self.queue:
            if self._fatal_error is not None:
                self._send_error(None, self._fatal_error)
            elif self.close_when_idle or self.state.shutting_down:
                self.close()
            elif self.request is None:
                self._arm(self.limits.keepalive_timeout)
                self._idle = True
            else:  # a request is arriving; it may have begun while we were busy
                if self._continue_pending:
                    self._send_continue()
                if not self.deadline:
                    self._arm(self.limits.request_timeout)

    def _handle(self, request: Request) -> None:
        api = self.state.api
        request.cors = api.cors.headers(request)
        try:
            handler, params = api.route(request)
            answer = handler(request, params)
            if isinstance(answer, tuple):  # answered at once (an accepted write)
                self._finish(request, answer)
                return
            outcome = self.state.start(answer)
        except MegaphoneError as exc:
            self._send_error(request, exc)
            return
        except Exception:
            log.exception("unexpected error in handler")
            self._send_error(request, InternalError())
            return
        if isinstance(outcome, eager.Done):
            self._finish(request, outcome.value)
        else:
            self._wait_for(request, outcome)

    def _wait_for(self, request: Request, task: asyncio.Task[object]) -> None:
        self.busy = True
        self.task = task
        task.add_done_callback(lambda t: self._task_done(request, t))

    def _task_done(self, request: Request, task: asyncio.Task[object]) -> None:
        self.task = None
        self.busy = False
        if self.closed or task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, MegaphoneError):
            self._send_error(request, exc)
        elif exc is not None:
            log.error("unexpected error in handler", exc_info=exc)
            self._send_error(request, InternalError())
        else:
            self._finish(request, task.result())  # type: ignore[arg-type]
        self._process_queue()

    def _finish(self, request: Request, result: Result) -> None:
        if isinstance(result, ReadRequest):
            self._start_read(request, result)
            return
        keep_alive = self._keep_alive(request)
        if result is WRITTEN and keep_alive and not request.http10 and not request.cors:
            self.write(WRITTEN_RESPONSE)  # the hot path's answer, framed once
            return
        status, body, content_type, extra = result
        self.write(
            wire.response(
                status,
                body,
                content_type=content_type,
                keep_alive=keep_alive,
                http10=request.http10,
                head=request.method == b"HEAD",
                extra=extra + request.cors,
            )
        )
        if not keep_alive:
            self.close()

    def _keep_alive(self, request: Request) -> bool:
        # after the client's EOF, the requests it completed before are still answered: only the
        # last one says "close"
        closing = self.close_when_idle and not self.queue
        return request.keep_alive and not closing and not self.state.shutting_down

    def _send_error(self, request: Request | None, error: MegaphoneError) -> None:
        if error.status >= 500 and error.code == "INTERNAL_SERVER_ERROR":
            log.error("request failed", extra={"status": error.status, "code": error.code})
        else:
            log.info(
                "request rejected",
                extra={"status": error.status, "code": error.code, "detail": error.message},
            )
        keep_alive = request is not None and self._keep_alive(request)
        http10 = request is not None and request.http10
        head = request is not None and request.method == b"HEAD"
        cors = request.cors if request is not None else b""
        self.write(
            wire.error_response(error, keep_alive=keep_alive, http10=http10, head=head, extra=cors)
        )
        if not keep_alive:
            self.close()

    def _fatal(self, error: MegaphoneError) -> None:
        """The byte stream is unusable (bad framing, limit hit): answer the complete requests
        before it, then this error, then close."""
        self._fatal_error = error
        self.request = None
        self._body = None
        self.state.buffered_request_bytes -= self._body_charge  # the body will not be read
        self._body_charge = 0
        self._continue_pending = False
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._process_queue()

    # --- reads --------------------------------------------------------------------------------

    def _start_read(self, request: Request, read: ReadRequest) -> None:
        stream = NdjsonStream(
            self,
            chunked=not request.http10,
            keep_alive=self._keep_alive(request),
            cors=request.cors,
        )
        self.busy = True
        self.stream = stream
        self._disarm()
        if self.timer is not None:  # a read can last long: do not hold a timer meanwhile
            self.timer.cancel()
            self.timer = None
        try:
            outcome = self.state.start(self.state.broker.attach(read.consumer, stream, read.after))
        except Exception as exc:
            self._read_failed(request, stream, exc)
            return
        if isinstance(outcome, eager.Done):
            stream.attached(outcome.value, self.state.windows)
            return
        self.task = outcome
        outcome.add_done_callback(lambda task: self._read_attached(request, stream, task))

    def _read_attached(
        self, request: Request, stream: NdjsonStream, task: asyncio.Task[Subscription]
    ) -> None:
        self.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not self.closed:
                self._read_failed(request, stream, exc)
        elif self.closed:
            task.result().close()  # the client left while we attached
        else:
            stream.attached(task.result(), self.state.windows)

    def _read_failed(self, request: Request, stream: NdjsonStream, exc: BaseException) -> None:
        stream.done = True
        self.stream = None
        self.busy = False
        if not isinstance(exc, MegaphoneError):
            log.error("unexpected error attaching a reader", exc_info=exc)
            exc = InternalError()
        self._send_error(request, exc)
        self._process_queue()

    def stream_finished(self, keep_alive: bool) -> None:
        self.stream = None
        self.busy = False
        if not keep_alive or self.state.shutting_down:
            self.close()
            return
        self._process_queue()

    # --- output and lifetime ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; every connection written to in one turn of the event loop is flushed
        at the end of that turn, with one ``send`` each (see HttpServerState.flush_later)."""
        if self.transport is None or self.closed:
            return
        out = self._out
        if out is None:
            self._out = [data]
            self.state.flush_later(self)
        else:
            out.append(data)

    def flush(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        if self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        """Close after what was written is flushed; abort if the client does not read it."""
        if self.closed or self.transport is None:
            return
        self.flush()
        self.closed = True
        transport = self.transport
        self._disarm()
        if self._fatal_error is not None and transport.can_write_eof():
            # the client may still be sending (a refused body, a header that never ends):
            # closing with unread input makes the kernel send a reset, which can destroy our
            # answer before the client reads it. Shut down our side and drop what still comes
            # until the client closes (eof_received), for a short while at most.
            transport.write_eof()
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
            linger = min(self.limits.request_timeout, LINGER_SECONDS)
            self._abort_timer = self.loop.call_later(linger, transport.abort)
            return
        transport.close()
        self._abort_timer = self.loop.call_later(self.limits.request_timeout, transport.abort)

    def shutdown(self) -> None:
        """Server shutdown: end a read cleanly, close once idle."""
        if self.stream is not None:
            self.stream.finish()
        elif not self.busy and not self.queue:
            self.close()
        else:
            self.close_when_idle = True

    def _arm(self, delay: float) -> None:
        deadline = self.loop.time() + delay
        self.deadline = deadline
        self._idle = False
        if self.timer is None or self._timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self._timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._check_deadline)

    def _disarm(self) -> None:
        self.deadline = 0.0  # a timer still scheduled finds nothing due

    def _check_deadline(self) -> None:
        self.timer = None
        deadline = self.deadline
        if not deadline:
            return
        if self.loop.time() + TIMER_SLACK < deadline:  # the deadline moved on since
            self._timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._check_deadline)
            return
        self.deadline = 0.0
        self._on_timeout()

    def _write_stalled(self) -> None:
        self._stall_timer = None
        log.info("client stopped reading: connection dropped")
        if self.transport is not None:
            self.transport.abort()

    def _on_timeout(self) -> None:
        if self.busy or self.closed:
            return
        if self.request is not None:
            self._fatal(RequestTimeout("request not received in time"))
        else:
            self.close()


def _framing_error(exc: Exception) -> MegaphoneError:
    """What a parse error of httptools means for the client."""
    if str(exc) in UNSUPPORTED_VERSION_REASONS:
        return VersionNotSupported()
    return BadRequest(f"malformed HTTP request: {exc}")


def _over_budget(budget: int) -> Overloaded:
    return Overloaded(
        f"the server holds its maximum of request bodies ({budget} bytes); retry later"
    )
