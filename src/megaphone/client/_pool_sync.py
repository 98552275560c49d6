"""``SyncPool``: keep-alive HTTP/1.1 connections on blocking sockets, h11 as the parser.

The blocking twin of ``_pool_async``: one request at a time per connection, an idle connection
back to the pool (last in, first out) when its answer was read to the end, any other closed.
Threads may share a pool (taking and returning a connection is one atomic deque operation).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import h11

from megaphone.client import _http11
from megaphone.client._base import Answer, Request

__all__ = ["SyncPool", "SyncStream"]

RECV = 65536


class _Connection:
    """One socket and its h11 state; ``next_event`` receives as h11 asks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_http11.MAX_HEAD)
        self._timeout: float | None = sock.gettimeout()
        self._ended = False

    @property
    def stale(self) -> bool:
        """Closed or spoken to by the server while idle: not to be used again."""
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _receive(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout
        self.h11.receive_data(self.sock.recv(RECV))

    def next_event(self, timeout: float | None) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self._receive(timeout)
                continue
            if type(event) is h11.ConnectionClosed:
                raise _http11.Closed("the server closed the connection before answering")
            return event

    def response(self, timeout: float | None) -> h11.Response:
        while True:
            event = self.next_event(timeout)
            if type(event) is h11.Response:
                return event

    def data(self, timeout: float | None) -> bytes | None:
        """The body bytes received so far (receiving some first), ``None`` at the end."""
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
                if parts:
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                self._receive(timeout)
                continue
            if type(event) is h11.ConnectionClosed:
                raise _http11.Closed("the server closed the connection mid-answer")
            raise _http11.Closed(f"unexpected {type(event).__name__}")


class SyncStream:
    """An answer whose body is read as it arrives: ``status``, ``headers``, ``next_chunk()``."""

    def __init__(
        self, pool: SyncPool, request: Request, timeout: float | None, read: float | None
    ) -> None:
        self._pool = pool
        self._request = request
        self._timeout = timeout
        self._read_timeout = read
        self._conn: _Connection | None = None
        self._done = False
        self.status = 0
        self.headers: Mapping[str, str] = {}

    def __enter__(self) -> SyncStream:
        conn = self._pool.acquire(self._timeout)
        self._conn = conn
        try:
            conn.sock.sendall(
                _http11.encode(conn.h11, self._pool.origin, self._request, self._pool.defaults)
            )
            self.status, self.headers = _http11.head(conn.response(self._read_timeout))
        except _http11.WIRE_ERRORS as exc:
            self._drop()
            raise _http11.wire_error(exc) from exc
        except BaseException:
            self._drop()
            raise
        return self

    def next_chunk(self) -> bytes | None:
        """The body bytes that arrived (several HTTP chunks at once), ``None`` at its end."""
        conn = self._conn
        if conn is None or self._done:
            return None
        try:
            chunk = conn.data(self._read_timeout)
        except _http11.WIRE_ERRORS as exc:
            self._drop()
            raise _http11.wire_error(exc) from exc
        except BaseException:
            self._drop()
            raise
        if chunk is None:
            self._done = True
        return chunk

    def read(self) -> bytes:
        parts = []
        while (chunk := self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __exit__(
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


class SyncPool:
    """Keep-alive connections to one origin; ``send`` a request, or ``stream`` its answer."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.origin = _http11.Origin.parse(base_url)
        self.defaults = [(k.encode(), v.encode()) for k, v in headers.items()]
        self._idle: deque[_Connection] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def acquire(self, timeout: float | None) -> _Connection:
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            if not conn.stale:
                return conn
            conn.close()
        origin = self.origin
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=timeout)
        except OSError as exc:
            raise _http11.connect_error(exc) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.tls:
                if self._ssl is None:
                    self._ssl = _http11.ssl_context()  # once per pool, at its first connection
                sock = self._ssl.wrap_socket(sock, server_hostname=origin.host)
        except OSError as exc:
            sock.close()
            raise _http11.connect_error(exc) from exc
        return _Connection(sock)

    def release(self, conn: _Connection) -> None:
        if self._closed or not _http11.reusable(conn.h11) or len(self._idle) >= _http11.MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    def send(self, request: Request, timeout: float | None) -> Answer:
        """The whole answer to ``request``; ``timeout`` bounds the connect and each wait."""
        conn = self.acquire(timeout)
        try:
            conn.sock.sendall(_http11.encode(conn.h11, self.origin, request, self.defaults))
            status, headers = _http11.head(conn.response(timeout))
            parts = []
            while True:
                event = conn.next_event(timeout)
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

    def stream(self, request: Request, timeout: float | None, read: float | None) -> SyncStream:
        """``with pool.stream(...) as answer``: the answer's body read as it arrives."""
        return SyncStream(self, request, timeout, read)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return
