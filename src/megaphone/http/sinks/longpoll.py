"""Long-poll (``?transport=long-poll``): one plain response per read.

The read answers as soon as at least one event is there: ``200`` with every event pending at that
moment (up to the replay window) as a JSON array of the NDJSON objects, or ``204`` when the window
ends with none. Like every read, the events it answered stay in the replay window until the next
read's cursor (the last ``eid``, as ``Last-Event-ID`` or ``?after=``) confirms them, so an answer
lost on the way is sent again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaphone.core.transports import Transport
from megaphone.http import wire
from megaphone.http.sinks.base import EndReason, StreamSink
from megaphone.store.base import ResumeStatus, Subscription

if TYPE_CHECKING:
    from megaphone.http.connection import HttpProtocol
    from megaphone.http.state import HttpServerState
    from megaphone.http.types import ReadStream, Request


class LongPollSink(StreamSink):
    transport = Transport.LONG_POLL
    content_type = wire.JSON
    __slots__ = ("events", "http10", "resume")

    def __init__(self, connection: HttpProtocol, request: Request, read: ReadStream) -> None:
        super().__init__(connection, request, read)
        self.keep_alive = connection.keep_alive_for(request)  # a plain response: no chunking
        self.http10 = request.http10
        self.events: list[bytes] = []
        self.resume = ResumeStatus.NONE

    def wants_heartbeats(self, read: ReadStream) -> bool:
        return False

    def attached(self, subscription: Subscription, state: HttpServerState) -> None:
        self.resume = subscription.status
        self._started = True  # nothing goes out before the answer
        super().attached(subscription, state)

    def deliver(self, lines: list[bytes]) -> None:
        if not self.events:
            # answer at the end of this turn of the loop, with whatever else arrives meanwhile
            self.connection.loop.call_soon(self.finish, EndReason.WINDOW)
        self.events.extend(lines)
        self.connection.state.metrics.sample_latency(lines[-1])

    def _complete(self, reason: EndReason) -> None:
        connection = self.connection
        if connection.closed:
            return
        extra = self.cors + wire.NO_STORE
        if self.resume is not ResumeStatus.NONE:
            extra += b"megaphone-resume: %b\r\n" % self.resume.value.encode()
        if self.events:
            body = b"[%b]" % b",".join([line[:-1] for line in self.events])
            status = 200
        else:
            body, status = b"", 204
        self.events = []
        connection.write(
            wire.response(status, body, keep_alive=self.keep_alive, http10=self.http10, extra=extra)
        )
        connection.stream_finished(self.keep_alive)
