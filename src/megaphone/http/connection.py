"""One HTTP/1.x connection of the public server: httptools parses, this module is the glue.

Keep-alive and pipelining (requests answered in order), ``Expect: 100-continue``, limits on the
request target, headers and body, timeouts for slow or idle clients, output batched per turn of the
loop, and protocol upgrades (a WebSocket read takes the connection's bytes once answered).

A handler's answer is a :class:`megaphone.http.types.Result`, which sends itself: a complete reply,
or a read that the connection attaches and hands to a sink (:mod:`megaphone.http.sinks`, one per
transport), which frames events until the read ends.

Requests that finish without waiting (most writes, creates) are answered inline without a task
(:func:`megaphone.core.eager.start`); only a request that really waits gets one, and that task is
cancelled if the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NoReturn, cast

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
from megaphone.http import sinks, wire
from megaphone.http.sinks import EndReason, StreamSink
from megaphone.http.state import TIMER_SLACK, HttpLimits, HttpServerState
from megaphone.http.types import ReadStream, Reply, Request, Result
from megaphone.store.base import Subscription

log = logging.getLogger("megaphone.http")

MAX_PIPELINE = 32
HEAD_SLACK = 64  # request line and blank line framing, on top of the target and header limits
LINGER_SECONDS = 5.0  # the most we keep draining a client after refusing its request
OUTPUT_HIGH_WATER = 16_384  # bytes of unsent output before a connection's writing pauses
PIPELINE_HEAD_BYTES = 256  # what a queued request's head counts against max_pipeline_bytes
# httptools reports these as plain parse errors (llhttp's reasons): a well-formed version other
# than the ones llhttp knows (HTTP/1.2, HTTP/3.0), and the HTTP/2 connection preface
UNSUPPORTED_VERSION_REASONS = frozenset({"Invalid HTTP version", "Pause on PRI/Upgrade"})

__all__ = ["HttpLimits", "HttpProtocol", "HttpServerState"]


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
        "_upgrade_tail",
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
        "ws",
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
        self.stream: StreamSink | None = None  # the read in progress
        self.ws: StreamSink | None = None  # a read upgraded to a WebSocket: it takes the bytes
        # bytes after an upgrade request, held until the upgrade is answered (None: no upgrade)
        self._upgrade_tail: bytearray | None = None
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
        if self.ws is not None:
            self.ws.received(data)
            return
        if self._fatal_error is not None:
            return  # the byte stream is unusable: what follows is dropped
        tail = self._upgrade_tail
        if tail is not None:  # waiting to answer an upgrade: not HTTP any more
            tail += data
            if len(tail) > self.limits.max_pipeline_bytes:
                self._fatal(BadRequest("too much data before the upgrade was answered"))
            return
        head_before = self.request if self._in_head else None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # what follows the upgrade request is not HTTP: held for the WebSocket read if the
            # request becomes one; anything else is answered, then the connection closes
            self._upgrade_tail = bytearray(data[exc.args[0] :] if exc.args else b"")
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
        self.request = request = Request()
        if self.state.access_log:
            request.started = self.loop.time()
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
        request.upgrade = parser.should_upgrade()
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
            if isinstance(answer, Result):  # answered at once (an accepted write, a read)
                answer.respond(self, request)
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
            outcome.value.respond(self, request)
        else:
            self._wait_for(request, outcome)

    def _wait_for(self, request: Request, task: asyncio.Task[Result]) -> None:
        self.busy = True
        self.task = task
        task.add_done_callback(lambda t: self._task_done(request, t))

    def _task_done(self, request: Request, task: asyncio.Task[Result]) -> None:
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
            task.result().respond(self, request)
        self._process_queue()

    def send_reply(self, request: Request, reply: Reply) -> None:
        self.answered(request, reply.status)
        keep_alive = self.keep_alive_for(request)
        framed = reply.framed
        if framed is not None and keep_alive and not request.http10 and not request.cors:
            self.write(framed)  # the hot path's answer, framed once
            return
        self.write(
            wire.response(
                reply.status,
                reply.body,
                content_type=reply.content_type,
                keep_alive=keep_alive,
                http10=request.http10,
                head=request.method == b"HEAD",
                extra=reply.extra + request.cors,
            )
        )
        if not keep_alive:
            self.close()

    def keep_alive_for(self, request: Request) -> bool:
        # after the client's EOF, the requests it completed before are still answered: only the
        # last one says "close"
        closing = self.close_when_idle and not self.queue
        return request.keep_alive and not closing and not self.state.shutting_down

    def answered(self, request: Request, status: int) -> None:
        """Count a request by endpoint and status; its access line when logging at debug."""
        state = self.state
        state.metrics.count_request(request.endpoint or "other", status)
        if state.access_log:
            log.debug(
                "request",
                extra={
                    "method": request.method.decode("latin-1"),
                    "path": short_path(request.path),
                    "status": status,
                    "duration_ms": round((self.loop.time() - request.started) * 1000, 3),
                    "client": self.client(),
                },
            )

    def client(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return "unix" if peer is not None else "-"

    def _send_error(self, request: Request | None, error: MegaphoneError) -> None:
        where = {
            "status": error.status,
            "code": error.code,
            "path": short_path(request.path) if request is not None else "-",
            "client": self.client(),
        }
        if error.status >= 500 and error.code == "INTERNAL_SERVER_ERROR":
            log.error("request failed", extra=where)
        else:
            log.info("request rejected", extra={**where, "detail": error.message})
        if request is not None:
            self.state.metrics.count_request(request.endpoint or "other", error.status)
        keep_alive = request is not None and self.keep_alive_for(request)
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

    def start_read(self, request: Request, read: ReadStream) -> None:
        stream = sinks.make(self, request, read)
        self.busy = True
        self.stream = stream
        self._disarm()
        if self.timer is not None:  # a read can last long: do not hold a timer meanwhile
            self.timer.cancel()
            self.timer = None
        try:
            outcome = self.state.start(
                self.state.api.broker.attach(read.consumer, stream, read.after)
            )
        except Exception as exc:
            self._read_failed(request, stream, exc)
            return
        if isinstance(outcome, eager.Done):
            self.answered(request, stream.status)
            stream.attached(outcome.value, self.state)
            return
        self.task = outcome
        outcome.add_done_callback(lambda task: self._read_attached(request, stream, task))

    def _read_attached(
        self, request: Request, stream: StreamSink, task: asyncio.Task[Subscription]
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
            self.answered(request, stream.status)
            stream.attached(task.result(), self.state)

    def _read_failed(self, request: Request, stream: StreamSink, exc: BaseException) -> None:
        stream.done = True
        self.stream = None
        self.busy = False
        if not isinstance(exc, MegaphoneError):
            log.error("unexpected error attaching a reader", exc_info=exc)
            exc = InternalError()
        self._send_error(request, exc)
        self._process_queue()

    def upgraded(self, sink: StreamSink) -> None:
        """The upgrade was answered (101): the client's bytes are the sink's from now on."""
        self.ws = sink
        tail, self._upgrade_tail = self._upgrade_tail, None
        if tail:
            sink.received(bytes(tail))

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
            self.stream.finish(EndReason.SHUTDOWN)
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


def short_path(path: bytes) -> str:
    """A request path for logs, long segments (addresses) cut: ``/write/vm.Gx3k…/s``."""
    text = path.decode("latin-1")
    if len(text) <= 48:
        return text
    return "/".join(part if len(part) <= 16 else part[:12] + "…" for part in text.split("/"))


def _framing_error(exc: Exception) -> MegaphoneError:
    """What a parse error of httptools means for the client."""
    if str(exc) in UNSUPPORTED_VERSION_REASONS:
        return VersionNotSupported()
    return BadRequest(f"malformed HTTP request: {exc}")


def _over_budget(budget: int) -> Overloaded:
    return Overloaded(
        f"the server holds its maximum of request bodies ({budget} bytes); retry later"
    )
