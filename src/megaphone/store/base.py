"""The channel store interface.

A store keeps channels (pending events, the reader lease, expiry). The read transports (NDJSON now;
SSE, WebSocket and long-poll later) are thin :class:`ReadSink` implementations: the store pushes
whole serialised events into the sink while the sink is writable, and the sink tells the store
when it can take more (:meth:`Subscription.resume`). Delivery therefore only moves bytes.

Errors are raised from :mod:`megaphone.errors` (``NotFound``, ``Busy``, ``WriteTimeout``), so the
layers above translate them once.
"""

from __future__ import annotations

import abc
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


class Subscription(Protocol):
    def resume(self) -> None:
        """The sink became writable again: deliver what is pending."""
        ...

    def close(self) -> None:
        """The read is over (window ended or client gone); idempotent."""
        ...


class ChannelInfo(NamedTuple):
    address: str
    agent: str


class ChannelStore(abc.ABC):
    @abc.abstractmethod
    async def create(self, key: ChannelKey, consumer_address: str) -> None: ...

    @abc.abstractmethod
    async def exists(self, key: ChannelKey) -> bool: ...

    @abc.abstractmethod
    async def write(self, key: ChannelKey, event: Event, wait: float) -> None:
        """Append ``event``; wait up to ``wait`` seconds for room. NotFound / WriteTimeout."""

    @abc.abstractmethod
    async def attach(self, key: ChannelKey, sink: ReadSink) -> Subscription:
        """Make ``sink`` the channel's only reader and flush pending events. NotFound / Busy."""

    @abc.abstractmethod
    async def delete(self, key: ChannelKey) -> bool: ...

    @abc.abstractmethod
    async def expire(self) -> list[str]:
        """Delete the channels whose lifetime has passed; their consumer addresses."""

    @abc.abstractmethod
    async def list(self, skip: int, limit: int) -> list[ChannelInfo]: ...

    @abc.abstractmethod
    def count(self, agent: str | None = None) -> int: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources; idempotent."""
