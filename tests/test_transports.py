"""The browser transports of issue #11 (SSE, WebSocket, long-poll) against the real server, both
stores: delivery and order, window end, resume after a cut connection, heartbeats, back-pressure,
bad upgrades and cursors, the channel's protocols, and 409 for a second reader whatever the
transport."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from conftest import ServerFactory, base_url, create_channel
from megaphone.server import MegaphoneServer

ALL = ["HTTP_STREAM_NDJSON_V1", "SSE_V1", "WEBSOCKET_V1", "LONG_POLL_V1"]


async def write(
    http: httpx.AsyncClient, channel: dict[str, Any], body: Any, sid: str = "s"
) -> None:
    reply = await http.post(f"/write/{channel['producerAddress']}/{sid}", json=body)
    assert reply.status_code == 201, reply.text


# --- SSE ----------------------------------------------------------------------------------------


def parse_sse(text: str) -> list[dict[str, str]]:
    """Messages of an event stream (comments kept as {"comment": ...})."""
    messages: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        message: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                message["comment"] = value
            else:
                message[name] = message[name] + "\n" + value if name in message else value
        messages.append(message)
    return messages


async def sse_read(
    http: httpx.AsyncClient,
    consumer: str,
    *,
    until: int | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[httpx.Response, list[dict[str, str]]]:
    """Read an SSE stream until it ends, or until ``until`` data messages arrived (then cut)."""
    text = ""
    async with http.stream(
        "GET",
        f"/read/{consumer}",
        headers={"accept": "text/event-stream", **(headers or {})},
        params=params,
    ) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return reply, []
        async for chunk in reply.aiter_text():
            text += chunk
            if (
                until is not None
                and text.endswith("\n\n")
                and sum("id" in m for m in parse_sse(text)) >= until
            ):
                break
    return reply, parse_sse(text)


def data_messages(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [orjson.loads(m["data"]) | {"_id": m["id"]} for m in messages if "id" in m]


async def test_sse_delivers_in_order_and_ends_with_the_window(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(sse_window_millis=400, sse_retry_millis=250)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        for n in range(5):
            await write(http, channel, {"n": n}, sid=f"s{n % 2}")
        reply, messages = await sse_read(http, channel["consumerAddress"])
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-accel-buffering"] == "no"
    assert messages[0] == {"retry": "250"}
    events = data_messages(messages)
    assert [e["body"]["n"] for e in events] == list(range(5))
    assert [e["sid"] for e in events] == ["s0", "s1", "s0", "s1", "s0"]
    assert all(e["_id"] == e["eid"] for e in events)  # id: is the eid, for Last-Event-ID
    assert all(set(e) == {"sid", "eid", "ts", "body", "_id"} for e in events)


async def test_sse_resumes_from_last_event_id_after_a_cut(server_factory: ServerFactory) -> None:
    node = await server_factory(sse_window_millis=2_000)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        for n in range(6):
            await write(http, channel, n)
        _, first = await sse_read(http, channel["consumerAddress"], until=3)  # then cut
        seen = data_messages(first)[:3]
        # what EventSource does on reconnect: Last-Event-ID = the last id it saw
        _, rest = await sse_read(
            http, channel["consumerAddress"], until=3, headers={"last-event-id": seen[-1]["eid"]}
        )
        resumed = data_messages(rest)
    assert [e["body"] for e in seen + resumed] == list(range(6))  # nothing lost, no duplicate


async def test_sse_signals_an_unknown_cursor_and_beats(server_factory: ServerFactory) -> None:
    node = await server_factory(sse_window_millis=700, heartbeat_millis=100)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await write(http, channel, "x")
        reply, messages = await sse_read(
            http, channel["consumerAddress"], params={"transport": "sse", "after": "no-such-eid"}
        )
    assert reply.headers["megaphone-resume"] == "unknown-cursor"
    assert messages[1] == {"event": "megaphone-resume", "data": '{"status":"unknown-cursor"}'}
    assert [e["body"] for e in data_messages(messages)] == ["x"]
    assert sum(m.get("comment") == "heartbeat" for m in messages) >= 2


# --- long-poll ----------------------------------------------------------------------------------


async def test_long_poll_answers_what_is_pending_and_the_cursor_confirms(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        consumer = channel["consumerAddress"]
        poll = {"transport": "long-poll"}
        empty = await http.get(f"/read/{consumer}", params=poll)  # the window ends: 204
        assert empty.status_code == 204
        assert empty.headers["cache-control"] == "no-store"
        for n in range(3):
            await write(http, channel, n)
        first = await http.get(f"/read/{consumer}", params=poll)
        assert first.status_code == 200
        assert first.headers["content-type"] == "application/json"
        events = first.json()
        assert [e["body"] for e in events] == [0, 1, 2]
        # an answer lost on the way is sent again: the cursor confirms only up to the first
        again = await http.get(f"/read/{consumer}", params={**poll, "after": events[0]["eid"]})
        assert [e["body"] for e in again.json()] == [1, 2]

        # a poll that waits is answered as soon as an event comes
        async def later() -> None:
            await asyncio.sleep(0.05)
            await write(http, channel, 3)

        waiter = asyncio.create_task(later())
        live = await http.get(f"/read/{consumer}", params={**poll, "after": events[-1]["eid"]})
        await waiter
        assert [e["body"] for e in live.json()] == [3]


# --- WebSocket ----------------------------------------------------------------------------------


class WsClient:
    """A minimal WebSocket client over a real socket, framed by wsproto."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []

    @classmethod
    async def connect(
        cls, node: MegaphoneServer, target: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> tuple[WsClient, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        client = cls(reader, writer)
        writer.write(
            client.ws.send(Request(host="localhost", target=target, extra_headers=extra or []))
        )
        return client, await client.next_event()

    async def next_event(self) -> Any:
        async with asyncio.timeout(5):
            while not self.events:
                data = await self.reader.read(65_536)
                self.ws.receive_data(data or None)
                self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def messages_until_close(self) -> tuple[list[dict[str, Any]], CloseConnection, int]:
        messages: list[dict[str, Any]] = []
        pings = 0
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                messages.append(orjson.loads(event.data))
            elif isinstance(event, Ping):
                pings += 1
                self.writer.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                return messages, event, pings

    def close(self) -> None:
        self.writer.close()


async def test_websocket_frames_events_and_closes_with_a_reason(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(websocket_window_millis=500, heartbeat_millis=100)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        for n in range(3):
            await write(http, channel, n)
        ws, accepted = await WsClient.connect(node, f"/read/{channel['consumerAddress']}")
        assert isinstance(accepted, AcceptConnection)
        await write(http, channel, 3)  # live, after the upgrade
        messages, close, pings = await ws.messages_until_close()
        ws.close()
        assert [m["body"] for m in messages] == [0, 1, 2, 3]
        assert close.code == 4000  # the window ended: reconnect with ?after=
        assert pings >= 2  # the server's keep-alive
        # resume with the cursor as a query parameter: nothing again, then what is new
        await write(http, channel, 4)
        ws, _ = await WsClient.connect(
            node, f"/read/{channel['consumerAddress']}?after={messages[-1]['eid']}"
        )
        rest, _, _ = await ws.messages_until_close()
        ws.close()
        assert [m["body"] for m in rest] == [4]


async def test_websocket_answers_pings_and_says_when_the_channel_is_gone(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(websocket_window_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        ws, _ = await WsClient.connect(node, f"/read/{channel['consumerAddress']}?after=unknown")
        gap = await ws.next_event()
        assert isinstance(gap, TextMessage)
        assert orjson.loads(gap.data) == {"resume": "unknown-cursor"}
        ws.writer.write(ws.ws.send(Ping(payload=b"hi")))
        pong = await ws.next_event()
        assert pong.payload == b"hi"
        ws.writer.write(ws.ws.send(TextMessage(data="ignored: a read is one-way")))
        key = node.registry.addresses.consumer(channel["consumerAddress"])
        assert await node.store.delete(key)
        _, close, _ = await ws.messages_until_close()
        ws.close()
        assert close.code == 4404


async def test_websocket_shutdown_closes_with_going_away(server_factory: ServerFactory) -> None:
    node = await server_factory(websocket_window_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        ws, _ = await WsClient.connect(node, f"/read/{channel['consumerAddress']}")
        closing = asyncio.create_task(node.aclose(grace=2))
        _, close, _ = await ws.messages_until_close()
        ws.close()
        await closing
        assert close.code == 1001


async def raw_request(node: MegaphoneServer, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(request)
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            return head + await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n", b"400"),
        (
            b"upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 8\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"426",
        ),
        (
            b"upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: c2hvcnQ=\r\n",
            b"400",
        ),
        (
            b"upgrade: websocket\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"400",
        ),
    ],
    ids=["no-key", "version-8", "short-key", "no-connection-upgrade"],
)
async def test_bad_upgrades_get_a_clear_4xx(
    server: MegaphoneServer, client: httpx.AsyncClient, headers: bytes, status: bytes
) -> None:
    channel = await create_channel(client)
    answer = await raw_request(
        server,
        b"GET /read/%b HTTP/1.1\r\nhost: x\r\n%b\r\n"
        % (channel["consumerAddress"].encode(), headers),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status, answer
    assert orjson.loads(body)["code"] in {"BAD_REQUEST", "UPGRADE_REQUIRED"}
    if status == b"426":
        assert b"sec-websocket-version: 13" in head
    assert (await client.get("/healthz")).status_code == 200  # still serving


async def test_websocket_on_a_missing_channel_is_a_plain_404(
    server: MegaphoneServer, client: httpx.AsyncClient
) -> None:
    channel = await create_channel(client)
    agent, segment, bits = channel["consumerAddress"].split(".")
    missing = f"{agent}.{segment[:-10]}abcdefghij.{bits}"
    ws, answer = await WsClient.connect(server, f"/read/{missing}")
    ws.close()
    assert isinstance(answer, RejectConnection)
    assert answer.status_code == 404


# --- across transports --------------------------------------------------------------------------


async def test_protocols_restrict_transports_and_address_bits_say_so(
    client: httpx.AsyncClient,
) -> None:
    every = await create_channel(client)
    assert every["protocols"] == ALL
    sse_only = await create_channel(client, protocols=["SSE_V1", "FUTURE_V9"])
    assert sse_only["protocols"] == ["SSE_V1"]
    assert sse_only["consumerAddress"].endswith(".2")
    consumer = sse_only["consumerAddress"]
    refused = await client.get(f"/read/{consumer}")  # NDJSON
    assert refused.status_code == 406
    assert refused.json()["code"] == "NOT_ACCEPTABLE"
    poll = await client.get(f"/read/{consumer}", params={"transport": "long-poll"})
    assert poll.status_code == 406
    bad = await client.get(f"/read/{consumer}", params={"transport": "carrier-pigeon"})
    assert bad.status_code == 400
    # an address minted before issue #11 (suffix 1) keeps meaning NDJSON only
    old = every["consumerAddress"].rsplit(".", 1)[0] + ".1"
    assert (
        await client.get(f"/read/{old}", headers={"accept": "text/event-stream"})
    ).status_code == 406


READ_HEADERS = {
    "ndjson": b"",
    "sse": b"accept: text/event-stream\r\n",
    "long-poll": b"",
    "websocket": b"upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
}


async def start_read(
    node: MegaphoneServer, transport: str, consumer: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a read request with ``transport`` on a raw socket; nothing is read back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    query = b"?transport=long-poll" if transport == "long-poll" else b""
    writer.write(
        b"GET /read/%b%b HTTP/1.1\r\nhost: x\r\n%b\r\n"
        % (consumer.encode(), query, READ_HEADERS[transport])
    )
    return reader, writer


async def attached(node: MegaphoneServer) -> None:
    """Until some connection of ``node`` holds an attached read."""
    for _ in range(500):
        if any(c.stream is not None and c.stream.subscription for c in node.http.connections):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no read attached")


@pytest.mark.parametrize("first", ["ndjson", "sse", "websocket", "long-poll"])
async def test_second_reader_is_busy_whatever_the_transport(
    server_factory: ServerFactory, first: str
) -> None:
    node = await server_factory(poll_duration_millis=5_000)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        consumer = channel["consumerAddress"]
        _, holder = await start_read(node, first, consumer)
        await attached(node)
        for second in ["ndjson", "sse", "websocket", "long-poll"]:
            reader, writer = await start_read(node, second, consumer)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            assert head.startswith(b"HTTP/1.1 409 "), (first, second, head)
        holder.close()


@pytest.mark.parametrize("transport", ["ndjson", "sse", "websocket"])
async def test_a_reader_that_does_not_read_pauses_delivery(
    server_factory: ServerFactory, transport: str
) -> None:
    """Back-pressure: the socket fills, events wait in the channel, its buffer and write timeout
    apply (503 TIMEOUT), and the server keeps serving everyone else."""
    node = await server_factory(
        channel_buffer_size=10, write_timeout_millis=100, poll_duration_millis=30_000
    )
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        consumer = channel["consumerAddress"]
        reader, writer = await start_read(node, transport, consumer)
        await reader.readuntil(b"\r\n\r\n")  # the head; from now on we read nothing
        big = "x" * 60_000
        statuses = []
        for _ in range(2_000):
            reply = await http.post(f"/write/{channel['producerAddress']}/s", json=big)
            statuses.append(reply.status_code)
            if reply.status_code != 201:
                break
        assert statuses[-1] == 503
        assert reply.json()["code"] == "TIMEOUT"
        assert (await http.get("/healthz")).status_code == 200
        writer.close()


async def test_cors_and_token_apply_to_every_transport(server_factory: ServerFactory) -> None:
    node = await server_factory(
        cors_allowed_origins=["https://app.example"], producer_token="t", poll_duration_millis=300
    )
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        created = await http.post("/create", headers={"authorization": "Bearer t"})
        channel = created.json()
        origin = {"origin": "https://app.example"}
        consumer = channel["consumerAddress"]
        async with http.stream(
            "GET", f"/read/{consumer}", headers={"accept": "text/event-stream", **origin}
        ) as sse:
            assert sse.headers["access-control-allow-origin"] == "https://app.example"
        poll = await http.get(
            f"/read/{consumer}", params={"transport": "long-poll"}, headers=origin, timeout=30
        )
        assert poll.headers["access-control-allow-origin"] == "https://app.example"
        # reads need no token; writes still do
        refused = await http.post(f"/write/{channel['producerAddress']}/s", json=1)
        assert refused.status_code == 401


async def test_ndjson_heartbeats_are_opt_in(server_factory: ServerFactory) -> None:
    """Empty lines every heartbeat_millis, only when asked (official clients cannot take them)."""
    node = await server_factory(poll_duration_millis=450, heartbeat_millis=100)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        consumer = channel["consumerAddress"]
        await write(http, channel, 1)
        plain = (await http.get(f"/read/{consumer}")).content
        assert plain.count(b"\n") == 1
        await write(http, channel, 2)
        beating = (await http.get(f"/read/{consumer}", params={"heartbeat": "1"})).content
    lines = beating.split(b"\n")
    assert orjson.loads(lines[0])["body"] == 2
    assert lines.count(b"") >= 3  # beats, and the final newline


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 200_000])
def test_event_frames_are_byte_for_byte_wsproto_s(size: int) -> None:
    """The sink frames events itself (issue #14: ~0.3 µs instead of ~6 µs an event): the bytes
    must be exactly what wsproto sends for the same text message, at every length boundary."""
    from wsproto.events import AcceptConnection as Accept
    from wsproto.events import Request as WsRequest

    from megaphone.http.sinks.websocket import text_frame

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(WsRequest(host="h", target="/")))
    list(server.events())
    client.receive_data(server.send(Accept()))
    list(client.events())
    line = b'{"body":"' + "é".encode() * (size // 2) + b"x" * (size % 2) + b'"}\n'
    frame = text_frame(line)
    assert frame == server.send(TextMessage(data=line[:-1].decode()))
    client.receive_data(frame)
    (received,) = list(client.events())
    assert isinstance(received, TextMessage)
    assert received.data.encode() == line[:-1]
