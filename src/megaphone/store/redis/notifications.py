"""Wake-ups for the readers attached on this node.

A write publishes on the channel's ``:n`` pub/sub channel while its reader waits (the take script
arms a flag): the event itself when the reader has everything before it (the write marks it sent,
see write.lua), else a bare wake-up (and the flag is disarmed until the next take).
:class:`Notifications` routes each message to the reader watching that channel here. Nothing
published while the connection was down is replayed, so every (re)connect wakes every reader; a
reader also looks again when Redis confirms its subscription (a write between the reader's first
look and that confirmation was published to nobody); and every ``tick`` seconds every reader
looks again (a safety net, which also renews the readers' leases).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from megaphone.store.redis.connection import RespSubscriber
from megaphone.store.redis.url import RedisAddress


class Watcher(Protocol):
    def notified(self, data: bytes) -> None:
        """A message on the watched channel: ``b""`` new events, ``b"d"`` the channel is gone,
        anything else an event handed over (write.lua)."""
        ...

    def resume(self) -> None:
        """Look again (a reconnect, or the tick)."""
        ...


class Notifications:
    def __init__(self, address: RedisAddress, tick: float) -> None:
        self.tick = tick
        self.watchers: dict[str, Watcher] = {}
        self._subscriber = RespSubscriber(
            address, self._on_message, self.wake_all, self._on_subscribed
        )
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._subscriber.start()
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def watch(self, channel: str, watcher: Watcher) -> None:
        self.watchers[channel] = watcher
        self._subscriber.subscribe(channel)

    def unwatch(self, channel: str, watcher: Watcher) -> None:
        """Stop watching ``channel`` unless another watcher took it over meanwhile."""
        if self.watchers.get(channel) is watcher:
            del self.watchers[channel]
            self._subscriber.unsubscribe(channel)

    def wake_all(self) -> None:
        for watcher in list(self.watchers.values()):
            watcher.resume()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        watcher = self.watchers.get(channel.decode())
        if watcher is not None:
            watcher.notified(data)

    def _on_subscribed(self, channel: bytes) -> None:
        watcher = self.watchers.get(channel.decode())
        if watcher is not None:
            watcher.resume()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.wake_all()

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self._subscriber.aclose()
