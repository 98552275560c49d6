"""The Redis store across nodes and failures (issue #4), against real redis-server processes.

Two in-process nodes share the session's redis-server (``redis_server``) under a fresh key prefix
per test; the crash and restart tests run ``megaphone`` as a real subprocess (SIGKILL / SIGTERM);
the outage tests stop and restart a private redis-server of their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from conftest import base_url, create_channel, make_settings, read_events
from megaphone.core.addressing import parse_consumer
from megaphone.server import MegaphoneServer
from support import MegaphoneProcess, RedisServer, WebhookReceiver, clean_env

MEGAPHONE = str(Path(sys.executable).parent / "megaphone")
AGENT = "test-agent"  # every node of a test serves the same agent, whose key lives in Redis
# seconds: an upper bound for every retry loop, only there to turn a hang into a failure
HANG_GUARD = 20.0

NodeFactory = Callable[..., Awaitable[MegaphoneServer]]


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"cluster{uuid.uuid4().hex}:"


@pytest.fixture
async def start_node(redis_server: RedisServer, prefix: str) -> AsyncIterator[NodeFactory]:
    """In-process nodes on the session's redis-server, all under this test's prefix."""
    started: list[MegaphoneServer] = []

    async def start(**overrides: Any) -> MegaphoneServer:
        settings: dict[str, Any] = {
            "store": "redis",
            "redis_url": redis_server.url,
            "redis_prefix": prefix,
            "agent": AGENT,
            "redis_poll_millis": 200,
        }
        node = MegaphoneServer(make_settings(**{**settings, **overrides}))
        await node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        await node.aclose(grace=1.0)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A direct connection, to look at the documented key layout."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def channel_key(prefix: str, consumer: str, suffix: str) -> str:
    """``P{agent.digest}:<suffix>``, the layout of megaphone.store.redis."""
    key = parse_consumer(consumer)
    return f"{prefix}{{{key.agent}.{key.digest.hex()}}}:{suffix}"


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def lines_of(reply: httpx.Response) -> list[dict[str, Any]]:
    assert reply.status_code == 200, reply.text
    return [json.loads(line) for line in reply.text.splitlines()]


def bodies(events: list[dict[str, Any]]) -> list[Any]:
    return [event["body"] for event in events]


async def write(http: httpx.AsyncClient, producer: str, body: Any) -> None:
    reply = await http.post(f"/write/{producer}/s", json=body)
    assert reply.status_code == 201, reply.text


async def read_when_free(
    http: httpx.AsyncClient, consumer: str, headers: dict[str, str] | None = None
) -> tuple[list[int], httpx.Response]:
    """Read, retrying while another reader holds the lease; the statuses seen, the final reply."""
    statuses: list[int] = []
    deadline = time.monotonic() + HANG_GUARD
    while True:
        reply = await http.get(f"/read/{consumer}", headers=headers)
        statuses.append(reply.status_code)
        if reply.status_code != 409:
            return statuses, reply
        assert reply.json()["code"] == "BUSY"
        assert time.monotonic() < deadline, "the lease never lapsed"
        await asyncio.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[list[MegaphoneProcess]]:
    started: list[MegaphoneProcess] = []
    yield started
    for process in started:
        process.close()


async def spawn(
    processes: list[MegaphoneProcess], cwd: Path, redis_url: str, prefix: str, *flags: str
) -> MegaphoneProcess:
    """``megaphone`` as a real subprocess on the Redis store (configured by environment)."""
    env = clean_env(
        megaphone_store="redis", megaphone_redis_url=redis_url, megaphone_redis_prefix=prefix
    )
    args = ["--address", "127.0.0.1:0", "--agent", AGENT, *flags]
    process = await asyncio.to_thread(MegaphoneProcess, args, cwd, env)
    processes.append(process)
    return process


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    made = WebhookReceiver()
    yield made
    made.close()


# --- 1. two nodes, one Redis ------------------------------------------------------------------


async def test_create_on_a_write_on_b_read_on_a(start_node: NodeFactory) -> None:
    a = await start_node(poll_duration_millis=1000)
    b = await start_node(poll_duration_millis=1000)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        exists = await http_b.post("/channelsExists", json={"channels": [producer, consumer]})
        assert exists.json() == {"channels": {producer: True, consumer: True}}
        for n in range(3):
            await write(http_b, producer, n)
        events = await read_events(http_a, consumer, 3)
        assert bodies(events) == [0, 1, 2]
        # and live: a reader attached on A gets what B writes while it waits
        async with http_a.stream("GET", f"/read/{consumer}") as reply:
            assert reply.status_code == 200
            await write(http_b, producer, "live")
            lines = reply.aiter_lines()
            assert json.loads(await anext(lines))["body"] == "live"


async def test_write_blocked_on_a_is_released_by_a_read_on_b(
    start_node: NodeFactory, redis_client: aioredis.Redis, prefix: str
) -> None:
    settings = {"channel_buffer_size": 2, "write_timeout_millis": 15_000}
    a = await start_node(**settings)
    b = await start_node(**settings)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        await write(http_a, producer, 0)
        await write(http_a, producer, 1)
        blocked = asyncio.create_task(http_a.post(f"/write/{producer}/s", json=2))
        waiting = channel_key(prefix, consumer, "w")

        async def queued() -> bool:
            return bool(await redis_client.llen(waiting) == 1)

        await wait_for(queued, "the third write to queue")
        await asyncio.sleep(0.2)
        assert not blocked.done()  # the buffer is full: the write waits
        events = await read_events(http_b, consumer, 3)
        assert bodies(events) == [0, 1, 2]
        reply = await blocked
        assert reply.status_code == 201, reply.text


async def test_second_reader_on_the_other_node_is_busy(start_node: NodeFactory) -> None:
    a = await start_node(poll_duration_millis=1000)
    b = await start_node(poll_duration_millis=1000)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_b)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        async with http_a.stream("GET", f"/read/{consumer}") as first:
            assert first.status_code == 200
            busy = await http_b.get(f"/read/{consumer}")
            assert busy.status_code == 409
            assert busy.json()["code"] == "BUSY"
            with_cursor = await http_b.get(f"/read/{consumer}", headers={"Last-Event-ID": "x"})
            assert with_cursor.status_code == 409
            await first.aread()  # A's window ends (its lease is released before the last chunk)
        # a client that reconnects at once, to the other node, is not refused
        await write(http_a, producer, "next")
        second = await http_b.get(f"/read/{consumer}")
        assert bodies(lines_of(second)) == ["next"]


async def test_queued_writers_on_both_nodes_keep_fifo_order(
    start_node: NodeFactory, redis_client: aioredis.Redis, prefix: str
) -> None:
    settings = {"channel_buffer_size": 1, "write_timeout_millis": 15_000}
    a = await start_node(**settings)
    b = await start_node(**settings)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        await write(http_a, producer, "fill")
        waiting = channel_key(prefix, consumer, "w")
        writers: list[asyncio.Task[httpx.Response]] = []
        for n in range(8):
            http = (http_a, http_b)[n % 2]
            writers.append(asyncio.create_task(http.post(f"/write/{producer}/s", json=n)))

            async def queued(count: int = n + 1) -> bool:
                return bool(await redis_client.llen(waiting) == count)

            await wait_for(queued, f"writer {n} to queue")  # arrival order is known
        events = await read_events(http_b, consumer, 9)
        assert bodies(events) == ["fill", *range(8)]
        assert [(await w).status_code for w in writers] == [201] * 8


async def test_expiry_webhook_fires_once_per_channel_cluster_wide(
    start_node: NodeFactory, receiver: WebhookReceiver, redis_client: aioredis.Redis, prefix: str
) -> None:
    """Both nodes sweep every 20 ms; each expired channel is posted exactly once, and a channel
    read on A is kept alive against B's sweeps until its read ends."""
    settings = {
        "channel_ttl_millis": 300,
        "sweep_interval_millis": 20,
        "poll_duration_millis": 2000,
        "webhooks": {"audit": {"hook": "on-channel-deleted", "endpoint": receiver.url}},
    }
    a = await start_node(**settings)
    b = await start_node(**settings)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        held = (await create_channel(http_b))["consumerAddress"]
        async with http_a.stream("GET", f"/read/{held}") as reading:
            assert reading.status_code == 200
            created = [
                (await create_channel((http_a, http_b)[n % 2]))["consumerAddress"]
                for n in range(20)
            ]

            async def all_posted() -> bool:
                return set(receiver.posted()) >= set(created)

            await wait_for(all_posted, "every expired channel to be posted")
            assert held not in receiver.posted()  # a reader is attached: it never expires
            exists = await http_b.post("/channelsExists", json={"channels": [held]})
            assert exists.json()["channels"][held]
            assert not reading.is_closed
            await reading.aread()  # the window ends: the channel's lifetime starts again

        async def held_posted() -> bool:
            return held in receiver.posted()

        await wait_for(held_posted, "the channel to expire once its read ended")
        await asyncio.sleep(0.3)  # many more sweeps on both nodes
        assert Counter(receiver.posted()) == Counter([*created, held])  # each exactly once
        exists = await http_a.post("/channelsExists", json={"channels": [*created, held]})
        assert not any(exists.json()["channels"].values())
    assert int(await redis_client.get(prefix + "count") or 0) == 0
    assert await redis_client.zcard(prefix + "expiry") == 0
    assert a.metrics.channel_disposed + b.metrics.channel_disposed == len(created) + 1


async def test_max_channels_counts_the_whole_cluster(start_node: NodeFactory) -> None:
    a = await start_node(max_channels=3)
    b = await start_node(max_channels=3)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        first = await create_channel(http_a)
        await create_channel(http_a)
        await create_channel(http_b)
        for http in (http_a, http_b):
            refused = await http.post("/create")
            assert refused.status_code == 503
            assert refused.json()["code"] == "CHANNEL_LIMIT"
            assert (await http.get("/readyz")).status_code == 503
        # a channel deleted on A frees a slot on B
        assert await a.store.delete(parse_consumer(first["consumerAddress"]))
        assert (await http_b.get("/readyz")).status_code == 200
        await create_channel(http_b)
        assert (await http_a.post("/create")).json()["code"] == "CHANNEL_LIMIT"


# --- any node serves any agent; agent keys survive Redis losing its data ---------------------


async def test_nodes_with_different_agent_names_serve_each_others_channels(
    start_node: NodeFactory,
) -> None:
    """Every node accepts every agent whose key is in Redis (learned on first sight), while
    ``/create`` keeps using the node's own agent."""
    a = await start_node(agent="nodea", poll_duration_millis=1000)
    b = await start_node(agent="nodeb", poll_duration_millis=1000)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        for mine, other, name in ((http_a, http_b, "nodea"), (http_b, http_a, "nodeb")):
            channel = await create_channel(mine)
            assert channel["agentName"] == name
            producer, consumer = channel["producerAddress"], channel["consumerAddress"]
            exists = await other.post("/channelsExists", json={"channels": [producer, consumer]})
            assert exists.json() == {"channels": {producer: True, consumer: True}}
            batch = await other.post(
                "/write-batch",
                json={"channels": [producer], "messages": [{"streamId": "s", "body": 0}]},
            )
            assert batch.json() == {"failures": []}
            await write(other, producer, 1)
            assert bodies(await read_events(other, consumer, 2)) == [0, 1]
        assert (await create_channel(http_b))["agentName"] == "nodeb"
        # an agent no node has: 404 (looked up, not learned), on every endpoint
        foreign = channel["producerAddress"].replace("nodeb.", "nodez.", 1)
        assert (await http_a.post(f"/write/{foreign}/s", json=1)).status_code == 404
        consumer = channel["consumerAddress"].replace("nodeb.", "nodez.", 1)
        assert (await http_a.get(f"/read/{consumer}")).status_code == 404
        exists = await http_a.post("/channelsExists", json={"channels": [foreign]})
        assert exists.json() == {"channels": {foreign: False}}
    assert set(a.registry.learned) == {"nodeb"}
    assert set(b.registry.learned) == {"nodea"}


async def test_two_keys_minted_for_one_agent_settle_on_the_older(
    start_node: NodeFactory, redis_client: aioredis.Redis, prefix: str
) -> None:
    """After a loss, a node of an agent that starts before the running nodes restore its key
    mints another (here: written into Redis by hand, as that node would). The older key wins
    everywhere within a check: the running node writes it back, a node that picked up the younger
    one adopts the older, so the addresses minted before the loss open on every node again."""
    a = await start_node(agent="nodea")
    async with httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a:
        before = (await create_channel(http_a))["producerAddress"]
        agents = prefix + "agents"
        older = await redis_client.hget(agents, "nodea")
        await redis_client.flushall()
        younger = base64.b64encode(os.urandom(32))
        now = int(time.time() * 1000)
        await redis_client.hset(agents, mapping={"nodea": younger, "nodea:minted": now})
        c = await start_node(agent="nodea")  # starts on the younger key (if A is not faster)
        async with httpx.AsyncClient(base_url=base_url(c), timeout=30) as http_c:

            async def settled() -> bool:
                if await redis_client.hget(agents, "nodea") != older:
                    return False
                reply = await http_c.post(f"/write/{before}/s", json=1)
                return reply.status_code == 404  # opens (the channel is gone with the data)

            await wait_for(settled, "the older key to win on every node")
            fresh = await create_channel(http_c)
            await write(http_a, fresh["producerAddress"], "both")


async def test_a_write_retried_on_another_node_is_applied_once(start_node: NodeFactory) -> None:
    """The idempotency key lives with the channel in Redis: a retry through another node (the
    load balancer's choice) is recognised as well."""
    a = await start_node(agent="nodea", poll_duration_millis=1000)
    b = await start_node(agent="nodeb", poll_duration_millis=1000)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        for http in (http_a, http_b):
            reply = await http.post(
                f"/write/{producer}/s", json="once", headers={"Idempotency-Key": "retry-1"}
            )
            assert reply.status_code == 201, reply.text
        await write(http_b, producer, "next")
        assert bodies(await read_events(http_a, consumer, 2)) == ["once", "next"]


async def test_agent_keys_survive_redis_losing_its_data(
    start_node: NodeFactory, redis_client: aioredis.Redis, prefix: str
) -> None:
    """FLUSHALL between nodes: running nodes write back the keys they use (their own and those
    they learned) with HSETNX; a node started afterwards with a lost agent's name finds its key,
    so producer addresses minted before the loss still open everywhere (their channels are gone:
    404, not a 400 for an address that no longer decrypts)."""
    a = await start_node(agent="nodea")
    b = await start_node(agent="nodeb")
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        before = channel["producerAddress"]
        await write(http_b, before, 0)  # B learns nodea's key
        await a.aclose(grace=1.0)  # nodea's own node is gone: B alone still knows its key
        before_keys = await redis_client.hmget(prefix + "agents", ["nodea", "nodeb"])
        await redis_client.flushall()
        agents = prefix + "agents"

        async def restored() -> bool:
            return bool(await redis_client.hmget(agents, ["nodea", "nodeb"]) == before_keys)

        await wait_for(restored, "the running node to restore both keys")
        c = await start_node(agent="nodea")  # a new node of the lost agent: no new key minted
        async with httpx.AsyncClient(base_url=base_url(c), timeout=30) as http_c:
            for http in (http_b, http_c):
                reply = await http.post(f"/write/{before}/s", json=1)
                assert reply.status_code == 404, reply.text  # opened: same key, channel gone
            fresh = await create_channel(http_c)
            await write(http_b, fresh["producerAddress"], 2)
            assert bodies(await read_events(http_b, fresh["consumerAddress"], 1)) == [2]


# --- 2. a node killed mid-read ----------------------------------------------------------------


async def test_reader_resumes_on_b_after_a_is_killed_mid_read(
    start_node: NodeFactory,
    processes: list[MegaphoneProcess],
    redis_server: RedisServer,
    prefix: str,
    tmp_path: Path,
) -> None:
    """A (a subprocess: a lease of 300 ms ticks + 700 ms margin, renewed at every tick, under a
    5 s read window) dies with SIGKILL while streaming; the client got only the first 5 of the 10
    events A sent (the rest were in flight). B refuses the channel until A's lease lapses (a lease,
    not a window, after the kill), then replays everything after the cursor, then pending."""
    a = await spawn(
        processes,
        tmp_path,
        redis_server.url,
        prefix,
        "--poll-duration-millis",
        "5000",
        "--redis-poll-millis",
        "300",
        "--redis-lease-margin-millis",
        "700",
    )
    b = await start_node(poll_duration_millis=800)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        for n in range(10):
            await write(http_a, producer, n)
        received: list[dict[str, Any]] = []
        async with http_a.stream("GET", f"/read/{consumer}") as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                received.append(json.loads(line))
                if len(received) == 5:
                    break
            a.signal(signal.SIGKILL)
            assert await asyncio.to_thread(a.wait) == -signal.SIGKILL
        assert bodies(received) == [0, 1, 2, 3, 4]
        for n in range(10, 15):  # the producer carries on through B
            await write(http_b, producer, n)
        cursor = {"Last-Event-ID": received[-1]["eid"]}
        statuses, reply = await read_when_free(http_b, consumer, cursor)
        assert statuses[0] == 409  # A's lease still holds the channel
        assert statuses[-1] == 200
        assert reply.headers["megaphone-resume"] == "resumed"
        resumed = lines_of(reply)
        assert bodies(resumed) == list(range(5, 15))  # sent-but-unconfirmed, then pending
        merged = list({event["eid"]: event for event in received + resumed}.values())
        assert bodies(merged) == list(range(15))
        assert len({event["eid"] for event in resumed}) == len(resumed)


async def test_a_read_longer_than_its_lease_keeps_the_channel(start_node: NodeFactory) -> None:
    """The lease (100 ms ticks + 400 ms) is renewed at every tick: a 1.5 s read keeps its
    channel to the end (another node's reader is refused meanwhile), then frees it at once."""
    timers = {"redis_poll_millis": 100, "redis_lease_margin_millis": 400}
    a = await start_node(poll_duration_millis=1500, **timers)
    b = await start_node(poll_duration_millis=300, **timers)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        channel = await create_channel(http_a)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        refused = 0
        async with http_a.stream("GET", f"/read/{consumer}") as reading:
            assert reading.status_code == 200
            finished = asyncio.ensure_future(reading.aread())
            while not finished.done():
                other = await http_b.get(f"/read/{consumer}")
                if finished.done():
                    break
                assert other.status_code == 409, other.text  # still A's, lease after lease
                refused += 1
                await asyncio.sleep(0.05)
            await finished
        assert refused > 0
        await write(http_b, producer, "after")
        assert bodies(lines_of(await http_b.get(f"/read/{consumer}"))) == ["after"]


# --- 3. a broker restart ----------------------------------------------------------------------


async def test_restart_keeps_pending_events_and_producer_addresses(
    processes: list[MegaphoneProcess], redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """SIGTERM a node, start a new process on the same Redis and prefix: the pending events, the
    replay window and the agent key (so the old producer address) are all still there; and a node
    stopped while a reader is attached releases its lease, so the reader resumes at once."""
    flags = ("--poll-duration-millis", "5000")
    first = await spawn(processes, tmp_path, redis_server.url, prefix, *flags)
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        for n in range(5):
            await write(http, producer, n)
        sent = await read_events(http, consumer, 5)
        assert bodies(sent) == [0, 1, 2, 3, 4]
        for n in range(5, 8):  # pending at the restart
            await write(http, producer, n)
    first.signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait) == 0

    second = await spawn(processes, tmp_path, redis_server.url, prefix, *flags)
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        exists = await http.post("/channelsExists", json={"channels": [producer, consumer]})
        assert exists.json() == {"channels": {producer: True, consumer: True}}
        # the replay window survived too: resume from the first read's third event
        cursor = {"Last-Event-ID": sent[2]["eid"]}
        replayed = await read_events(http, consumer, 5, headers=cursor)
        assert bodies(replayed) == [3, 4, 5, 6, 7]  # replayed, then the pending ones
        assert [e["eid"] for e in replayed[:2]] == [e["eid"] for e in sent[3:]]
        await write(http, producer, 8)  # the old producer address still writes: same agent key
        cursor = {"Last-Event-ID": replayed[3]["eid"]}
        again = await read_events(http, consumer, 2, headers=cursor)
        assert bodies(again) == [7, 8]
        # a rolling restart with a reader attached: the read ends cleanly, the lease is released
        async with http.stream("GET", f"/read/{consumer}") as reading:
            assert reading.status_code == 200
            await write(http, producer, 9)
            lines = reading.aiter_lines()
            last = json.loads(await anext(lines))
            assert last["body"] == 9
            second.signal(signal.SIGTERM)
            assert [line async for line in lines] == []
    assert await asyncio.to_thread(second.wait) == 0

    third = await spawn(processes, tmp_path, redis_server.url, prefix, *flags)
    async with httpx.AsyncClient(base_url=third.url, timeout=30) as http:
        await write(http, producer, 10)
        resumed = await read_events(http, consumer, 1, headers={"Last-Event-ID": last["eid"]})
        assert bodies(resumed) == [10]  # first attempt: no 409, nothing replayed twice


# --- 4. Redis stopped and restarted under load ------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, with an append-only file so that its data survives the
    restart: the test then also checks that no acknowledged write is lost across the outage."""
    server = RedisServer("--appendonly", "yes", "--dir", str(tmp_path))
    yield server
    server.stop()


@pytest.fixture
async def private_node(private_redis: RedisServer, prefix: str) -> AsyncIterator[NodeFactory]:
    """In-process nodes on the test's private redis-server."""
    started: list[MegaphoneServer] = []

    async def start(**overrides: Any) -> MegaphoneServer:
        settings: dict[str, Any] = {
            "store": "redis",
            "redis_url": private_redis.url,
            "redis_prefix": prefix,
            "agent": AGENT,
        }
        node = MegaphoneServer(make_settings(**{**settings, **overrides}))
        await node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        await node.aclose(grace=1.0)


async def until_served(send: Callable[[], Awaitable[httpx.Response]], ok: int) -> httpx.Response:
    """Retry while the store is unavailable (or a lease left by the outage lapses)."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        reply = await send()
        if reply.status_code == ok:
            return reply
        assert (reply.status_code, reply.json()["code"]) in {
            (503, "STORE_UNAVAILABLE"),
            (409, "BUSY"),
        }, reply.text
        assert time.monotonic() < deadline, f"still {reply.status_code}: {reply.text}"
        await asyncio.sleep(0.05)


class Load:
    """One writer and one resuming reader on a channel, recording every answer."""

    def __init__(self, http: httpx.AsyncClient, producer: str, consumer: str) -> None:
        self.http = http
        self.producer = producer
        self.consumer = consumer
        self.stop = asyncio.Event()
        self.acked: list[int] = []
        self.writes: Counter[tuple[int, str]] = Counter()
        self.reads: Counter[tuple[int, str]] = Counter()
        self.events: dict[str, int] = {}  # eid → body, deduplicated, in arrival order

    @staticmethod
    def code(reply: httpx.Response) -> str:
        return str(reply.json()["code"]) if reply.status_code >= 400 else ""

    async def writer(self) -> None:
        n = 0
        while not self.stop.is_set():
            reply = await self.http.post(f"/write/{self.producer}/s", json=n)
            self.writes[reply.status_code, self.code(reply)] += 1
            if reply.status_code == 201:
                self.acked.append(n)
            n += 1
            await asyncio.sleep(0.005)

    async def reader(self) -> None:
        cursor: str | None = None
        while not self.stop.is_set() or len(self.events) < len(self.acked):
            headers = {"Last-Event-ID": cursor} if cursor else {}
            async with self.http.stream("GET", f"/read/{self.consumer}", headers=headers) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    self.reads[reply.status_code, self.code(reply)] += 1
                    await asyncio.sleep(0.02)
                    continue
                self.reads[200, ""] += 1
                async for line in reply.aiter_lines():
                    event = json.loads(line)
                    self.events.setdefault(event["eid"], event["body"])
                    cursor = event["eid"]


async def test_redis_outage_under_load_is_survived(
    private_node: NodeFactory, private_redis: RedisServer
) -> None:
    """The node answers 503 STORE_UNAVAILABLE while Redis is down, stays up, and recovers by
    itself when Redis returns on the same port with its data (append-only file): every write
    acknowledged with 201 is read, once and in order, by a reader that resumes with its cursor."""
    node = await private_node(
        poll_duration_millis=500,
        redis_lease_margin_millis=500,
        redis_poll_millis=100,
        write_timeout_millis=2000,
    )
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        load = Load(http, producer, consumer)
        tasks = [asyncio.create_task(load.writer()), asyncio.create_task(load.reader())]

        async def written(count: int) -> bool:
            return len(load.acked) >= count

        await wait_for(lambda: written(20), "writes before the outage")
        await asyncio.to_thread(private_redis.stop)
        acked_before = len(load.acked)

        async def refused() -> bool:
            unavailable = (503, "STORE_UNAVAILABLE")
            return load.writes[unavailable] >= 5 and load.reads[unavailable] >= 2

        # until the reader's window has ended during the outage and its next reads were refused
        await wait_for(refused, "writes and reads refused during the outage")
        for reply in (
            await http.post("/create"),
            await http.post(f"/write/{producer}/s", json="down"),
            await http.get(f"/read/{consumer}"),
            await http.post("/channelsExists", json={"channels": [consumer]}),
        ):
            assert reply.status_code == 503, reply.text
            assert reply.json()["code"] == "STORE_UNAVAILABLE"
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200

        await asyncio.to_thread(private_redis.start)
        await until_served(lambda: http.post("/create"), 200)  # the node recovers by itself
        await wait_for(lambda: written(acked_before + 20), "writes after the outage")
        await until_served(lambda: http.get("/readyz"), 200)
        fresh = (await until_served(lambda: http.post("/create"), 200)).json()
        write_after = f"/write/{fresh['producerAddress']}/s"
        await until_served(lambda: http.post(write_after, json="after"), 201)
        reply = await until_served(lambda: http.get(f"/read/{fresh['consumerAddress']}"), 200)
        assert set(bodies(lines_of(reply))) == {"after"}

        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD)
        assert (await http.get("/healthz")).status_code == 200

    assert set(load.writes) <= {(201, ""), (503, "STORE_UNAVAILABLE")}, load.writes
    assert set(load.reads) <= {(200, ""), (409, "BUSY"), (503, "STORE_UNAVAILABLE")}, load.reads
    read = list(load.events.values())
    assert read == sorted(read)  # in write order, no duplicate (deduplicated by eid, then checked)
    assert len(set(read)) == len(read)
    assert set(load.acked) <= set(read), "acknowledged writes lost"


async def test_a_hung_redis_is_a_503_not_a_hang(
    private_node: NodeFactory, private_redis: RedisServer
) -> None:
    """A Redis that stops answering (SIGSTOP) without closing its connections: a request gets
    503 STORE_UNAVAILABLE after ``redis_timeout_millis``, and the node serves again by itself
    once Redis answers again."""
    node = await private_node(redis_timeout_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        path = f"/write/{channel['producerAddress']}/s"
        assert (await http.post(path, json="before")).status_code == 201
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            reply = await http.post(path, json="hung")
            assert reply.status_code == 503, reply.text
            assert reply.json()["code"] == "STORE_UNAVAILABLE"
            assert (await http.get("/readyz")).status_code == 503
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        await until_served(lambda: http.post(path, json="after"), 201)
        assert (await http.get("/readyz")).status_code == 200


async def test_recovered_node_has_no_stale_connections(
    private_node: NodeFactory, private_redis: RedisServer
) -> None:
    node = await private_node()
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        path = f"/write/{channel['producerAddress']}/s"
        before = await asyncio.gather(*(http.post(path, json=n) for n in range(30)))
        assert [reply.status_code for reply in before] == [201] * 30  # the pool grows
        await asyncio.to_thread(private_redis.stop)
        await asyncio.to_thread(private_redis.start)
        await until_served(lambda: http.post(path, json="recovered"), 201)
        after = await asyncio.gather(*(http.post(path, json=n) for n in range(30)))
        refused = [reply.json() for reply in after if reply.status_code != 201]
        assert refused == []  # today: several 503 STORE_UNAVAILABLE, one per stale connection


async def test_a_read_cut_by_an_outage_frees_its_channel_when_redis_is_back(
    private_node: NodeFactory, private_redis: RedisServer
) -> None:
    """A read whose window ends while Redis is down cannot release its lease then; the node
    keeps retrying the release, so the channel is free as soon as Redis is back, long before the
    lease (60 s here) would lapse."""
    node = await private_node(
        poll_duration_millis=500,
        redis_poll_millis=200,
        redis_lease_margin_millis=60_000,
        redis_timeout_millis=500,
    )
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        await write(http, producer, 0)
        async with http.stream("GET", f"/read/{consumer}") as reading:
            lines = reading.aiter_lines()
            assert json.loads(await anext(lines))["body"] == 0
            await asyncio.to_thread(private_redis.stop)
            async for _ in lines:  # the window ends during the outage
                pass
        await asyncio.to_thread(private_redis.start)
        reply = await until_served(
            lambda: http.get(f"/read/{consumer}", headers={"Last-Event-ID": "x"}), 200
        )
        assert bodies(lines_of(reply)) == [0]  # the unconfirmed event, replayed


# --- the channel count under failures and races -----------------------------------------------


async def test_count_forgets_channels_whose_keys_lapsed(
    start_node: NodeFactory, redis_client: aioredis.Redis, prefix: str
) -> None:
    settings = {"max_channels": 1, "channel_ttl_millis": 100, "sweep_interval_millis": 20}
    first = await start_node(**settings)
    async with httpx.AsyncClient(base_url=base_url(first), timeout=30) as http:
        consumer = (await create_channel(http))["consumerAddress"]
    await first.aclose(grace=1.0)  # no node is left to sweep
    for suffix in ("m", "p", "w"):  # ... for longer than the keys' safety TTL
        await redis_client.pexpire(channel_key(prefix, consumer, suffix), 1)
    second = await start_node(**settings)

    async def swept() -> bool:
        return bool(await redis_client.zcard(prefix + "expiry") == 0)

    await wait_for(swept, "a sweep over the lapsed channel")
    async with httpx.AsyncClient(base_url=base_url(second), timeout=30) as http:
        assert (await http.post("/channelsExists", json={"channels": [consumer]})).json() == {
            "channels": {consumer: False}
        }
        reply = await http.post("/create")
        assert reply.status_code == 200, reply.text  # today: 503 CHANNEL_LIMIT, forever


async def test_max_channels_holds_under_concurrent_creates(
    start_node: NodeFactory, redis_client: aioredis.Redis, prefix: str
) -> None:
    a = await start_node(max_channels=5)
    b = await start_node(max_channels=5)
    async with (
        httpx.AsyncClient(base_url=base_url(a), timeout=30) as http_a,
        httpx.AsyncClient(base_url=base_url(b), timeout=30) as http_b,
    ):
        replies = await asyncio.gather(
            *((http_a, http_b)[n % 2].post("/create") for n in range(40))
        )
    created = sum(reply.status_code == 200 for reply in replies)
    assert {reply.status_code for reply in replies} == {200, 503}
    assert created == 5, f"{created} channels created with max_channels=5"
    assert int(await redis_client.get(prefix + "count") or 0) == 5
