"""The channel store interface.

A store keeps channels (pending events, the replay window of sent events, the reader lease,
expiry). Sent events stay in the window until a later read confirms them; a read delivers only what
fits the window and then ends (:meth:`ReadSink.window_full`), so a broken connection never holds
more than the window can replay. The read transports (NDJSON now; SSE, WebSocket and long-poll
later) are thin :class:`ReadSink` implementations: a read attaches (takes the lease and settles its
resume cursor), starts (replayed events first, then pending ones), and from then on the store
pushes whole serialised events into the sink while the sink is writable; the sink tells the store
when it can take more (:meth:`Subscription.resume`). Delivery therefore only moves bytes.

Errors are raised from :mod:`megaphone.errors` (``NotFound``, ``Busy``, ``WriteTimeout``), so the
layers above translate them once.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple, Protocol

from megaphone.core.addressing import ChannelKey
from megaphone.core.events import Event


class ReadSink(Protocol):
    """Where a channel's events go while a reader is attached."""

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is full: the store keeps events pending."""
        ...

    def deliver(self, lines: list[bytes]) -> None:
        """Send whole serialised events, in order."""
        ...

    def end(self) -> None:
        """The channel is gone: finish the read."""
        ...

    def window_full(self) -> None:
        """The replay window holds as many unconfirmed events as it may: finish the read, so
        that the client reconnects and its cursor confirms what it received. Nothing more is
        delivered to this sink meanwhile."""
        ...


class ResumeStatus(StrEnum):
    """How a read's cursor (``Last-Event-ID`` / ``?after=``) was settled."""

    NONE = "none"  # no cursor: Part A behaviour, nothing replayed
    RESUMED = "resumed"  # the cursor was found: everything after it is replayed
    UNKNOWN = (
        "unknown-cursor"  # too old or foreign: the replay window is sent, events may be missing
    )


class Subscription(Protocol):
    @property
    def status(self) -> ResumeStatus: ...

    def start(self) -> None:
        """Begin delivery: the replayed events, then the pending ones, then new ones as written."""
        ...

    def resume(self) -> None:
        """The sink became writable again: deliver what is pending."""
        ...

    def close(self) -> asyncio.Future[None] | None:
        """The read is over (window ended or client gone); idempotent. A store that releases the
        reader lease asynchronously returns the future of that release."""
        ...


class ChannelInfo(NamedTuple):
    address: str
    agent: str


class ChannelStore(abc.ABC):
    # True when every call either completes without suspending or only awaits futures the store
    # resolves itself, so requests can run inline without a task (see megaphone.core.eager)
    runs_inline: bool = False

    @abc.abstractmethod
    async def create(self, key: ChannelKey, consumer_address: str, limit: int) -> None:
        """Create a channel unless the store already holds ``limit`` channels (ChannelLimit)."""

    @abc.abstractmethod
    async def exists(self, key: ChannelKey) -> bool: ...

    @abc.abstractmethod
    async def write(
        self, key: ChannelKey, event: Event, wait: float, idempotency_key: str | None = None
    ) -> None:
        """Append ``event``; wait up to ``wait`` seconds for room. NotFound / WriteTimeout.

        With an ``idempotency_key``: a key the channel applied a write with, within the store's
        retention (``idempotency_ttl``, at most ``idempotency_max`` keys per channel), makes
        this write succeed without writing anything, so a retried write is applied once and
        answers as the first did. A key is remembered only when its write is applied."""

    def write_now(self, key: ChannelKey, event: Event, idempotency_key: str | None = None) -> bool:
        """Append ``event`` if that takes no waiting and no I/O; False when the caller must use
        :meth:`write` instead (no room now, or a store that has to ask a server). NotFound."""
        return False

    @abc.abstractmethod
    async def attach(self, key: ChannelKey, sink: ReadSink, after: str | None) -> Subscription:
        """Make ``sink`` the channel's only reader and settle the cursor ``after``: the events
        sent up to it are confirmed and dropped, the later ones will be replayed. Nothing is
        delivered before :meth:`Subscription.start`. NotFound / Busy."""

    @abc.abstractmethod
    async def delete(self, key: ChannelKey) -> bool: ...

    @abc.abstractmethod
    async def expire(self) -> list[str]:
        """Delete the channels whose lifetime has passed; their consumer addresses."""

    @abc.abstractmethod
    async def list(self, skip: int, limit: int) -> list[ChannelInfo]: ...

    @abc.abstractmethod
    async def count(self, agent: str | None = None) -> int: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and start background work."""

    async def ping(self) -> None:  # noqa: B027 - optional hook
        """Raise ``StoreUnavailable`` when the store cannot serve requests now."""

    async def agent_keys(self, names: builtins.list[str]) -> dict[str, bytes] | None:
        """Agent keys shared by every node of the store, or None for keys local to this process.
        A store that shares them keeps them: it restores them if it finds them lost."""
        return None

    async def agent_key(self, name: str) -> bytes | None:
        """The shared key of an agent (of any node), or None when the store knows no such agent
        (or shares no keys). A store that shares keys keeps the ones it answered, as above."""
        return None

    def on_agent_key(self, changed: Callable[[str, bytes], None]) -> None:  # noqa: B027
        """Call ``changed(name, key)`` when the store replaces a shared key it handed out (two
        keys were minted for one agent name; the older one wins everywhere)."""

    def stop_waiting(self, error: Exception) -> None:  # noqa: B027 - optional hook
        """Shutdown: answer every write waiting for room with ``error`` now, and make later
        writes that would wait fail the same way at once."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources; idempotent."""
