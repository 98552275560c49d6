"""The memory store in virtual time (injected clock): expiry, reader lease, backpressure."""

from __future__ import annotations

import asyncio
import gc

import orjson
import pytest

from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.events import EVENT_OVERHEAD, make_event
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


async def test_a_read_delivers_one_window_then_ends(clock: FakeClock) -> None:
    store = MemoryStore(metrics=Metrics(), capacity=10, replay_size=2, clock=clock)
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await open_read(store, key, sink)
    for n in range(4):
        await store.write(key, make_event("s", n), 0)
    # two unconfirmed events fill the window: the read must end, the rest stays pending
    assert len(sink.lines) == 2
    assert sink.window_ended
    subscription.close()
    # the connection broke after the first event: everything after it is still there
    again = Sink()
    subscription = await open_read(store, key, again, after=eids(sink)[0])
    assert subscription.status is ResumeStatus.RESUMED
    assert eids(again) == [*eids(sink)[1:], *eids(again)[1:]]
    assert [orjson.loads(line)["body"] for line in again.lines] == [1, 2]
    assert again.window_ended  # event 1 (replayed) and 2 fill the window again
    subscription.close()
    last = Sink()
    subscription = await open_read(store, key, last, after=eids(again)[-1])
    assert [orjson.loads(line)["body"] for line in last.lines] == [3]
    assert not last.window_ended


async def test_the_window_is_bounded_by_bytes_too(clock: FakeClock) -> None:
    size = len(make_event("s", "x" * 100).line) + EVENT_OVERHEAD
    store = MemoryStore(
        metrics=Metrics(), capacity=10, replay_size=100, replay_bytes=3 * size, clock=clock
    )
    _, key = await new_channel(store)
    sink = Sink()
    await open_read(store, key, sink)
    for _ in range(5):
        await store.write(key, make_event("s", "x" * 100), 0)
    assert len(sink.lines) == 3
    assert sink.window_ended


async def test_unknown_cursor_is_flagged_and_window_sent(store: MemoryStore) -> None:
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await open_read(store, key, sink)
    for n in range(2):
        await store.write(key, make_event("s", n), 0)
    subscription.close()
    foreign = Sink()
    subscription = await open_read(store, key, foreign, after="not-an-eid-of-this-channel")
    assert subscription.status is ResumeStatus.UNKNOWN
    assert eids(foreign) == eids(sink)  # the whole unconfirmed window
    subscription.close()
    plain = Sink()
    subscription = await open_read(store, key, plain)  # no cursor: confirms the window
    subscription.close()
    stale = Sink()
    subscription = await open_read(store, key, stale, after=eids(sink)[0])
    assert subscription.status is ResumeStatus.UNKNOWN
    assert stale.lines == []


async def test_channel_buffer_is_bounded_by_bytes(clock: FakeClock) -> None:
    size = len(make_event("s", "x" * 1000).line) + EVENT_OVERHEAD
    store = MemoryStore(metrics=Metrics(), capacity=100, capacity_bytes=2 * size, clock=clock)
    _, key = await new_channel(store)
    await store.write(key, make_event("s", "x" * 1000), 0)
    await store.write(key, make_event("s", "x" * 1000), 0)
    with pytest.raises(WriteTimeout, match="bytes"):
        await store.write(key, make_event("s", "x" * 1000), 0)
    # one event always fits an empty buffer, whatever its size
    _, other = await new_channel(store)
    await store.write(other, make_event("s", "x" * 10_000), 0)


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
