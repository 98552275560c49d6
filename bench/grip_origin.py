"""The origin behind the bench's pushpin target: answers every request with a GRIP stream hold.

``GET /sub/<channel>`` (any path: the channel is its last segment) gets ``200`` with
``Grip-Hold: stream`` and ``Grip-Channel: <channel>`` and an empty body, so pushpin keeps the
client's response open and streams into it whatever is published to that channel. Raw asyncio
protocol on uvloop, keep-alive: pushpin (through zurl) asks it once per subscribe, never per event.

    python3 bench/grip_origin.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

HOLD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nGrip-Hold: stream\r\n"
    b"Grip-Channel: %b\r\nContent-Length: 0\r\n\r\n"
)


class Origin(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]  # GET requests have no body
            path = head.split(b" ", 2)[1].split(b"?", 1)[0]
            assert self.transport is not None
            self.transport.write(HOLD % path.rstrip(b"/").rsplit(b"/", 1)[-1])


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Origin, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
