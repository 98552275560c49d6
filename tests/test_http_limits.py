"""Issue #9, "bounded by design", at the HTTP connection layer, over raw sockets.

Strict HTTP/1.x framing (``Host``, the version, ``Transfer-Encoding``), ``HEAD`` on the GET
endpoints, the request timeout counted from the accept, and the bounds: ``max_connections``,
``max_pipeline_bytes`` and ``max_buffered_request_bytes``. Every refusal is checked for its JSON
error and followed by a check that the server still serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from conftest import ServerFactory, base_url, create_channel, read_events
from megaphone.http.connection import PIPELINE_HEAD_BYTES, HttpProtocol
from megaphone.server import MegaphoneServer
from test_http_protocol import (
    WAIT,
    Conn,
    _close_connections,  # noqa: F401  (the autouse fixture closing every Conn)
    assert_error,
    assert_serves,
    assert_untouched,
    request,
    write_request,
)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (the server runs in this loop) until it holds, at most WAIT s."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.005)


async def count_events(node: MegaphoneServer, consumer: str, count: int) -> int:
    """Read ``count`` events (large ones: read_events wants a whole line per network read)."""
    conn = await Conn.open(node)
    await conn.send(request("GET", f"/read/{consumer}"))
    assert (await conn.head()).status == 200
    lines = 0
    while lines < count:
        chunk = await conn.read_chunk()
        assert chunk.endswith(b"\n")
        lines += chunk.count(b"\n")
    await conn.close()
    return lines


def only_connection(node: MegaphoneServer) -> HttpProtocol:
    [connection] = node.http.connections
    return connection


async def assert_refused(conn: Conn, status: int, code: str) -> None:
    """``status``/``code`` as JSON, ``connection: close``, then the close."""
    response = await conn.response()
    assert_error(response, status, code)
    assert response.headers["connection"] == "close"
    await conn.assert_closed()


# --- strict framing ---------------------------------------------------------------------------


async def test_http11_request_without_host_is_refused(server_factory: ServerFactory) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(b"POST /create HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    await assert_refused(conn, 400, "BAD_REQUEST")
    await assert_serves(node)


async def test_http10_request_without_host_is_served(server_factory: ServerFactory) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert (await conn.response()).json() == {"status": "OK"}
    await conn.send(b"GET /healthz HTTP/1.0\r\n\r\n")  # still usable
    assert (await conn.response()).status == 200
    await conn.assert_closed()


async def test_two_host_headers_are_refused(server_factory: ServerFactory) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    await assert_refused(conn, 400, "BAD_REQUEST")
    await assert_serves(node)


@pytest.mark.parametrize(
    "line",
    [
        b"GET /healthz HTTP/2.0",  # httptools parses it: get_http_version() == "2.0"
        b"GET /healthz HTTP/0.9",  # likewise "0.9"
        b"GET /healthz HTTP/1.2",  # httptools: "Invalid HTTP version"
        b"GET /healthz HTTP/3.0",
    ],
)
async def test_unsupported_http_version_gets_505(
    server_factory: ServerFactory, line: bytes
) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(line + b"\r\nHost: test\r\n\r\n")
    await assert_refused(conn, 505, "HTTP_VERSION_NOT_SUPPORTED")
    await assert_serves(node)


async def test_http2_preface_gets_505(server_factory: ServerFactory) -> None:
    """A client speaking HTTP/2 with prior knowledge learns why, in HTTP/1.1."""
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    await assert_refused(conn, 505, "HTTP_VERSION_NOT_SUPPORTED")
    await assert_serves(node)


async def test_requests_before_an_unsupported_version_are_answered(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(request("GET", "/healthz") + b"GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n")
    assert (await conn.response()).status == 200
    await assert_refused(conn, 505, "HTTP_VERSION_NOT_SUPPORTED")


@pytest.mark.parametrize("coding", ["gzip, chunked", "gzip", "identity", "deflate"])
async def test_transfer_coding_other_than_chunked_gets_501(
    server_factory: ServerFactory, coding: str
) -> None:
    node = await server_factory()
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        conn = await Conn.open(node)
        # a body that would be a valid write if it were read as plain chunked
        await conn.send(
            request(
                "POST",
                f"/write/{channel['producerAddress']}/s",
                headers={"Transfer-Encoding": coding},
            )
            + b'3\r\n"x"\r\n0\r\n\r\n'
        )
        await assert_refused(conn, 501, "NOT_IMPLEMENTED")
        await assert_untouched(http, channel)
    await assert_serves(node)


async def test_chunked_is_a_case_insensitive_coding_name(server_factory: ServerFactory) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(
        request("POST", "/create", headers={"Transfer-Encoding": "Chunked"})
        + b"2\r\n{}\r\n0\r\n\r\n"
    )
    assert (await conn.response()).status == 200


@pytest.mark.parametrize(
    "codings", [["chunked, gzip"], ["chunked", "chunked"]], ids=["chunked-not-last", "twice"]
)
async def test_unreadable_transfer_coding_is_a_bad_request(
    server_factory: ServerFactory, codings: list[str]
) -> None:
    """httptools refuses these itself (RFC 9112 6.3: the length cannot be known): 400."""
    node = await server_factory()
    conn = await Conn.open(node)
    head = b"POST /create HTTP/1.1\r\nHost: t\r\n"
    head += b"".join(b"Transfer-Encoding: %b\r\n" % c.encode() for c in codings)
    await conn.send(head + b"\r\n2\r\n{}\r\n0\r\n\r\n")
    await assert_refused(conn, 400, "BAD_REQUEST")
    await assert_serves(node)


# --- HEAD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_head_answers_like_get_without_the_body(
    server_factory: ServerFactory, path: str
) -> None:
    node = await server_factory()
    conn = await Conn.open(node)
    await conn.send(request("GET", path))
    get = await conn.response()
    await conn.send(request("HEAD", path) + request("GET", "/healthz"))
    head = await conn.head()  # and no body: the next response follows at once
    assert head.status == get.status == 200
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the metrics change between the two requests
        assert head.headers["content-length"] == get.headers["content-length"]
    assert int(head.headers["content-length"]) > 0
    assert (await conn.response()).json() == {"status": "OK"}  # keep-alive stays in step


async def test_head_read_answers_the_streams_head_without_attaching(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        assert (await http.post(f"/write/{producer}/s", json="pending")).status_code == 201
        conn = await Conn.open(node)
        await conn.send(request("HEAD", f"/read/{consumer}") + request("GET", "/healthz"))
        head = await conn.head()
        assert head.status == 200
        assert head.headers["content-type"] == "application/x-ndjson"
        assert head.headers["transfer-encoding"] == "chunked"  # what the GET would say
        assert "content-length" not in head.headers
        assert (await conn.response()).json() == {"status": "OK"}  # no body came between
        # nothing was attached or taken: a read gets the pending event, not 409
        [event] = await read_events(http, consumer, 1)
        assert event["body"] == "pending"
        # a HEAD while a reader is attached is not a second reader either
        async with http.stream("GET", f"/read/{consumer}") as stream:
            assert stream.status_code == 200
            await conn.send(request("HEAD", f"/read/{consumer}"))
            assert (await conn.head()).status == 200
        # HTTP/1.0: no chunked framing, and keep-alive as asked
        await conn.send(
            request(
                "HEAD", f"/read/{consumer}", version="1.0", headers={"Connection": "keep-alive"}
            )
        )
        head = await conn.head()
        assert head.status == 200
        assert "transfer-encoding" not in head.headers
        assert head.headers["connection"] == "keep-alive"
        await conn.send(request("GET", "/healthz"))
        assert (await conn.response()).status == 200


async def test_head_read_refuses_what_a_read_refuses(server_factory: ServerFactory) -> None:
    node = await server_factory()
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        consumer = channel["consumerAddress"]
        agent, _, feature = consumer.split(".")
        unknown = f"{agent}.{'Z' * 50}.{feature}"
        cases = {
            f"/read/{unknown}": 404,  # a well-formed address of no channel
            f"/read/{channel['producerAddress']}": 400,
            "/read/garbage": 400,
            f"/read/{consumer}?after=" + "x" * 300: 400,  # a cursor a read would refuse
        }
        for target, status in cases.items():
            get = await http.get(target)
            head = await http.head(target)
            assert (get.status_code, head.status_code) == (status, status), target
            assert head.content == b""
            assert head.headers["content-length"] == get.headers["content-length"]
        assert (await http.get("/healthz")).status_code == 200


async def test_allow_lists_head_where_get_is_allowed(server_factory: ServerFactory) -> None:
    node = await server_factory()
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        for path in ("/metrics", "/healthz", "/readyz", "/read/x"):
            reply = await http.post(path, content=b"{}")
            assert_error_reply(reply, 405, "METHOD_NOT_ALLOWED")
            assert reply.headers["allow"] == "GET, HEAD, OPTIONS"
        reply = await http.head("/create")
        assert reply.status_code == 405
        assert reply.headers["allow"] == "POST, OPTIONS"
        options = await http.options("/metrics")
        assert "HEAD" in options.headers["allow"]


def assert_error_reply(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    body: dict[str, Any] = reply.json()
    assert body["code"] == code
    assert isinstance(body["message"], str)


# --- the request timeout ----------------------------------------------------------------------


def deadlines_at_first_byte(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The connection's deadline right after each request's first byte was parsed."""
    seen: list[float] = []
    begin = HttpProtocol.on_message_begin

    def watched(self: HttpProtocol) -> None:
        begin(self)
        seen.append(self.deadline)

    monkeypatch.setattr(HttpProtocol, "on_message_begin", watched)
    return seen


async def test_first_request_deadline_counts_from_the_accept(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that waits before its first byte does not get a second request timeout."""
    deadlines = deadlines_at_first_byte(monkeypatch)
    node = await server_factory(request_timeout_millis=1000, keepalive_timeout_millis=60_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    conn = await Conn.open(node)
    await until(lambda: len(node.http.connections) == 1, "accepted")
    accepted = loop.time()  # the accept happened at or before this
    await asyncio.sleep(0.8)
    await conn.send(b"POST /create HTTP/1.1\r\nHost: test\r\n")  # and never finish it
    await assert_refused(conn, 408, "REQUEST_TIMEOUT")
    assert loop.time() - started < 1.5  # ~1.0 s; counted from the first byte, 1.8 s
    [deadline] = deadlines
    assert deadline <= accepted + 1.0  # not moved to the first byte + 1 s
    await assert_serves(node)


async def test_after_a_keep_alive_wait_the_request_timeout_starts_at_the_first_byte(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    deadlines = deadlines_at_first_byte(monkeypatch)
    node = await server_factory(request_timeout_millis=300, keepalive_timeout_millis=60_000)
    loop = asyncio.get_running_loop()
    conn = await Conn.open(node)
    await conn.send(request("GET", "/healthz"))
    assert (await conn.response()).status == 200
    await asyncio.sleep(0.5)  # idle for longer than a request timeout: covered by keep-alive
    first_byte = loop.time()
    await conn.send(b"POST /create HTTP/1.1\r\nHost: test\r\n")
    await assert_refused(conn, 408, "REQUEST_TIMEOUT")
    assert loop.time() - first_byte >= 0.3 - 0.01  # the loop's clock ticks in ms
    assert deadlines[1] >= first_byte + 0.3
    await assert_serves(node)


# --- max_connections --------------------------------------------------------------------------


def refusal_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("connection limit")
    ]


async def test_connections_over_the_limit_get_503_and_a_rate_limited_warning(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="megaphone")
    node = await server_factory(max_connections=3)
    held = [await Conn.open(node) for _ in range(3)]
    await until(lambda: len(node.http.connections) == 3, "three connections")
    for _ in range(2):  # refused at once: the client need not send anything
        refused = await Conn.open(node)
        await assert_refused(refused, 503, "OVERLOADED")
        await refused.close()
    refused = await Conn.open(node)  # a client that sends its request anyway
    await refused.send(request("POST", "/create", b""))
    await assert_refused(refused, 503, "OVERLOADED")
    await refused.close()
    [warning] = refusal_warnings(caplog)  # one line for the three
    assert warning.refused == 1  # type: ignore[attr-defined]
    assert warning.exc_info is None
    assert node.http.refused_connections == 3

    node.http.refusal_log_interval = 0.2  # the next line after the interval carries the count
    await asyncio.sleep(0.25)
    refused = await Conn.open(node)
    await assert_refused(refused, 503, "OVERLOADED")
    await refused.close()
    assert [w.refused for w in refusal_warnings(caplog)] == [1, 3]  # type: ignore[attr-defined]

    for conn in held:  # the connections held are unaffected
        await conn.send(request("GET", "/healthz"))
        assert (await conn.response()).status == 200
    await held[0].close()
    await until(lambda: len(node.http.connections) == 2, "a connection closed")
    await assert_serves(node)  # room again
    await until(lambda: not node.http.refused, "refused connections gone")


# --- max_pipeline_bytes -----------------------------------------------------------------------


async def test_pipelined_bytes_are_bounded_by_pausing_reads(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 300_000
    node = await server_factory(
        max_pipeline_bytes=bound, poll_duration_millis=1000, request_timeout_millis=10_000
    )
    peak = largest_read = 0
    paused: list[HttpProtocol] = []  # the connection, once its reading was paused
    data_received = HttpProtocol.data_received

    def watched(self: HttpProtocol, data: bytes) -> None:
        nonlocal peak, largest_read
        data_received(self, data)
        peak = max(peak, self.queued_bytes)
        largest_read = max(largest_read, len(data))
        if self.reading_paused and not paused:
            paused.append(self)

    monkeypatch.setattr(HttpProtocol, "data_received", watched)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        reader = await create_channel(http)
        targets = [await create_channel(http) for _ in range(5)]
        conn = await Conn.open(node)
        payload = "x" * 100_000
        writes = [write_request(t["producerAddress"], "s", payload) for t in targets * 3]
        await conn.send(request("GET", f"/read/{reader['consumerAddress']}"))
        assert (await conn.head()).status == 200
        sending = asyncio.create_task(conn.send(b"".join(writes)))  # 1.5 MB behind the read
        await until(lambda: bool(paused), "reading paused")
        [connection] = paused
        assert connection.busy  # still the read: the writes wait
        assert await conn.read_chunk() == b""  # the read's window ends
        for _ in writes:
            assert (await conn.response()).status == 201
        await sending
        assert connection.queued_bytes == 0
        assert node.http.buffered_request_bytes == 0
        for target in targets:
            assert await count_events(node, target["consumerAddress"], 3) == 3
    # a read completes several queued requests at once: the queue stays within one read of
    # the bound (and the bound was reached: the writes did queue up)
    assert bound / 2 < peak <= bound + largest_read + 4 * PIPELINE_HEAD_BYTES
    await assert_serves(node)


async def test_a_lone_request_larger_than_the_pipeline_bound_is_read(
    server_factory: ServerFactory,
) -> None:
    """The bound holds back what queues behind a request, never the request being served."""
    node = await server_factory(max_pipeline_bytes=1000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        conn = await Conn.open(node)
        await conn.send(write_request(channel["producerAddress"], "s", "y" * 50_000) * 3)
        for _ in range(3):
            assert (await conn.response()).status == 201
        assert await count_events(node, channel["consumerAddress"], 3) == 3


# --- max_buffered_request_bytes ---------------------------------------------------------------


def held_body(producer: str, size: int) -> bytes:
    """The head of a write announcing a ``size``-byte JSON string body, and all but its end."""
    head = request("POST", f"/write/{producer}/s", headers={"Content-Length": str(size)})
    return head + b'"' + b"a" * (size - 3)


async def test_body_over_the_global_budget_gets_503_before_it_is_read(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(max_buffered_request_bytes=10_000, max_body_bytes=8_000)
    state = node.http
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        producer = channel["producerAddress"]
        holder = await Conn.open(node)
        await holder.send(held_body(producer, 6_000))  # reserves its whole Content-Length
        await until(lambda: state.buffered_request_bytes == 6_000, "reserved")

        refused = await Conn.open(node)  # 6000 more would make 12000: refused on the head
        await refused.send(
            request("POST", f"/write/{producer}/s", headers={"Content-Length": "6000"})
        )
        await assert_refused(refused, 503, "OVERLOADED")
        assert state.buffered_request_bytes == 6_000

        small = await Conn.open(node)  # within the budget: served meanwhile
        await small.send(write_request(producer, "s", "small"))
        assert (await small.response()).status == 201

        await holder.send(b'a"')  # the held body completes, is handled and released
        assert (await holder.response()).status == 201
        assert state.buffered_request_bytes == 0
        await small.send(write_request(producer, "s", "z" * 5_990))  # room again
        assert (await small.response()).status == 201
        events = await read_events(http, channel["consumerAddress"], 3)
        assert [len(e["body"]) for e in events] == [5, 5_998, 5_990]
    await assert_serves(node)


async def test_chunked_body_is_charged_as_it_arrives(server_factory: ServerFactory) -> None:
    node = await server_factory(max_buffered_request_bytes=10_000, max_body_bytes=8_000)
    state = node.http
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        channel = await create_channel(http)
        producer = channel["producerAddress"]
        holder = await Conn.open(node)
        await holder.send(held_body(producer, 6_000))
        await until(lambda: state.buffered_request_bytes == 6_000, "reserved")

        chunked = await Conn.open(node)
        await chunked.send(
            request("POST", f"/write/{producer}/s", headers={"Transfer-Encoding": "chunked"})
        )
        await chunked.send(b'bb8\r\n"' + b"c" * 2999 + b"\r\n")  # 3000: within the budget
        await until(lambda: state.buffered_request_bytes == 9_000, "charged")
        await chunked.send(b"7d0\r\n" + b"c" * 2000 + b"\r\n")  # 2000 more: over it
        await assert_refused(chunked, 503, "OVERLOADED")
        assert state.buffered_request_bytes == 6_000  # the refused body was released

        await holder.close()  # a connection that dies releases what it held
        await until(lambda: state.buffered_request_bytes == 0, "released")
        await assert_untouched(http, channel)
    await assert_serves(node)


async def test_queued_bodies_count_until_handled(server_factory: ServerFactory) -> None:
    """Bodies pipelined behind a read hold their bytes until their turn comes."""
    node = await server_factory(max_buffered_request_bytes=10_000, poll_duration_millis=1000)
    state = node.http
    async with httpx.AsyncClient(base_url=base_url(node), timeout=WAIT) as http:
        reader = await create_channel(http)
        channel = await create_channel(http)
        conn = await Conn.open(node)
        body = orjson.dumps("q" * 3_998)
        await conn.send(
            request("GET", f"/read/{reader['consumerAddress']}")
            + request("POST", f"/write/{channel['producerAddress']}/s", body) * 2
        )
        assert (await conn.head()).status == 200
        await until(lambda: state.buffered_request_bytes == 8_000, "queued")
        other = await Conn.open(node)  # the budget is taken by the queue
        await other.send(write_request(channel["producerAddress"], "s", "w" * 3_000))
        await assert_refused(other, 503, "OVERLOADED")
        assert await conn.read_chunk() == b""
        for _ in range(2):
            assert (await conn.response()).status == 201
        assert state.buffered_request_bytes == 0
    await assert_serves(node)
