"""Ports of the original project's integration tests (megaphone-broker 0.10.5, tests/client.rs)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from conftest import create_channel, read_events


async def write(http: httpx.AsyncClient, producer: str, stream: str, body: Any) -> None:
    reply = await http.post(f"/write/{producer}/{stream}", json=body)
    assert reply.status_code == 201, reply.text
    assert reply.json() == {"status": "OK"}


async def test_create(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    assert set(channel) == {
        "channelId",
        "producerAddress",
        "consumerAddress",
        "agentName",
        "protocols",
    }
    assert channel["channelId"] == channel["consumerAddress"]
    assert channel["agentName"] == "test-agent"
    # issue #11 (recorded in docs/contract.md): without `protocols` every transport is listed,
    # the original's NDJSON stream first
    assert channel["protocols"] == [
        "HTTP_STREAM_NDJSON_V1",
        "SSE_V1",
        "WEBSOCKET_V1",
        "LONG_POLL_V1",
    ]


async def test_write(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    await write(client, channel["producerAddress"], "greetings", {"hello": "world"})


async def test_read_after_write(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    await write(client, channel["producerAddress"], "s", {"n": 1})
    [event] = await read_events(client, channel["consumerAddress"], 1)
    assert event["sid"] == "s"
    assert event["body"] == {"n": 1}


async def test_hundred_messages_in_order_while_written(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)

    async def producer() -> None:
        for n in range(100):
            await write(client, channel["producerAddress"], "numbers", {"n": n})

    reader = asyncio.create_task(read_events(client, channel["consumerAddress"], 100))
    await producer()
    events = await reader
    assert [e["body"]["n"] for e in events] == list(range(100))
    assert len({e["eid"] for e in events}) == 100


async def demultiplexed(http: httpx.AsyncClient, count: int) -> None:
    """One channel carries "even" and "odd"; two client-side consumers split them by sid."""
    channel = await create_channel(http)
    reader = asyncio.create_task(read_events(http, channel["consumerAddress"], count))
    for n in range(count):
        await write(http, channel["producerAddress"], "even" if n % 2 == 0 else "odd", n)
    events = await reader
    even = [e["body"] for e in events if e["sid"] == "even"]
    odd = [e["body"] for e in events if e["sid"] == "odd"]
    assert even == list(range(0, count, 2))
    assert odd == list(range(1, count, 2))


async def test_two_streams_on_one_channel(client: httpx.AsyncClient) -> None:
    await demultiplexed(client, 50)


async def test_ten_channels_in_parallel(client: httpx.AsyncClient) -> None:
    await asyncio.gather(*(demultiplexed(client, 50) for _ in range(10)))
