"""The load generator behind ``bench/run.py``: one workload against one running server.

``run.py`` starts it pinned to its own CPU (``taskset``) with a JSON job on the command line and
reads one JSON result from stdout. It is meant to be cheap per event so that the server, not the
harness, is the limit: raw asyncio protocols on uvloop, HTTP/1.1 requests written by hand,
responses parsed only as far as needed (status line, ``Content-Length``, chunked framing).

Workloads (``job["workload"]``):

* ``throughput``: streaming readers on N channels, closed-loop keep-alive writers; acks/s,
  deliveries/s, publish→deliver latency, lost events, server CPU per 1,000 events.
* ``idle``: N idle streaming readers; server RSS growth per reader, then one event into every
  channel and the time until every reader has it.
* ``create``: closed-loop ``POST /create`` on keep-alive connections (megaphone only).
* ``resume`` and ``churn``: one reader per channel that hangs up now and then and reconnects at
  once with a resume cursor (``?after=`` / ``Last-Event-ID``; nchan: its eventsource subscriber);
  writers closed-loop or paced; events delivered, lost, replayed and duplicated, reconnects/s,
  read-open latency, server CPU per 1,000 events and reconnects. See :class:`Reconnecting`.
* ``sse`` and ``websocket`` (issue #11): ``throughput`` or ``idle`` (``job["kind"]``) with every
  reader on that transport instead of the NDJSON stream (``job["transport"]``): megaphone's
  ``GET /read/{consumer}`` with ``Accept: text/event-stream`` or ``Upgrade: websocket``, nchan's
  ``eventsource`` and ``websocket`` subscribers. SSE rides on :class:`StreamReader` (only the
  ``data:`` lines are passed on); WebSocket is :class:`WsReader`, framed by ``wsproto``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import re
import resource
import statistics
import sys
import time
import urllib.parse
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import uvloop
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Request as WsRequest

now = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (request bytes, tag) — the tag comes back with the response
Request = tuple[bytes, int]
# the next request, None (this connection is done) or a delay in seconds (ask again then)
Source = Callable[[], Request | float | None]
Sink = Callable[[int, int, bytes, float], None]  # status, tag, body, round trip (s)


# --- /proc sampling (synchronous helpers, called between phases) -----------------------------


def proc_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def proc_rss_kib(pids: Sequence[int]) -> int:
    """Resident set size (VmRSS) of the given processes, summed, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def machine_busy_seconds() -> float:
    """Busy time of the whole machine (all CPUs) from /proc/stat, in seconds.

    user + nice + system + irq + softirq: what processes are charged for, softirq included (the
    loopback networking done in a process's context counts as that process's system time); plus
    steal, the time the hypervisor of a VM ran something else on our CPUs, which no process of
    ours is charged for but which disturbs a window just as another process would.
    """
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    wall: float
    server_cpu: float  # the HTTP server's processes (megaphone: every node; nginx: master + worker)
    client_cpu: float
    machine_cpu: float
    redis_cpu: float | None  # redis-server, when the target has one
    node_cpu: dict[str, float]  # several megaphone nodes: each node's own

    @classmethod
    def take(cls, job: dict[str, Any]) -> Sample:
        nodes: dict[str, list[int]] = job.get("node_pids") or {}
        return cls(
            now(),
            proc_cpu_seconds(job["server_pids"]),
            self_cpu_seconds(),
            machine_busy_seconds(),
            proc_cpu_seconds(job["redis_pids"]) if job.get("redis_pids") else None,
            {name: proc_cpu_seconds(pids) for name, pids in nodes.items()},
        )


def window(start: Sample, end: Sample) -> dict[str, Any]:
    """CPU use over a measured window, each in % of one core (100 = one CPU fully busy)."""
    wall = end.wall - start.wall
    server = end.server_cpu - start.server_cpu
    client = end.client_cpu - start.client_cpu
    redis = None
    if start.redis_cpu is not None and end.redis_cpu is not None:
        redis = end.redis_cpu - start.redis_cpu
    others = max(0.0, end.machine_cpu - start.machine_cpu - server - client - (redis or 0.0))
    out: dict[str, Any] = {
        "wall_s": wall,
        "server_cpu_s": server,
        "server_cpu_pct": 100 * server / wall,
        "loadgen_cpu_pct": 100 * client / wall,
        # everything else the machine ran meanwhile: noise, should be ~0
        "other_cpu_pct": 100 * others / wall,
    }
    if redis is not None:
        out["redis_cpu_s"] = redis
        out["redis_cpu_pct"] = 100 * redis / wall
    if start.node_cpu:
        out["node_cpu_pct"] = {
            name: 100 * (end.node_cpu[name] - cpu) / wall for name, cpu in start.node_cpu.items()
        }
    return out


def per_1k(cpu_s: float | None, count: int) -> float | None:
    """CPU milliseconds per 1,000 of something."""
    return 1e6 * cpu_s / count if cpu_s is not None and count else None


def redis_rss_kib(job: dict[str, Any]) -> int | None:
    pids = job.get("redis_pids")
    return proc_rss_kib(pids) if pids else None


def percentiles(samples: array[float] | list[float]) -> dict[str, float | None]:
    """p50 / p99 / max in milliseconds (nearest rank)."""
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0}
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, round(q * n) - 1))] * 1000

    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99), "max_ms": ordered[-1] * 1000, "n": n}


# --- HTTP client pieces ---------------------------------------------------------------------


class HttpConn(asyncio.Protocol):
    """A keep-alive connection running a closed loop: request, response, next request.

    ``source()`` gives the next request (or None: this connection is done; or a float: ask again
    after that many seconds, for paced writers); ``sink`` gets every response. Only
    ``Content-Length`` responses are understood, which is all the targets send for the requests
    made here. A response with ``Connection: close`` (pushpin's publish endpoint answers every
    request so) is followed by a new connection to the same address before the next request; the
    round trip passed to ``sink`` does not include that connect.
    """

    def __init__(self, source: Source, sink: Sink, address: tuple[str, int] = ("", 0)) -> None:
        self.source = source
        self.sink = sink
        self.address = address
        self.closing = 0  # connections closed on purpose whose connection_lost is still to come
        self.reconnects = 0
        self.reopening: asyncio.Future[None] | None = None
        self.buf = bytearray()
        self.tag = 0
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        item = self.source()
        if item is None:
            if not self.done.done():
                self.done.set_result(None)
            return
        if isinstance(item, float):
            asyncio.get_running_loop().call_later(item, self._next)
            return
        data, self.tag = item
        self.sent_at = now()
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                eol = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : eol if eol >= 0 else len(head)])
            elif b"transfer-encoding" in head:
                self._fail(f"unsupported response framing: {head[:200]!r}")
                return
            else:
                length = 0
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(head[9:12])
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self.sink(status, self.tag, body, now() - self.sent_at)
            if b"\r\nconnection: close" in head:
                self._reopen()
                return
            self._next()

    def _reopen(self) -> None:
        """The server closes this connection: open a new one, then go on with the loop."""
        self.closing += 1
        self.buf.clear()
        assert self.transport is not None
        self.transport.close()
        self.reconnects += 1

        async def reopen() -> None:
            try:
                await asyncio.get_running_loop().create_connection(lambda: self, *self.address)
            except OSError as exc:
                self._fail(f"could not reconnect: {exc!r}")
                return
            self._next()

        self.reopening = asyncio.ensure_future(reopen())

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closing:
            self.closing -= 1
            return
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost mid-loop: {exc!r}"))


async def connect(
    host: str,
    port: int,
    connections: int,
    source: Source,
    sink: Sink,
    own_source: Callable[[int], Source] | None = None,
) -> list[HttpConn]:
    """Open ``connections`` keep-alive connections, idle until started.

    They share ``source``, unless ``own_source`` is given: then it is called with each
    connection's number and returns that connection's own source (paced writers).
    """
    loop = asyncio.get_running_loop()
    conns: list[HttpConn] = []
    for number in range(connections):
        mine = own_source(number) if own_source is not None else source
        _, conn = await loop.create_connection(
            lambda: HttpConn(mine, sink, (host, port)),  # noqa: B023
            host,
            port,
        )
        conns.append(conn)
    return conns


async def closed_loop(host: str, port: int, connections: int, source: Source, sink: Sink) -> None:
    """Run ``connections`` keep-alive connections until ``source`` is exhausted."""
    conns = await connect(host, port, connections, source, sink)
    await drive(conns)


async def drive(conns: list[HttpConn]) -> None:
    """Start every connection's loop (all connected already) and wait until all are done."""
    for conn in conns:
        conn.start()
    try:
        await asyncio.gather(*(c.done for c in conns))
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()


LinesCallback = Callable[["StreamReader", list[bytes], float], None]


class StreamReader(asyncio.Protocol):
    """One streaming read (``GET``): response head, then newline-separated events.

    The body may be chunked (megaphone) or close-delimited (nchan's http-raw-stream); either way
    ``on_lines`` gets the complete non-empty lines of every ``data_received`` call, with the time
    they arrived. Only a 200 response's body is passed on (an error body is not an event), and
    nothing once ``closing`` is set (the client hung up on purpose).
    """

    def __init__(
        self, index: int, path: bytes, on_lines: LinesCallback, headers: bytes = b""
    ) -> None:
        self.index = index
        self.path = path
        self.headers = headers
        self.request = b"GET %b HTTP/1.1\r\nHost: bench\r\n%b\r\n" % (path, headers)
        # megaphone: when the server ends the read (its window: time, or a full replay window),
        # read again on the same connection from the last event, as a resuming client does
        self.read_again = False
        self.reads = 1
        self.last_line = b""
        self.on_lines = on_lines
        self.resume = b""  # the megaphone-resume response header, if any
        self.sse_id = ""  # server-sent events (nchan): the id of the event being read
        self.closing = False  # the client closed it; what still arrives is dropped
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.status = 0
        self.in_body = False
        self.chunked = False
        self.cbuf = bytearray()  # undecoded chunked framing
        self.remaining = 0  # chunk data bytes still to come
        self.skip = 0  # CRLF bytes after a chunk still to skip
        self.partial = b""  # an incomplete last line
        self.ended = False  # the server ended the stream (last chunk / close)
        self.error_body = b""  # the start of a non-200 answer's body
        self.lost = False  # the connection closed
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        t = now()
        if self.closing:
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end]).lower()
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            at = head.find(b"\r\nmegaphone-resume:")
            if at >= 0:
                eol = head.find(b"\r\n", at + 2)
                self.resume = head[at + 19 : eol if eol >= 0 else len(head)].strip()
            data = bytes(self.head[end + 4 :])
            self.head.clear()
            self.in_body = True
            if self.status != 200:
                self.error_body = data[:500]
            if not self.ready.done():
                self.ready.set_result(self.status)
            if not data or self.status != 200:
                return
        elif self.status != 200:
            self.error_body = (self.error_body + data)[:500]
            return
        payload = self._dechunk(data) if self.chunked else data
        if self.partial:
            payload = self.partial + payload
        lines = payload.split(b"\n")
        self.partial = lines.pop()
        lines = [line for line in lines if line]
        if lines:
            self.last_line = lines[-1]
            self.on_lines(self, lines, t)
        if self.ended and self.read_again and self.transport is not None:
            self._read_again()

    def _read_again(self) -> None:
        at = self.last_line.find(b'"eid":"')
        cursor = b"Last-Event-ID: %b\r\n" % self.last_line[at + 7 : at + 30] if at >= 0 else b""
        self.head.clear()
        self.in_body = self.ended = False
        self.cbuf.clear()
        self.remaining = self.skip = 0
        self.partial = b""
        self.reads += 1
        assert self.transport is not None
        request = b"GET %b HTTP/1.1\r\nHost: bench\r\n%b%b\r\n" % (self.path, self.headers, cursor)
        self.transport.write(request)

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.cbuf
        buf += data
        out: list[bytes] = []
        pos = 0
        size = len(buf)
        while pos < size:
            if self.remaining:
                take = min(self.remaining, size - pos)
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self.remaining -= take
                if self.remaining:
                    break
                self.skip = 2
            if self.skip:
                take = min(self.skip, size - pos)
                pos += take
                self.skip -= take
                if self.skip:
                    break
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            length = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            pos = eol + 2
            if length == 0:
                self.ended = True
                break
            self.remaining = length
        del buf[:pos]
        return b"".join(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"reader closed before its head: {exc!r}"))


class WsReader(asyncio.Protocol):
    """One WebSocket read (issue #11): the handshake and the frames are ``wsproto``'s (client
    side: it writes the upgrade request and parses the ``101`` with h11).

    Each text message (reassembled when it arrives in pieces) is passed on as one line, like an
    NDJSON line; pings are answered; a close frame (megaphone: ``4000`` when the read window
    ends) is answered and marks the read ``ended``. With ``read_again`` (megaphone), a ``4000``
    close (the time window, or a full replay window) is followed at once by a new connection to
    the same read with ``?after=`` the last event's id, as a resuming client does (the events
    written meanwhile wait in the channel). The same attributes as :class:`StreamReader` as far
    as the workloads use them; ``ready`` is the first handshake's status (``101`` accepted).
    """

    def __init__(self, index: int, path: bytes, on_lines: LinesCallback) -> None:
        self.index = index
        self.path = path
        self.target = path  # of the current connection (``?after=`` once read again)
        self.on_lines = on_lines
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.read_again = False
        self.address: tuple[str, int] | None = None  # where to connect again
        self.again = False  # a 4000 close came: connect again once this connection is gone
        self.last_line = b""
        self.reads = 1
        self.resume = b""
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.message: list[str] = []  # the pieces of a text message not complete yet
        self.ended = False  # the server closed the socket (close frame)
        self.close_code: int | None = None
        self.error_body = b""
        self.lost = False
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.ws.send(WsRequest(host="bench", target=self.target.decode())))

    def data_received(self, data: bytes) -> None:
        t = now()
        if self.closing:
            return
        ws = self.ws
        ws.receive_data(data)
        lines: list[bytes] = []
        for event in ws.events():
            if isinstance(event, TextMessage):
                if not event.message_finished:
                    self.message.append(event.data)
                    continue
                if self.message:
                    self.message.append(event.data)
                    lines.append("".join(self.message).encode())
                    self.message.clear()
                else:
                    lines.append(event.data.encode())
            elif isinstance(event, AcceptConnection):
                self._set_ready(101)
            elif isinstance(event, Ping):
                self._send(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                if self.read_again and event.code == 4000 and self.address is not None:
                    self.again = True
                else:
                    self.ended = True
                    WS_CLOSES[f"{event.code} {event.reason}"] += 1
                self._send(ws.send(event.response()))
            elif isinstance(event, RejectConnection):
                self.status = event.status_code
                if not event.has_body:
                    self._set_ready(self.status)
            elif isinstance(event, RejectData):
                self.error_body = (self.error_body + event.data)[:500]
                if event.body_finished:
                    self._set_ready(self.status)
        if lines:
            self.last_line = lines[-1]
            self.on_lines(cast(StreamReader, self), lines, t)

    def _set_ready(self, status: int) -> None:
        self.status = status
        if not self.ready.done():
            self.ready.set_result(status)

    def _send(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.again and not self.closing:
            self.again = False
            asyncio.get_running_loop().create_task(self._read_again())
            return
        self.lost = True
        if not self.closing and not self.ended:
            WS_CLOSES[f"connection lost without a close frame: {exc!r}"] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"reader closed before its head: {exc!r}"))

    async def _read_again(self) -> None:
        at = self.last_line.find(b'"eid":"')
        cursor = self.last_line[at + 7 : self.last_line.index(b'"', at + 7)] if at >= 0 else b""
        self.target = self.path + b"?after=" + cursor if cursor else self.path
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.message.clear()
        self.reads += 1
        assert self.address is not None
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, *self.address)
        except OSError as exc:
            self.lost = True
            WS_CLOSES[f"could not read again: {exc!r}"] += 1


# how WebSocket reads ended before the client closed them ("code reason"): reported
WS_CLOSES: Counter[str] = Counter()
TRANSPORTS = ("ndjson", "sse", "websocket")
EVENT_STREAM = b"Accept: text/event-stream\r\n"
READ_OK = (200, 101)  # a read's head that starts a stream (101: a WebSocket accepted)


def sse_data(on_lines: LinesCallback) -> LinesCallback:
    """Server-Sent Events: pass on only the ``data:`` lines, as they are after the field name
    (the JSON object: megaphone's event, nchan's message); ``id:``, ``retry:`` and comments
    (heartbeats, nchan's ``: hi``) are dropped. Every event here is one ``data:`` line."""

    def on_sse(reader: StreamReader, lines: list[bytes], t: float) -> None:
        data = [line[5:] for line in lines if line.startswith(b"data:")]
        if data:
            on_lines(reader, data, t)

    return on_sse


def make_reader(
    transport: str, index: int, path: bytes, on_lines: LinesCallback
) -> StreamReader | WsReader:
    """A reader of ``path`` on ``transport`` (``ndjson``, ``sse`` or ``websocket``)."""
    if transport == "websocket":
        return WsReader(index, path, on_lines)
    if transport == "sse":
        return StreamReader(index, path, sse_data(on_lines), EVENT_STREAM)
    return StreamReader(index, path, on_lines)


def read_paths(job: dict[str, Any], channels: Sequence[Channel]) -> list[bytes]:
    """Where each channel is read on the job's transport: megaphone serves every transport on
    the consumer address; nchan has a location per subscriber type (``/ev/``: eventsource,
    ``/ws/``: websocket; bench/run.py's nginx.conf)."""
    transport = job.get("transport", "ndjson")
    prefix = {"sse": b"/ev/", "websocket": b"/ws/"}.get(transport)
    if job["target"] == "nchan" and prefix is not None:
        return [c.read_path.replace(b"/sub/", prefix, 1) for c in channels]
    return [c.read_path for c in channels]


OPEN_ATTEMPTS = 100  # a read answered 5xx is opened again (counted), at most this many times


async def open_readers(
    host: str,
    port: int,
    paths: Sequence[bytes],
    on_lines: LinesCallback,
    concurrency: int,
    refused: Counter[str] | None = None,
    read_again: bool = False,
    transport: str = "ndjson",
) -> list[StreamReader | WsReader]:
    """Open one reader per path (at most ``concurrency`` opening at once); wait for every head.

    A read answered 5xx (the server could not serve it now), or closed before its head, is
    opened again after 10 ms; each such answer is counted in ``refused`` ("status body", status 0
    for a close), which the result reports. ``transport``: see :func:`make_reader`."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    readers: list[StreamReader | WsReader] = []

    async def one(index: int, path: bytes) -> None:
        async with gate:
            for _ in range(OPEN_ATTEMPTS):
                reader = make_reader(transport, index, path, on_lines)
                reader.read_again = read_again
                if isinstance(reader, WsReader):
                    reader.address = (host, port)
                await loop.create_connection(lambda: reader, host, port)  # noqa: B023
                try:
                    status = await asyncio.wait_for(reader.ready, 30)
                except ConnectionError:
                    if refused is None:
                        raise
                    status = 0  # closed before its head (pushpin under a burst): open again
                if status in READ_OK:
                    readers.append(reader)
                    return
                reader.closing = True
                if reader.transport is not None:
                    reader.transport.abort()
                if 0 < status < 500 or refused is None:
                    break
                note_error(refused, status, reader.error_body if status else b"closed before head")
                await asyncio.sleep(0.01)
            raise ConnectionError(f"read {path!r} answered {status}")

    await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))
    readers.sort(key=lambda r: r.index)
    return readers


def close_all(readers: Sequence[StreamReader | WsReader]) -> None:
    for reader in readers:
        reader.closing = True
        if reader.transport is not None:
            reader.transport.abort()


# --- targets --------------------------------------------------------------------------------


@dataclass
class Channel:
    write_path: bytes
    read_path: bytes
    name: bytes = b""  # nchan, pushpin: the channel's name; megaphone: its producer address
    grip: bool = False  # pushpin: a write is a publish (POST /publish/) naming the channel

    def write(self, body: bytes) -> bytes:
        """The request that writes ``body`` (one event) into this channel."""
        if self.grip:
            return write_request(self.write_path, grip_items([self.name], body))
        return write_request(self.write_path, body)


def grip_items(channels: Sequence[bytes], body: bytes) -> bytes:
    """pushpin's publish body: one item per channel, the event as an http-stream line."""
    content = body.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    items = b",".join(
        b'{"channel":"%b","formats":{"http-stream":{"content":"%b\\n"}}}' % (name, content)
        for name in channels
    )
    return b'{"items":[%b]}' % items


# Which node does what, when the target has several (megaphone on a shared Redis): ``port`` is
# the readers' node, ``write_port`` the writers', ``create_port`` where the channels are created;
# ``node_ports`` lists every node (metrics are summed over them; the create workload spreads its
# connections over them). Each defaults to ``port``: one server does everything.


def read_port(job: dict[str, Any]) -> int:
    return int(job["port"])


def write_port(job: dict[str, Any]) -> int:
    return int(job.get("write_port") or job["port"])


def create_port(job: dict[str, Any]) -> int:
    return int(job.get("create_port") or job["port"])


def node_ports(job: dict[str, Any]) -> list[int]:
    return [int(p) for p in job.get("node_ports") or [job["port"]]]


async def make_channels(job: dict[str, Any], count: int, connections: int = 32) -> list[Channel]:
    """megaphone: ``POST /create`` each; nchan and pushpin: channels are just names."""
    if job["target"] in ("nchan", "pushpin"):
        tag = b"bench%s" % os.urandom(4).hex().encode()
        names = [b"%s%d" % (tag, i) for i in range(count)]
        if job["target"] == "pushpin":  # the origin holds /sub/<name> on channel <name>
            return [Channel(b"/publish/", b"/sub/%s" % n, n, grip=True) for n in names]
        return [Channel(b"/pub/%s" % n, b"/sub/%s" % n, n) for n in names]
    channels: list[Channel] = []
    failures: Counter[int] = Counter()
    issued = 0
    request = b"POST /create HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"

    def source() -> Request | None:
        nonlocal issued
        if issued >= count:
            return None
        issued += 1
        return request, issued

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        if status != 200:
            failures[status] += 1
            return
        created = orjson.loads(body)
        producer = created["producerAddress"].encode()
        channels.append(
            Channel(
                b"/write/%s/s" % producer,
                b"/read/%s" % created["consumerAddress"].encode(),
                producer,
            )
        )

    await closed_loop(job["host"], create_port(job), min(connections, count), source, sink)
    if failures:
        raise RuntimeError(f"channel creation failed: {dict(failures)}")
    return channels


async def fill_idle(job: dict[str, Any], count: int) -> None:
    """Create ``count`` channels that nobody reads and write one pending event into each."""
    channels = await make_channels(job, count, connections=64)
    body = b'{"idle":true,"pad":"%b"}' % (b"x" * job["pad_bytes"])
    pending = iter(channels)
    failed: Counter[str] = Counter()

    def source() -> Request | None:
        channel = next(pending, None)
        return None if channel is None else (channel.write(body), 0)

    def sink(status: int, tag: int, answer: bytes, rtt: float) -> None:
        if not 200 <= status < 300:
            note_error(failed, status, answer)

    await closed_loop(job["host"], write_port(job), 64, source, sink)
    if failed:
        raise RuntimeError(f"writing the idle channels' events failed: {dict(failed)}")


def note_error(bodies: Counter[str], status: int, body: bytes) -> None:
    """Count a failed request's answer by status and body (the first 10 distinct kinds)."""
    key = f"{status} {body[:200].decode(errors='replace')}"
    if key in bodies or len(bodies) < 10:
        bodies[key] += 1


def write_request(path: bytes, body: bytes) -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (path, len(body), body)
    )


Metrics = dict[str, float]


async def scrape_metrics(job: dict[str, Any]) -> tuple[Metrics | None, list[Metrics] | None]:
    """megaphone's own counters (``GET /metrics``), to cross-check the client's counts: summed
    over the nodes, and each node's (None with a single node)."""
    if job["target"] != "megaphone":
        return None, None
    nodes = [await scrape_node(job["host"], port) for port in node_ports(job)]
    total: Metrics = {}
    for metrics in nodes:
        for name, value in metrics.items():
            total[name] = total.get(name, 0.0) + value
    return total, (nodes if len(nodes) > 1 else None)


async def scrape_node(host: str, port: int) -> Metrics:
    out: Metrics = {}
    sent = False

    def source() -> Request | None:
        nonlocal sent
        if sent:
            return None
        sent = True
        return b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n", 0

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        for line in body.decode().splitlines():
            # with workers > 1 every figure is labelled {worker="i"}: summed over the workers
            line = re.sub(r'^(\w+)\{worker="\d+"\}', r"\1", line)
            if line.startswith("megaphone_") and " " in line and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = out.get(name, 0.0) + float(value)

    await closed_loop(host, port, 1, source, sink)
    return out


# --- workload (a): throughput ---------------------------------------------------------------


class Throughput:
    """Writers spread round-robin over the channels; readers check and time every event.

    Closed loop (each writer sends its next write when the last one is answered), or, with
    ``write_rate``, paced at that many writes/s over all writers: writer k sends its i-th write
    at t0 + (i*W + k)/rate, or at once when its previous one was answered later than that. A
    paced write carries its scheduled time as the send time, so a writer held up by a slow
    answer adds that delay to the latency of the writes it held back (no coordinated omission).
    """

    def __init__(self, job: dict[str, Any], channels: list[Channel]) -> None:
        self.channels = channels
        self.wrapped = job["target"] == "megaphone"  # megaphone wraps the body in an event
        self.pad = b"x" * job["pad_bytes"]
        self.rate = float(job.get("write_rate") or 0)
        self.writers: int = job["writers"]
        self.t0 = 0.0  # paced: when the schedule starts
        self.late = 0  # paced: writes sent more than 1 ms after their scheduled time
        self.running = True
        self.recording = False
        self.seq = 0
        self.acked = 0
        self.acked_seqs: set[int] = set()
        self.write_errors: Counter[int] = Counter()
        self.error_bodies: Counter[str] = Counter()  # "status body" of failed writes, a few kinds
        self.ack_rtt: array[float] = array("d")
        self.delivered = 0
        self.delivered_seqs: set[int] = set()
        self.duplicates = 0
        self.misrouted = 0
        self.unparseable = 0
        self.latency: array[float] = array("d")

    def next_write(self) -> Request | None:
        if not self.running:
            return None
        seq = self.seq
        self.seq = seq + 1
        channel = self.channels[seq % len(self.channels)]
        return channel.write(self.body(seq)), seq

    def body(self, seq: int, sent: float | None = None) -> bytes:
        return b'{"seq":%d,"t":%.6f,"pad":"%b"}' % (seq, now() if sent is None else sent, self.pad)

    def writer_source(self, number: int) -> Source:
        """Paced writer ``number``'s requests (see the class)."""
        sent = 0

        def source() -> Request | float | None:
            nonlocal sent
            if not self.running:
                return None
            due = self.t0 + (sent * self.writers + number) / self.rate
            wait = due - now()
            if wait > 0.0002:
                return wait
            if wait < -0.001 and self.recording:
                self.late += 1
            sent += 1
            seq = self.seq
            self.seq = seq + 1
            channel = self.channels[seq % len(self.channels)]
            return channel.write(self.body(seq, due)), seq

        return source

    def on_ack(self, status: int, seq: int, body: bytes, rtt: float) -> None:
        if 200 <= status < 300:
            self.acked += 1
            self.acked_seqs.add(seq)
            if self.recording:
                self.ack_rtt.append(rtt)
        else:
            self.write_errors[status] += 1
            note_error(self.error_bodies, status, body)

    def on_lines(self, reader: StreamReader, lines: list[bytes], t: float) -> None:
        self.delivered += len(lines)
        n = len(self.channels)
        for line in lines:
            try:
                event = orjson.loads(line)
                body = event["body"] if self.wrapped else event
                seq: int = body["seq"]
                sent: float = body["t"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self.unparseable += 1
                continue
            if seq in self.delivered_seqs:
                self.duplicates += 1
            else:
                self.delivered_seqs.add(seq)
            if seq % n != reader.index:
                self.misrouted += 1
            if self.recording:
                self.latency.append(t - sent)


async def run_throughput(job: dict[str, Any]) -> dict[str, Any]:
    """Workloads ``throughput``, ``latency`` (paced writes) and ``scale`` (``idle_channels``
    more channels created first, each given one pending event, never read)."""
    host = job["host"]
    idle_channels = job.get("idle_channels", 0)
    if idle_channels:
        await fill_idle(job, idle_channels)
    channels = await make_channels(job, job["channels"])
    load = Throughput(job, channels)
    paths = read_paths(job, channels)
    refused: Counter[str] = Counter()
    readers = await open_readers(
        host,
        read_port(job),
        paths,
        load.on_lines,
        100,
        refused,
        read_again=job["target"].startswith("megaphone"),
        transport=job.get("transport", "ndjson"),
    )
    paced = load.writer_source if load.rate else None
    conns = await connect(
        host, write_port(job), job["writers"], load.next_write, load.on_ack, own_source=paced
    )
    load.t0 = now()
    writers = asyncio.ensure_future(drive(conns))
    await asyncio.sleep(job["warmup_s"])
    acked0, delivered0 = load.acked, load.delivered
    start = Sample.take(job)
    load.recording = True
    await asyncio.sleep(job["duration_s"])
    load.recording = False
    end = Sample.take(job)
    acked1, delivered1 = load.acked, load.delivered
    rss_kib = proc_rss_kib(job["server_pids"])
    load.running = False
    await writers  # in-flight writes get their answers

    # drain: wait for the stragglers, stop once complete or without progress for a while
    drain_start = now()
    last, last_change = -1, now()
    while now() - drain_start < job["drain_s"] and not load.acked_seqs <= load.delivered_seqs:
        if load.delivered != last:
            last, last_change = load.delivered, now()
        elif now() - last_change > 2.0:
            break
        await asyncio.sleep(0.05)
    drained_in = now() - drain_start
    metrics, by_node = await scrape_metrics(job)
    lost = len(load.acked_seqs - load.delivered_seqs)
    unacked_delivered = len(load.delivered_seqs - load.acked_seqs)
    readers_gone = sum(r.lost or r.ended for r in readers)
    reads_per_reader = sum(r.reads for r in readers) / max(1, len(readers))
    close_all(readers)

    stats = window(start, end)
    acked, delivered = acked1 - acked0, delivered1 - delivered0
    return {
        **stats,
        "channels": len(channels),
        "idle_channels": idle_channels,
        "writers": job["writers"],
        "write_rate": load.rate or None,
        "writes_late": load.late if load.rate else None,
        "writer_reconnects": sum(c.reconnects for c in conns),
        "server_rss_kib": rss_kib,
        "body_bytes": len(load.body(10**6)),
        "acked_per_s": acked / stats["wall_s"],
        "delivered_per_s": delivered / stats["wall_s"],
        "server_cpu_ms_per_1k_events": per_1k(stats["server_cpu_s"], delivered),
        "redis_cpu_ms_per_1k_events": per_1k(stats.get("redis_cpu_s"), delivered),
        "latency": percentiles(load.latency),
        "ack_rtt": percentiles(load.ack_rtt),
        "total_acked": load.acked,
        "total_delivered": load.delivered,
        "lost": lost,
        "delivered_but_not_acked": unacked_delivered,
        "duplicates": load.duplicates,
        "misrouted": load.misrouted,
        "unparseable": load.unparseable,
        "write_errors": {str(k): v for k, v in load.write_errors.items()},
        "write_error_bodies": dict(load.error_bodies),
        "readers_ended_or_lost": readers_gone,
        "reads_per_reader": reads_per_reader,
        "read_refused": dict(refused),
        "drain_s": drained_in,
        "server_metrics": metrics,
        "server_metrics_by_node": by_node,
    }


# --- workload (b): idle readers, then one event each ----------------------------------------


class FanOut:
    """One event per channel; records when each reader gets its first one."""

    def __init__(self, job: dict[str, Any], channels: list[Channel]) -> None:
        self.channels = channels
        self.wrapped = job["target"] == "megaphone"
        self.pad = b"x" * job["pad_bytes"]
        self.armed = False
        self.next_index = 0
        self.acked = 0
        self.write_errors: Counter[int] = Counter()
        self.error_bodies: Counter[str] = Counter()  # "status body" of failed writes, a few kinds
        self.got = bytearray(len(channels))
        self.waiting = len(channels)
        self.early = 0  # lines before the fan-out (there should be none)
        self.extra = 0  # lines beyond the one expected per reader
        self.last_at = 0.0
        self.latency: array[float] = array("d")
        self.all_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.again: list[int] = []  # channels whose write was answered 5xx: written again
        self.attempts: Counter[int] = Counter()

    def next_write(self) -> Request | None:
        if self.again:
            index = self.again.pop()
        else:
            index = self.next_index
            if index >= len(self.channels):
                return None
            self.next_index = index + 1
        self.attempts[index] += 1
        body = b'{"seq":%d,"t":%.6f,"pad":"%b"}' % (index, now(), self.pad)
        return self.channels[index].write(body), index

    def on_ack(self, status: int, index: int, body: bytes, rtt: float) -> None:
        if 200 <= status < 300:
            self.acked += 1
        else:
            self.write_errors[status] += 1
            note_error(self.error_bodies, status, body)
            # the server could not take it now: write it again (the event's latency then counts
            # from the new attempt; "every reader has its event" still from the first write)
            if status >= 500 and self.attempts[index] < 20:
                self.again.append(index)

    def on_lines(self, reader: StreamReader, lines: list[bytes], t: float) -> None:
        if not self.armed:
            self.early += len(lines)
            return
        if self.got[reader.index]:
            self.extra += len(lines)
            return
        self.got[reader.index] = 1
        self.extra += len(lines) - 1
        event = orjson.loads(lines[0])
        body = event["body"] if self.wrapped else event
        self.latency.append(t - body["t"])
        self.last_at = t
        self.waiting -= 1
        if self.waiting == 0 and not self.all_in.done():
            self.all_in.set_result(None)


async def run_idle(job: dict[str, Any]) -> dict[str, Any]:
    host, pids = job["host"], job["server_pids"]
    count = job["readers"]
    t = now()
    channels = await make_channels(job, count)
    create_s = now() - t
    fan = FanOut(job, channels)

    gc.collect()
    await asyncio.sleep(0.5)
    rss_before, redis_rss_before = proc_rss_kib(pids), redis_rss_kib(job)
    t = now()
    paths = read_paths(job, channels)
    refused: Counter[str] = Counter()
    readers = await open_readers(
        host,
        read_port(job),
        paths,
        fan.on_lines,
        job["connect_concurrency"],
        refused,
        transport=job.get("transport", "ndjson"),
    )
    connect_s = now() - t
    idle_start = Sample.take(job)
    await asyncio.sleep(job["settle_s"])
    idle_end = Sample.take(job)
    rss_after, redis_rss_after = proc_rss_kib(pids), redis_rss_kib(job)

    writers = await connect(host, write_port(job), job["writers"], fan.next_write, fan.on_ack)
    await asyncio.sleep(0.2)
    fan.armed = True
    start = Sample.take(job)
    t0 = now()
    writes_timed_out = False
    await drive(writers)  # the writers were connected beforehand: time the fan-out only
    writes_s = now() - t0
    try:
        await asyncio.wait_for(asyncio.shield(fan.all_in), job["fanout_timeout_s"])
    except TimeoutError:
        writes_timed_out = True
    end = Sample.take(job)
    await asyncio.sleep(0.2)  # let any duplicate arrive before counting
    rss_end = proc_rss_kib(pids)
    readers_gone = sum(r.lost or r.ended for r in readers)
    metrics, by_node = await scrape_metrics(job)
    close_all(readers)
    redis_growth = None
    if redis_rss_before is not None and redis_rss_after is not None:
        redis_growth = (redis_rss_after - redis_rss_before) / count

    return {
        "readers": count,
        "channel_setup_s": create_s,
        "connect_s": connect_s,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_after_fanout_kib": rss_end,
        "rss_per_reader_kib": (rss_after - rss_before) / count,
        "redis_rss_before_kib": redis_rss_before,
        "redis_rss_after_kib": redis_rss_after,
        "redis_rss_per_reader_kib": redis_growth,
        "idle": window(idle_start, idle_end),
        "fanout_writers": job["writers"],
        "fanout_all_delivered_s": (fan.last_at - t0) if not writes_timed_out else None,
        "fanout_writes_acked_s": writes_s,
        "fanout_received": count - fan.waiting,
        "fanout_acked": fan.acked,
        "fanout_timed_out": writes_timed_out,
        "fanout_latency": percentiles(fan.latency),
        "fanout": window(start, end),
        "write_errors": {str(k): v for k, v in fan.write_errors.items()},
        "write_error_bodies": dict(fan.error_bodies),
        "early_lines": fan.early,
        "extra_lines": fan.extra,
        "readers_ended_or_lost": readers_gone,
        "read_refused": dict(refused),
        "server_metrics": metrics,
        "server_metrics_by_node": by_node,
    }


# --- workload batch: one write to 1,000 channels, against 1,000 single writes ---------------

NCHAN_MULTI_PUBLISH = 250  # nchan publishes to at most 255 channels per request


class Rounds:
    """Rounds of one event into every channel, each round waiting until every reader has it.

    ``batch`` rounds send as few requests as the target allows: megaphone one ``POST
    /write-batch`` naming every channel, pushpin one ``POST /publish/`` with one item per
    channel, nchan one ``POST /mpub/a,b,...`` per 250 channels (all at once, one connection
    each). ``single`` rounds write each channel on its own, over 64 keep-alive connections.
    """

    def __init__(self, job: dict[str, Any], channels: list[Channel]) -> None:
        self.job = job
        self.target = job["target"]
        self.channels = channels
        self.wrapped = self.target == "megaphone"
        self.pad = b"x" * job["pad_bytes"]
        self.round = -1
        self.got = bytearray(len(channels))
        self.waiting = 0
        self.done: asyncio.Future[None] | None = None
        self.last_at = 0.0
        self.latency: array[float] = array("d")
        self.extra = 0  # lines that were not this round's first event for their reader
        self.failures: Counter[str] = Counter()
        self.answers = 0

    def body(self) -> bytes:
        return b'{"seq":%d,"t":%.6f,"pad":"%b"}' % (self.round, now(), self.pad)

    def batch_requests(self) -> Iterator[bytes]:
        """The requests of one batch round, each built when it is sent (its own send time)."""
        channels = self.channels
        if self.target == "megaphone":
            names = b",".join(b'"%b"' % c.name for c in channels)
            message = b'{"channels":[%b],"messages":[{"streamId":"s","body":%b}]}'
            yield write_request(b"/write-batch", message % (names, self.body()))
        elif self.target == "pushpin":
            yield write_request(b"/publish/", grip_items([c.name for c in channels], self.body()))
        else:
            for i in range(0, len(channels), NCHAN_MULTI_PUBLISH):
                names = b",".join(c.name for c in channels[i : i + NCHAN_MULTI_PUBLISH])
                yield write_request(b"/mpub/%b" % names, self.body())

    def on_answer(self, status: int, tag: int, body: bytes, rtt: float) -> None:
        self.answers += 1
        failed = not 200 <= status < 300
        if not failed and body.startswith(b'{"failures"'):
            failed = orjson.loads(body)["failures"] != []
        if failed:
            note_error(self.failures, status, body)

    def on_lines(self, reader: StreamReader, lines: list[bytes], t: float) -> None:
        for line in lines:
            event = orjson.loads(line)
            body = event["body"] if self.wrapped else event
            if body["seq"] != self.round or self.got[reader.index]:
                self.extra += 1
                continue
            self.got[reader.index] = 1
            self.latency.append(t - body["t"])
            self.last_at = t
            self.waiting -= 1
            if not self.waiting and self.done is not None and not self.done.done():
                self.done.set_result(None)

    async def run(self, mode: str, rounds: int) -> dict[str, Any]:
        """``rounds`` rounds of ``mode``: time to the last delivery, CPU, latency."""
        job, host, port = self.job, self.job["host"], write_port(self.job)
        self.latency = array("d")
        times: list[float] = []
        cpu = redis_cpu = 0.0
        answers = self.answers
        timed_out = ran = 0
        for _ in range(rounds):
            if timed_out:  # a target that lost a delivery once is not waited for again
                timed_out += 1
                continue
            self.round += 1
            ran += 1
            self.got = bytearray(len(self.channels))
            self.waiting = len(self.channels)
            self.done = asyncio.get_running_loop().create_future()
            if mode == "batch":
                count = (
                    -(-len(self.channels) // NCHAN_MULTI_PUBLISH) if self.target == "nchan" else 1
                )
                source, conns = one_by_one(self.batch_requests()), count
            else:  # built when sent, so each carries its own send time
                source = one_by_one(c.write(self.body()) for c in self.channels)
                conns = 64
            opened = await connect(host, port, conns, source, self.on_answer)
            await asyncio.sleep(0.05)
            start = Sample.take(job)
            t0 = now()
            await drive(opened)
            try:
                await asyncio.wait_for(asyncio.shield(self.done), job["timeout_s"])
                times.append(self.last_at - t0)
            except TimeoutError:
                timed_out += 1
            end = Sample.take(job)
            cpu += end.server_cpu - start.server_cpu
            if start.redis_cpu is not None and end.redis_cpu is not None:
                redis_cpu += end.redis_cpu - start.redis_cpu
            await asyncio.sleep(0.2)
        events = len(self.channels) * ran
        return {
            "rounds": rounds,
            "requests_per_round": (self.answers - answers) / ran,
            "all_delivered_s": statistics.median(times) if times else None,
            "all_delivered_max_s": max(times) if times else None,
            "rounds_timed_out": timed_out,
            "latency": percentiles(self.latency),
            "server_cpu_s": cpu,
            "server_cpu_ms_per_1k_events": per_1k(cpu, events),
            "redis_cpu_ms_per_1k_events": per_1k(redis_cpu, events)
            if job.get("redis_pids")
            else None,
        }


async def run_batch(job: dict[str, Any]) -> dict[str, Any]:
    channels = await make_channels(job, job["channels"])
    rounds = Rounds(job, channels)
    refused: Counter[str] = Counter()
    paths = [c.read_path for c in channels]
    readers = await open_readers(job["host"], read_port(job), paths, rounds.on_lines, 256, refused)
    await asyncio.sleep(0.5)
    first = Sample.take(job)
    out: dict[str, Any] = {"channels": len(channels)}
    for mode in ("batch", "single"):
        out[mode] = await rounds.run(mode, job["rounds"])
    stats = window(first, Sample.take(job))
    readers_gone = sum(r.lost or r.ended for r in readers)
    close_all(readers)
    return {
        **out,
        "loadgen_cpu_pct": stats["loadgen_cpu_pct"],
        "other_cpu_pct": stats["other_cpu_pct"],
        "batch_vs_single_cpu": quotient(
            out["batch"]["server_cpu_ms_per_1k_events"],
            out["single"]["server_cpu_ms_per_1k_events"],
        ),
        "write_error_bodies": dict(rounds.failures),
        "extra_lines": rounds.extra,
        "readers_ended_or_lost": readers_gone,
        "read_refused": dict(refused),
        "rounds_timed_out": out["batch"]["rounds_timed_out"] + out["single"]["rounds_timed_out"],
    }


def one_by_one(requests: Iterator[bytes]) -> Source:
    """A source that sends these requests (each once, on whichever connection asks), then ends."""

    def source() -> Request | None:
        request = next(requests, None)
        return None if request is None else (request, 0)

    return source


def quotient(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- workload sweep: what the expiry sweep costs -------------------------------------------


async def run_sweep(job: dict[str, Any]) -> dict[str, Any]:
    """N channels exist (nobody reads them); K of them expire inside the measured window.

    The server runs with a channel TTL of ``ttl_s`` and a short sweep interval. The K channels
    that expire are created first, then, ``window_s`` later, the N-K that stay: they expire
    ``window_s`` after the first ones, after the window. The window starts just before the
    first K expire and lasts ``window_s``. With K = 0 the same steps measure sweeps that find
    nothing to delete among N channels. The channels disposed in the window are counted by the
    server (``megaphone_channel_disposed``).
    """
    ttl, span, margin = job["ttl_s"], job["window_s"], 0.25
    expiring, total = job["expiring"], job["channels"]
    t_a = now()
    if expiring:
        await make_channels(job, expiring, connections=64)
    t_b = now()
    await asyncio.sleep(max(0.0, t_b + span - now()))
    await make_channels(job, total - expiring, connections=64)
    t_c = now()
    start_at = t_a + ttl - margin
    late = t_c > start_at - 0.3  # the last creations would overlap the window
    await asyncio.sleep(max(0.0, start_at - 0.1 - now()))
    before, _ = await scrape_metrics(job)
    await asyncio.sleep(max(0.0, start_at - now()))
    start = Sample.take(job)
    await asyncio.sleep(span)
    end = Sample.take(job)
    after, _ = await scrape_metrics(job)
    stats = window(start, end)
    disposed = None
    if before is not None and after is not None:
        key = "megaphone_channel_disposed"
        disposed = after.get(key, 0) - before.get(key, 0)
    return {
        **stats,
        "channels": total,
        "expiring": expiring,
        "ttl_s": ttl,
        "window_s": span,
        "sweep_interval_s": job.get("sweep_interval_s"),
        "create_expiring_s": t_b - t_a,
        "create_all_s": t_c - t_a,
        "setup_late": late or (t_b - t_a) > span - 2 * margin - (job.get("sweep_interval_s") or 0),
        "disposed_in_window": disposed,
        "server_cpu_ms": 1e3 * stats["server_cpu_s"],
        "redis_cpu_ms": 1e3 * stats["redis_cpu_s"] if "redis_cpu_s" in stats else None,
    }


# --- workload (c): channel creation ---------------------------------------------------------


async def run_create(job: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop creates; with several nodes, the connections are spread evenly over them."""
    host, pids = job["host"], job["server_pids"]
    request = b"POST /create HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"
    running, recording = True, False
    created = 0
    failures: Counter[int] = Counter()
    failure_bodies: Counter[str] = Counter()
    rtt_samples: array[float] = array("d")

    def source() -> Request | None:
        return (request, 0) if running else None

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        nonlocal created
        if status == 200 and body.startswith(b"{"):
            created += 1
            if recording:
                rtt_samples.append(rtt)
        else:
            failures[status] += 1
            note_error(failure_bodies, status, body)

    rss_before, redis_rss_before = proc_rss_kib(pids), redis_rss_kib(job)
    ports = node_ports(job)
    conns: list[HttpConn] = []
    for number, port in enumerate(ports):
        share = len(range(number, job["connections"], len(ports)))
        conns += await connect(host, port, share, source, sink)
    loop_done = asyncio.ensure_future(drive(conns))
    await asyncio.sleep(job["warmup_s"])
    created0 = created
    start = Sample.take(job)
    recording = True
    await asyncio.sleep(job["duration_s"])
    recording = False
    end = Sample.take(job)
    created1 = created
    running = False
    await loop_done
    rss_after, redis_rss_after = proc_rss_kib(pids), redis_rss_kib(job)
    metrics, by_node = await scrape_metrics(job)

    stats = window(start, end)
    n = created1 - created0
    redis_growth = None
    if redis_rss_before is not None and redis_rss_after is not None and created:
        redis_growth = (redis_rss_after - redis_rss_before) / created
    return {
        **stats,
        "connections": job["connections"],
        "created_per_s": n / stats["wall_s"],
        "server_cpu_ms_per_1k_creates": per_1k(stats["server_cpu_s"], n),
        "redis_cpu_ms_per_1k_creates": per_1k(stats.get("redis_cpu_s"), n),
        "latency": percentiles(rtt_samples),
        "total_created": created,
        "rss_per_channel_kib": (rss_after - rss_before) / created if created else None,
        "redis_rss_per_channel_kib": redis_growth,
        "failures": {str(k): v for k, v in failures.items()},
        "failure_bodies": dict(failure_bodies),
        "server_metrics": metrics,
        "server_metrics_by_node": by_node,
    }


# --- workloads (d) resume and (e) churn: readers that hang up and come back with a cursor --


ParsedEvent = tuple[str, int, float]  # event id, seq, send time
REOPEN_GIVE_UP_S = 15.0  # a reader answered only 409/5xx for this long stops trying (a failure)


class Slot:
    """One channel's reader, across its reconnections."""

    __slots__ = (
        "budget",
        "count",
        "cursor",
        "dying",
        "index",
        "path",
        "reader",
        "timer",
        "use_header",
    )

    def __init__(self, index: int, path: bytes, use_header: bool) -> None:
        self.index = index
        self.path = path
        self.use_header = use_header  # cursor as a Last-Event-ID header, else ?after=
        self.reader: StreamReader | None = None  # the current connection
        self.cursor: str | None = None  # eid of the last event received
        self.count = 0  # events taken on the current connection
        self.budget = 0  # hang up after this many events (0: not on a count)
        self.timer: asyncio.TimerHandle | None = None  # hang up at this time
        self.dying = False  # hanging up: what still arrives is dropped, as if lost on the way


class Reconnecting:
    """Writers (closed loop, or paced at a fixed total rate) spread round-robin over the
    channels; one reader per channel that hangs up now and then and reconnects at once, naming
    the last event id it received (``?after=`` or ``Last-Event-ID``).

    megaphone: ``GET /read/{consumer}`` (NDJSON events, the id is ``eid``). nchan: its
    ``eventsource`` subscriber (``id:`` / ``data:`` lines), which resumes from ``Last-Event-ID``
    or ``?last_event_id=`` out of the channel's message buffer.

    A reader hangs up after a number of events and/or after a random time, as a client whose
    network drops would: it takes the events of the chunk up to the last one it counts, drops the
    rest of the chunk and everything else that arrives for ``hangup_linger_s`` more (lost on the
    way), then aborts the connection (whatever the server sent meanwhile is lost with it) and
    reconnects at once, naming the last event it took. The server must re-send every dropped
    event: the client checks that each comes back, and that nothing it took comes twice. With
    ``cursor: "none"`` and no hang-ups this is the throughput workload with the same client
    code, the baseline.
    """

    def __init__(self, job: dict[str, Any], channels: list[Channel]) -> None:
        self.nchan = job["target"] == "nchan"
        self.parse = self.parse_sse if self.nchan else self.parse_ndjson
        self.accept = b"Accept: text/event-stream\r\n" if self.nchan else b""
        self.cursor_arg = b"last_event_id" if self.nchan else b"after"
        self.host: str = job["host"]
        self.port = read_port(job)  # the readers' node
        self.channels = channels
        self.n = len(channels)
        self.pad = b"x" * job["pad_bytes"]
        self.writers: int = job["writers"]
        self.rate: float = float(job.get("write_rate") or 0)  # all writers together; 0: closed loop
        self.every_events: int = job.get("reconnect_every_events", 0)
        self.jitter: bool = job.get("reconnect_jitter", False)
        self.after_s: float = job.get("reconnect_after_s", 0.0)
        self.linger: float = job.get("hangup_linger_s", 0.0)
        self.cursor_mode: str = job.get("cursor", "query")  # none | query | header | mixed
        self.rng = random.Random(job.get("seed", 1))
        header = self.cursor_mode == "header"
        self.slots = [
            Slot(
                i,
                c.read_path.replace(b"/sub/", b"/ev/", 1) if self.nchan else c.read_path,
                header or (self.cursor_mode == "mixed" and i % 2 == 1),
            )
            for i, c in enumerate(channels)
        ]
        self.churning = False  # hang-ups enabled
        self.recording = False
        self.running = True
        # writers
        self.seq = 0
        self.t0 = 0.0
        self.acked = 0
        self.acked_seqs: set[int] = set()
        self.write_errors: Counter[int] = Counter()
        self.error_bodies: Counter[str] = Counter()  # "status body" of failed writes, a few kinds
        # readers
        self.delivered = 0  # events taken, first receipt only
        self.taken: set[int] = set()
        self.dropped: set[int] = set()  # received after a hang-up point, not taken (yet)
        self.dropped_lines = 0
        self.replays_seen = 0  # taken events that had been received and dropped before
        self.duplicates = 0  # events received again after being taken
        self.misrouted = 0
        self.unparseable = 0
        self.latency: array[float] = array("d")
        self.hangups = 0
        self.opens = 0
        self.busy = 0  # 409 answers to a reconnect (the old read not detached yet)
        self.open_failures: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # reads answered 5xx ("status body"), reopened
        self.resume_headers: Counter[str] = Counter()
        self.cursors_sent = 0
        self.open_latency: array[float] = array("d")
        self.reconnecting: set[asyncio.Task[bool]] = set()

    # --- writers ----------------------------------------------------------------------------

    def body(self, seq: int) -> bytes:
        return b'{"seq":%d,"t":%.6f,"pad":"%b"}' % (seq, now(), self.pad)

    def writer_source(self, number: int) -> Source:
        """Writer ``number``'s requests; paced, writer k sends its i-th at t0 + (i*W + k)/rate."""
        sent = 0

        def source() -> Request | float | None:
            nonlocal sent
            if not self.running:
                return None
            if self.rate:
                wait = self.t0 + (sent * self.writers + number) / self.rate - now()
                if wait > 0.0002:
                    return wait
            sent += 1
            seq = self.seq
            self.seq = seq + 1
            channel = self.channels[seq % self.n]
            return channel.write(self.body(seq)), seq

        return source

    def on_ack(self, status: int, seq: int, body: bytes, rtt: float) -> None:
        if 200 <= status < 300:
            self.acked += 1
            self.acked_seqs.add(seq)
        else:
            self.write_errors[status] += 1
            note_error(self.error_bodies, status, body)

    # --- readers ----------------------------------------------------------------------------

    def next_budget(self, first: bool) -> int:
        every = self.every_events
        if not every:
            return 0
        if self.jitter:  # churn: a fresh random count every time, mean ``every``
            return self.rng.randint(1, 2 * every - 1)
        # resume: spread the first hang-ups so the readers do not reconnect in step
        return self.rng.randint(1, every) if first else every

    async def open(self, slot: Slot, first: bool = False) -> bool:
        """(Re)open the slot's read with its cursor; retry at once while the answer is 409."""
        loop = asyncio.get_running_loop()
        path, headers = slot.path, self.accept
        if slot.cursor is not None and self.cursor_mode != "none":
            self.cursors_sent += 1
            if slot.use_header:
                headers += b"Last-Event-ID: %b\r\n" % slot.cursor.encode()
            else:
                cursor = urllib.parse.quote(slot.cursor, safe="").encode()
                path = b"%b?%b=%b" % (path, self.cursor_arg, cursor)
        started = now()
        for attempt in range(1, 1001):
            if now() - started > REOPEN_GIVE_UP_S:
                self.open_failures[f"gave up after {REOPEN_GIVE_UP_S:g} s of 409/5xx"] += 1
                slot.reader = None
                return False
            reader = StreamReader(slot.index, path, self.on_lines, headers)
            slot.reader = reader  # lines may come with the head, before we resume below
            slot.count = 0
            slot.budget = self.next_budget(first)
            try:
                await loop.create_connection(lambda: reader, self.host, self.port)  # noqa: B023
                status = await asyncio.wait_for(reader.ready, 30)
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.open_failures[type(exc).__name__] += 1
                reader.closing = True
                if reader.transport is not None:
                    reader.transport.abort()
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                break
            reader.closing = True
            if reader.transport is not None:
                reader.transport.abort()
            if status >= 500:  # the server cannot serve it now: counted, and opened again
                note_error(self.refused, status, reader.error_body)
                await asyncio.sleep(0.01)
                continue
            if status != 409:
                self.open_failures[str(status)] += 1
                slot.reader = None
                return False
            self.busy += 1
            await asyncio.sleep(0.0005 * min(attempt, 20))
        else:
            self.open_failures["gave up after 1,000 attempts"] += 1
            slot.reader = None
            return False
        self.opens += 1
        if self.recording:
            self.open_latency.append(now() - started)
        self.resume_headers[reader.resume.decode() or "(none)"] += 1
        if self.after_s and self.churning:
            slot.timer = loop.call_later(
                self.rng.uniform(0, 2 * self.after_s), self.hang_up_timer, slot, reader
            )
        return True

    async def open_all(self, concurrency: int) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(slot: Slot) -> None:
            async with gate:
                if not await self.open(slot, first=True):
                    raise ConnectionError(f"reader {slot.index} could not open")

        await asyncio.gather(*(one(slot) for slot in self.slots))

    def hang_up_timer(self, slot: Slot, reader: StreamReader) -> None:
        slot.timer = None
        if reader is slot.reader and self.churning and not reader.closing and not slot.dying:
            self.hang_up(slot)

    def hang_up(self, slot: Slot) -> None:
        reader = slot.reader
        assert reader is not None
        slot.dying = True
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        self.hangups += 1
        task = asyncio.ensure_future(self.reconnect(slot, reader))
        self.reconnecting.add(task)
        task.add_done_callback(self.reconnecting.discard)

    async def reconnect(self, slot: Slot, reader: StreamReader) -> bool:
        if self.linger:
            await asyncio.sleep(self.linger)
        reader.closing = True
        if reader.transport is not None:
            reader.transport.abort()
        slot.dying = False
        return await self.open(slot)

    @staticmethod
    def parse_ndjson(reader: StreamReader, lines: list[bytes]) -> list[ParsedEvent | None]:
        """megaphone: one ``{"sid","eid","ts","body"}`` event per line."""
        out: list[ParsedEvent | None] = []
        for line in lines:
            try:
                event = orjson.loads(line)
                body = event["body"]
                out.append((event["eid"], body["seq"], body["t"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                out.append(None)
        return out

    @staticmethod
    def parse_sse(reader: StreamReader, lines: list[bytes]) -> list[ParsedEvent | None]:
        """nchan eventsource: ``id: …`` then ``data: <body>``; comments (``: hi``) skipped."""
        out: list[ParsedEvent | None] = []
        for line in lines:
            if line.startswith(b"data:"):
                try:
                    body = orjson.loads(line[5:])
                    out.append((reader.sse_id, body["seq"], body["t"]))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    out.append(None)
            elif line.startswith(b"id:"):
                reader.sse_id = line[3:].strip().decode()
        return out

    def on_lines(self, reader: StreamReader, lines: list[bytes], t: float) -> None:
        slot = self.slots[reader.index]
        if reader is not slot.reader or reader.closing:
            return
        events = self.parse(reader, lines)
        if slot.dying:
            self.drop(events)
            return
        taken = self.taken
        for i, parsed in enumerate(events):
            if parsed is None:
                self.unparseable += 1
                continue
            eid, seq, sent = parsed
            if seq in taken:
                self.duplicates += 1  # a client drops it (by its id)
            else:
                taken.add(seq)
                self.delivered += 1
                if seq in self.dropped:
                    self.dropped.discard(seq)
                    self.replays_seen += 1
                if self.recording:
                    self.latency.append(t - sent)
            if seq % self.n != reader.index:
                self.misrouted += 1
            slot.cursor = eid
            slot.count += 1
            if slot.budget and slot.count >= slot.budget and self.churning:
                self.drop(events[i + 1 :])
                self.hang_up(slot)
                return

    def drop(self, events: list[ParsedEvent | None]) -> None:
        """Events that arrive after the hang-up point: received, but lost on the way."""
        for parsed in events:
            if parsed is None:
                continue
            self.dropped_lines += 1
            if parsed[1] not in self.taken:
                self.dropped.add(parsed[1])

    async def settle(self) -> int:
        """Stop hanging up; wait for reconnections in flight; reopen any reader that is gone.

        Returns how many readers had to be reopened (the server ended or lost them)."""
        self.churning = False
        for slot in self.slots:
            if slot.timer is not None:
                slot.timer.cancel()
                slot.timer = None
        while self.reconnecting:
            await asyncio.gather(*list(self.reconnecting), return_exceptions=True)
        gone = [s for s in self.slots if s.reader is None or s.reader.lost or s.reader.ended]
        if gone:  # all at once: each gives up after REOPEN_GIVE_UP_S of 409/5xx answers
            await asyncio.gather(*(self.open(slot) for slot in gone))
        return len(gone)

    def counters(self) -> dict[str, int]:
        return {
            "acked": self.acked,
            "delivered": self.delivered,
            "hangups": self.hangups,
            "opens": self.opens,
            "busy": self.busy,
        }


async def run_reconnecting(job: dict[str, Any]) -> dict[str, Any]:
    """Workloads ``resume`` (one phase per job) and ``churn``: see :class:`Reconnecting`."""
    host, pids = job["host"], job["server_pids"]
    channels = await make_channels(job, job["channels"])
    load = Reconnecting(job, channels)
    t = now()
    await load.open_all(job.get("connect_concurrency", 100))
    connect_s = now() - t
    rss_start = proc_rss_kib(pids)
    load.churning = bool(load.every_events or load.after_s)
    conns = await connect(
        host,
        write_port(job),
        job["writers"],
        load.writer_source(0),
        load.on_ack,
        own_source=load.writer_source,
    )
    load.t0 = now()
    writers = asyncio.ensure_future(drive(conns))
    await asyncio.sleep(job["warmup_s"])
    before = load.counters()
    start = Sample.take(job)
    load.recording = True
    await asyncio.sleep(job["duration_s"])
    load.recording = False
    end = Sample.take(job)
    after = load.counters()
    load.running = False
    await writers
    reopened = await load.settle()

    drain_start = now()
    last, last_change = -1, now()
    while now() - drain_start < job["drain_s"] and not load.acked_seqs <= load.taken:
        if load.delivered != last:
            last, last_change = load.delivered, now()
        elif now() - last_change > 2.0:
            break
        await asyncio.sleep(0.05)
    drained_in = now() - drain_start
    metrics, by_node = await scrape_metrics(job)
    rss_end = proc_rss_kib(pids)
    lost = len(load.acked_seqs - load.taken)
    readers = [s.reader for s in load.slots if s.reader is not None]
    readers_gone = sum(r.lost or r.ended for r in readers) + load.n - len(readers)
    close_all(readers)

    stats = window(start, end)
    d = {k: after[k] - before[k] for k in after}
    wall = stats["wall_s"]
    cpu_ms = 1e3 * stats["server_cpu_s"]
    sent = (metrics or {}).get("megaphone_messages_read")
    replayed = (metrics or {}).get("megaphone_messages_replayed")
    return {
        **stats,
        "channels": load.n,
        "writers": load.writers,
        "write_rate": load.rate or None,
        "reconnect_every_events": load.every_events or None,
        "reconnect_after_s": load.after_s or None,
        "cursor": load.cursor_mode,
        "body_bytes": len(load.body(10**6)),
        "connect_s": connect_s,
        # readers open before, every reader back and drained after: what the phase left behind
        "rss_start_kib": rss_start,
        "rss_end_kib": rss_end,
        "acked_per_s": d["acked"] / wall,
        "delivered_per_s": d["delivered"] / wall,
        "reconnects_per_s": d["hangups"] / wall,
        "busy_per_s": d["busy"] / wall,
        "server_cpu_ms_per_1k_events": 1e3 * cpu_ms / d["delivered"] if d["delivered"] else None,
        "server_cpu_ms_per_1k_reconnects": 1e3 * cpu_ms / d["hangups"] if d["hangups"] else None,
        "redis_cpu_ms_per_1k_events": per_1k(stats.get("redis_cpu_s"), d["delivered"]),
        "redis_cpu_ms_per_1k_reconnects": per_1k(stats.get("redis_cpu_s"), d["hangups"]),
        "latency": percentiles(load.latency),
        "open_latency": percentiles(load.open_latency),
        "total_acked": load.acked,
        "total_delivered": load.delivered,
        "total_reconnects": load.hangups,
        "total_busy": load.busy,
        "cursors_sent": load.cursors_sent,
        "resume_headers": dict(load.resume_headers),
        "dropped_at_hangup": load.dropped_lines,
        "replays_seen": load.replays_seen,
        "dropped_never_replayed": len(load.dropped),
        "server_sent": sent,
        "server_replayed": replayed,
        # events the server sent more than once, as far as the client can tell: whatever the
        # server counted as sent beyond the distinct events the client took
        "server_sent_beyond_taken": (sent - load.delivered) if sent is not None else None,
        "lost": lost,
        "delivered_but_not_acked": len(load.taken - load.acked_seqs),
        "duplicates": load.duplicates,
        "misrouted": load.misrouted,
        "unparseable": load.unparseable,
        "write_errors": {str(k): v for k, v in load.write_errors.items()},
        "write_error_bodies": dict(load.error_bodies),
        "open_failures": dict(load.open_failures),
        "read_refused": dict(load.refused),
        "readers_reopened_at_end": reopened,
        "readers_ended_or_lost": readers_gone,
        "drain_s": drained_in,
        "server_metrics": metrics,
        "server_metrics_by_node": by_node,
    }


# --- workloads sse and websocket (issue #11): throughput and idle on another transport -----


async def run_transport(job: dict[str, Any]) -> dict[str, Any]:
    """A phase of ``sse`` or ``websocket``: ``job["kind"]`` (``throughput`` or ``idle``) with
    every reader on ``job["transport"]``; the same load, figures and checks as the NDJSON
    workload of that kind."""
    if job.get("transport") not in TRANSPORTS:
        raise ValueError(f"unknown transport {job.get('transport')!r}")
    runner = {"throughput": run_throughput, "idle": run_idle}[job["kind"]]
    result = await runner(job)
    result["kind"], result["transport"] = job["kind"], job["transport"]
    result["ws_closes"] = dict(WS_CLOSES)  # before the client closed them (websocket only)
    return result


# --- entry point ----------------------------------------------------------------------------

WORKLOADS = {
    "throughput": run_throughput,
    "idle": run_idle,
    "create": run_create,
    "resume": run_reconnecting,
    "churn": run_reconnecting,
    "latency": run_throughput,
    "scale": run_throughput,
    "batch": run_batch,
    "sweep": run_sweep,
    "sse": run_transport,
    "websocket": run_transport,
}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    job: dict[str, Any] = json.loads(sys.argv[1])
    raise_nofile()
    result = uvloop.run(WORKLOADS[job["workload"]](job))
    result["loadgen_cpus"] = sorted(os.sched_getaffinity(0))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
