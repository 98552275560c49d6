"""The in-memory channel store: the zero-setup default.

Delivery is push-based: a write into a channel whose reader is writable goes straight into the
reader's transport, with no task and no copy. Expiry keeps a heap of deadlines, so a sweep costs in
proportion to what expires, not to what exists.

Memory is bounded three ways (issue #9):

* per channel, ``capacity`` pending events and ``capacity_bytes`` of them (one event always fits an
  empty buffer); a write past either waits for room like a write into a full buffer;
* per channel, the replay window: events sent to a reader stay until a later read's cursor (or a
  read without one) confirms them. A read delivers while the unconfirmed events fit the window
  (``window_size`` events, ``window_bytes``), then the store asks its sink to end
  (:meth:`ReadSink.window_full`) so that the client reconnects and confirms what it got. Whatever
  the client's connection held in flight when it broke is therefore still in the window: a reader
  that resumes with its last ``eid`` loses nothing, however slowly it reads;
* per node, :class:`Budget`: pending, unconfirmed and waiting events of every channel together
  (``max_pending_bytes``); a write past it is refused at once (``WriteTimeout``), since waiting
  would hold its bytes too.

Each event counts its serialised size plus :data:`EVENT_OVERHEAD` (the objects that hold it), so the
budgets follow what the process really holds. An idle channel is one object tracked by the cyclic
GC: its queues exist only while they hold something.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable

from megaphone.core.addressing import ChannelKey
from megaphone.core.events import EVENT_OVERHEAD, Event
from megaphone.errors import Busy, ChannelLimit, NotFound, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import ChannelInfo, ChannelStore, ReadSink, ResumeStatus, Subscription

ROOM, CHANNEL_FULL, BUDGET_FULL = 0, 1, 2
EXPIRE_BATCH = 2_000  # channels deleted per turn of the event loop by a sweep
# a channel's key as stored: a plain (agent, digest) tuple. It hashes and compares like the
# ChannelKey it comes from, but the cyclic GC stops tracking it (it never untracks a named tuple),
# so neither the key nor the expiry heap's entries cost a full collection anything
Key = tuple[str, bytes]


class Budget:
    """Bytes of pending and unconfirmed events held by every channel of a store together."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class _Waiter:
    __slots__ = ("event", "future", "size", "timer")

    def __init__(self, event: Event, size: int, future: asyncio.Future[None]) -> None:
        self.event = event
        self.size = size
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


def _size(event: Event) -> int:
    return len(event.line) + EVENT_OVERHEAD


class MemoryChannel:
    __slots__ = (
        "address",
        "confirmed",
        "created_at",
        "expires_at",
        "idem",
        "key",
        "pending",
        "pending_bytes",
        "reader",
        "replay",
        "sent",
        "sent_bytes",
        "sink",
        "store",
        "waiters",
    )

    def __init__(self, store: MemoryStore, key: Key, address: str, now: float) -> None:
        self.store = store
        self.key = key
        self.address = address
        self.created_at = now
        self.expires_at = now + store.ttl
        # the queues exist only while they hold something: an idle channel is one object
        self.pending: deque[Event] | None = None
        self.pending_bytes = 0
        self.waiters: deque[_Waiter] | None = None
        # sent, not yet confirmed by a later read: the replay window
        self.sent: deque[Event] | None = None
        self.sent_bytes = 0
        self.confirmed: str | None = None  # the newest eid a cursor confirmed
        self.replay: list[Event] | None = None  # to re-send when the attached reader starts
        self.reader: ReadSink | None = None  # holds the lease from attach to close
        self.sink: ReadSink | None = None  # receives events once started
        # idempotency keys of applied writes → until when they are kept (oldest first: they all
        # live as long, so insertion order is expiry order)
        self.idem: dict[str, float] | None = None

    # --- room ----------------------------------------------------------------------------------

    def _buffer_full(self, size: int) -> bool:
        """Whether the pending buffer (events or bytes) has no room for ``size`` more bytes;
        one event always fits an empty buffer."""
        pending = self.pending
        if not pending:
            return False
        store = self.store
        return len(pending) >= store.capacity or self.pending_bytes + size > store.capacity_bytes

    def room(self, size: int) -> int:
        """ROOM if an event of ``size`` bytes can be buffered now, else what is full."""
        if self._buffer_full(size):
            return CHANNEL_FULL
        budget = self.store.budget
        if budget.used + size > budget.limit:
            return BUDGET_FULL
        return ROOM

    def _fits(self, size: int) -> bool:
        """Whether one more sent event fits the replay window (one always fits an empty one)."""
        sent = self.sent
        if not sent:
            return True
        store = self.store
        return len(sent) < store.window_size and self.sent_bytes + size <= store.window_bytes

    def _window_full(self) -> bool:
        sent = self.sent
        return sent is not None and len(sent) >= self.store.window_size

    def _retain(self, event: Event, size: int) -> None:
        """``event`` was sent: keep it until confirmed (or let it go when resume is off)."""
        if self.store.window_size:
            sent = self.sent
            if sent is None:
                sent = self.sent = deque()
            sent.append(event)
            self.sent_bytes += size
        else:
            self.store.budget.used -= size

    def confirm(self, keep: int) -> None:
        """Drop the sent events but the ``keep`` newest: the client has them. Costs in proportion
        to what is kept (usually nothing: a client resumes from the last event it got)."""
        sent = self.sent
        if sent is None:
            return
        if keep:
            kept = deque(sent[i] for i in range(len(sent) - keep, len(sent)))
            kept_bytes = sum(_size(event) for event in kept)
        else:
            kept, kept_bytes = None, 0
        self.store.budget.used -= self.sent_bytes - kept_bytes
        self.sent, self.sent_bytes = kept, kept_bytes

    # --- idempotent writes --------------------------------------------------------------------

    def applied(self, idempotency_key: str, now: float) -> bool:
        """Whether a write with this key was applied within the retention."""
        keys = self.idem
        if keys is None:
            return False
        while keys:
            oldest = next(iter(keys))
            if keys[oldest] > now:
                break
            del keys[oldest]
        if not keys:
            self.idem = None
            return False
        return idempotency_key in keys

    def remember(self, idempotency_key: str, now: float) -> None:
        keys = self.idem
        if keys is None:
            keys = self.idem = {}
        keys[idempotency_key] = now + self.store.idempotency_ttl
        if len(keys) > self.store.idempotency_max:
            del keys[next(iter(keys))]

    # --- writing and delivery ----------------------------------------------------------------

    def offer(self, event: Event) -> bool:
        """Accept ``event`` if there is room and nobody is queued before it."""
        if self.waiters:
            return False
        size = len(event.line) + EVENT_OVERHEAD
        if self.room(size) != ROOM:
            return False
        store = self.store
        store.metrics.messages_received += 1
        store.budget.used += size
        sink = self.sink
        if (
            sink is not None
            and not self.pending
            and not self.replay
            and sink.writable
            and self._fits(size)
        ):
            store.metrics.messages_read += 1
            self._retain(event, size)
            sink.deliver([event.line])
            if self._window_full() and self.sink is sink:
                sink.window_full()
            return True
        self._buffer(event, size)
        if sink is not None and sink.writable:
            self.flush()
        return True

    def _buffer(self, event: Event, size: int) -> None:
        pending = self.pending
        if pending is None:
            pending = self.pending = deque()
        pending.append(event)
        self.pending_bytes += size

    def flush(self) -> None:
        """Replay, then move pending events (then queued writers) into the sink while it is
        writable and the replay window has room; a full window ends the read."""
        sink = self.sink
        if sink is None:
            return
        metrics = self.store.metrics
        if self.replay and sink.writable:
            lines = [event.line for event in self.replay]
            self.replay = None
            metrics.messages_replayed += len(lines)
            sink.deliver(lines)
            if self.sink is not sink:
                return
        pending = self.pending
        while pending and sink.writable:
            lines = []
            while pending:
                event = pending[0]
                size = len(event.line) + EVENT_OVERHEAD
                if not self._fits(size):
                    break
                pending.popleft()
                self.pending_bytes -= size
                self._retain(event, size)
                lines.append(event.line)
            if not lines:  # the window is full of unconfirmed events: the client must confirm
                sink.window_full()
                return
            metrics.messages_read += len(lines)
            self._admit_waiters()  # room freed in the buffer
            sink.deliver(lines)
            if self.sink is not sink:
                return
        if pending is not None and not pending and self.pending is pending:
            self.pending = None
        self._admit_waiters()
        if self._window_full() and self.sink is sink:
            sink.window_full()

    def _admit_waiters(self) -> None:
        """Move queued writers into the buffer while it has room (their bytes are already
        counted in the node's budget: a waiting write holds its event)."""
        waiters = self.waiters
        while waiters:
            waiter = waiters[0]
            if self._buffer_full(waiter.size):
                return
            waiters.popleft()
            if waiter.timer is not None:
                waiter.timer.cancel()
            self._buffer(waiter.event, waiter.size)
            self.store.metrics.messages_received += 1
            if not waiter.future.done():
                waiter.future.set_result(None)
        self.waiters = None

    # --- readers -----------------------------------------------------------------------------

    def settle_cursor(self, after: str | None) -> ResumeStatus:
        """Confirm the events up to ``after`` and queue the later sent ones for replay. A read
        without a cursor cannot resume: it confirms every event sent before it."""
        sent = self.sent
        self.replay = None
        if after is None:
            self.confirm(0)
            return ResumeStatus.NONE
        if sent:
            # from the newest: a client usually resumes from the last event it received
            for back in range(len(sent)):
                if sent[-1 - back].eid == after:
                    self.confirm(back)
                    self.confirmed = after
                    self.replay = list(self.sent) if self.sent else None
                    return ResumeStatus.RESUMED
        self.replay = list(sent) if sent else None
        return ResumeStatus.RESUMED if after == self.confirmed else ResumeStatus.UNKNOWN

    def release(self, reader: ReadSink, now: float) -> bool:
        if self.reader is not reader:
            return False
        self.reader = self.sink = None
        self.replay = None
        self.expires_at = now + self.store.ttl
        return True

    def drop(self) -> int:
        """The channel is deleted: fail queued writers, release its bytes; the events lost."""
        lost = len(self.pending or ()) + len(self.waiters or ())
        self.store.budget.used -= self.pending_bytes + self.sent_bytes
        self.pending = self.sent = None
        self.pending_bytes = self.sent_bytes = 0
        self.fail_waiters(NotFound("channel deleted"))
        return lost

    def fail_waiters(self, error: Exception) -> None:
        waiters, self.waiters = self.waiters, None
        while waiters:
            waiter = waiters.popleft()
            self.store.budget.used -= waiter.size
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(error)


class _MemorySubscription:
    __slots__ = ("_channel", "_closed", "_sink", "_store", "status")

    def __init__(
        self, store: MemoryStore, channel: MemoryChannel, sink: ReadSink, status: ResumeStatus
    ) -> None:
        self._store = store
        self._channel = channel
        self._sink = sink
        self._closed = False
        self.status = status

    def start(self) -> None:
        if not self._closed and self._channel.reader is self._sink:
            self._channel.sink = self._sink
            self._channel.flush()

    def resume(self) -> None:
        if not self._closed and self._channel.sink is self._sink:
            self._channel.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store._detach(self._channel, self._sink)
        return


class MemoryStore(ChannelStore):
    runs_inline = True

    def __init__(
        self,
        *,
        metrics: Metrics,
        capacity: int = 100,
        capacity_bytes: int = 1 << 20,
        replay_size: int = 1000,
        replay_bytes: int = 1 << 20,
        budget_bytes: int = 256 << 20,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        idempotency_ttl: float = 300.0,
        idempotency_max: int = 1_000,
    ) -> None:
        self.metrics = metrics
        self.idempotency_ttl = idempotency_ttl
        self.idempotency_max = idempotency_max
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.window_size = replay_size
        self.window_bytes = replay_bytes
        self.budget = Budget(budget_bytes)
        self.ttl = ttl
        self.clock = clock
        self._channels: dict[Key, MemoryChannel] = {}
        self._deadlines: list[tuple[float, int, Key]] = []
        self._seq = 0
        self._per_agent: dict[str, int] = {}
        self.stopped: Exception | None = None  # shutting down: writes no longer wait

    def _schedule(self, channel: MemoryChannel) -> None:
        self._seq += 1
        heapq.heappush(self._deadlines, (channel.expires_at, self._seq, channel.key))

    async def create(self, key: ChannelKey, consumer_address: str, limit: int) -> None:
        if len(self._channels) >= limit:
            raise ChannelLimit(f"this node holds its maximum of {limit} channels")
        channel = MemoryChannel(self, (key.agent, key.digest), consumer_address, self.clock())
        self._channels[channel.key] = channel
        self._per_agent[key.agent] = self._per_agent.get(key.agent, 0) + 1
        self._schedule(channel)
        self.metrics.channel_created += 1

    async def exists(self, key: ChannelKey) -> bool:
        return key in self._channels

    def _get(self, key: ChannelKey) -> MemoryChannel:
        channel = self._channels.get(key)
        if channel is None:
            raise NotFound("channel not found")
        return channel

    def write_now(self, key: ChannelKey, event: Event, idempotency_key: str | None = None) -> bool:
        channel = self._channels.get(key)
        if channel is None:
            self.metrics.messages_unroutable += 1
            raise NotFound("channel not found")
        if idempotency_key is None:
            return channel.offer(event)
        now = self.clock()
        if channel.applied(idempotency_key, now):
            return True  # applied before: answered as then, written once
        if channel.offer(event):
            channel.remember(idempotency_key, now)
            return True
        return False

    async def write(
        self, key: ChannelKey, event: Event, wait: float, idempotency_key: str | None = None
    ) -> None:
        if self.write_now(key, event, idempotency_key):
            return
        channel = self._channels[key]
        size = _size(event)
        if self.stopped is not None:
            raise self.stopped
        if wait <= 0:
            raise self._full(channel, size)
        budget = self.budget
        if budget.used + size > budget.limit:
            raise self._budget_full()  # waiting would hold the event's bytes too
        budget.used += size  # a waiting write holds its event: counted from now
        loop = asyncio.get_running_loop()
        waiter = _Waiter(event, size, loop.create_future())
        waiter.timer = loop.call_later(wait, self._expire_waiter, channel, waiter)
        if channel.waiters is None:
            channel.waiters = deque()
        channel.waiters.append(waiter)
        try:
            await waiter.future
            if idempotency_key is not None:
                channel.remember(idempotency_key, self.clock())
        finally:
            if not waiter.future.done() or waiter.future.cancelled():
                waiter.timer.cancel()
                if channel.waiters and waiter in channel.waiters:
                    channel.waiters.remove(waiter)
                    budget.used -= size

    def _budget_full(self) -> WriteTimeout:
        return WriteTimeout(
            f"this node's budget for buffered events ({self.budget.limit} bytes) is full"
        )

    def _full(self, channel: MemoryChannel, size: int) -> WriteTimeout:
        if channel.room(size) == BUDGET_FULL:
            return self._budget_full()
        return WriteTimeout(
            f"channel buffer stayed full ({self.capacity} events or {self.capacity_bytes} bytes)"
        )

    def _expire_waiter(self, channel: MemoryChannel, waiter: _Waiter) -> None:
        if waiter.future.done() or not channel.waiters:
            return
        try:
            channel.waiters.remove(waiter)
        except ValueError:
            return
        self.budget.used -= waiter.size
        waiter.future.set_exception(
            WriteTimeout(
                f"channel buffer stayed full ({self.capacity} events or "
                f"{self.capacity_bytes} bytes)"
            )
        )

    async def attach(self, key: ChannelKey, sink: ReadSink, after: str | None) -> Subscription:
        channel = self._get(key)
        if channel.reader is not None:
            raise Busy("channel already has a reader")
        channel.reader = sink
        status = channel.settle_cursor(after)
        return _MemorySubscription(self, channel, sink, status)

    def _detach(self, channel: MemoryChannel, sink: ReadSink) -> None:
        if channel.release(sink, self.clock()) and self._channels.get(channel.key) is channel:
            self._schedule(channel)

    def _remove(self, channel: MemoryChannel) -> None:
        del self._channels[channel.key]
        left = self._per_agent.get(channel.key[0], 1) - 1
        if left:
            self._per_agent[channel.key[0]] = left
        else:
            self._per_agent.pop(channel.key[0], None)
        self.metrics.channel_disposed += 1
        self.metrics.messages_lost += channel.drop()
        self.metrics.channel_duration.observe(self.clock() - channel.created_at)
        reader, channel.reader, channel.sink = channel.reader, None, None
        if reader is not None:
            reader.end()

    def stop_waiting(self, error: Exception) -> None:
        self.stopped = error
        for channel in self._channels.values():
            if channel.waiters:
                channel.fail_waiters(error)

    async def delete(self, key: ChannelKey) -> bool:
        channel = self._channels.get(key)
        if channel is None:
            return False
        self._remove(channel)
        return True

    async def expire(self) -> list[str]:
        now = self.clock()
        expired: list[str] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, key = heapq.heappop(deadlines)
            channel = self._channels.get(key)
            if channel is None or channel.reader is not None or channel.expires_at > now:
                continue  # stale entry: deleted, being read, or read again since
            self._remove(channel)
            expired.append(channel.address)
            if len(expired) % EXPIRE_BATCH == 0:
                await asyncio.sleep(0)  # a mass expiry must not stall the node: let others in
                now = min(now, self.clock())
        return expired

    async def list(self, skip: int, limit: int) -> list[ChannelInfo]:
        """A page in creation order: skips in C (``islice``), copies only the page."""
        page = itertools.islice(self._channels.values(), skip, skip + limit)
        return [ChannelInfo(channel.address, channel.key[0]) for channel in page]

    async def count(self, agent: str | None = None) -> int:
        if agent is None:
            return len(self._channels)
        return self._per_agent.get(agent, 0)

    def backlog(self) -> tuple[int, int]:
        """``(pending events, writers waiting for room)`` over every channel, for the gauges
        (a walk over the channels: read on scrape, not on the hot path)."""
        pending = waiting = 0
        for channel in self._channels.values():
            if channel.pending:
                pending += len(channel.pending)
            if channel.waiters:
                waiting += len(channel.waiters)
        return pending, waiting
