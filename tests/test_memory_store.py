"""The memory store in virtual time (injected clock): expiry, reader lease, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.events import make_event
from megaphone.errors import Busy, NotFound, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.memory import MemoryStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.writable = True
        self.ended = False

    def deliver(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def end(self) -> None:
        self.ended = True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(metrics=Metrics(), capacity=3, ttl=60.0, clock=clock)


async def new_channel(store: MemoryStore) -> tuple[str, ChannelKey]:
    address, key = new_consumer_address("a")
    await store.create(key, address)
    return address, key


async def test_expires_a_lifetime_after_creation(store: MemoryStore, clock: FakeClock) -> None:
    address, key = await new_channel(store)
    clock.now += 59.9
    assert await store.expire() == []
    clock.now += 0.2
    assert await store.expire() == [address]
    assert not await store.exists(key)
    assert store.metrics.channel_disposed == 1


async def test_lifetime_restarts_when_the_read_ends(store: MemoryStore, clock: FakeClock) -> None:
    address, key = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(key, sink)
    clock.now += 3600  # a reader is attached: never expires
    assert await store.expire() == []
    subscription.close()
    clock.now += 59
    assert await store.expire() == []
    clock.now += 2
    assert await store.expire() == [address]


async def test_sweep_cost_follows_what_expires(store: MemoryStore, clock: FakeClock) -> None:
    keys = [await new_channel(store) for _ in range(1000)]
    clock.now += 30
    late = [await new_channel(store) for _ in range(10)]
    clock.now += 31
    expired = await store.expire()
    assert len(expired) == 1000
    assert len(store._deadlines) == 10  # only the live channels' deadlines remain
    assert [await store.exists(k) for _, k in keys] == [False] * 1000
    assert [await store.exists(k) for _, k in late] == [True] * 10


async def test_one_reader_and_lease_release(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    first = await store.attach(key, Sink())
    with pytest.raises(Busy):
        await store.attach(key, Sink())
    first.close()
    first.close()  # idempotent, and does not detach a later reader
    second_sink = Sink()
    await store.attach(key, second_sink)
    first.close()
    with pytest.raises(Busy):
        await store.attach(key, Sink())


async def test_paused_sink_keeps_events_pending(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(key, sink)
    await store.write(key, make_event("s", 1), 0)
    sink.writable = False
    await store.write(key, make_event("s", 2), 0)
    await store.write(key, make_event("s", 3), 0)
    assert len(sink.lines) == 1
    sink.writable = True
    subscription.resume()
    assert [b'"body":1' in x for x in sink.lines] == [True, False, False]
    assert len(sink.lines) == 3


async def test_full_buffer_write_timeout_and_release(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    for n in range(3):
        await store.write(key, make_event("s", n), 0)
    with pytest.raises(WriteTimeout):
        await store.write(key, make_event("s", 3), 0)
    with pytest.raises(WriteTimeout):
        await store.write(key, make_event("s", 3), 0.01)
    waiting = asyncio.create_task(store.write(key, make_event("s", 4), 5))
    await asyncio.sleep(0)
    sink = Sink()
    await store.attach(key, sink)
    await waiting
    assert len(sink.lines) == 4  # three pending + the released writer


async def test_deleting_fails_waiters_and_ends_reader(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    for n in range(3):
        await store.write(key, make_event("s", n), 0)
    waiting = asyncio.create_task(store.write(key, make_event("s", 9), 5))
    await asyncio.sleep(0)
    assert await store.delete(key)
    with pytest.raises(NotFound):
        await waiting
    assert store.metrics.messages_lost == 4
    assert not await store.delete(key)

    _, key2 = await new_channel(store)
    sink = Sink()
    await store.attach(key2, sink)
    await store.delete(key2)
    assert sink.ended


async def test_cancelled_writer_leaves_the_queue(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    for n in range(3):
        await store.write(key, make_event("s", n), 0)
    waiting = asyncio.create_task(store.write(key, make_event("s", 9), 5))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    sink = Sink()
    await store.attach(key, sink)
    assert len(sink.lines) == 3


async def test_counts_and_listing(store: MemoryStore) -> None:
    for _ in range(5):
        await new_channel(store)
    assert store.count() == 5
    assert store.count("a") == 5
    assert store.count("b") == 0
    assert len(await store.list(0, 50)) == 5
    assert len(await store.list(3, 50)) == 2
    assert len(await store.list(1, 2)) == 2
