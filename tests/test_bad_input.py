"""Bad input through the public API: every refusal has the right status and ``{"code","message"}``
body, writes nothing into any channel, and leaves the server serving."""

from __future__ import annotations

import hashlib
import secrets
import string
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from conftest import ServerFactory, base_url, create_channel, read_events
from megaphone.server import MegaphoneServer

MAX_BODY = 1024
MAX_SID = 16


@pytest.fixture
async def node(server_factory: ServerFactory) -> MegaphoneServer:
    return await server_factory(
        poll_duration_millis=300, max_body_bytes=MAX_BODY, max_stream_id_length=MAX_SID
    )


@pytest.fixture
async def http(node: MegaphoneServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(node), timeout=10) as client:
        yield client


@pytest.fixture
async def channel(http: httpx.AsyncClient) -> dict[str, Any]:
    return await create_channel(http)


@pytest.fixture
async def other_node(server_factory: ServerFactory) -> MegaphoneServer:
    """A node of another deployment, with an agent of the same name but its own key (with the
    Redis store: another key prefix, as nodes sharing a prefix share their agents' keys)."""
    return await server_factory(poll_duration_millis=300, redis_prefix="other-deployment:")


async def counter(http: httpx.AsyncClient, name: str) -> int:
    reply = await http.get("/metrics")
    assert reply.status_code == 200
    for line in reply.text.splitlines():
        if line.startswith(f"megaphone_{name} "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no metric {name}")


def assert_error(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]


class Guard:
    """Checks that a refused request wrote nothing anywhere and the server still serves."""

    def __init__(self, http: httpx.AsyncClient, channel: dict[str, Any]) -> None:
        self.http = http
        self.channel = channel
        self.received = 0
        self.created = 0

    async def __aenter__(self) -> Guard:
        self.received = await counter(self.http, "messages_received")
        self.created = await counter(self.http, "channel_created")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            return
        assert await counter(self.http, "messages_received") == self.received
        assert await counter(self.http, "channel_created") == self.created
        # still serving; and events keep their order, so if the first event of the channel is
        # the one we write now, nothing was written into it before
        reply = await self.http.post(f"/write/{self.channel['producerAddress']}/g", json="sentinel")
        assert reply.status_code == 201
        [event] = await read_events(self.http, self.channel["consumerAddress"], 1)
        assert (event["sid"], event["body"]) == ("g", "sentinel")
        await create_channel(self.http)


@pytest.fixture
def guard(http: httpx.AsyncClient, channel: dict[str, Any]) -> Guard:
    return Guard(http, channel)


def flip(text: str, index: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    """``text`` with the character at ``index`` replaced by another one of ``alphabet``."""
    current = text[index]
    replacement = next(c for c in alphabet if c != current)
    return text[:index] + replacement + text[index + 1 :]


def never_created_consumer(channel: dict[str, Any]) -> str:
    agent, segment, features = channel["consumerAddress"].split(".")
    return f"{agent}.{flip(segment, 10)}.{features}"


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_address", "status", "code"),
    [
        (lambda ch: "not-an-address", 400, "BAD_REQUEST"),
        (lambda ch: "test-agent.", 400, "BAD_REQUEST"),
        (lambda ch: "test-agent.tooshort", 400, "BAD_REQUEST"),
        (lambda ch: ch["producerAddress"] + "A", 400, "BAD_REQUEST"),
        (lambda ch: ch["producerAddress"][:-1], 400, "BAD_REQUEST"),
        (lambda ch: ch["producerAddress"].replace(".", "!", 1), 400, "BAD_REQUEST"),
        (lambda ch: ch["producerAddress"][:-1] + "*", 400, "BAD_REQUEST"),
        # well-formed, but the token does not open with the agent's key
        (lambda ch: flip(ch["producerAddress"], -5), 400, "BAD_REQUEST"),
        (lambda ch: flip(ch["producerAddress"], len("test-agent.") + 2), 400, "BAD_REQUEST"),
        # a capability to read is not one to write
        (lambda ch: ch["consumerAddress"], 400, "BAD_REQUEST"),
        # an agent this node does not host: no such channel here
        (lambda ch: "other-agent." + ch["producerAddress"].split(".")[1], 404, "NOT_FOUND"),
    ],
    ids=[
        "garbage",
        "agent-only",
        "short-token",
        "long-token",
        "truncated-token",
        "no-dot",
        "bad-char",
        "forged-tag",
        "forged-nonce",
        "consumer-address",
        "unknown-agent",
    ],
)
async def test_write_with_bad_producer_address(
    http: httpx.AsyncClient,
    channel: dict[str, Any],
    guard: Guard,
    make_address: Any,
    status: int,
    code: str,
) -> None:
    async with guard:
        reply = await http.post(f"/write/{quote(make_address(channel), safe='')}/s", json=1)
        assert_error(reply, status, code)


async def test_write_with_producer_address_of_another_node(
    http: httpx.AsyncClient, other_node: MegaphoneServer, guard: Guard
) -> None:
    async with httpx.AsyncClient(base_url=base_url(other_node)) as other:
        foreign = await create_channel(other)
    assert foreign["agentName"] == "test-agent"  # same agent name, another key
    async with guard:
        reply = await http.post(f"/write/{foreign['producerAddress']}/s", json=1)
        assert_error(reply, 400, "BAD_REQUEST")


async def test_write_to_a_channel_that_was_never_created(
    node: MegaphoneServer, http: httpx.AsyncClient, guard: Guard
) -> None:
    # a genuine producer address of this node's agent, for a channel nobody created
    cipher = node.registry.agents["test-agent"].cipher
    segment = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(50))
    digest = hashlib.md5(segment.encode()).digest()
    address = cipher.producer_address(digest)
    async with guard:
        unroutable = await counter(http, "messages_unroutable")
        reply = await http.post(f"/write/{address}/s", json=1)
        assert_error(reply, 404, "NOT_FOUND")
        assert await counter(http, "messages_unroutable") == unroutable + 1


@pytest.mark.parametrize(
    ("make_address", "status", "code"),
    [
        (lambda ch: "garbage", 400, "BAD_REQUEST"),
        (lambda ch: ch["consumerAddress"].rsplit(".", 1)[0], 400, "BAD_REQUEST"),
        (lambda ch: ch["consumerAddress"] + "x", 400, "BAD_REQUEST"),
        (lambda ch: ch["consumerAddress"][:-3] + "..1", 400, "BAD_REQUEST"),
        (lambda ch: ch["consumerAddress"].rsplit(".", 1)[0] + ".zz", 400, "BAD_REQUEST"),
        (lambda ch: ch["producerAddress"], 400, "BAD_REQUEST"),  # write capability
        (never_created_consumer, 404, "NOT_FOUND"),
        (lambda ch: "other-agent." + ch["consumerAddress"].split(".", 1)[1], 404, "NOT_FOUND"),
    ],
    ids=[
        "garbage",
        "no-features",
        "bad-features",
        "short-segment",
        "non-hex-features",
        "producer-address",
        "never-created",
        "unknown-agent",
    ],
)
async def test_read_with_bad_consumer_address(
    http: httpx.AsyncClient,
    channel: dict[str, Any],
    guard: Guard,
    make_address: Any,
    status: int,
    code: str,
) -> None:
    reply = await http.post(f"/write/{channel['producerAddress']}/s", json="kept")
    assert reply.status_code == 201
    reply = await http.get(f"/read/{quote(make_address(channel), safe='')}")
    assert_error(reply, status, code)
    # the refused read took nothing out of the channel
    [event] = await read_events(http, channel["consumerAddress"], 1)
    assert event["body"] == "kept"
    async with guard:
        pass


async def test_read_with_consumer_address_of_another_node(
    http: httpx.AsyncClient, other_node: MegaphoneServer, guard: Guard
) -> None:
    async with httpx.AsyncClient(base_url=base_url(other_node)) as other:
        foreign = await create_channel(other)
    async with guard:
        assert_error(await http.get(f"/read/{foreign['consumerAddress']}"), 404, "NOT_FOUND")


async def test_channels_exists_with_bad_addresses(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard
) -> None:
    bad = [
        "garbage",
        "",
        never_created_consumer(channel),
        flip(channel["producerAddress"], -5),
        "other-agent." + channel["consumerAddress"].split(".", 1)[1],
    ]
    good = [channel["consumerAddress"], channel["producerAddress"]]
    async with guard:
        reply = await http.post("/channelsExists", json={"channels": bad + good})
        assert reply.status_code == 200
        assert reply.json() == {
            "channels": {**dict.fromkeys(bad, False), **dict.fromkeys(good, True)}
        }


async def test_write_batch_with_bad_addresses_reports_failures(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard
) -> None:
    target = await create_channel(http)
    bad = {
        "garbage": "BAD_REQUEST",
        channel["consumerAddress"]: "BAD_REQUEST",
        flip(channel["producerAddress"], -5): "BAD_REQUEST",
    }
    messages = [{"streamId": "s", "body": 1}, {"streamId": "s", "body": 2}]
    reply = await http.post(
        "/write-batch",
        json={"channels": [*bad, target["producerAddress"]], "messages": messages},
    )
    assert reply.status_code == 201
    failures = reply.json()["failures"]
    assert sorted((f["channel"], f["index"], f["reason"]) for f in failures) == sorted(
        (address, index, reason) for address, reason in bad.items() for index in (0, 1)
    )
    # the one good channel got both messages; the victim channel nothing
    assert [e["body"] for e in await read_events(http, target["consumerAddress"], 2)] == [1, 2]
    async with guard:
        pass


# --- bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"{not json", b'{"a": 1} trailing', b'"\xff"', b"[1, 2", b"NaN", b"undefined"],
    ids=["empty", "blank", "not-json", "trailing", "invalid-utf8", "truncated", "nan", "undefined"],
)
async def test_write_body_that_is_not_json(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard, body: bytes
) -> None:
    async with guard:
        reply = await http.post(
            f"/write/{channel['producerAddress']}/s",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert_error(reply, 400, "BAD_REQUEST")


async def test_write_body_over_the_limit(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard
) -> None:
    async with guard:
        reply = await http.post(
            f"/write/{channel['producerAddress']}/s", content=orjson.dumps("x" * MAX_BODY)
        )
        assert_error(reply, 413, "PAYLOAD_TOO_LARGE")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
            yield b'"'
            for _ in range(4):
                yield b"y" * (MAX_BODY // 2)
            yield b'"'

        reply = await http.post(f"/write/{channel['producerAddress']}/s", content=chunks())
        assert_error(reply, 413, "PAYLOAD_TOO_LARGE")
    # at the limit is fine
    at_limit = orjson.dumps("z" * (MAX_BODY - 2))
    assert len(at_limit) == MAX_BODY
    reply = await http.post(f"/write/{channel['producerAddress']}/s", content=at_limit)
    assert reply.status_code == 201


async def test_batch_body_over_the_limit(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard
) -> None:
    messages = [{"streamId": "s", "body": "x" * 100} for _ in range(20)]
    async with guard:
        reply = await http.post(
            "/write-batch", json={"channels": [channel["producerAddress"]], "messages": messages}
        )
        assert_error(reply, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    "body",
    [
        {"unknown": 1},
        {"protocols": [], "extra": True},
        {"protocols": "HTTP_STREAM_NDJSON_V1"},
        {"protocols": [1]},
        {"protocols": None},
        {"protocols": ["NO_SUCH_PROTOCOL"]},
        [],
        "HTTP_STREAM_NDJSON_V1",
        42,
    ],
)
async def test_create_with_bad_body(http: httpx.AsyncClient, guard: Guard, body: Any) -> None:
    async with guard:
        assert_error(await http.post("/create", json=body), 400, "BAD_REQUEST")


async def test_create_with_body_that_is_not_json(http: httpx.AsyncClient, guard: Guard) -> None:
    async with guard:
        assert_error(await http.post("/create", content=b"{protocols"), 400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "make_body",
    [
        lambda p: {"channels": [p], "messages": [], "extra": 1},
        lambda p: {"channels": [p], "messages": [{"streamId": "s", "body": 1, "extra": 2}]},
        lambda p: {"channels": p, "messages": [{"streamId": "s", "body": 1}]},
        lambda p: {"channels": [p], "messages": {"streamId": "s", "body": 1}},
        lambda p: {"channels": [p, 7], "messages": [{"streamId": "s", "body": 1}]},
        lambda p: {"channels": [p], "messages": [{"streamId": 5, "body": 1}]},
        lambda p: {"channels": [p], "messages": [{"streamId": "s"}]},
        lambda p: {"channels": [p], "messages": [{"body": 1}]},
        lambda p: {"channels": [p], "messages": ["s"]},
        lambda p: {"channels": [p]},
        lambda p: {"messages": [{"streamId": "s", "body": 1}]},
        lambda p: [p],
        lambda p: None,
        # stream ids are checked for the whole batch before anything is written
        lambda p: {"channels": [p], "messages": [{"streamId": "ok", "body": 1}, {"streamId": ""}]},
        lambda p: {
            "channels": [p],
            "messages": [{"streamId": "ok", "body": 1}, {"streamId": "", "body": 2}],
        },
        lambda p: {
            "channels": [p],
            "messages": [
                {"streamId": "ok", "body": 1},
                {"streamId": "s" * (MAX_SID + 1), "body": 2},
            ],
        },
    ],
    ids=[
        "unknown-field",
        "unknown-message-field",
        "channels-not-a-list",
        "messages-not-a-list",
        "channel-not-a-string",
        "stream-id-not-a-string",
        "no-body",
        "no-stream-id",
        "message-not-an-object",
        "no-messages",
        "no-channels",
        "array",
        "null",
        "missing-body-after-good-message",
        "empty-stream-id",
        "long-stream-id",
    ],
)
async def test_write_batch_with_bad_body(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard, make_body: Any
) -> None:
    async with guard:
        reply = await http.post("/write-batch", json=make_body(channel["producerAddress"]))
        assert_error(reply, 400, "BAD_REQUEST")


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null"])
async def test_write_batch_body_that_is_not_an_object(
    http: httpx.AsyncClient, guard: Guard, body: bytes
) -> None:
    async with guard:
        assert_error(await http.post("/write-batch", content=body), 400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "body",
    [
        b'{"channels": [], "extra": 1}',
        b'{"channels": "abc"}',
        b'{"channels": [1]}',
        b'{"channels": null}',
        b"{}",
        b"[]",
        b"",
        b"{",
    ],
)
async def test_channels_exists_with_bad_body(
    http: httpx.AsyncClient, guard: Guard, body: bytes
) -> None:
    async with guard:
        assert_error(await http.post("/channelsExists", content=body), 400, "BAD_REQUEST")


# --- methods and paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/create", "POST"),
        ("PUT", "/create", "POST"),
        ("GET", "/write/{producer}/s", "POST"),
        ("DELETE", "/write/{producer}/s", "POST"),
        ("GET", "/write-batch", "POST"),
        ("POST", "/read/{consumer}", "GET, HEAD"),
        ("PATCH", "/read/{consumer}", "GET, HEAD"),
        ("GET", "/channelsExists", "POST"),
        ("POST", "/metrics", "GET, HEAD"),
        ("HEAD", "/create", "POST"),
    ],
)
async def test_wrong_method(
    http: httpx.AsyncClient,
    channel: dict[str, Any],
    guard: Guard,
    method: str,
    path: str,
    allow: str,
) -> None:
    url = path.format(producer=channel["producerAddress"], consumer=channel["consumerAddress"])
    async with guard:
        reply = await http.request(method, url, content=b'{"x": 1}' if method != "GET" else None)
        assert reply.status_code == 405
        assert reply.headers["allow"] == f"{allow}, OPTIONS"
        if method == "HEAD":  # no body, but the connection stays in step (the guard reuses it)
            assert reply.content == b""
        else:
            assert_error(reply, 405, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nowhere"),
        ("POST", "/CREATE"),
        ("POST", "/create/extra"),
        ("POST", "/creates"),
        ("POST", "//create"),
        ("POST", "/write/{producer}"),
        ("POST", "/write/{producer}/s/extra"),
        ("POST", "/write"),
        ("GET", "/read/{consumer}/extra"),
        ("POST", "/write-batch/x"),
        ("GET", "/metrics/x"),
    ],
)
async def test_unknown_path(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard, method: str, path: str
) -> None:
    url = path.format(producer=channel["producerAddress"], consumer=channel["consumerAddress"])
    async with guard:
        reply = await http.request(method, url, content=b"1" if method == "POST" else None)
        assert_error(reply, 404, "NOT_FOUND")


# --- stream ids -------------------------------------------------------------------------------


STREAM_IDS = [
    "caf\u00e9-\u2603",  # unicode
    "\U0001f4e3",  # outside the BMP
    "with space",
    "what?",
    "a#b",
    "a.b",
    ".",
    "..",
    "a/b",
    "100%",
    "a+b",
    "&x=1;y",
    "line\nbreak\r",  # escaped in the JSON line, so NDJSON framing holds
    "nul\x00tab\t",
    '"quoted"\\',
    "s" * MAX_SID,  # at the limit
    "\u00e9" * MAX_SID,  # the limit counts characters, not bytes
]


def encode_segment(text: str) -> str:
    """Percent-encode every reserved character, dots too (clients drop "." and ".." segments)."""
    return quote(text, safe="").replace(".", "%2E")


async def test_stream_ids_come_back_verbatim(
    http: httpx.AsyncClient, channel: dict[str, Any]
) -> None:
    for index, sid in enumerate(STREAM_IDS):
        reply = await http.post(
            f"/write/{channel['producerAddress']}/{encode_segment(sid)}", json=index
        )
        assert reply.status_code == 201, (sid, reply.text)
    events = await read_events(http, channel["consumerAddress"], len(STREAM_IDS))
    assert [(e["sid"], e["body"]) for e in events] == [(sid, i) for i, sid in enumerate(STREAM_IDS)]


async def test_stream_ids_come_back_verbatim_through_write_batch(
    http: httpx.AsyncClient, channel: dict[str, Any]
) -> None:
    messages = [{"streamId": sid, "body": i} for i, sid in enumerate(STREAM_IDS)]
    reply = await http.post(
        "/write-batch", json={"channels": [channel["producerAddress"]], "messages": messages}
    )
    assert reply.status_code == 201
    assert reply.json() == {"failures": []}
    events = await read_events(http, channel["consumerAddress"], len(STREAM_IDS))
    assert [(e["sid"], e["body"]) for e in events] == [(sid, i) for i, sid in enumerate(STREAM_IDS)]


@pytest.mark.parametrize(
    "raw_sid",
    ["", "%FF", "%C3", "%ED%A0%80", quote("s" * (MAX_SID + 1)), quote("\u00e9" * (MAX_SID + 1))],
    ids=["empty", "invalid-utf8", "truncated-utf8", "surrogate", "too-long", "too-long-unicode"],
)
async def test_bad_stream_id(
    http: httpx.AsyncClient, channel: dict[str, Any], guard: Guard, raw_sid: str
) -> None:
    async with guard:
        reply = await http.post(f"/write/{channel['producerAddress']}/{raw_sid}", json=1)
        assert_error(reply, 400, "BAD_REQUEST")
