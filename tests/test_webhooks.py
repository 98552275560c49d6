"""on-channel-deleted webhooks, against real HTTP receivers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import ServerFactory, base_url, create_channel
from support import WebhookReceiver, free_port


@pytest.fixture
def receivers() -> Iterator[list[WebhookReceiver]]:
    made: list[WebhookReceiver] = []
    yield made
    for receiver in made:
        receiver.close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_expired_channels_are_posted(
    server_factory: ServerFactory, receivers: list[WebhookReceiver]
) -> None:
    receiver = WebhookReceiver()
    receivers.append(receiver)
    node = await server_factory(
        channel_ttl_millis=200,
        sweep_interval_millis=100,
        webhooks={"audit": {"hook": "on-channel-deleted", "endpoint": receiver.url}},
    )
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channels = [await create_channel(http) for _ in range(3)]
    await wait_for(lambda: sum(len(b["channels"]) for b in receiver.bodies) >= 3)
    posted = [address for body in receiver.bodies for address in body["channels"]]
    assert sorted(posted) == sorted(c["consumerAddress"] for c in channels)
    assert all(set(body) == {"channels"} for body in receiver.bodies)


async def test_failing_endpoints_are_logged_and_never_block(
    server_factory: ServerFactory,
    receivers: list[WebhookReceiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, failing, slow = WebhookReceiver(), WebhookReceiver(status=500), WebhookReceiver(delay=5.0)
    receivers.extend([good, failing, slow])
    node = await server_factory(
        channel_ttl_millis=100,
        sweep_interval_millis=50,
        webhook_timeout_millis=300,
        webhooks={
            "refused": {"hook": "on-channel-deleted", "endpoint": closed_port_url()},
            "failing": {"hook": "on-channel-deleted", "endpoint": failing.url},
            "slow": {"hook": "on-channel-deleted", "endpoint": slow.url},
            "good": {"hook": "on-channel-deleted", "endpoint": good.url},
        },
    )
    caplog.set_level(logging.INFO, logger="megaphone")
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await wait_for(lambda: len(good.bodies) >= 1 and len(slow.bodies) >= 1)
        # the broker keeps serving while a hook hangs
        for _ in range(20):
            assert (await http.post("/create")).status_code == 200
        assert slow.answered == 0  # still hanging when the creates were answered
    assert good.bodies[0]["channels"] == [channel["consumerAddress"]]
    await wait_for(lambda: len(failing.bodies) >= 1)
    await asyncio.sleep(0.5)  # past the slow hook's timeout
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    hooks = {getattr(r, "webhook", None) for r in warnings}
    assert {"refused", "failing", "slow"} <= hooks
    assert all(r.exc_info is None for r in warnings)  # logged without a traceback
