"""WebSocket (RFC 6455, framed by ``wsproto``): ``GET /read/{consumer}`` + ``Upgrade: websocket``.

One text frame per event (the NDJSON object, without the newline). A read ends with a close frame
whose code says why: ``4000`` the read window ended or the replay window is full (reconnect with
``?after=<last eid>``), ``4404`` the channel is gone (do not reconnect), ``1001`` the server is
shutting down (reconnect later). When the cursor was unknown, the first frame is
``{"resume":"unknown-cursor"}`` (a frame without ``eid``): the gap signal. The server pings every
``heartbeat_millis`` and answers the client's pings; what the client sends otherwise is read and
dropped (the read is one-way). Back-pressure is the NDJSON one: a socket that does not drain
pauses delivery, events wait in the channel, and its buffer and write timeout apply.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping, TextMessage
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from megaphone.core.transports import Transport
from megaphone.http.sinks.base import EndReason, StreamSink
from megaphone.store.base import ResumeStatus

if TYPE_CHECKING:
    from megaphone.http.connection import HttpProtocol
    from megaphone.http.types import ReadStream, Request

CLOSE_CODES = {
    EndReason.WINDOW: 4000,
    EndReason.FULL: 4000,
    EndReason.GONE: 4404,
    EndReason.SHUTDOWN: 1001,
}
GAP_MESSAGE = '{"resume":"unknown-cursor"}'
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def text_frame(line: bytes) -> bytes:
    """The frame ``wsproto`` sends for ``TextMessage(line[:-1].decode())`` on this connection
    (server side: unmasked; no extension is negotiated; an event line is valid UTF-8 JSON),
    byte for byte (a test compares them), at ~0.3 µs instead of ~6 µs an event: wsproto builds
    each frame in Python, through a str round trip. Everything else (the handshake's token,
    pings, close frames, whatever the client sends) is wsproto's."""
    size = len(line) - 1
    if size < 126:
        return b"\x81%c%b" % (size, line[:-1])
    if size < 65536:
        return b"\x81~%b%b" % (_U16.pack(size), line[:-1])
    return b"\x81\x7f%b%b" % (_U64.pack(size), line[:-1])


class WebSocketSink(StreamSink):
    transport = Transport.WEBSOCKET
    status = 101
    __slots__ = ("accept", "ws")

    def __init__(self, connection: HttpProtocol, request: Request, read: ReadStream) -> None:
        super().__init__(connection, request, read)
        self.keep_alive = False  # the connection is the socket's
        self.chunked = False
        self.accept = generate_accept_token(read.ws_key)
        self.ws = Connection(ConnectionType.SERVER)

    def head(self, status: ResumeStatus) -> bytes:
        extra = b""
        if status is not ResumeStatus.NONE:
            extra = b"megaphone-resume: %b\r\n" % status.value.encode()
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: %b\r\n%b%b\r\n" % (self.accept, extra, self.cors)
        )

    def _start(self) -> None:
        super()._start()
        self.connection.upgraded(self)  # from now on the client's bytes are WebSocket frames

    def opening(self, status: ResumeStatus) -> bytes:
        if status is ResumeStatus.UNKNOWN:
            return self.ws.send(TextMessage(data=GAP_MESSAGE))
        return b""

    def frame(self, lines: list[bytes]) -> bytes:
        if len(lines) == 1:
            return text_frame(lines[0])
        return b"".join([text_frame(line) for line in lines])

    def heartbeat(self) -> bytes:
        return self.ws.send(Ping())

    def closing(self, reason: EndReason) -> bytes:
        if self.ws.state is not ConnectionState.OPEN:
            return b""
        return self.ws.send(CloseConnection(code=CLOSE_CODES[reason], reason=reason.value))

    def received(self, data: bytes) -> None:
        ws = self.ws
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Ping):
                    self.connection.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self._peer_closed(ws.send(event.response()))
                    return
                # messages, pongs: a read is one-way, what the client says is dropped
        except RemoteProtocolError:
            self._peer_closed(b"")

    def _peer_closed(self, answer: bytes) -> None:
        """The client closed the socket (or broke the protocol): answer and let go."""
        if answer:
            self.connection.write(answer)
        self.abort()
        self.connection.stream_finished(False)
