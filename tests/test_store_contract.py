"""The channel rules, below HTTP, on every store: one fixture parametrised over the memory store
and the Redis store (a real redis-server), as litestar's ``channels`` backends are tested. The
Redis store's rules are Lua scripts, the memory store's are Python: these tests are where they are
proven equal (buffer, queued writers, lease, cursors, replay window, expiry, deletion).

Time: both stores take their clock as a parameter; expiry runs on a virtual one here. Write
timeouts are real (short) waits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.events import EVENT_OVERHEAD, make_event
from megaphone.errors import Busy, NotFound, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import ChannelStore, ResumeStatus, Subscription
from megaphone.store.memory import MemoryStore
from support import RedisServer

HANG_GUARD = 10.0  # seconds: only turns a hang into a failure


class Clock:
    """A virtual clock (seconds), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sink:
    def __init__(self, writable: bool = True) -> None:
        self.writable = writable
        self.lines: list[bytes] = []
        self.ended = False
        self.window_ended = False

    def deliver(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def end(self) -> None:
        self.ended = True

    def window_full(self) -> None:
        self.window_ended = True

    @property
    def bodies(self) -> list[Any]:
        return [orjson.loads(line)["body"] for line in self.lines]

    @property
    def eids(self) -> list[str]:
        return [orjson.loads(line)["eid"] for line in self.lines]


StoreFactory = Callable[..., Awaitable[ChannelStore]]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[StoreFactory]:
    """``await make_store(capacity=..., ...)``: a started store of the parametrised kind."""
    made: list[ChannelStore] = []

    async def make(**limits: Any) -> ChannelStore:
        options: dict[str, Any] = {"metrics": Metrics(), "ttl": 60.0, "clock": clock, **limits}
        store: ChannelStore
        if request.param == "memory":
            store = MemoryStore(**options)
        else:
            from megaphone.store.redis import RedisStore

            redis: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore(url=redis.url, prefix=f"c{uuid.uuid4().hex}:", **options)
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def new_channel(store: ChannelStore) -> tuple[str, ChannelKey]:
    address, key = new_consumer_address("agent")
    await store.create(key, address, 1_000)
    return address, key


async def write(store: ChannelStore, key: ChannelKey, body: Any, wait: float = 0.0) -> str:
    event = make_event("s", body)
    await store.write(key, event, wait)
    return event.eid


async def read(store: ChannelStore, key: ChannelKey, count: int, after: str | None = None) -> Sink:
    """Attach, start, wait for ``count`` events, close (the lease released)."""
    sink = Sink()
    subscription = await store.attach(key, sink, after)
    subscription.start()
    await until(lambda: len(sink.lines) >= count or sink.window_ended, f"{count} events")
    await close(subscription)
    return sink


async def close(subscription: Subscription) -> None:
    released = subscription.close()
    if released is not None:
        await released


# --- the buffer and queued writers ------------------------------------------------------------


async def test_a_full_buffer_refuses_a_write_that_cannot_wait(make_store: StoreFactory) -> None:
    store = await make_store(capacity=3)
    _, key = await new_channel(store)
    for n in range(3):
        await write(store, key, n)
    with pytest.raises(WriteTimeout):
        await write(store, key, 3)
    assert (await read(store, key, 3)).bodies == [0, 1, 2]
    await write(store, key, 3)  # room again once read


async def test_the_buffer_is_bounded_by_bytes_too(make_store: StoreFactory) -> None:
    """One event always fits an empty buffer; past the byte bound the next write waits."""
    store = await make_store(capacity=100, capacity_bytes=500)
    _, key = await new_channel(store)
    await write(store, key, "x" * 1_000)  # alone: fits
    with pytest.raises(WriteTimeout):
        await write(store, key, "y")
    assert (await read(store, key, 1)).bodies == ["x" * 1_000]
    await write(store, key, "y")


async def test_queued_writers_are_admitted_in_arrival_order(make_store: StoreFactory) -> None:
    store = await make_store(capacity=1)
    _, key = await new_channel(store)
    await write(store, key, 0)
    waiting = []
    for n in range(1, 4):
        waiting.append(asyncio.ensure_future(write(store, key, n, wait=HANG_GUARD)))
        await asyncio.sleep(0.02)  # each queues before the next arrives
    assert not any(task.done() for task in waiting)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    subscription.start()
    await until(lambda: len(sink.lines) == 4, "the queued writes")
    await asyncio.gather(*waiting)
    assert sink.bodies == [0, 1, 2, 3]
    await close(subscription)


async def test_a_queued_write_times_out_and_is_not_written(make_store: StoreFactory) -> None:
    store = await make_store(capacity=1)
    _, key = await new_channel(store)
    await write(store, key, 0)
    with pytest.raises(WriteTimeout):
        await write(store, key, "late", wait=0.1)
    assert (await read(store, key, 1)).bodies == [0]
    await write(store, key, 1)
    assert (await read(store, key, 1)).bodies == [1]


async def test_a_cancelled_writer_leaves_the_queue(make_store: StoreFactory) -> None:
    store = await make_store(capacity=1)
    _, key = await new_channel(store)
    await write(store, key, 0)
    waiting = asyncio.ensure_future(write(store, key, "cancelled", wait=HANG_GUARD))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    after = asyncio.ensure_future(write(store, key, "after", wait=HANG_GUARD))
    await asyncio.sleep(0.02)
    assert (await read(store, key, 2)).bodies == [0, "after"]  # not blocked behind it
    await after


# --- the lease --------------------------------------------------------------------------------


async def test_one_reader_at_a_time(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    first = await store.attach(key, Sink(), None)
    with pytest.raises(Busy):
        await store.attach(key, Sink(), None)
    await close(first)
    await close(first)  # closing twice is harmless...
    second = await store.attach(key, Sink(), None)
    await close(first)  # ...and does not release a later reader's lease
    with pytest.raises(Busy):
        await store.attach(key, Sink(), None)
    await close(second)


async def test_unknown_channels_are_not_found(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = new_consumer_address("agent")
    assert not await store.exists(key)
    with pytest.raises(NotFound):
        await write(store, key, 0)
    with pytest.raises(NotFound):
        await store.attach(key, Sink(), None)


async def test_a_live_reader_gets_new_events_in_order(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    subscription.start()
    for n in range(5):
        await write(store, key, n)
    await until(lambda: len(sink.lines) == 5, "live events")
    assert sink.bodies == [0, 1, 2, 3, 4]
    await close(subscription)


async def test_a_sink_that_cannot_take_keeps_events_pending(make_store: StoreFactory) -> None:
    store = await make_store(capacity=2)
    _, key = await new_channel(store)
    sink = Sink(writable=False)
    subscription = await store.attach(key, sink, None)
    subscription.start()
    await write(store, key, 0)
    await write(store, key, 1)
    with pytest.raises(WriteTimeout):
        await write(store, key, 2)  # they count against the buffer
    assert sink.lines == []
    sink.writable = True
    subscription.resume()
    await until(lambda: len(sink.lines) == 2, "the pending events")
    assert sink.bodies == [0, 1]
    await close(subscription)


async def test_nothing_is_delivered_before_start(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    await write(store, key, 1)
    await asyncio.sleep(0.05)
    assert sink.lines == []
    subscription.start()
    await until(lambda: len(sink.lines) == 1, "the event after start")
    await close(subscription)


# --- cursors and the replay window ------------------------------------------------------------


async def test_cursors_confirm_and_replay(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    for n in range(3):
        await write(store, key, n)
    first = await read(store, key, 3)
    eids = first.eids
    # resumed after the first: the two later ones are replayed
    sink = Sink()
    subscription = await store.attach(key, sink, eids[0])
    assert subscription.status is ResumeStatus.RESUMED
    subscription.start()
    await until(lambda: len(sink.lines) == 2, "the replay")
    assert sink.eids == eids[1:]
    await close(subscription)
    # a cursor the window does not hold: the whole window, flagged
    sink = Sink()
    subscription = await store.attach(key, sink, "not-an-eid")
    assert subscription.status is ResumeStatus.UNKNOWN
    subscription.start()
    await until(lambda: len(sink.lines) == 2, "the window")
    assert sink.eids == eids[1:]
    await close(subscription)
    # the newest confirmed eid: resumed, the window replayed
    sink = Sink()
    subscription = await store.attach(key, sink, eids[0])
    assert subscription.status is ResumeStatus.RESUMED
    await close(subscription)
    # no cursor: nothing replayed, and the window is confirmed (a later cursor finds nothing)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    assert subscription.status is ResumeStatus.NONE
    subscription.start()
    await write(store, key, "new")
    await until(lambda: len(sink.lines) == 1, "the new event")
    assert sink.bodies == ["new"]
    await close(subscription)
    resumed = await store.attach(key, Sink(), eids[2])
    assert resumed.status is ResumeStatus.UNKNOWN
    await close(resumed)


async def test_a_resumed_read_replays_then_sends_pending(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    first = Sink()
    subscription = await store.attach(key, first, None)
    subscription.start()
    for n in range(3):
        await write(store, key, n)
    await until(lambda: len(first.lines) == 3, "three events")
    await close(subscription)  # the connection died; the client saw only the first event
    await write(store, key, 3)
    resumed = await read(store, key, 3, after=first.eids[0])
    assert resumed.eids[:2] == first.eids[1:]  # replayed, in order, then the pending one
    assert resumed.bodies == [1, 2, 3]
    # the cursor confirmed event 0 for good: naming it again replays 1..3 only
    again = await read(store, key, 3, after=first.eids[0])
    assert again.eids == resumed.eids


async def test_a_full_replay_window_ends_the_read(make_store: StoreFactory) -> None:
    """A read delivers while the unconfirmed events fit the window, then asks its sink to end;
    the next read's cursor confirms them and delivery goes on. Nothing is skipped."""
    store = await make_store(replay_size=2)
    _, key = await new_channel(store)
    for n in range(5):
        await write(store, key, n)

    async def one_read(cursor: str | None, expected: int, ends: bool) -> Sink:
        sink = Sink()
        subscription = await store.attach(key, sink, cursor)
        subscription.start()
        await until(lambda: len(sink.lines) >= expected, "a window's events")
        if ends:
            await until(lambda: sink.window_ended, "the window to end the read")
        await close(subscription)
        assert len(sink.lines) == expected
        return sink

    got: list[Any] = []
    cursor: str | None = None
    for expected, ends in ((2, True), (2, True), (1, False)):
        sink = await one_read(cursor, expected, ends)
        got.extend(sink.bodies)
        cursor = sink.eids[-1]
    assert got == [0, 1, 2, 3, 4]


async def test_the_window_does_not_count_against_the_buffer(make_store: StoreFactory) -> None:
    store = await make_store(capacity=2, replay_size=10)
    _, key = await new_channel(store)
    await write(store, key, 0)
    await write(store, key, 1)
    await read(store, key, 2)  # sent, unconfirmed: in the window
    await write(store, key, 2)
    await write(store, key, 3)  # the buffer holds only these two


async def test_the_window_is_bounded_by_bytes_too(make_store: StoreFactory) -> None:
    size = len(make_event("s", "x" * 100).line) + EVENT_OVERHEAD
    store = await make_store(capacity=10, replay_size=100, replay_bytes=3 * size)
    _, key = await new_channel(store)
    for _ in range(5):
        await write(store, key, "x" * 100)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    subscription.start()
    await until(lambda: sink.window_ended, "the window to end the read")
    assert len(sink.lines) == 3
    await close(subscription)


async def test_resume_off_keeps_nothing(make_store: StoreFactory) -> None:
    """With a window of 0 nothing is kept for replay and reads never end early."""
    store = await make_store(capacity=10, replay_size=0)
    _, key = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(key, sink, None)
    subscription.start()
    for n in range(20):
        await write(store, key, n, wait=HANG_GUARD)
    await until(lambda: len(sink.lines) == 20, "every event")
    assert not sink.window_ended
    await close(subscription)
    again = await store.attach(key, Sink(), sink.eids[5])
    assert again.status is ResumeStatus.UNKNOWN
    await close(again)


# --- expiry and deletion ----------------------------------------------------------------------


async def test_channels_expire_after_their_lifetime(make_store: StoreFactory, clock: Clock) -> None:
    store = await make_store(ttl=60.0)
    address, key = await new_channel(store)
    clock.advance(59)
    assert await store.expire() == []
    clock.advance(2)
    assert await store.expire() == [address]
    assert not await store.exists(key)
    assert await store.expire() == []  # reported once


async def test_the_list_pages_in_creation_order_whatever_expiry_does(
    make_store: StoreFactory, clock: Clock
) -> None:
    """/channel/list pages through channels in a stable order: the order they were created in,
    not the order of their expiry checks (which a read or a sweep moves)."""
    store = await make_store(ttl=60.0)
    made = []
    for _ in range(4):
        made.append(await new_channel(store))
        clock.advance(1)
    (first, first_key), (second, _), (third, _), (fourth, _) = made
    reading = await store.attach(first_key, Sink(), None)
    clock.advance(57.5)  # the first two are due: the first has a reader, the second expires
    assert await store.expire() == [second]
    listed = [info.address for info in await store.list(0, 10)]
    assert listed == [first, third, fourth]
    pages = [info.address for skip in range(3) for info in await store.list(skip, 1)]
    assert pages == listed
    assert await store.list(3, 10) == []
    await close(reading)


async def test_a_read_restarts_the_lifetime_and_a_reader_holds_it(
    make_store: StoreFactory, clock: Clock
) -> None:
    store = await make_store(ttl=60.0)
    address, key = await new_channel(store)
    clock.advance(50)
    reading = await store.attach(key, Sink(), None)
    clock.advance(20)  # past the creation's lifetime: a channel with a reader never expires
    assert await store.expire() == []
    await close(reading)  # its lifetime runs again from the end of the read
    clock.advance(59)
    assert await store.expire() == []
    clock.advance(2)
    assert await store.expire() == [address]


async def test_delete_drops_pending_events(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    await write(store, key, 0)
    assert await store.delete(key)
    assert not await store.delete(key)
    assert not await store.exists(key)
    with pytest.raises(NotFound):
        await write(store, key, 1)


async def test_delete_fails_queued_writers_and_ends_the_read(make_store: StoreFactory) -> None:
    store = await make_store(capacity=1)
    _, key = await new_channel(store)
    await write(store, key, 0)
    waiting = asyncio.ensure_future(write(store, key, 1, wait=HANG_GUARD))
    await asyncio.sleep(0.02)
    assert await store.delete(key)
    with pytest.raises(NotFound):
        await waiting
    _, other = await new_channel(store)
    sink = Sink()
    subscription = await store.attach(other, sink, None)
    subscription.start()
    await asyncio.sleep(0.02)
    assert await store.delete(other)
    await until(lambda: sink.ended, "the read to end")
    await close(subscription)


async def test_counts(make_store: StoreFactory) -> None:
    store = await make_store()
    await new_channel(store)
    _, key = await new_channel(store)
    assert await store.count() == 2
    assert await store.count("agent") == 2
    assert await store.delete(key)
    assert await store.count() == 1


# --- idempotent writes ------------------------------------------------------------------------


async def test_a_retried_write_is_applied_once(make_store: StoreFactory) -> None:
    store = await make_store()
    _, key = await new_channel(store)
    await store.write(key, make_event("s", "first"), 0.0, "k1")
    await store.write(key, make_event("s", "retry"), 0.0, "k1")  # succeeds, writes nothing
    await store.write(key, make_event("s", "other"), 0.0, "k2")
    await store.write(key, make_event("s", "plain"), 0.0)
    assert (await read(store, key, 3)).bodies == ["first", "other", "plain"]
    await store.write(key, make_event("s", "again"), 0.0, "k1")  # still remembered
    await store.write(key, make_event("s", "next"), 0.0)
    assert (await read(store, key, 1)).bodies == ["next"]


async def test_idempotency_keys_are_per_channel(make_store: StoreFactory) -> None:
    store = await make_store()
    _, first = await new_channel(store)
    _, second = await new_channel(store)
    await store.write(first, make_event("s", 1), 0.0, "k")
    await store.write(second, make_event("s", 2), 0.0, "k")
    assert (await read(store, second, 1)).bodies == [2]


async def test_idempotency_keys_are_kept_for_a_bounded_time_and_number(
    make_store: StoreFactory, clock: Clock
) -> None:
    store = await make_store(idempotency_ttl=30.0, idempotency_max=2)
    _, key = await new_channel(store)
    for name in ("a", "b", "c"):  # "a" is dropped for "c": at most two are kept
        await store.write(key, make_event("s", name), 0.0, name)
    await store.write(key, make_event("s", "a again"), 0.0, "a")
    await store.write(key, make_event("s", "c again"), 0.0, "c")
    clock.advance(31)  # past the retention: every key forgotten
    await store.write(key, make_event("s", "c late"), 0.0, "c")
    assert (await read(store, key, 5)).bodies == ["a", "b", "c", "a again", "c late"]


async def test_a_write_that_was_not_applied_is_not_remembered(make_store: StoreFactory) -> None:
    store = await make_store(capacity=1)
    _, key = await new_channel(store)
    await write(store, key, 0)
    with pytest.raises(WriteTimeout):
        await store.write(key, make_event("s", "refused"), 0.0, "k")
    assert (await read(store, key, 1)).bodies == [0]
    await store.write(key, make_event("s", "retried"), 0.0, "k")
    await store.write(key, make_event("s", "retried twice"), 0.0, "k")
    assert (await read(store, key, 1)).bodies == ["retried"]


async def test_a_queued_write_remembers_its_key_once_applied(make_store: StoreFactory) -> None:
    store = await make_store(capacity=1)
    _, key = await new_channel(store)
    await write(store, key, 0)
    queued = asyncio.ensure_future(store.write(key, make_event("s", "queued"), HANG_GUARD, "k"))
    await asyncio.sleep(0.02)
    assert (await read(store, key, 2)).bodies == [0, "queued"]  # admitted as room appears
    await queued
    await store.write(key, make_event("s", "duplicate"), 0.0, "k")
    await write(store, key, "next")
    assert (await read(store, key, 1)).bodies == ["next"]
