"""The original stream (SPEC Part A): one JSON event per line, ``application/x-ndjson``, chunked
for HTTP/1.1 and close-delimited for HTTP/1.0. Heartbeats are opt-in (``?heartbeat=1``): an empty
line, which the official clients do not expect, so they are never sent unasked."""

from __future__ import annotations

from megaphone.core.transports import Transport
from megaphone.http.sinks.base import StreamSink
from megaphone.http.types import ReadStream


class NdjsonSink(StreamSink):
    transport = Transport.NDJSON
    __slots__ = ()

    def wants_heartbeats(self, read: ReadStream) -> bool:
        return read.heartbeat

    def frame(self, lines: list[bytes]) -> bytes:
        return lines[0] if len(lines) == 1 else b"".join(lines)

    def heartbeat(self) -> bytes:
        return b"\n"
