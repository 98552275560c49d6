"""GET /metrics: the original's counter names and the channel-duration histogram."""

from __future__ import annotations

import asyncio
import gc

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


async def test_gc_pauses_by_generation(server_factory: ServerFactory) -> None:
    """One process-wide ``gc.callbacks`` hook however many servers run: a forced collection is
    counted once on every server's /metrics, and the hook goes with the last server."""
    gen2_count = 'megaphone_gc_pause_seconds_count{generation="2"}'
    gen2_longest = 'megaphone_gc_longest_pause_seconds{generation="2"}'
    hooks = len(gc.callbacks)
    first = await server_factory()
    second = await server_factory()
    assert len(gc.callbacks) == hooks + 1
    gc.disable()  # only the forced collections below, so the counts are exact
    try:
        async with (
            httpx.AsyncClient(base_url=base_url(first)) as one,
            httpx.AsyncClient(base_url=base_url(second)) as two,
        ):
            before = sample((await one.get("/metrics")).text, gen2_count)
            gc.collect()
            text = (await one.get("/metrics")).text
            assert sample(text, gen2_count) == before + 1
            assert sample((await two.get("/metrics")).text, gen2_count) == before + 1
            assert sample(text, gen2_longest) > 0
            assert 'megaphone_gc_pause_seconds_bucket{generation="2",le="2.0"}' in text
            for generation in "01":
                assert f'megaphone_gc_longest_pause_seconds{{generation="{generation}"}}' in text
            for histogram in ("megaphone_gc_pause_seconds", "megaphone_channel_duration"):
                assert f"{histogram}_created" not in text
            await first.aclose()
            await first.aclose()  # closing twice gives back nothing more
            assert len(gc.callbacks) == hooks + 1
            gc.collect()
            assert sample((await two.get("/metrics")).text, gen2_count) == before + 2
    finally:
        gc.enable()
    await second.aclose()
    assert len(gc.callbacks) == hooks


async def test_budget_gauges(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        for n in range(3):
            await http.post(f"/write/{channel['producerAddress']}/s", json=n)
        text = (await http.get("/metrics")).text
        assert sample(text, "megaphone_open_connections") >= 1
        assert sample(text, "megaphone_refused_connections") == 0
        assert sample(text, "megaphone_buffered_io_bytes") == 0
        assert sample(text, "megaphone_gc_frozen_objects") > 0  # the policy froze start-up
        if node.settings.store == "memory":
            held = sample(text, "megaphone_pending_bytes")
            assert held > 3 * 60  # three events, each its line plus its bookkeeping
            assert held == node.store.budget.used  # type: ignore[attr-defined]
        else:
            assert "megaphone_pending_bytes" not in text
