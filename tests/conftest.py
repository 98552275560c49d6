"""Fixtures: a real Megaphone server on a loopback port, in the test's own (uvloop) event loop.

``server_factory(**settings)`` starts a node with any settings (short timers for tests) and
closes it at teardown; ``server`` is a node with defaults; ``client`` an ``httpx.AsyncClient``
bound to it.
"""

from __future__ import annotations

import asyncio
import io
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
import uvloop

from megaphone.config import Settings
from megaphone.server import MegaphoneServer
from support import RedisServer

ServerFactory = Callable[..., Awaitable[MegaphoneServer]]

# An async test (fixtures included) that is still running after this long is stuck: its tasks
# are printed and cancelled, so it fails with a traceback and the run goes on. pytest-timeout
# (pyproject) cannot do this on uvloop: its SIGALRM handler only runs once the loop wakes up,
# which a loop with nothing scheduled never does. It stays the backstop, by thread, at 90 s.
WATCHDOG_SECONDS = 45.0


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop, as the server does in production."""
    return {"uvloop": uvloop.new_event_loop}


def _stuck(loop: asyncio.AbstractEventLoop, name: str) -> None:
    out = io.StringIO()
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    print(f"\n{name}: stuck after {WATCHDOG_SECONDS:.0f} s; cancelling its tasks:", file=out)
    for task in tasks:
        task.print_stack(file=out)
    sys.stderr.write(out.getvalue())
    for task in tasks:
        task.cancel(f"stuck after {WATCHDOG_SECONDS:.0f} s")


@pytest.fixture(autouse=True)
async def _watchdog(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Set up first and torn down last, so it covers every fixture of the test too."""
    loop = asyncio.get_running_loop()
    timer = loop.call_later(WATCHDOG_SECONDS, _stuck, loop, request.node.nodeid)
    yield
    timer.cancel()


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "agent": "test-agent",
        "log_level": "debug",
        "mng_socket_path": "",  # off: the management tests give each server its own socket
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every server test runs against both channel stores (one contract suite)."""
    if request.param == "memory":
        return {"store": "memory"}
    redis: RedisServer = request.getfixturevalue("redis_server")
    return {"store": "redis", "redis_url": redis.url, "redis_prefix": f"t{uuid.uuid4().hex}:"}


@pytest.fixture
async def server_factory(store_settings: dict[str, Any]) -> AsyncIterator[ServerFactory]:
    started: list[MegaphoneServer] = []

    async def start(**overrides: Any) -> MegaphoneServer:
        node = MegaphoneServer(make_settings(**{**store_settings, **overrides}))
        await node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        await node.aclose(grace=1.0)


@pytest.fixture
async def server(server_factory: ServerFactory) -> MegaphoneServer:
    return await server_factory()


def base_url(node: MegaphoneServer) -> str:
    return f"http://127.0.0.1:{node.port}"


@pytest.fixture
async def client(server: MegaphoneServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(server), timeout=30) as http:
        yield http


async def create_channel(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    reply = await http.post("/create", json=body if body else None)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


async def read_events(
    http: httpx.AsyncClient, consumer: str, count: int, **kwargs: Any
) -> list[dict[str, Any]]:
    """Read the first ``count`` events, asserting that every chunk holds whole lines only."""
    events: list[dict[str, Any]] = []
    async with http.stream("GET", f"/read/{consumer}", **kwargs) as reply:
        assert reply.status_code == 200, await reply.aread()
        assert reply.headers["content-type"] == "application/x-ndjson"
        async for chunk in reply.aiter_raw():
            assert chunk.endswith(b"\n"), f"chunk with a partial line: {chunk!r}"
            events.extend(httpx.Response(200, content=line).json() for line in chunk.splitlines())
            if len(events) >= count:
                break
    return events
