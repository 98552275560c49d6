"""GET /metrics: the original's counter names and the channel-duration histogram."""

from __future__ import annotations

import asyncio

import httpx

from conftest import ServerFactory, base_url, create_channel, read_events


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


async def test_counters_and_histogram(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_ttl_millis=200, sweep_interval_millis=50)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        for n in range(3):
            await http.post(f"/write/{channel['producerAddress']}/s", json=n)
        await read_events(http, channel["consumerAddress"], 2)
        await http.post(f"/write/{channel['producerAddress']}/s", json=9)
        await asyncio.sleep(0.6)  # read ended → expires with one unread event
        reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    assert "# TYPE megaphone_channel_created counter" in text
    assert sample(text, "megaphone_channel_created") == 1
    assert sample(text, "megaphone_messages_received") == 4
    assert sample(text, "megaphone_messages_read") == 3  # delivered in the one read
    assert sample(text, "megaphone_channel_disposed") == 1
    assert sample(text, "megaphone_messages_lost") == 1
    assert sample(text, "megaphone_messages_unroutable") == 0
    assert "# TYPE megaphone_channel_duration histogram" in text
    for bucket in (
        "80.0",
        "160.0",
        "320.0",
        "640.0",
        "1280.0",
        "2560.0",
        "5120.0",
        "10240.0",
        "20480.0",
    ):
        assert f'megaphone_channel_duration_bucket{{le="{bucket}"}} 1.0' in text
    assert sample(text, "megaphone_channel_duration_count") == 1
