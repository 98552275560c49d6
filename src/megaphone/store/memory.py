"""The in-memory channel store: the zero-setup default.

Delivery is push-based: a write into a channel whose reader is writable goes straight into the
reader's transport, with no task and no copy. Expiry keeps a heap of deadlines, so a sweep costs in
proportion to what expires, not to what exists.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable

from megaphone.core.addressing import ChannelKey
from megaphone.core.events import Event
from megaphone.errors import Busy, ChannelLimit, NotFound, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import ChannelInfo, ChannelStore, ReadSink, ResumeStatus, Subscription


class _Waiter:
    __slots__ = ("event", "future", "timer")

    def __init__(self, event: Event, future: asyncio.Future[None]) -> None:
        self.event = event
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


class MemoryChannel:
    __slots__ = (
        "address",
        "capacity",
        "confirmed",
        "created_at",
        "expires_at",
        "key",
        "metrics",
        "pending",
        "reader",
        "replay",
        "sent",
        "sink",
        "waiters",
    )

    def __init__(
        self,
        key: ChannelKey,
        address: str,
        capacity: int,
        replay_size: int,
        now: float,
        ttl: float,
        metrics: Metrics,
    ) -> None:
        self.key = key
        self.address = address
        self.capacity = capacity
        self.created_at = now
        self.expires_at = now + ttl
        self.metrics = metrics
        self.pending: deque[Event] = deque()
        self.waiters: deque[_Waiter] = deque()
        # sent but not yet confirmed by a later read's cursor: the replay window
        self.sent: deque[Event] = deque(maxlen=replay_size)
        self.confirmed: str | None = None  # the newest eid a cursor confirmed
        self.replay: list[Event] = []  # to re-send when the attached reader starts
        self.reader: ReadSink | None = None  # holds the lease from attach to close
        self.sink: ReadSink | None = None  # receives events once started

    def offer(self, event: Event) -> bool:
        """Accept ``event`` if there is room and nobody is queued before it."""
        if self.waiters or len(self.pending) >= self.capacity:
            return False
        self.metrics.messages_received += 1
        sink = self.sink
        if sink is not None and sink.writable and not self.pending and not self.replay:
            self.metrics.messages_read += 1
            self.sent.append(event)
            sink.deliver([event.line])
        else:
            self.pending.append(event)
            if sink is not None and sink.writable:
                self.flush()
        return True

    def flush(self) -> None:
        """Replay, then move pending events (then queued writers) into the sink while writable."""
        sink = self.sink
        if sink is not None and self.replay and sink.writable:
            lines = [event.line for event in self.replay]
            self.replay = []
            self.metrics.messages_replayed += len(lines)
            sink.deliver(lines)
            sink = self.sink
        while sink is not None and sink.writable and self.pending:
            events = list(self.pending)
            self.pending.clear()
            self.sent.extend(events)
            self._admit_waiters()
            self.metrics.messages_read += len(events)
            sink.deliver([event.line for event in events])
            sink = self.sink
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self.waiters and len(self.pending) < self.capacity:
            waiter = self.waiters.popleft()
            if waiter.timer is not None:
                waiter.timer.cancel()
            self.pending.append(waiter.event)
            self.metrics.messages_received += 1
            if not waiter.future.done():
                waiter.future.set_result(None)

    def settle_cursor(self, after: str | None) -> ResumeStatus:
        """Confirm the events up to ``after`` and queue the later sent ones for replay."""
        if after is None:
            self.replay = []
            return ResumeStatus.NONE
        for index, event in enumerate(self.sent):
            if event.eid == after:
                for _ in range(index + 1):
                    self.sent.popleft()
                self.confirmed = after
                self.replay = list(self.sent)
                return ResumeStatus.RESUMED
        self.replay = list(self.sent)
        return ResumeStatus.RESUMED if after == self.confirmed else ResumeStatus.UNKNOWN

    def release(self, reader: ReadSink, now: float, ttl: float) -> bool:
        if self.reader is not reader:
            return False
        self.reader = self.sink = None
        self.replay = []
        self.expires_at = now + ttl
        return True

    def fail_waiters(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(NotFound("channel deleted"))


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
        replay_size: int = 100,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.capacity = capacity
        self.replay_size = replay_size
        self.ttl = ttl
        self.clock = clock
        self._channels: dict[ChannelKey, MemoryChannel] = {}
        self._deadlines: list[tuple[float, int, ChannelKey]] = []
        self._seq = 0
        self._per_agent: dict[str, int] = {}

    def _schedule(self, channel: MemoryChannel) -> None:
        self._seq += 1
        heapq.heappush(self._deadlines, (channel.expires_at, self._seq, channel.key))

    async def create(self, key: ChannelKey, consumer_address: str, limit: int) -> None:
        if len(self._channels) >= limit:
            raise ChannelLimit(f"this node holds its maximum of {limit} channels")
        channel = MemoryChannel(
            key,
            consumer_address,
            self.capacity,
            self.replay_size,
            self.clock(),
            self.ttl,
            self.metrics,
        )
        self._channels[key] = channel
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

    def write_now(self, key: ChannelKey, event: Event) -> bool:
        channel = self._channels.get(key)
        if channel is None:
            self.metrics.messages_unroutable += 1
            raise NotFound("channel not found")
        return channel.offer(event)

    async def write(self, key: ChannelKey, event: Event, wait: float) -> None:
        if self.write_now(key, event):
            return
        channel = self._channels[key]
        if wait <= 0:
            raise WriteTimeout(f"channel buffer full ({channel.capacity} events)")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(event, loop.create_future())
        waiter.timer = loop.call_later(wait, self._expire_waiter, channel, waiter)
        channel.waiters.append(waiter)
        try:
            await waiter.future
        finally:
            if not waiter.future.done() or waiter.future.cancelled():
                waiter.timer.cancel()
                if waiter in channel.waiters:
                    channel.waiters.remove(waiter)

    def _expire_waiter(self, channel: MemoryChannel, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        try:
            channel.waiters.remove(waiter)
        except ValueError:
            return
        waiter.future.set_exception(
            WriteTimeout(f"channel buffer stayed full ({channel.capacity} events)")
        )

    async def attach(self, key: ChannelKey, sink: ReadSink, after: str | None) -> Subscription:
        channel = self._get(key)
        if channel.reader is not None:
            raise Busy("channel already has a reader")
        channel.reader = sink
        return _MemorySubscription(self, channel, sink, channel.settle_cursor(after))

    def _detach(self, channel: MemoryChannel, sink: ReadSink) -> None:
        if (
            channel.release(sink, self.clock(), self.ttl)
            and self._channels.get(channel.key) is channel
        ):
            self._schedule(channel)

    def _remove(self, channel: MemoryChannel) -> None:
        del self._channels[channel.key]
        left = self._per_agent.get(channel.key.agent, 1) - 1
        if left:
            self._per_agent[channel.key.agent] = left
        else:
            self._per_agent.pop(channel.key.agent, None)
        self.metrics.channel_disposed += 1
        self.metrics.messages_lost += len(channel.pending) + len(channel.waiters)
        self.metrics.channel_duration.observe(self.clock() - channel.created_at)
        channel.fail_waiters()
        reader, channel.reader, channel.sink = channel.reader, None, None
        if reader is not None:
            reader.end()

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
        return expired

    async def list(self, skip: int, limit: int) -> list[ChannelInfo]:
        out: list[ChannelInfo] = []
        for index, channel in enumerate(self._channels.values()):
            if index < skip:
                continue
            if len(out) >= limit:
                break
            out.append(ChannelInfo(channel.address, channel.key.agent))
        return out

    async def count(self, agent: str | None = None) -> int:
        if agent is None:
            return len(self._channels)
        return self._per_agent.get(agent, 0)
