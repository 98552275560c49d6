"""A reader attached on this node: a task that takes events from the channel's stream into its
sink, woken by notifications, by its sink draining, and by the tick (which also renews its
lease when the sink cannot take anything). A notification that carries the event itself (the
write found the reader waiting with everything before it, see write.lua) is delivered at once,
without a take, when it follows on from what this reader holds; otherwise it is a wake-up."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from megaphone.errors import StoreUnavailable
from megaphone.metrics import Metrics
from megaphone.store.base import ReadSink, ResumeStatus
from megaphone.store.redis.keys import ChannelKeys

TAKE_BATCH = 256


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class Reads(Protocol):
    """What a subscription needs of its store: the lease's length and three calls on it."""

    lease: float
    metrics: Metrics

    async def take_events(
        self, keys: ChannelKeys, token: str, start: str
    ) -> tuple[int, list[tuple[str, bytes]], bool]:
        """(new events, events, window full); new is -1 when the lease is lost. Renews it."""
        ...

    async def renew_lease(self, keys: ChannelKeys, token: str) -> bool:
        """False when the lease is lost."""
        ...

    def release_lease(
        self, keys: ChannelKeys, token: str, watcher: object, lapses: float
    ) -> asyncio.Future[None]:
        """Stop watching the channel and release the lease (``lapses``: when it would lapse)."""
        ...


class RedisSubscription:
    def __init__(
        self,
        reads: Reads,
        keys: ChannelKeys,
        sink: ReadSink,
        token: str,
        start: str,
        status: ResumeStatus,
        leased: float,
        sent: str,
    ) -> None:
        self.reads = reads
        self.keys = keys
        self.sink = sink
        self.token = token
        self._token = token.encode()
        self.last = start
        self.status = status
        self.renewed = leased  # monotonic: when the last call that renewed the lease was sent
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.released: asyncio.Future[None] | None = None
        self.closed = False
        self.taking = False  # a take is in flight: a pushed event is left to it (a wake-up)
        self.finished = False  # the read is over (window full, lease lost): nothing more
        # the events up to the channel's last sent one when this read began are replays (a
        # resumed read's); every later one is a first send (messages_read), whether a take or
        # its write's notification brought it (a take counts an event that its write marked
        # sent as sent before: it may have been left to the take)
        self.replays_to: tuple[int, int] | None = None if sent == start else _stream_id(sent)

    def start(self) -> None:
        if not self.closed and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        # a cancelled task keeps its CancelledError, whose traceback holds _run's frame and so
        # this subscription: let go of the task, so that no cycle is left for the GC
        if self.task is task:
            self.task = None

    def resume(self) -> None:
        self.wake.set()

    def notified(self, data: bytes) -> None:
        if data == b"d":
            self._end()
        elif not data or not self._pushed(data):
            self.wake.set()

    def _pushed(self, data: bytes) -> bool:
        """Deliver an event handed over in its notification (write.lua: ``token previous id
        full line``); False when a take must fetch it instead. Redis marked it sent and keeps it
        in the replay window, so a take from ``last`` returns it whenever it is not used here: a
        take in flight (its reply may or may not hold it), a reader that is not ours (a lease
        taken over) or that missed an event before it, a sink that cannot take it."""
        if self.closed or self.finished or self.taking or self.task is None:
            return False
        parts = data.split(b" ", 4)
        if len(parts) != 5 or parts[0] != self._token or parts[1].decode() != self.last:
            return False
        if not self.sink.writable:
            return False  # the task renews the lease, which stops the pushes until a take
        self.last = parts[2].decode()
        self.reads.metrics.messages_read += 1
        self.sink.deliver([parts[4]])
        if parts[3] == b"1":  # the replay window is full now (as a take's code 2)
            self.finished = True
            self.sink.window_full()
            self.wake.set()  # (the task ends)
        return True

    def _first_sends(self, events: list[tuple[str, bytes]]) -> int:
        """How many of the events (in stream order) come after the replayed ones."""
        replays_to = self.replays_to
        if replays_to is None:
            return len(events)
        replays = 0
        for eid, _ in events:
            if _stream_id(eid) > replays_to:
                self.replays_to = None  # past the replays: every later event is new
                break
            replays += 1
        return len(events) - replays

    def close(self) -> asyncio.Future[None] | None:
        if self.closed:
            return self.released
        self.closed = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.released = self.reads.release_lease(
            self.keys, self.token, self, self.renewed + self.reads.lease
        )
        return self.released

    def _end(self) -> None:
        if not self.closed:
            self.sink.end()

    async def _run(self) -> None:
        reads, metrics = self.reads, self.reads.metrics
        backoff = 0.05
        while not self.closed and not self.finished:
            self.wake.clear()
            sent = time.monotonic()
            if self.sink.writable:
                self.taking = True
                try:
                    new, events, full = await reads.take_events(self.keys, self.token, self.last)
                except StoreUnavailable:
                    await asyncio.sleep(backoff)  # Redis is away: try again soon, not at a tick
                    backoff = min(backoff * 2, 1.0)
                    continue
                finally:
                    self.taking = False
                backoff = 0.05
                if new == -1:  # the lease is gone (channel deleted or lapsed)
                    self.finished = True
                    self._end()
                    return
                self.renewed = sent
                if events:
                    self.last = events[-1][0]
                    new = self._first_sends(events)
                    metrics.messages_read += new
                    metrics.messages_replayed += len(events) - new
                    self.sink.deliver([line for _, line in events])
                if full:  # the client must reconnect and confirm before it gets more
                    self.finished = True
                    if not self.closed:
                        self.sink.window_full()
                    return
                if events and len(events) == TAKE_BATCH:
                    continue  # there may be more already
                # the take armed the channel's notification: the next write wakes us
            else:  # the sink is full: no take, but the lease is kept (at every tick)
                try:
                    if not await reads.renew_lease(self.keys, self.token):
                        self.finished = True
                        self._end()
                        return
                    self.renewed = sent
                except StoreUnavailable:
                    pass  # the next tick tries again
            await self.wake.wait()
