"""``AsyncPool``: keep-alive HTTP/1.1 connections on asyncio protocols, h11 as the parser.

One request at a time per connection; an idle connection goes back to the pool (last in, first
out) when its answer was read to the end, any other is closed (an error, a timeout, a
cancellation, a read left early). Every wait is bounded by its timeout; the socket stops being
read while a read's body holds more than ``HIGH_WATER`` unread bytes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, cast

import h11

from megaphone.client import _http11
from megaphone.client._base import Answer, Request

__all__ = ["AsyncPool", "AsyncStream"]


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One connection: the protocol collects bytes, ``next_event`` feeds them to h11."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_http11.MAX_HEAD)
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._eof = False
        self._eof_fed = False
        self._ended = False  # the body's end was read, not yet reported
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _http11.HIGH_WATER and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the pool ----------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """Closed or spoken to by the server while idle: not to be used again."""
        return self._eof or bool(self._chunks) or self._transport is None

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _feed(self) -> bool:
        """Hand the collected bytes (or the end of the stream) to h11; False: nothing to hand."""
        if self._chunks:
            chunks, self._chunks, self._buffered = self._chunks, [], 0
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            self.h11.receive_data(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            return True
        if self._eof and not self._eof_fed:
            self._eof_fed = True
            self.h11.receive_data(b"")
            return True
        return False

    async def _wait(self, limit: float | None) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = None if limit is None else self._loop.call_later(limit, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def next_event(self, limit: float | None) -> Any:
        """h11's next event, waiting for bytes at most ``limit`` seconds at a time."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                if type(event) is h11.ConnectionClosed:
                    raise _http11.Closed("the server closed the connection before answering")
                return event
            if not self._feed():
                await self._wait(limit)

    async def response(self, limit: float | None) -> h11.Response:
        while True:
            event = await self.next_event(limit)
            if type(event) is h11.Response:
                return event
            # an InformationalResponse (1xx): the answer follows

    async def data(self, limit: float | None) -> bytes | None:
        """The body bytes available now (waiting for some first), ``None`` at the end."""
        if self._ended:
            self._ended = False
            return None
        parts: list[bytes] = []
        while True:
            event = self.h11.next_event()
            if type(event) is h11.Data:
                parts.append(event.data)
                continue
            if type(event) is h11.EndOfMessage:
                if parts:  # reported on the next call
                    self._ended = True
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                return None
            if event is h11.NEED_DATA:
                if self._feed():
                    continue
                if parts:
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                await self._wait(limit)
                continue
            if type(event) is h11.ConnectionClosed:
                raise _http11.Closed("the server closed the connection mid-answer")
            raise _http11.Closed(f"unexpected {type(event).__name__}")


class AsyncStream:
    """An answer whose body is read as it arrives: ``status``, ``headers``, ``next_chunk()``."""

    def __init__(
        self, pool: AsyncPool, request: Request, timeout: float | None, read: float | None
    ) -> None:
        self._pool = pool
        self._request = request
        self._timeout = timeout
        self._read_timeout = read
        self._conn: _Connection | None = None
        self._done = False
        self.status = 0
        self.headers: Mapping[str, str] = {}

    async def __aenter__(self) -> AsyncStream:
        conn = await self._pool.acquire(self._timeout)
        self._conn = conn
        try:
            conn.write(
                _http11.encode(conn.h11, self._pool.origin, self._request, self._pool.defaults)
            )
            self.status, self.headers = _http11.head(await conn.response(self._read_timeout))
        except _http11.WIRE_ERRORS as exc:
            self._drop()
            raise _http11.wire_error(exc) from exc
        except BaseException:
            self._drop()
            raise
        return self

    async def next_chunk(self) -> bytes | None:
        """The body bytes that arrived (several HTTP chunks at once), ``None`` at its end."""
        conn = self._conn
        if conn is None or self._done:
            return None
        try:
            chunk = await conn.data(self._read_timeout)
        except _http11.WIRE_ERRORS as exc:
            self._drop()
            raise _http11.wire_error(exc) from exc
        except BaseException:
            self._drop()
            raise
        if chunk is None:
            self._done = True
        return chunk

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._done and exc is None:
                self._pool.release(conn)
            else:
                conn.close()


class AsyncPool:
    """Keep-alive connections to one origin; ``send`` a request, or ``stream`` its answer."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.origin = _http11.Origin.parse(base_url)
        self.defaults = [(k.encode(), v.encode()) for k, v in headers.items()]
        self._idle: deque[_Connection] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def acquire(self, limit: float | None) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        conn = _Connection(loop)
        origin = self.origin
        if origin.tls and self._ssl is None:
            self._ssl = _http11.ssl_context()  # once per pool, at its first connection
        tls = self._ssl if origin.tls else None
        try:
            async with asyncio.timeout(limit):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except (OSError, TimeoutError) as exc:
            conn.close()
            raise _http11.connect_error(exc) from exc
        return conn

    def release(self, conn: _Connection) -> None:
        if self._closed or not _http11.reusable(conn.h11) or len(self._idle) >= _http11.MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    async def send(self, request: Request, limit: float | None) -> Answer:
        """The whole answer to ``request``; ``limit`` bounds the connect and each wait."""
        conn = await self.acquire(limit)
        try:
            conn.write(_http11.encode(conn.h11, self.origin, request, self.defaults))
            status, headers = _http11.head(await conn.response(limit))
            parts = []
            while True:
                event = await conn.next_event(limit)
                if type(event) is h11.Data:
                    parts.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    break
        except _http11.WIRE_ERRORS as exc:
            conn.close()
            raise _http11.wire_error(exc) from exc
        except BaseException:
            conn.close()
            raise
        self.release(conn)
        return _http11.answer(status, headers, parts)

    def stream(self, request: Request, timeout: float | None, read: float | None) -> AsyncStream:
        """``async with pool.stream(...) as answer``: the answer's body read as it arrives."""
        return AsyncStream(self, request, timeout, read)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
