"""SPEC Part A channel semantics, each line through the real HTTP server with short timers."""

from __future__ import annotations

import asyncio
import time

import httpx

from conftest import ServerFactory, base_url, create_channel, read_events
from megaphone.core.transports import Transport


async def test_write_into_full_channel_times_out(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_buffer_size=3, write_timeout_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        for n in range(3):
            ok = await http.post(f"/write/{channel['producerAddress']}/s", json=n)
            assert ok.status_code == 201
        started = time.monotonic()
        full = await http.post(f"/write/{channel['producerAddress']}/s", json=3)
        assert full.status_code == 503
        assert full.json()["code"] == "TIMEOUT"
        assert time.monotonic() - started >= 0.25  # it waited for room before giving up
        events = await read_events(http, channel["consumerAddress"], 3)
        assert [e["body"] for e in events] == [0, 1, 2]  # the timed-out event was not written


async def test_blocked_write_is_released_by_a_read(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_buffer_size=2, write_timeout_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        for n in range(2):
            await http.post(f"/write/{channel['producerAddress']}/s", json=n)
        blocked = asyncio.create_task(http.post(f"/write/{channel['producerAddress']}/s", json=2))
        await asyncio.sleep(0.2)
        assert not blocked.done()
        events = await read_events(http, channel["consumerAddress"], 3)
        assert (await blocked).status_code == 201
        assert [e["body"] for e in events] == [0, 1, 2]


async def test_queued_writers_keep_their_order(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_buffer_size=1, write_timeout_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        url = f"/write/{channel['producerAddress']}/s"
        await http.post(url, json=0)
        waiting = []
        for n in range(1, 6):
            waiting.append(asyncio.create_task(http.post(url, json=n)))
            await asyncio.sleep(0.05)  # queue them in a known order
        events = await read_events(http, channel["consumerAddress"], 6)
        assert [e["body"] for e in events] == [0, 1, 2, 3, 4, 5]
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [201] * 5


async def test_write_batch_skips_after_timeout(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_buffer_size=2, write_timeout_millis=200)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        full = await create_channel(http)
        roomy = await create_channel(http)
        messages = [{"streamId": "s", "body": n} for n in range(4)]
        reply = await http.post(
            "/write-batch",
            json={
                "channels": [full["producerAddress"], roomy["producerAddress"]],
                "messages": messages[:0],
            },
        )
        assert reply.status_code == 201
        assert reply.json() == {"failures": []}
        await http.post(f"/write/{full['producerAddress']}/s", json="x")
        reply = await http.post(
            "/write-batch",
            json={"channels": [full["producerAddress"]], "messages": messages[:3]},
        )
        assert reply.status_code == 201
        assert reply.json()["failures"] == [
            {"channel": full["producerAddress"], "index": 1, "reason": "TIMEOUT"},
            {"channel": full["producerAddress"], "index": 2, "reason": "SKIPPED"},
        ]
        # channelIds is accepted as an alias; each message reaches each channel, with one eid
        other = await create_channel(http)
        reply = await http.post(
            "/write-batch",
            json={
                "channelIds": [roomy["producerAddress"], other["producerAddress"]],
                "messages": messages[:2],
            },
        )
        assert reply.json() == {"failures": []}
        first = await read_events(http, roomy["consumerAddress"], 2)
        second = await read_events(http, other["consumerAddress"], 2)
        assert [e["body"] for e in first] == [0, 1] == [e["body"] for e in second]
        assert [e["eid"] for e in first] == [e["eid"] for e in second]


async def test_write_batch_reports_unknown_and_malformed_channels(
    client: httpx.AsyncClient,
) -> None:
    good = await create_channel(client)
    consumer_only = (await create_channel(client))["consumerAddress"]
    reply = await client.post(
        "/write-batch",
        json={
            "channels": [good["producerAddress"], "nonsense", consumer_only],
            "messages": [{"streamId": "a", "body": 1}],
        },
    )
    assert reply.status_code == 201
    reasons = {f["channel"]: f["reason"] for f in reply.json()["failures"]}
    assert reasons == {"nonsense": "BAD_REQUEST", consumer_only: "BAD_REQUEST"}
    [event] = await read_events(client, good["consumerAddress"], 1)
    assert event["body"] == 1


async def test_second_reader_is_busy(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    async with client.stream("GET", f"/read/{channel['consumerAddress']}") as first:
        assert first.status_code == 200
        second = await client.get(f"/read/{channel['consumerAddress']}")
        assert second.status_code == 409
        assert second.json()["code"] == "BUSY"


async def test_read_window_ends_cleanly(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=400)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await http.post(f"/write/{channel['producerAddress']}/s", json="early")
        started = time.monotonic()
        reply = await http.get(
            f"/read/{channel['consumerAddress']}"
        )  # returns when the window ends
        assert reply.status_code == 200
        assert time.monotonic() - started >= 0.35
        lines = reply.content.splitlines()
        assert len(lines) == 1
        # the reader lease is released: the next read works and gets nothing new
        again = await http.get(f"/read/{channel['consumerAddress']}")
        assert again.status_code == 200
        assert again.content == b""


async def test_each_read_ends_after_its_own_window(server_factory: ServerFactory) -> None:
    """Windows share one FIFO and one timer: a read begun later ends later, each on its own."""
    node = await server_factory(poll_duration_millis=600)
    ended: list[str] = []
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        first, second = await create_channel(http), await create_channel(http)

        async def read(name: str, channel: dict[str, str]) -> None:
            started = time.monotonic()
            reply = await http.get(f"/read/{channel['consumerAddress']}", timeout=10)
            assert reply.status_code == 200
            assert time.monotonic() - started >= 0.55  # not cut by the other read's window
            ended.append(name)

        one = asyncio.create_task(read("first", first))
        await asyncio.sleep(0.3)
        await read("second", second)
        await one
    assert ended == ["first", "second"]


async def test_a_reader_gone_early_leaves_nothing_in_the_windows(
    server_factory: ServerFactory,
) -> None:
    """A read whose client leaves keeps no part of its connection alive until its window ends."""
    node = await server_factory(poll_duration_millis=60_000)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        async with http.stream("GET", f"/read/{channel['consumerAddress']}") as reply:
            assert reply.status_code == 200
        for _ in range(250):  # until the server has seen the reader go
            if all(c.stream is None for c in node.http.connections):
                break
            await asyncio.sleep(0.02)
        entries = list(node.http.windows[Transport.NDJSON]._entries)
        assert entries  # its entry waits for the deadline
        assert all(stream is None for _, stream in entries)
        # and the channel can be read again at once
        again = await http.post(f"/write/{channel['producerAddress']}/s", json=1)
        assert again.status_code == 201


async def test_unread_channel_expires(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_ttl_millis=300, sweep_interval_millis=100)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await http.post(f"/write/{channel['producerAddress']}/s", json=1)
        await asyncio.sleep(0.7)
        exists = await http.post("/channelsExists", json={"channels": [channel["producerAddress"]]})
        assert exists.json() == {"channels": {channel["producerAddress"]: False}}
        gone = await http.post(f"/write/{channel['producerAddress']}/s", json=2)
        assert gone.status_code == 404
        assert gone.json()["code"] == "NOT_FOUND"
        metrics = (await http.get("/metrics")).text
        assert "megaphone_channel_disposed 1\n" in metrics
        assert "megaphone_messages_lost 1\n" in metrics
        assert "megaphone_messages_unroutable 1\n" in metrics


async def test_channel_with_reader_never_expires(server_factory: ServerFactory) -> None:
    node = await server_factory(
        channel_ttl_millis=200, sweep_interval_millis=50, poll_duration_millis=800
    )
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        reader = asyncio.create_task(http.get(f"/read/{channel['consumerAddress']}"))
        await asyncio.sleep(0.6)  # three lifetimes while the reader is attached
        ok = await http.post(f"/write/{channel['producerAddress']}/s", json="still here")
        assert ok.status_code == 201
        reply = await reader
        assert b"still here" in reply.content
        # the lifetime restarts when the read ends: alive right after, gone a lifetime later
        alive = await http.post("/channelsExists", json={"channels": [channel["consumerAddress"]]})
        assert alive.json()["channels"][channel["consumerAddress"]] is True
        await asyncio.sleep(0.5)
        dead = await http.post("/channelsExists", json={"channels": [channel["consumerAddress"]]})
        assert dead.json()["channels"][channel["consumerAddress"]] is False


async def test_channels_exists_accepts_both_addresses(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    addresses = [channel["producerAddress"], channel["consumerAddress"], "garbage", "x.y.1"]
    reply = await client.post("/channelsExists", json={"channels": addresses})
    assert reply.status_code == 200
    assert reply.json() == {
        "channels": {
            channel["producerAddress"]: True,
            channel["consumerAddress"]: True,
            "garbage": False,
            "x.y.1": False,
        }
    }


async def test_create_negotiates_protocols(client: httpx.AsyncClient) -> None:
    reply = await client.post("/create", json={"protocols": ["SSE_V9", "HTTP_STREAM_NDJSON_V1"]})
    assert reply.json()["protocols"] == ["HTTP_STREAM_NDJSON_V1"]
    refused = await client.post("/create", json={"protocols": ["SSE_V9"]})
    assert refused.status_code == 400
    assert refused.json()["code"] == "BAD_REQUEST"
    empty = await client.post("/create", json={"protocols": []})
    assert empty.status_code == 200


async def test_event_shape(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    body = {"nested": [1, 2.5, None, True, "é"], "deep": {"x": {"y": []}}}
    await client.post(f"/write/{channel['producerAddress']}/stream-1", json=body)
    [event] = await read_events(client, channel["consumerAddress"], 1)
    assert list(event) == ["sid", "eid", "ts", "body"]
    assert event["sid"] == "stream-1"
    assert event["body"] == body
    assert len(event["eid"]) == 23
    assert event["eid"].isalnum()
    assert event["ts"].endswith("Z")
    from datetime import datetime

    datetime.fromisoformat(event["ts"])
