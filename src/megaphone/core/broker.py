"""The broker: agents + addresses + a channel store, with the rules of SPEC Part A.

Transport-free: the HTTP layer parses requests and calls these methods; errors come out as
:mod:`megaphone.errors` exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from megaphone.config import Settings
from megaphone.core import transports
from megaphone.core.addressing import ChannelKey, new_consumer_address
from megaphone.core.agents import AgentRegistry
from megaphone.core.events import Event, make_event
from megaphone.errors import (
    BadRequest,
    BatchTooLarge,
    MegaphoneError,
    NotFound,
    ShuttingDown,
    Skipped,
    Unavailable,
    WriteTimeout,
)
from megaphone.metrics import Metrics
from megaphone.store.base import ChannelStore, ReadSink, Subscription

log = logging.getLogger("megaphone.broker")

SUPPORTED_PROTOCOLS: tuple[str, ...] = tuple(t.protocol for t in transports.ALL_TRANSPORTS)
MAX_ADDRESS_LENGTH = 256  # longer than any address this broker mints (agent names aside)
MAX_IDEMPOTENCY_KEY_LENGTH = 256


def check_idempotency_key(key: str) -> None:
    """An idempotency key is 1 to 256 characters (a UUID is the usual choice)."""
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise BadRequest(f"an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")


class Broker:
    def __init__(
        self,
        settings: Settings,
        store: ChannelStore,
        registry: AgentRegistry,
        metrics: Metrics,
        on_deleted: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.on_deleted = on_deleted
        self.write_timeout = settings.write_timeout_millis / 1000
        self.poll_duration = settings.poll_duration_millis / 1000
        self.draining = False  # shutting down: not ready for new work

    def check_stream_id(self, stream_id: str) -> None:
        if not stream_id:
            raise BadRequest("stream id must not be empty")
        if len(stream_id) > self.settings.max_stream_id_length:
            raise BadRequest(
                f"stream id longer than {self.settings.max_stream_id_length} characters"
            )

    async def create(self, protocols: Sequence[str] = ()) -> dict[str, Any]:
        chosen = transports.choose(protocols)
        if not chosen:
            raise BadRequest(
                f"none of the requested protocols is supported; supported: "
                f"{', '.join(SUPPORTED_PROTOCOLS)}"
            )
        agent = self.registry.pick_master()
        consumer, key = new_consumer_address(agent.name, transports.features(chosen))
        await self.store.create(key, consumer, self.settings.max_channels)
        return {
            "channelId": consumer,
            "producerAddress": agent.cipher.producer_address(key.digest),
            "consumerAddress": consumer,
            "agentName": agent.name,
            "protocols": [t.protocol for t in chosen],
        }

    def write_now(
        self, producer: str, stream_id: str, body: Any, idempotency_key: str | None = None
    ) -> Coroutine[Any, Any, None] | None:
        """Write one event: None when it is already accepted (a channel with room on a store that
        needs no I/O, the hot path, no coroutine at all), else the write still to await. A write
        with an ``idempotency_key`` the channel applied already succeeds without writing."""
        self.check_stream_id(stream_id)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        try:
            key = self.registry.addresses.producer(producer)
        except MegaphoneError:
            if not self.registry.may_learn(producer):
                raise
            return self._write_learning(producer, stream_id, body, idempotency_key)
        event = make_event(stream_id, body)
        if self.store.write_now(key, event, idempotency_key):
            return None
        return self.store.write(key, event, self.write_timeout, idempotency_key)

    async def _write_learning(
        self, producer: str, stream_id: str, body: Any, idempotency_key: str | None
    ) -> None:
        key = await self._resolve(self.registry.addresses.producer, producer)
        event = make_event(stream_id, body)
        await self.store.write(key, event, self.write_timeout, idempotency_key)

    async def _resolve(self, resolve: Callable[[str], ChannelKey], address: str) -> ChannelKey:
        """``resolve(address)``; an address of an agent this node does not know (or whose key
        it learned and that does not open it) first learns the agent's key from the store, when
        the store shares them (Redis: any node serves any agent)."""
        try:
            return resolve(address)
        except (BadRequest, NotFound):
            if not await self.registry.learn(address):
                raise
        return resolve(address)

    async def dispose(self, address: str) -> bool:
        """Delete a channel (management API) by either address: its pending events count as lost,
        an attached read ends cleanly. False when there is no such channel."""
        key = await self._resolve(self.registry.addresses.any, address)
        return await self.store.delete(key)

    def check_batch(self, channels: Sequence[str], messages: Sequence[tuple[str, Any]]) -> None:
        """Refuse a write-batch over the limits, before any work."""
        if len(messages) > self.settings.max_batch_messages:
            raise BatchTooLarge(
                f"{len(messages)} messages; at most {self.settings.max_batch_messages} per batch"
            )
        if len(channels) > self.settings.max_batch_channels:
            raise BatchTooLarge(
                f"{len(channels)} channels; at most {self.settings.max_batch_channels} per batch"
            )
        unique = list(dict.fromkeys(channels))
        # the answer lists at most one failure per (channel, message): bounding the product and
        # the length of a channel string bounds the answer, checked before any work
        writes = len(unique) * len(messages)
        if writes > self.settings.max_batch_writes:
            raise BatchTooLarge(
                f"{len(unique)} channels x {len(messages)} messages = {writes} writes; at most "
                f"{self.settings.max_batch_writes} per batch"
            )
        for channel in unique:
            if len(channel) > MAX_ADDRESS_LENGTH:
                raise BadRequest(f"channel address longer than {MAX_ADDRESS_LENGTH} characters")
        for stream_id, _ in messages:
            self.check_stream_id(stream_id)

    async def write_batch(
        self,
        channels: Sequence[str],
        messages: Sequence[tuple[str, Any]],
        idempotency_keys: Sequence[str | None] = (),
    ) -> list[dict[str, Any]]:
        """``idempotency_keys``: one per message (or none at all), each kept per channel."""
        self.check_batch(channels, messages)
        keys = list(idempotency_keys) or [None] * len(messages)
        if len(keys) != len(messages):
            raise ValueError("one idempotency key (or None) per message")
        for idempotency_key in keys:
            if idempotency_key is not None:
                check_idempotency_key(idempotency_key)
        unique = list(dict.fromkeys(channels))
        events = [make_event(stream_id, body) for stream_id, body in messages]
        results = await asyncio.gather(*(self._write_all(c, events, keys) for c in unique))
        return [failure for failures in results for failure in failures]

    async def _write_all(
        self, channel: str, events: list[Event], keys: list[str | None]
    ) -> list[dict[str, Any]]:
        failures: list[dict[str, Any]] = []
        try:
            key = await self._resolve(self.registry.addresses.producer, channel)
        except MegaphoneError as exc:
            return [
                {"channel": channel, "index": i, "reason": exc.code} for i in range(len(events))
            ]
        timed_out = False
        for index, event in enumerate(events):
            if timed_out:
                failures.append({"channel": channel, "index": index, "reason": Skipped.code})
                continue
            try:
                await self.store.write(key, event, self.write_timeout, keys[index])
            except MegaphoneError as exc:
                failures.append({"channel": channel, "index": index, "reason": exc.code})
                timed_out = isinstance(exc, WriteTimeout | ShuttingDown)
        return failures

    async def attach(self, consumer: str, sink: ReadSink, after: str | None = None) -> Subscription:
        """Attach a reader; ``after`` is its resume cursor (the last eid it received)."""
        key = await self._resolve(self.registry.addresses.consumer, consumer)
        return await self.store.attach(key, sink, after)

    async def ready(self) -> str | None:
        """Why this node cannot create channels now, or None when it can."""
        if self.draining:
            return "shutting down"
        try:
            self.registry.pick_master()
            await self.store.ping()
        except Unavailable as exc:
            return exc.message
        if await self.store.count() >= self.settings.max_channels:
            return "channel limit reached"
        return None

    async def exists(self, addresses: Sequence[str]) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for address in addresses:
            try:
                key = await self._resolve(self.registry.addresses.any, address)
            except (BadRequest, NotFound):
                out[address] = False
            else:
                out[address] = await self.store.exists(key)
        return out

    async def sweep(self) -> list[str]:
        expired = await self.store.expire()
        if expired:
            log.info("channels expired", extra={"count": len(expired)})
            if self.on_deleted is not None:
                self.on_deleted(expired)
        return expired

    async def run_sweeper(self) -> None:
        interval = self.settings.sweep_interval_millis / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except MegaphoneError as exc:  # e.g. the store is unreachable: try again next time
                log.warning("expiry sweep skipped", extra={"code": exc.code, "detail": exc.message})
            except Exception:
                log.exception("expiry sweep failed")
