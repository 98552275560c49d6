"""Server-Sent Events (``text/event-stream``), for a browser's native ``EventSource``.

Each event is one SSE message of the default type (``message``): ``id:`` is its ``eid``, so the
browser's automatic reconnection sends ``Last-Event-ID`` and resumes exactly as an NDJSON read with
a cursor; ``data:`` is the same JSON object as an NDJSON line (``sid``, ``eid``, ``ts``, ``body``).
One event type rather than one per stream id, because ``onmessage`` only sees ``message`` events
and a page cannot know every stream id in advance to ``addEventListener`` it; the ``sid`` is in the
data. The stream opens with ``retry:`` (the reconnection delay) and, when the cursor was unknown, a
``megaphone-resume`` event whose data is ``{"status":"unknown-cursor"}``: the gap signal a script
can see (it cannot read response headers). Heartbeats are SSE comments, which EventSource ignores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaphone.core.transports import Transport
from megaphone.http.sinks.base import StreamSink, event_id
from megaphone.store.base import ResumeStatus

if TYPE_CHECKING:
    from megaphone.http.connection import HttpProtocol
    from megaphone.http.types import ReadStream, Request

EVENT_STREAM = b"text/event-stream"
HEARTBEAT = b": heartbeat\n\n"


class SseSink(StreamSink):
    transport = Transport.SSE
    content_type = EVENT_STREAM
    __slots__ = ("retry",)

    def __init__(self, connection: HttpProtocol, request: Request, read: ReadStream) -> None:
        super().__init__(connection, request, read)
        self.retry = connection.state.reads.sse_retry_millis

    def opening(self, status: ResumeStatus) -> bytes:
        opening = b"retry: %d\n\n" % self.retry
        if status is ResumeStatus.UNKNOWN:
            opening += b'event: megaphone-resume\ndata: {"status":"unknown-cursor"}\n\n'
        return opening

    def frame(self, lines: list[bytes]) -> bytes:
        return b"".join([b"id: %b\ndata: %b\n\n" % (event_id(line), line[:-1]) for line in lines])

    def heartbeat(self) -> bytes:
        return HEARTBEAT
