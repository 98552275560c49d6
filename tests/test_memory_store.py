"""The memory store in virtual time (injected clock): expiry, reader lease, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.events import make_event
from megaphone.errors import Busy, NotFound, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import ResumeStatus, Subscription
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
    subscription = await open_read(store, key, sink)
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
    first = await open_read(store, key, Sink())
    with pytest.raises(Busy):
        await open_read(store, key, Sink())
    first.close()
    first.close()  # idempotent, and does not detach a later reader
    second_sink = Sink()
    await open_read(store, key, second_sink)
    first.close()
    with pytest.raises(Busy):
        await open_read(store, key, Sink())


async def test_paused_sink_keeps_events_pending(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await open_read(store, key, sink)
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
    await open_read(store, key, sink)
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
    await open_read(store, key2, sink)
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
    await open_read(store, key, sink)
    assert len(sink.lines) == 3


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
    import orjson

    return [orjson.loads(line)["eid"] for line in sink.lines]


async def test_resume_replays_after_the_cursor_then_pending(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    first = Sink()
    subscription = await open_read(store, key, first)
    assert subscription.status is ResumeStatus.NONE
    for n in range(3):
        await store.write(key, make_event("s", n), 0)
    subscription.close()  # the connection died; the client only saw the first event
    await store.write(key, make_event("s", 3), 0)
    sent = eids(first)
    second = Sink()
    subscription = await open_read(store, key, second, after=sent[0])
    assert subscription.status is ResumeStatus.RESUMED
    assert eids(second)[:2] == sent[1:]  # replayed, in order
    assert len(second.lines) == 3  # then the pending one
    assert store.metrics.messages_replayed == 2
    subscription.close()
    # the cursor confirmed event 0 for good: naming it again replays 1..3 only
    third = Sink()
    subscription = await open_read(store, key, third, after=sent[0])
    assert subscription.status is ResumeStatus.RESUMED
    assert eids(third) == eids(second)


async def test_replay_window_is_separate_from_the_buffer(store: MemoryStore) -> None:
    _, key = await new_channel(store)  # capacity 3
    sink = Sink()
    subscription = await open_read(store, key, sink)
    for n in range(10):  # ten sent events: the window never blocks writers
        await store.write(key, make_event("s", n), 0)
    subscription.close()
    for n in range(3):  # and the pending buffer still has its full room
        await store.write(key, make_event("s", 10 + n), 0)


async def test_unknown_cursor_is_flagged_and_window_sent(clock: FakeClock) -> None:
    store = MemoryStore(metrics=Metrics(), capacity=10, replay_size=2, clock=clock)
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await open_read(store, key, sink)
    for n in range(4):
        await store.write(key, make_event("s", n), 0)
    subscription.close()
    oldest = eids(sink)[0]  # fell out of the two-event window
    again = Sink()
    subscription = await open_read(store, key, again, after=oldest)
    assert subscription.status is ResumeStatus.UNKNOWN
    assert eids(again) == eids(sink)[2:]
    subscription.close()
    foreign = Sink()
    subscription = await open_read(store, key, foreign, after="not-an-eid-of-this-channel")
    assert subscription.status is ResumeStatus.UNKNOWN


async def test_no_cursor_means_no_replay(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await open_read(store, key, sink)
    await store.write(key, make_event("s", 1), 0)
    subscription.close()
    again = Sink()
    await open_read(store, key, again)
    assert again.lines == []


async def test_nothing_is_delivered_before_start(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    await store.write(key, make_event("s", 1), 0)
    assert sink.lines == []
    subscription.start()
    assert len(sink.lines) == 1
