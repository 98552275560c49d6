"""The Redis store's own edge cases, below HTTP, against the session's real redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.events import make_event
from megaphone.errors import Busy, StoreUnavailable
from megaphone.metrics import Metrics
from megaphone.store.redis import RedisStore, connection
from megaphone.store.redis.connection import CLIENT_NAME, RespConnectionError
from megaphone.store.redis.keys import Keys
from megaphone.store.redis.url import RedisAddress
from support import RedisServer


class Sink:
    writable = True

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.ended = False
        self.window_ended = False

    def deliver(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def end(self) -> None:
        self.ended = True

    def window_full(self) -> None:
        self.window_ended = True


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A store on the session's Redis."""
    made = make_store(redis_server)
    await made.start()
    yield made
    await made.aclose()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A direct connection (redis-py, a test dependency only), to look at the key layout."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def make_store(redis_server: RedisServer, **options: Any) -> RedisStore:
    return RedisStore(
        url=redis_server.url, metrics=Metrics(), prefix=f"s{uuid.uuid4().hex}:", **options
    )


def meta_of(store: RedisStore, key: Any) -> str:
    return Keys(store.prefix).channel(key).meta


async def reading(store: RedisStore, sink: Sink | None = None) -> tuple[ChannelKey, Sink, Any]:
    """A new channel with a reader attached and started: (its key, the sink, the subscription)."""
    address, key = new_consumer_address("a")
    await store.create(key, address, 100)
    sink = sink if sink is not None else Sink()
    subscription = await store.attach(key, sink, None)
    subscription.start()
    return key, sink, subscription


async def test_a_cancelled_attach_does_not_keep_the_lease(
    store: RedisStore, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves while its read attaches, after the attach script took the lease but
    before its reply came back: no subscription exists to release the lease, the store must."""
    address, key = new_consumer_address("a")
    await store.create(key, address, 100)
    real = store._script

    async def slow_reply(name: str, keys: list[str], args: list[Any]) -> Any:
        result = await real(name, keys, args)
        if name == "attach":
            await asyncio.sleep(0.2)  # the script ran; its reply is still on its way
        return result

    monkeypatch.setattr(store, "_script", slow_reply)
    attaching = asyncio.ensure_future(store.attach(key, Sink(), None))
    await asyncio.sleep(0.05)
    attaching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attaching
    meta = meta_of(store, key)
    for _ in range(100):  # the release runs in the background once the script is done
        if await admin.hget(meta, "reader") is None:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the lease taken by a cancelled attach is still held")
    monkeypatch.undo()
    subscription = await store.attach(key, Sink(), None)  # and the channel can be read again
    released = subscription.close()
    assert released is not None
    await released


async def wait_lines(sink: Sink, count: int) -> None:
    """Until the sink holds ``count`` lines; the bound only turns a hang into a failure."""
    for _ in range(1000):
        if len(sink.lines) >= count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{len(sink.lines)} of {count} events arrived")


async def test_concurrent_calls_share_the_one_connection(redis_server: RedisServer) -> None:
    """200 concurrent writes to 20 channels and 100 concurrent existence checks all succeed on
    the store's one connection (the scripts share pipelines, the plain commands queue in order),
    which is the only connection the store opens for commands."""
    store = make_store(redis_server)
    await store.start()
    try:
        keys = [new_consumer_address("a") for _ in range(20)]
        for address, key in keys:
            await store.create(key, address, 100)
        writes = (store.write(key, make_event("s", n), 1.0) for n in range(10) for _, key in keys)
        checks = (store.exists(key) for _ in range(5) for _, key in keys)
        found = await asyncio.gather(*writes, *checks)
        assert store.metrics.messages_received == 200
        assert found[200:] == [True] * 100
    finally:
        await store.aclose()


async def test_scripts_flushed_from_redis_are_loaded_again(
    store: RedisStore, admin: aioredis.Redis
) -> None:
    """A Redis that lost its scripts (restart, SCRIPT FLUSH) answers NOSCRIPT; the store loads
    them and runs the call again, once: no error reaches the caller, nothing is doubled."""
    address, key = new_consumer_address("a")
    await store.create(key, address, 100)
    await admin.script_flush()
    await asyncio.gather(*(store.write(key, make_event("s", n), 0.0) for n in range(5)))
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    subscription.start()
    await wait_lines(sink, 5)
    await asyncio.sleep(0.05)
    assert [orjson.loads(line)["body"] for line in sink.lines] == [0, 1, 2, 3, 4]
    await _closed(subscription)


async def _armed_reader(
    store: RedisStore, admin: aioredis.Redis, sink: Sink
) -> tuple[Any, ChannelKey, Any]:
    """A channel whose reader waits (its first, empty take armed ``wk``), and a probe
    subscribed to its notifications."""
    key, _, subscription = await reading(store, sink)
    await asyncio.sleep(0.05)  # the first (empty) take armed the notification
    assert await admin.hget(meta_of(store, key), "wk") == b"1"
    probe = admin.pubsub()
    await probe.subscribe(Keys(store.prefix).channel(key).notify)
    await probe.get_message(timeout=1.0)  # the subscribe confirmation
    return subscription, key, probe


async def _published(probe: Any) -> list[bytes]:
    messages = []
    while (message := await probe.get_message(timeout=0.2)) is not None:
        messages.append(message["data"])
    await probe.aclose()
    return messages


async def test_a_waiting_reader_is_handed_each_event_in_its_notification(
    store: RedisStore, admin: aioredis.Redis
) -> None:
    """A write that finds the reader waiting with everything before it publishes the event
    itself, marked as sent: the node delivers it without a take (issue #14's fan-out), in
    order, once."""
    sink = Sink()
    subscription, key, probe = await _armed_reader(store, admin, sink)
    events = [make_event("s", n) for n in range(50)]
    await asyncio.gather(*(store.write(key, event, 0.0) for event in events))
    await wait_lines(sink, 50)
    messages = await _published(probe)
    assert len(messages) == 50
    assert all(
        message.endswith(event.line) for message, event in zip(messages, events, strict=True)
    )
    assert sink.lines == [event.line for event in events]
    meta = await admin.hmget(meta_of(store, key), "np", "ns", "wk")
    assert meta == [b"0", b"50", b"1"]  # sent (in the replay window), nothing pending, armed
    assert store.metrics.messages_read == 50
    assert store.metrics.messages_replayed == 0
    await _closed(subscription)


async def test_one_notification_per_take(redis_server: RedisServer, admin: aioredis.Redis) -> None:
    """Without a replay window nothing is handed over in a notification: writes publish a
    wake-up only while the reader waits, so a burst written before the reader takes again costs
    one notification, not one per event, and every event still arrives."""
    store = make_store(redis_server, replay_size=0)
    await store.start()
    try:
        sink = Sink()
        subscription, key, probe = await _armed_reader(store, admin, sink)
        await asyncio.gather(*(store.write(key, make_event("s", n), 0.0) for n in range(50)))
        await wait_lines(sink, 50)
        messages = await _published(probe)
        assert 1 <= len(messages) < 50
        assert set(messages) == {b""}
        await _closed(subscription)
    finally:
        await store.aclose()


async def test_a_reader_whose_sink_is_full_is_not_handed_events(
    store: RedisStore, admin: aioredis.Redis
) -> None:
    """An event handed over to a reader whose sink cannot take it is left to a take: the reader
    renews its lease instead, which disarms it (writes stop publishing), and once its sink
    drains every event arrives, in order, once."""
    sink = Sink()
    subscription, key, probe = await _armed_reader(store, admin, sink)
    sink.writable = False
    events = [make_event("s", n) for n in range(20)]
    for event in events:
        await store.write(key, event, 0.0)
    await asyncio.sleep(0.1)
    assert sink.lines == []
    assert await admin.hget(meta_of(store, key), "wk") == b"0"
    sink.writable = True
    subscription.resume()  # the sink drained
    await wait_lines(sink, 20)
    await asyncio.sleep(0.05)
    assert sink.lines == [event.line for event in events]
    assert len(await _published(probe)) < 20
    assert store.metrics.messages_read == 20  # first sends, though marked sent by their writes
    assert store.metrics.messages_replayed == 0
    await _closed(subscription)


async def test_an_event_handed_over_that_fills_the_window_ends_the_read(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """As a take that fills the replay window: the read ends (the client reconnects and
    confirms), and what is written next waits for that reader."""
    store = make_store(redis_server, replay_size=3)
    await store.start()
    try:
        sink = Sink()
        subscription, key, probe = await _armed_reader(store, admin, sink)
        for n in range(4):
            await store.write(key, make_event("s", n), 0.0)
        await asyncio.sleep(0.1)
        assert len(sink.lines) == 3
        assert sink.window_ended
        assert await admin.hmget(meta_of(store, key), "np", "ns") == [b"1", b"3"]
        await _published(probe)
        await _closed(subscription)
    finally:
        await store.aclose()


async def test_a_lost_notification_connection_wakes_every_reader(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Events published while the notification connection was down are not lost: once it is
    back, every reader of the node looks again, long before the (here: 60 s) safety tick."""
    store = make_store(redis_server, poll=60.0, lease=120.0)
    await store.start()
    try:
        key, sink, subscription = await reading(store)
        await asyncio.sleep(0.1)
        await store.write(key, make_event("s", "notified"), 0.0)  # only its notification
        await wait_lines(sink, 1)  # can deliver it before the tick
        await asyncio.sleep(0.05)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await store.write(key, make_event("s", "while away"), 0.0)  # its wake-up is lost
        await wait_lines(sink, 2)
        await _closed(subscription)
    finally:
        await store.aclose()


async def test_a_write_before_the_subscription_is_confirmed_wakes_the_reader(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A write that lands after the reader's first take armed the notification but before
    Redis confirmed the reader's SUBSCRIBE is published to nobody: the confirmation makes the
    reader look again, long before the (here: 60 s) safety tick."""
    store = make_store(redis_server, poll=60.0, lease=120.0)
    await store.start()
    subscriber = store.notifications._subscriber
    held: list[str] = []
    real_subscribe = subscriber.subscribe
    subscriber.subscribe = held.append  # type: ignore[method-assign]
    try:
        key, sink, subscription = await reading(store)
        meta = meta_of(store, key)
        for _ in range(1000):  # until the first (empty) take armed the notification
            if await admin.hget(meta, "wk") == b"1":
                break
            await asyncio.sleep(0.01)
        await store.write(key, make_event("s", "early"), 0.0)  # its PUBLISH reaches nobody
        assert held
        assert sink.lines == []
        real_subscribe(held[0])  # now the SUBSCRIBE goes out, and its confirmation comes back
        await wait_lines(sink, 1)
        await _closed(subscription)
    finally:
        subscriber.subscribe = real_subscribe  # type: ignore[method-assign]
        await store.aclose()


async def test_a_reader_that_cannot_take_keeps_its_lease(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A sink whose buffer is full takes nothing, but its lease (300 ms, ticks every 100 ms) is
    renewed all the same: another reader is refused until the first read is closed."""
    store = make_store(redis_server, lease=0.3, poll=0.1)
    await store.start()
    try:
        blocked = Sink()
        blocked.writable = False  # before the attach: the reader never takes
        key, _, subscription = await reading(store, blocked)
        meta = meta_of(store, key)
        first = int(await admin.hget(meta, "lease"))

        async def renewed_twice() -> bool:
            return int(await admin.hget(meta, "lease")) > first + 150

        await wait_until(renewed_twice)
        with pytest.raises(Busy):
            await store.attach(key, Sink(), None)
        await _closed(subscription)
        await _closed(await store.attach(key, Sink(), None))
    finally:
        await store.aclose()


async def wait_until(condition: Any) -> None:
    for _ in range(1000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


class Watcher:
    def notified(self, data: bytes) -> None:
        pass

    def resume(self) -> None:
        pass


async def _closed(subscription: Any) -> None:
    released = subscription.close()
    if released is not None:
        await released


async def test_concurrent_first_subscriptions_share_one_connection(
    redis_server: RedisServer,
) -> None:
    """50 subscriptions made at once by a node whose notification connection is not up yet
    open exactly one. (Each of its own would be a connection nobody reads: its readers would
    wait for the safety tick, as the two-node fan-out benchmark showed.)"""
    store = make_store(redis_server)
    probe = aioredis.Redis.from_url(redis_server.url)
    before = len(await probe.client_list(_type="pubsub"))
    await store.start()
    try:
        names = [f"{store.prefix}n{n}" for n in range(50)]
        for name in names:
            store.notifications.watch(name, Watcher())
        for _ in range(100):  # the lean connection subscribes as soon as it is up
            if len(await probe.client_list(_type="pubsub")) > before:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert len(await probe.client_list(_type="pubsub")) == before + 1
    finally:
        await store.aclose()
        await probe.aclose()


async def test_a_sweep_that_fails_on_some_channels_reports_the_others(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Due channels are expired together; one whose script fails stays indexed and is expired by
    the next sweep, the others are reported now (their webhook must not wait for it)."""
    store = RedisStore(
        url=redis_server.url, metrics=Metrics(), prefix=f"s{uuid.uuid4().hex}:", ttl=0.01
    )
    await store.start()
    try:
        (good, good_key), (bad, bad_key) = new_consumer_address("a"), new_consumer_address("a")
        for address, key in ((good, good_key), (bad, bad_key)):
            await store.create(key, address, 100)
        await asyncio.sleep(0.05)
        real = store._script
        failing = meta_of(store, bad_key)

        async def flaky(name: str, keys: list[str], args: list[Any]) -> Any:
            if name == "expire" and keys[0] == failing:
                raise StoreUnavailable("redis unavailable: test")
            return await real(name, keys, args)

        monkeypatch.setattr(store, "_script", flaky)
        assert await store.expire() == [good]
        monkeypatch.undo()
        assert await store.expire() == [bad]
        assert await store.count() == 0
    finally:
        await store.aclose()


async def test_a_sweep_whose_bookkeeping_fails_still_reports_what_it_deleted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts deleted the channels, the index and count update after them failed: the
    channels are reported (their webhook fires now), and the next sweep, finding their keys
    gone, fixes the index and the counts."""
    store = make_store(redis_server, ttl=0.01)
    await store.start()
    try:
        channels = [new_consumer_address("a") for _ in range(3)]
        for address, key in channels:
            await store.create(key, address, 100)
        await asyncio.sleep(0.05)

        async def unavailable(later: dict[str, int], gone: list[str]) -> None:
            raise StoreUnavailable("redis unavailable: test")

        monkeypatch.setattr(store, "_reindex", unavailable)
        assert sorted(await store.expire()) == sorted(address for address, _ in channels)
        assert await store.count() == 3  # not yet corrected
        monkeypatch.undo()
        assert await store.expire() == []  # nothing left to delete or report twice
        assert await store.count() == 0
        assert await store.count("a") == 0
        assert await store._call("ZCARD", store.keys.expiry) == 0
    finally:
        await store.aclose()


# --- the lean script connection ---------------------------------------------------------------


async def _script_connection(client: aioredis.Redis) -> dict[str, Any]:
    [found] = [c for c in await client.client_list() if c["name"] == CLIENT_NAME]
    return found


# a script that keeps Redis busy (it serves nobody meanwhile) for half a second
BUSY_HALF_A_SECOND = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  t = redis.call('TIME')
  if t[1] * 1000000 + t[2] - start > 500000 then return 1 end
end
"""


async def test_a_dropped_script_connection_fails_its_calls_and_is_replaced(
    redis_server: RedisServer,
) -> None:
    """Redis closing the connection: the next call opens another. The connection breaking with
    calls in flight: those fail with StoreUnavailable (a 503 upstream), nothing hangs."""
    store = RedisStore(url=redis_server.url, metrics=Metrics(), prefix=f"s{uuid.uuid4().hex}:")
    await store.start()
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        address, key = new_consumer_address("a")
        await store.create(key, address, 100)
        await store.write(key, make_event("s", 0), 0.0)
        first = await _script_connection(admin)
        await admin.client_kill_filter(_id=first["id"])
        await asyncio.sleep(0.1)  # the close reaches us
        await store.write(key, make_event("s", 1), 0.0)  # on a new connection
        second = await _script_connection(admin)
        assert second["id"] != first["id"]

        asleep = asyncio.ensure_future(admin.eval(BUSY_HALF_A_SECOND, 0))
        await asyncio.sleep(0.1)  # Redis is busy: what we send now stays unanswered
        in_flight = asyncio.ensure_future(store.write(key, make_event("s", "lost?"), 0.0))
        for _ in range(100):
            protocol = store.client._protocol
            if protocol is not None and protocol.waiting:
                break
            await asyncio.sleep(0.005)
        assert protocol is not None
        assert protocol.transport is not None
        protocol.transport.abort()  # the connection breaks (a reset, a dead peer)
        with pytest.raises(StoreUnavailable):
            await in_flight
        await asyncio.wait_for(asleep, 5)
        await store.write(key, make_event("s", 2), 0.0)
        sink = Sink()
        subscription = await store.attach(key, sink, None)
        subscription.start()
        await wait_lines(sink, 3)
        bodies = [orjson.loads(line)["body"] for line in sink.lines]
        # the write that failed may or may not have run (Redis read it before the reset): it
        # was answered 503, so its client knows to write it again
        assert bodies in ([0, 1, 2], [0, 1, "lost?", 2])
        await _closed(subscription)
    finally:
        await admin.aclose()
        await store.aclose()


async def test_the_script_connection_selects_the_database_of_the_url(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    store = RedisStore(url=url, metrics=Metrics(), prefix=f"s{uuid.uuid4().hex}:")
    await store.start()
    db3 = aioredis.Redis.from_url(url)
    try:
        address, key = new_consumer_address("a")
        await store.create(key, address, 100)
        await store.write(key, make_event("s", 1), 0.0)
        ids = Keys(store.prefix).channel(key)
        assert await db3.xlen(ids.stream) == 1  # the script's XADD went to db 3
        assert (await _script_connection(db3))["db"] == "3"
    finally:
        await db3.aclose()
        await store.aclose()


async def test_the_script_connection_authenticates() -> None:
    secured = RedisServer("--requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{secured.port}/0"
        store = RedisStore(url=url, metrics=Metrics(), prefix="auth:")
        await store.start()
        try:
            address, key = new_consumer_address("a")
            await store.create(key, address, 100)
            await store.write(key, make_event("s", 1), 0.0)
        finally:
            await store.aclose()
        wrong = RedisStore(
            url=f"redis://:nope@127.0.0.1:{secured.port}/0", metrics=Metrics(), prefix="auth:"
        )
        try:
            with pytest.raises(StoreUnavailable):
                await wrong._script("write", ["x"], [])
        finally:
            await wrong.aclose()
    finally:
        secured.stop()


class SilentRedis:
    """A TCP server that accepts and never answers: a connection attempt hangs in its setup
    (AUTH / SELECT / CLIENT SETNAME), the moment a shutdown may cancel it."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()  # the first setup command arrived
        self.closed_by_peer = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(4096):
                self.asked.set()  # requests are taken, never answered
        except ConnectionError:
            pass  # a reset: closed too
        self.closed_by_peer.set()  # the client closed its side
        writer.close()


async def test_a_connect_cancelled_during_its_setup_closes_the_connection() -> None:
    """A subscriber still connecting when the store closes must not leave its socket open:
    an open transport makes uvloop's ``loop.close()`` wait for it forever."""
    async with SilentRedis() as silent:
        store = RedisStore(url=silent.url, metrics=Metrics(), prefix="silent:")
        await store.start()
        async with asyncio.timeout(5):
            await silent.asked.wait()  # its setup commands are out, unanswered
        await store.aclose()
        async with asyncio.timeout(5):
            await silent.closed_by_peer.wait()


async def test_a_connect_that_times_out_in_its_setup_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timeout is an early end too: a ``RespConnectionError``, and the socket closed."""
    monkeypatch.setattr(connection, "CONNECT_TIMEOUT", 0.2)
    async with SilentRedis() as silent:
        address = RedisAddress.parse(silent.url)
        with pytest.raises(RespConnectionError, match="in time"):
            await connection.connect(address, connection.RespProtocol, CLIENT_NAME)
        assert silent.asked.is_set()
        async with asyncio.timeout(5):
            await silent.closed_by_peer.wait()


async def test_a_start_that_fails_closes_the_store_s_connections(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A node whose port is taken fails its start after the store connected: the store's
    connections are closed all the same (a half-started node leaks nothing)."""
    import socket

    from conftest import make_settings
    from megaphone.server import MegaphoneServer

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    prefix = f"f{uuid.uuid4().hex}:"
    names = {CLIENT_NAME}

    async def ours() -> int:
        return sum(1 for c in await admin.client_list() if c["name"] in names)

    before = await ours()
    node = MegaphoneServer(
        make_settings(
            address=f"127.0.0.1:{port}",
            store="redis",
            redis_url=redis_server.url,
            redis_prefix=prefix,
        )
    )
    try:
        with pytest.raises(OSError, match="in use"):
            await node.start()
        for _ in range(200):  # the server side notices the closes a moment later
            if await ours() <= before:
                break
            await asyncio.sleep(0.01)
        assert await ours() <= before
        with pytest.raises(RuntimeError):
            await node.start()  # closed: it does not start again
    finally:
        taken.close()


async def test_a_writer_cancelled_during_its_call_leaves_the_queue(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A waiting writer cancelled while its script call is in flight (the call that queues its
    ticket, or a retry) still takes its ticket out once the call is done: the writers behind it
    do not wait until it lapses (here 30 s)."""
    store = make_store(redis_server, capacity=1)
    await store.start()
    try:
        address, key = new_consumer_address("a")
        await store.create(key, address, 100)
        await store.write(key, make_event("s", 0), 0.0)  # full
        waiting = asyncio.ensure_future(store.write(key, make_event("s", "cancelled"), 30.0))
        await asyncio.sleep(0)  # its first call (which queues the ticket) is on its way
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        queue = Keys(store.prefix).channel(key).waiting
        for _ in range(100):
            if await admin.llen(queue) == 0:
                break
            await asyncio.sleep(0.01)
        assert await admin.llen(queue) == 0
    finally:
        await store.aclose()


async def test_events_handed_over_while_takes_run_arrive_once_in_order(
    redis_server: RedisServer,
) -> None:
    """Pushed events racing the reader's takes (a tick every 5 ms makes it take all the time):
    each event arrives once, in write order, and counts once as read."""
    store = make_store(redis_server, poll=0.005, lease=1.0)
    await store.start()
    try:
        key, sink, subscription = await reading(store)
        await asyncio.sleep(0.05)
        written: list[bytes] = []

        async def writer(n: int) -> None:
            for i in range(60):
                event = make_event("s", [n, i])
                await store.write(key, event, 5.0)
                written.append(event.line)  # (acknowledged in order: one channel, one queue)
                await asyncio.sleep(0.001 * (i % 3))

        await asyncio.gather(*(writer(n) for n in range(5)))
        await wait_lines(sink, 300)
        await asyncio.sleep(0.05)
        assert len(sink.lines) == 300
        assert sorted(sink.lines) == sorted(written)
        for n in range(5):  # each writer's events in its order
            mine = [line for line in sink.lines if b'"body":[%d,' % n in line]
            assert mine == [line for line in written if b'"body":[%d,' % n in line]
        assert store.metrics.messages_read == 300
        assert store.metrics.messages_replayed == 0
        await _closed(subscription)
    finally:
        await store.aclose()
