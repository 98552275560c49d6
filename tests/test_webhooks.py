"""on-channel-deleted webhooks, against real HTTP receivers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from conftest import ServerFactory, base_url, create_channel


class Receiver:
    """A real HTTP server in a thread that records what it is sent."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.bodies: list[Any] = []
        received = self.bodies
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                received.append(json.loads(self.rfile.read(length)))
                time.sleep(outer.delay)
                outer.answered += 1
                self.send_response(outer.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.status = status
        self.delay = delay
        self.answered = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_expired_channels_are_posted(
    server_factory: ServerFactory, receivers: list[Receiver]
) -> None:
    receiver = Receiver()
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
    server_factory: ServerFactory, receivers: list[Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    good, failing, slow = Receiver(), Receiver(status=500), Receiver(delay=5.0)
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
