"""The HTTP/1.x glue around httptools, over raw sockets.

Keep-alive, pipelining, HTTP/1.0, streamed reads (chunked and close-delimited),
``Expect: 100-continue``, the limits on request target, headers and body, malformed input, and the
timeouts for slow and idle clients. Every error case ends by checking that the server still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import orjson
import pytest

from conftest import ServerFactory, base_url, create_channel, read_events
from megaphone.http.connection import HttpProtocol
from megaphone.server import MegaphoneServer

WAIT = 5.0  # upper bound for anything we wait on; never a performance assertion


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)  # chunk payloads of a chunked body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.body.splitlines()]


class Conn:
    """One raw HTTP/1.x connection: send bytes, parse responses."""

    opened: ClassVar[list[Conn]] = []  # closed after each test

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        Conn.opened.append(self)

    @classmethod
    async def open(cls, node: MegaphoneServer) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        if self.writer.is_closing():
            return
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def _line(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.reader.readuntil(b"\r\n")

    async def head(self) -> Response:
        """Status line and headers."""
        status_line = (await self._line()).decode("latin-1").rstrip("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        while (line := await self._line()) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        return Response(int(status), reason, headers)

    async def read_chunk(self) -> bytes:
        """One chunk's payload; b"" for the last chunk (its trailer is consumed)."""
        size = int((await self._line()).split(b";")[0], 16)
        async with asyncio.timeout(WAIT):
            data = await self.reader.readexactly(size + 2)
        assert data.endswith(b"\r\n")
        if size == 0:
            assert data == b"\r\n"
        return data[:-2]

    async def read_to_eof(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.reader.read()

    async def response(self) -> Response:
        """A whole response: Content-Length, chunked, or delimited by the close."""
        response = await self.head()
        if "content-length" in response.headers:
            async with asyncio.timeout(WAIT):
                response.body = await self.reader.readexactly(
                    int(response.headers["content-length"])
                )
        elif response.headers.get("transfer-encoding") == "chunked":
            while chunk := await self.read_chunk():
                response.chunks.append(chunk)
            response.body = b"".join(response.chunks)
        else:
            response.body = await self.read_to_eof()
        return response

    async def assert_closed(self) -> None:
        """The server closes the connection (EOF or reset) with nothing more to say."""
        try:
            async with asyncio.timeout(WAIT):
                rest = await self.reader.read()
        except ConnectionResetError:
            return
        assert rest == b"", f"unexpected bytes before the close: {rest!r}"


def request(
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    version: str = "1.1",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def expect_continue(body: bytes) -> dict[str, str]:
    """Headers of a request whose body is only sent after ``100 Continue``."""
    return {"Expect": "100-continue", "Content-Length": str(len(body))}


def write_request(producer: str, sid: str, payload: Any, **kwargs: Any) -> bytes:
    return request("POST", f"/write/{producer}/{sid}", orjson.dumps(payload), **kwargs)


def assert_error(response: Response, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert set(body) == {"code", "message"}


async def assert_serves(node: MegaphoneServer) -> None:
    """A fresh connection still gets a normal answer."""
    conn = await Conn.open(node)
    try:
        await conn.send(request("POST", "/create", b""))
        response = await conn.response()
        assert response.status == 200, response
        assert response.json()["consumerAddress"]
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
async def _close_connections(server_factory: ServerFactory) -> AsyncIterator[None]:
    yield  # torn down before the servers, so they need not wait for our sockets
    for conn in Conn.opened:
        await conn.close()
    Conn.opened.clear()


@pytest.fixture
async def node(server_factory: ServerFactory) -> MegaphoneServer:
    return await server_factory(poll_duration_millis=500)


@pytest.fixture
async def http(node: MegaphoneServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as client:
        yield client


async def assert_untouched(http: httpx.AsyncClient, channel: dict[str, Any]) -> None:
    """Nothing was written into the channel: events keep their order, so a marker written now
    must be the first event a read gets."""
    reply = await http.post(f"/write/{channel['producerAddress']}/marker", json="marker")
    assert reply.status_code == 201
    [event] = await read_events(http, channel["consumerAddress"], 1)
    assert (event["sid"], event["body"]) == ("marker", "marker")


async def new_channel(conn: Conn) -> dict[str, Any]:
    await conn.send(request("POST", "/create", b""))
    response = await conn.response()
    assert response.status == 200, response
    data: dict[str, Any] = response.json()
    return data


# --- keep-alive and pipelining ----------------------------------------------------------------


async def test_keep_alive_serves_several_requests(node: MegaphoneServer) -> None:
    conn = await Conn.open(node)
    channel = await new_channel(conn)
    for i in range(3):
        await conn.send(write_request(channel["producerAddress"], "s", {"n": i}))
        response = await conn.response()
        assert response.status == 201
        assert response.json() == {"status": "OK"}
        assert "connection" not in response.headers
    await conn.send(request("GET", f"/read/{channel['consumerAddress']}"))
    read = await conn.response()
    assert [e["body"] for e in read.events()] == [{"n": 0}, {"n": 1}, {"n": 2}]
    await conn.send(request("GET", "/metrics"))
    assert (await conn.response()).status == 200
    await conn.close()


class RecordingTransport(asyncio.Transport):
    """Stands in for a socket: records each ``write`` (each would be one ``send``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def test_a_turn_of_the_loop_sends_once_per_connection(node: MegaphoneServer) -> None:
    """Everything written to a connection in one turn of the loop leaves in one send, after the
    turn: pipelined answers share it, and so do a reader's events from several writes."""
    if node.settings.store != "memory":
        pytest.skip("on Redis a write is answered in a later turn, after its round trip")
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
    reader, writer = HttpProtocol(node.http), HttpProtocol(node.http)
    reader_out, writer_out = RecordingTransport(), RecordingTransport()
    reader.connection_made(reader_out)
    writer.connection_made(writer_out)
    reader.data_received(request("GET", f"/read/{channel['consumerAddress']}"))
    await asyncio.sleep(0)
    assert len(reader_out.sent) == 1  # the stream's head
    writes = b"".join(write_request(channel["producerAddress"], "s", n) for n in range(3))
    writer.data_received(writes + request("GET", "/healthz"))
    assert writer_out.sent == []  # nothing sent during the turn
    assert len(reader_out.sent) == 1
    await asyncio.sleep(0)  # the end of the turn
    [answers] = writer_out.sent
    assert answers.count(b"HTTP/1.1 201 Created\r\n") == 3
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 1
    [_, events] = reader_out.sent  # three events, one send
    chunks = events.split(b"\r\n")[1::2]  # size, payload, size, payload, ...
    assert [orjson.loads(chunk)["body"] for chunk in chunks] == [0, 1, 2]
    writer.connection_lost(None)
    reader.connection_lost(None)


async def test_a_read_pipelined_behind_a_read_gets_its_own_window(
    server_factory: ServerFactory,
) -> None:
    """The second read starts while the first one's window is being ended (inside the expiry of
    the windows' FIFO) and still ends after a window of its own."""
    node = await server_factory(poll_duration_millis=300)
    conn = await Conn.open(node)
    channel = await new_channel(conn)
    path = f"/read/{channel['consumerAddress']}"
    await conn.send(request("GET", path) + request("GET", path))
    for _ in range(2):
        response = await conn.response()  # each ends with its last chunk
        assert response.status == 200
        assert response.chunks == []
    await conn.send(request("GET", "/healthz"))
    assert (await conn.response()).status == 200
    await conn.close()


async def test_pipelined_requests_are_answered_in_order(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    conn = await Conn.open(node)
    channel = await new_channel(conn)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    await conn.send(
        write_request(producer, "s", "first")
        + request("GET", "/nowhere")
        + write_request(producer, "s", "second")
        + request("POST", "/channelsExists", orjson.dumps({"channels": [consumer]}))
    )
    statuses = [(await conn.response()).status for _ in range(3)]
    assert statuses == [201, 404, 201]
    assert (await conn.response()).json() == {"channels": {consumer: True}}
    await conn.close()
    assert [e["body"] for e in await read_events(http, consumer, 2)] == ["first", "second"]


async def test_request_pipelined_behind_a_read_waits_for_the_stream(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    channel = await create_channel(http)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    conn = await Conn.open(node)
    await conn.send(
        write_request(producer, "s", "before")
        + request("GET", f"/read/{consumer}")
        + write_request(producer, "s", "after")
    )
    assert (await conn.response()).status == 201
    read = await conn.response()
    assert [e["body"] for e in read.events()] == ["before"]
    assert (await conn.response()).status == 201  # only once the read is over
    # "after" was written after the read ended, so it waits for the next read
    assert [e["body"] for e in await read_events(http, consumer, 1)] == ["after"]
    await conn.close()


# --- HTTP/1.0 ---------------------------------------------------------------------------------


async def test_http10_request_is_answered_then_closed(node: MegaphoneServer) -> None:
    conn = await Conn.open(node)
    await conn.send(request("POST", "/create", b"", version="1.0"))
    response = await conn.response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert response.json()["producerAddress"]
    await conn.assert_closed()
    await assert_serves(node)


async def test_http10_keep_alive_is_honoured(node: MegaphoneServer) -> None:
    conn = await Conn.open(node)
    for _ in range(2):
        await conn.send(
            request("POST", "/create", b"", version="1.0", headers={"Connection": "keep-alive"})
        )
        response = await conn.response()
        assert response.status == 200
        assert response.headers["connection"] == "keep-alive"
        assert int(response.headers["content-length"]) == len(response.body)
    await conn.send(request("GET", "/nowhere", version="1.0", headers={"Connection": "keep-alive"}))
    response = await conn.response()
    assert_error(response, 404, "NOT_FOUND")
    assert response.headers["connection"] == "keep-alive"
    await conn.send(request("GET", "/metrics", version="1.0"))  # no keep-alive: last one
    response = await conn.response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    await conn.assert_closed()


@pytest.mark.parametrize("connection", [None, "keep-alive"])
async def test_http10_read_is_close_delimited(
    node: MegaphoneServer, http: httpx.AsyncClient, connection: str | None
) -> None:
    channel = await create_channel(http)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    for i in range(2):
        assert (await http.post(f"/write/{producer}/s", json=i)).status_code == 201
    conn = await Conn.open(node)
    headers = {"Connection": connection} if connection else {}
    await conn.send(request("GET", f"/read/{consumer}", version="1.0", headers=headers))
    head = await conn.head()
    assert head.status == 200
    assert head.headers["content-type"] == "application/x-ndjson"
    assert head.headers["connection"] == "close"
    assert head.headers["cache-control"] == "no-store"
    assert head.headers["x-accel-buffering"] == "no"
    assert "transfer-encoding" not in head.headers
    assert "content-length" not in head.headers
    lines = [await conn.reader.readline() for _ in range(2)]
    assert [orjson.loads(line)["body"] for line in lines] == [0, 1]
    assert (await http.post(f"/write/{producer}/s", json=2)).status_code == 201
    async with asyncio.timeout(WAIT):
        line = await conn.reader.readline()
    assert orjson.loads(line)["body"] == 2  # raw, no chunk framing
    assert await conn.read_to_eof() == b""  # the window ends: the server closes
    await assert_serves(node)


# --- HTTP/1.1 reads ---------------------------------------------------------------------------


async def test_http11_read_is_chunked_whole_lines_then_keep_alive(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    channel = await create_channel(http)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    for i in range(3):
        assert (await http.post(f"/write/{producer}/s", json={"i": i})).status_code == 201
    conn = await Conn.open(node)
    await conn.send(request("GET", f"/read/{consumer}"))
    head = await conn.head()
    assert head.status == 200
    assert head.headers["transfer-encoding"] == "chunked"
    assert head.headers["content-type"] == "application/x-ndjson"
    assert head.headers["cache-control"] == "no-store"
    assert head.headers["x-accel-buffering"] == "no"
    assert "connection" not in head.headers
    events: list[dict[str, Any]] = []
    while len(events) < 3:
        chunk = await conn.read_chunk()
        assert chunk.endswith(b"\n")  # whole lines only
        events += [orjson.loads(line) for line in chunk.splitlines()]
    assert (await http.post(f"/write/{producer}/t", json="live")).status_code == 201
    chunk = await conn.read_chunk()
    assert chunk.endswith(b"\n")
    events += [orjson.loads(line) for line in chunk.splitlines()]
    assert [e["body"] for e in events] == [{"i": 0}, {"i": 1}, {"i": 2}, "live"]
    assert [e["sid"] for e in events] == ["s", "s", "s", "t"]
    assert len({e["eid"] for e in events}) == 4
    assert await conn.read_chunk() == b""  # the window ends with the last chunk
    # the connection is still usable
    await conn.send(request("POST", "/channelsExists", orjson.dumps({"channels": [consumer]})))
    assert (await conn.response()).json() == {"channels": {consumer: True}}
    await conn.close()


async def test_http11_read_with_connection_close_ends_and_closes(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    channel = await create_channel(http)
    conn = await Conn.open(node)
    await conn.send(
        request("GET", f"/read/{channel['consumerAddress']}", headers={"Connection": "close"})
    )
    response = await conn.response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert response.body == b""
    await conn.assert_closed()


async def test_reader_that_disconnects_frees_the_channel(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(poll_duration_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        assert (await http.post(f"/write/{producer}/s", json="one")).status_code == 201
        conn = await Conn.open(node)
        await conn.send(request("GET", f"/read/{consumer}"))
        assert (await conn.head()).status == 200
        assert orjson.loads(await conn.read_chunk())["body"] == "one"
        await conn.close()  # mid-stream, long before the window ends
        await asyncio.sleep(0.1)  # let the server see the FIN
        assert (await http.post(f"/write/{producer}/s", json="two")).status_code == 201
        events = await read_events(http, consumer, 1)  # 200, not 409 BUSY
        assert [e["body"] for e in events] == ["two"]


# --- Expect: 100-continue ---------------------------------------------------------------------


async def test_expect_continue_is_answered_before_the_body(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    channel = await create_channel(http)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    body = orjson.dumps({"hello": "world"})
    conn = await Conn.open(node)
    await conn.send(request("POST", f"/write/{producer}/s", headers=expect_continue(body)))
    interim = await conn.head()
    assert (interim.status, interim.reason) == (100, "Continue")
    assert interim.headers == {}
    await conn.send(body)
    response = await conn.response()
    assert response.status == 201
    events = await read_events(http, consumer, 1)
    assert [e["body"] for e in events] == [{"hello": "world"}]
    await conn.close()


async def test_expect_continue_behind_a_read_is_sent_when_its_turn_comes(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    channel = await create_channel(http)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    body = orjson.dumps("late")
    conn = await Conn.open(node)
    await conn.send(
        request("GET", f"/read/{consumer}")
        + request("POST", f"/write/{producer}/s", headers=expect_continue(body))
    )
    read = await conn.response()  # no 100 in the middle of the stream
    assert read.status == 200
    assert read.events() == []
    interim = await conn.head()
    assert interim.status == 100
    await conn.send(body)
    assert (await conn.response()).status == 201
    await conn.close()


async def test_expect_continue_with_too_large_body_is_refused_upfront(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(max_body_bytes=100)
    conn = await Conn.open(node)
    too_large = b"x" * 101  # announced, never sent
    await conn.send(request("POST", "/write/x/s", headers=expect_continue(too_large)))
    response = await conn.response()
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert response.headers["connection"] == "close"
    await conn.assert_closed()
    await assert_serves(node)


async def test_unsupported_expectation_is_rejected(node: MegaphoneServer) -> None:
    conn = await Conn.open(node)
    await conn.send(request("POST", "/create", b"", headers={"Expect": "something-else"}))
    assert_error(await conn.response(), 400, "BAD_REQUEST")
    await conn.assert_closed()
    await assert_serves(node)


# --- limits -----------------------------------------------------------------------------------


async def test_headers_too_large(server_factory: ServerFactory) -> None:
    node = await server_factory(max_header_bytes=1024)
    conn = await Conn.open(node)
    await conn.send(request("POST", "/create", b"", headers={"X-Big": "a" * 2000}))
    response = await conn.response()
    assert_error(response, 431, "HEADERS_TOO_LARGE")
    assert response.headers["connection"] == "close"
    await conn.assert_closed()
    # many small headers count too
    conn = await Conn.open(node)
    many = {f"X-H{i}": "v" * 40 for i in range(40)}
    await conn.send(request("POST", "/create", b"", headers=many))
    assert_error(await conn.response(), 431, "HEADERS_TOO_LARGE")
    # just under the limit is fine
    conn = await Conn.open(node)
    await conn.send(request("POST", "/create", b"", headers={"X-Big": "a" * 800}))
    assert (await conn.response()).status == 200
    await conn.close()
    await assert_serves(node)


async def test_header_that_never_ends_is_cut_at_the_limit(server_factory: ServerFactory) -> None:
    """A header line that keeps growing is refused at the limit, not buffered until the timeout."""
    node = await server_factory(
        max_header_bytes=1024, max_url_bytes=256, request_timeout_millis=30_000
    )
    conn = await Conn.open(node)
    await conn.send(b"POST /create HTTP/1.1\r\nHost: test\r\nX-Endless: ")
    for _ in range(8):  # separate reads on the server side, none ending the line
        await asyncio.sleep(0.01)
        if conn.writer.is_closing():
            break  # refused already
        conn.writer.write(b"a" * 512)
    response = await conn.response()
    assert_error(response, 431, "HEADERS_TOO_LARGE")
    await conn.assert_closed()
    await assert_serves(node)


async def test_request_target_too_long(server_factory: ServerFactory) -> None:
    node = await server_factory(max_url_bytes=256)
    conn = await Conn.open(node)
    await conn.send(request("GET", "/read/" + "a" * 300))
    response = await conn.response()
    assert_error(response, 414, "URI_TOO_LONG")
    await conn.assert_closed()
    await assert_serves(node)


async def test_target_and_headers_have_separate_limits(server_factory: ServerFactory) -> None:
    node = await server_factory(max_url_bytes=1024, max_header_bytes=1024)
    conn = await Conn.open(node)
    # each under its own limit, together over either: neither a 414 nor a 431
    await conn.send(request("GET", "/read/" + "a" * 900, headers={"X-Pad": "p" * 900}))
    assert_error(await conn.response(), 400, "BAD_REQUEST")  # a malformed consumer address
    await conn.send(request("GET", "/metrics"))  # and the connection stays usable
    assert (await conn.response()).status == 200
    await conn.close()


async def test_body_too_large_by_content_length(server_factory: ServerFactory) -> None:
    node = await server_factory(max_body_bytes=100)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        conn = await Conn.open(node)
        await conn.send(write_request(producer, "s", "x" * 200))
        response = await conn.response()
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        await conn.assert_closed()
        # exactly at the limit is fine
        conn = await Conn.open(node)
        await conn.send(request("POST", f"/write/{producer}/s", b'"' + b"y" * 98 + b'"'))
        assert (await conn.response()).status == 201
        await conn.close()
        events = await read_events(http, consumer, 1)
        assert [e["body"] for e in events] == ["y" * 98]
    await assert_serves(node)


async def test_refused_body_does_not_reset_a_client_still_sending_it(
    server_factory: ServerFactory,
) -> None:
    """The 413 reaches a client that keeps uploading: the server drains instead of resetting."""
    node = await server_factory(max_body_bytes=1000)
    conn = await Conn.open(node)
    body = b"z" * 1_000_000
    await conn.send(request("POST", "/write/x/s", headers={"Content-Length": str(len(body))}))
    for offset in range(0, len(body), 50_000):  # a client that does not wait for an answer
        await asyncio.sleep(0.002)
        await conn.send(body[offset : offset + 50_000])
    response = await conn.response()
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert response.headers["connection"] == "close"
    await conn.assert_closed()
    await assert_serves(node)


async def test_body_too_large_by_chunks(server_factory: ServerFactory) -> None:
    node = await server_factory(max_body_bytes=100)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        conn = await Conn.open(node)
        await conn.send(
            request("POST", f"/write/{producer}/s", headers={"Transfer-Encoding": "chunked"})
        )
        await conn.send(b'40\r\n"' + b"a" * 63 + b"\r\n")
        await conn.send(b"40\r\n" + b"a" * 63 + b'"\r\n0\r\n\r\n')
        response = await conn.response()
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        await conn.assert_closed()
        # a chunked body under the limit is fine
        conn = await Conn.open(node)
        await conn.send(
            request("POST", f"/write/{producer}/s", headers={"Transfer-Encoding": "chunked"})
            + b'3\r\n"ok\r\n1\r\n"\r\n0\r\n\r\n'
        )
        assert (await conn.response()).status == 201
        await conn.close()
        events = await read_events(http, consumer, 1)
        assert [e["body"] for e in events] == ["ok"]  # the refused body left nothing behind
    await assert_serves(node)


# --- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\nHost: test\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS hello
        b"POST /create HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_malformed_request_gets_400_and_close(node: MegaphoneServer, garbage: bytes) -> None:
    conn = await Conn.open(node)
    await conn.send(garbage)
    response = await conn.response()
    assert_error(response, 400, "BAD_REQUEST")
    assert response.headers["connection"] == "close"
    await conn.assert_closed()
    await assert_serves(node)


async def test_valid_requests_before_garbage_are_answered(node: MegaphoneServer) -> None:
    conn = await Conn.open(node)
    await conn.send(request("GET", "/metrics") + b"GARBAGE\r\n\r\n")
    assert (await conn.response()).status == 200
    assert_error(await conn.response(), 400, "BAD_REQUEST")
    await conn.assert_closed()
    await assert_serves(node)


async def test_raw_non_ascii_in_the_request_target_is_rejected(
    node: MegaphoneServer, http: httpx.AsyncClient
) -> None:
    channel = await create_channel(http)
    conn = await Conn.open(node)
    target = f"/write/{channel['producerAddress']}/caf\u00e9"  # not percent-encoded
    await conn.send(f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\n\r\n1".encode())
    assert_error(await conn.response(), 400, "BAD_REQUEST")
    await conn.assert_closed()
    await assert_untouched(http, channel)
    await assert_serves(node)


# --- timeouts ---------------------------------------------------------------------------------


async def test_request_whose_headers_never_complete_gets_408(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(request_timeout_millis=300)
    conn = await Conn.open(node)
    await conn.send(b"POST /create HTTP/1.1\r\nHost: test\r\n")
    response = await conn.response()
    assert_error(response, 408, "REQUEST_TIMEOUT")
    assert response.headers["connection"] == "close"
    await conn.assert_closed()
    await assert_serves(node)


async def test_request_whose_body_never_completes_gets_408(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(request_timeout_millis=300)
    conn = await Conn.open(node)
    await conn.send(request("POST", "/create", headers={"Content-Length": "10"}) + b"{")
    assert_error(await conn.response(), 408, "REQUEST_TIMEOUT")
    await conn.assert_closed()
    await assert_serves(node)


async def test_slow_request_after_a_read_still_times_out(server_factory: ServerFactory) -> None:
    node = await server_factory(request_timeout_millis=300, poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
    conn = await Conn.open(node)
    await conn.send(request("GET", f"/read/{channel['consumerAddress']}"))
    assert (await conn.head()).status == 200
    await conn.send(b"POST /create HTTP/1.1\r\nHost: test\r\n")  # while the read is open
    assert await conn.read_chunk() == b""
    assert_error(await conn.response(), 408, "REQUEST_TIMEOUT")
    await conn.assert_closed()
    await assert_serves(node)


async def test_silent_connection_is_closed_after_the_request_timeout(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(request_timeout_millis=300)
    conn = await Conn.open(node)
    await conn.assert_closed()  # nothing was asked, nothing is answered
    await assert_serves(node)


async def test_idle_keep_alive_connection_is_closed(server_factory: ServerFactory) -> None:
    node = await server_factory(keepalive_timeout_millis=300)
    conn = await Conn.open(node)
    await conn.send(request("GET", "/metrics"))
    assert (await conn.response()).status == 200
    await conn.assert_closed()
    await assert_serves(node)


async def test_activity_keeps_a_connection_past_its_first_timeouts(
    server_factory: ServerFactory,
) -> None:
    """The deadline moves with each request: the timer armed at connect fires, finds it moved,
    and waits again instead of closing."""
    node = await server_factory(keepalive_timeout_millis=500, request_timeout_millis=500)
    conn = await Conn.open(node)
    for _ in range(12):  # ~1.2 s of requests 100 ms apart: well past both timeouts
        await conn.send(request("GET", "/healthz"))
        assert (await conn.response()).status == 200
        await asyncio.sleep(0.1)
    await conn.assert_closed()  # then idle: closed once the keep-alive timeout passes
    await assert_serves(node)


async def test_request_timeout_shorter_than_keep_alive_still_fires(
    server_factory: ServerFactory,
) -> None:
    """A request begun while the keep-alive timer (60 s) is pending gets its own, sooner check."""
    node = await server_factory(keepalive_timeout_millis=60_000, request_timeout_millis=300)
    conn = await Conn.open(node)
    await conn.send(request("GET", "/healthz"))
    assert (await conn.response()).status == 200
    await asyncio.sleep(0.4)  # the timer armed at connect has fired and moved to 60 s
    await conn.send(b"POST /create HTTP/1.1\r\nHost: test\r\n")  # and never finish it
    assert_error(await conn.response(), 408, "REQUEST_TIMEOUT")
    await conn.assert_closed()
    await assert_serves(node)


async def test_keep_alive_timer_does_not_cut_a_long_read(server_factory: ServerFactory) -> None:
    node = await server_factory(
        keepalive_timeout_millis=100, request_timeout_millis=100, poll_duration_millis=1000
    )
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        conn = await Conn.open(node)
        await conn.send(request("GET", f"/read/{channel['consumerAddress']}"))
        assert (await conn.head()).status == 200
        await asyncio.sleep(0.3)  # past both timers, inside the window
        reply = await http.post(f"/write/{channel['producerAddress']}/s", json="still here")
        assert reply.status_code == 201
        assert orjson.loads(await conn.read_chunk())["body"] == "still here"
        assert await conn.read_chunk() == b""
        await conn.close()


async def test_client_that_stops_reading_is_dropped(server_factory: ServerFactory) -> None:
    """A client that takes nothing for ``request_timeout`` does not hold its connection forever."""
    node = await server_factory(request_timeout_millis=300, poll_duration_millis=200)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        for _ in range(4):
            reply = await http.post(f"/write/{channel['producerAddress']}/s", json="x" * 250_000)
            assert reply.status_code == 201
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    conn = Conn(reader, writer)
    await conn.send(request("GET", "/metrics"))  # once answered, the server holds the socket
    assert (await conn.response()).status == 200
    # small kernel buffers on the server side too, so the megabyte cannot hide in them
    [accepted] = node.http.connections
    assert accepted.transport is not None
    accepted.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    await conn.send(request("GET", f"/read/{channel['consumerAddress']}"))
    await asyncio.sleep(0.8)  # read nothing: the window ends, the server cannot write it all
    assert not node.http.connections  # dropped, not kept forever
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await conn.response()  # the stream never completes
    await assert_serves(node)
