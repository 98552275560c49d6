"""Keeping the cyclic garbage collector's pauses short.

A full collection walks every container object the process holds: with a million live channels
that took over a second (issue #9), and the whole node waits meanwhile. Long-lived objects that
are freed by reference counting (channels, connections, events: the code breaks its own cycles)
gain nothing from being walked again and again, so every ``interval`` the policy collects the
young generations (reclaiming recent cycles) and then freezes what is left
(:func:`gc.freeze`): full collections only walk what is newer than the last freeze.

Frozen objects are still freed by reference counting; only a cycle that becomes garbage after it
was frozen stays until the next reclaim. Every ``reclaim_interval``, if the process holds few
enough frozen objects for a full collection to stay short (``reclaim_below``), the policy thaws
everything, collects it all once and freezes again; a node holding more keeps its frozen cycles
until it shrinks (``megaphone_gc_frozen_objects`` shows how many objects are frozen).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("megaphone.gc")


class GcPolicy:
    """Process-wide: several servers in one process (tests) share one running policy."""

    _users = 0
    _timer: asyncio.TimerHandle | None = None
    _last_reclaim = 0.0

    def __init__(
        self,
        interval: float = 1.0,
        reclaim_interval: float = 600.0,
        reclaim_below: int = 200_000,
    ) -> None:
        self.interval = interval
        self.reclaim_interval = reclaim_interval
        self.reclaim_below = reclaim_below
        self._started = False

    def start(self) -> None:
        if self._started or self.interval <= 0:
            return
        self._started = True
        cls = type(self)
        cls._users += 1
        if cls._users == 1:
            gc.collect()  # start-up garbage goes now, the rest is long-lived: freeze it
            gc.freeze()
            cls._last_reclaim = time.monotonic()
            cls._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        cls = type(self)
        try:
            gc.collect(1)
            now = time.monotonic()
            if (
                now - cls._last_reclaim >= self.reclaim_interval
                and gc.get_freeze_count() < self.reclaim_below
            ):
                cls._last_reclaim = now
                gc.unfreeze()
                gc.collect()
            gc.freeze()
        finally:
            if cls._users:
                cls._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def close(self) -> None:
        """Stop (when the last server using it closes); closing twice is harmless."""
        if not self._started:
            return
        self._started = False
        cls = type(self)
        cls._users -= 1
        if cls._users == 0 and cls._timer is not None:
            cls._timer.cancel()
            cls._timer = None
