"""What only the memory store does, in virtual time: its node budget, sweep cost, GC footprint.

The channel rules both stores share are tested once, on both, in test_store_contract.py."""

from __future__ import annotations

import asyncio
import gc

import orjson
import pytest

from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.events import EVENT_OVERHEAD, make_event
from megaphone.errors import NotFound, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import Subscription
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
        self.window_ended = False

    def deliver(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def end(self) -> None:
        self.ended = True

    def window_full(self) -> None:
        self.window_ended = True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(metrics=Metrics(), capacity=3, ttl=60.0, clock=clock)


async def open_read(
    store: MemoryStore, key: ChannelKey, sink: Sink, after: str | None = None
) -> Subscription:
    subscription = await store.attach(key, sink, after)
    subscription.start()
    return subscription


async def new_channel(store: MemoryStore) -> tuple[str, ChannelKey]:
    address, key = new_consumer_address("a")
    await store.create(key, address, 1_000_000)
    return address, key


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


async def test_counts_and_listing(store: MemoryStore) -> None:
    for _ in range(5):
        await new_channel(store)
    assert await store.count() == 5
    assert await store.count("a") == 5
    assert await store.count("b") == 0
    assert len(await store.list(0, 50)) == 5
    assert len(await store.list(3, 50)) == 2
    assert len(await store.list(1, 2)) == 2


def eids(sink: Sink) -> list[str]:
    return [orjson.loads(line)["eid"] for line in sink.lines]


async def test_node_budget_counts_waiting_writes_and_refuses_past_it(clock: FakeClock) -> None:
    size = len(make_event("s", 0).line) + EVENT_OVERHEAD
    store = MemoryStore(metrics=Metrics(), capacity=2, budget_bytes=3 * size, clock=clock)
    _, a = await new_channel(store)
    _, b = await new_channel(store)
    for n in range(2):
        await store.write(a, make_event("s", n), 0)
    # a full channel: the write waits, and its event counts while it waits
    waiting = asyncio.create_task(store.write(a, make_event("s", 2), 5))
    await asyncio.sleep(0)
    assert store.budget.used == 3 * size
    # the node's budget is full: refused at once, whatever the channel
    with pytest.raises(WriteTimeout, match="budget"):
        await store.write(b, make_event("s", 9), 5)
    # a reader takes a's events: the waiting write gets in (its bytes were already counted)
    sink = Sink()
    subscription = await open_read(store, a, sink)
    await waiting
    assert len(sink.lines) == 3
    assert store.budget.used == 3 * size  # unconfirmed, still held
    subscription.close()
    await open_read(store, a, Sink(), after=eids(sink)[-1])  # confirmed: released
    assert store.budget.used == 0
    await store.write(b, make_event("s", 9), 0)


async def test_a_waiting_write_gives_its_bytes_back_when_it_ends(clock: FakeClock) -> None:
    store = MemoryStore(metrics=Metrics(), capacity=1, clock=clock)
    _, key = await new_channel(store)
    await store.write(key, make_event("s", 0), 0)
    held = store.budget.used
    with pytest.raises(WriteTimeout):
        await store.write(key, make_event("s", 1), 0.01)  # timed out
    cancelled = asyncio.create_task(store.write(key, make_event("s", 2), 5))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert store.budget.used == held
    deleted = asyncio.create_task(store.write(key, make_event("s", 3), 5))
    await asyncio.sleep(0)
    assert await store.delete(key)
    with pytest.raises(NotFound):
        await deleted
    assert store.budget.used == 0


async def test_a_mass_expiry_lets_the_loop_run(store: MemoryStore, clock: FakeClock) -> None:
    for _ in range(5000):
        await new_channel(store)
    clock.now += 61
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    assert len(await store.expire()) == 5000
    counter.cancel()
    assert turns - before >= 2  # it yielded between batches


async def test_resume_off_keeps_nothing(clock: FakeClock) -> None:
    store = MemoryStore(metrics=Metrics(), capacity=10, replay_size=0, clock=clock)
    _, key = await new_channel(store)
    sink = Sink()
    await open_read(store, key, sink)
    for n in range(20):
        await store.write(key, make_event("s", n), 0)
    assert len(sink.lines) == 20
    assert not sink.window_ended
    assert store.budget.used == 0


async def test_an_idle_channel_is_one_object_for_the_gc(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    channel = store._channels[key]
    gc.collect()  # tuples of untracked values are untracked by a collection (nested: twice)
    gc.collect()
    tracked = [
        getattr(channel, name)
        for name in channel.__slots__
        if gc.is_tracked(getattr(channel, name)) and name != "store"
    ]
    assert tracked == []
    assert not any(gc.is_tracked(entry) for entry in store._deadlines)
    sink = Sink()
    subscription = await open_read(store, key, sink)
    await store.write(key, make_event("s", 1), 0)
    subscription.close()
    await open_read(store, key, Sink(), after=eids(sink)[-1])
    assert channel.pending is None
    assert channel.sent is None
    assert channel.waiters is None
