"""The Redis channel store: any node serves any channel, and a restart loses nothing.

The channel rules are Lua scripts (``lua/``) on one channel's keys (``keys.py``), called through
the pipeliner (``pipeliner.py``) on the store's one command connection (``connection.py``);
readers are woken by notifications (``notifications.py``) and run as subscriptions
(``subscription.py``). A reader's lease lasts ``lease`` seconds and is renewed at every tick, so
a crashed node cannot hold a channel for long. Expiry is a sweep on every node: the delete script
runs on one channel's keys and only the node whose script deleted it reports it, so the
``on-channel-deleted`` webhook fires once per channel cluster-wide. Keys also carry a safety TTL,
so nothing leaks if no node is left to sweep.

Agent keys live in Redis (``Pagents``), shared by every node: a node creates its own agents' keys
if missing (HSETNX), looks up other nodes' agents on demand (:meth:`agent_key`), and writes back
every key it uses if Redis lost them (``FLUSHALL``, a restart without persistence, eviction).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from megaphone.core.addressing import ChannelKey
from megaphone.core.events import EVENT_OVERHEAD, Event
from megaphone.errors import Busy, ChannelLimit, NotFound, StoreUnavailable, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import ChannelInfo, ChannelStore, ReadSink, ResumeStatus, Subscription
from megaphone.store.redis.agents import AgentKeys
from megaphone.store.redis.connection import RespClient, ResponseError, bulk, bulks, pack
from megaphone.store.redis.keys import ChannelKeys, Keys
from megaphone.store.redis.notifications import Notifications
from megaphone.store.redis.pipeliner import Pipeliner, unavailable
from megaphone.store.redis.subscription import TAKE_BATCH, RedisSubscription
from megaphone.store.redis.url import RedisAddress

log = logging.getLogger("megaphone.store.redis")
T = TypeVar("T")

STATUS = {0: ResumeStatus.NONE, 1: ResumeStatus.RESUMED, 2: ResumeStatus.UNKNOWN}
RELEASE_TRIES = 6  # over ~1.6 s, before the read may end; then retried until the lease lapses
RELEASE_RETRY = 0.25  # seconds between the later retries of a release


class RedisStore(ChannelStore):
    def __init__(
        self,
        *,
        url: str,
        metrics: Metrics,
        prefix: str = "megaphone:",
        capacity: int = 100,
        capacity_bytes: int = 1 << 20,
        replay_size: int = 1000,
        replay_bytes: int = 1 << 20,
        ttl: float = 60.0,
        lease: float = 10.0,
        poll: float = 5.0,
        timeout: float = 5.0,
        agent_check: float = 1.0,
        clock: Callable[[], float] = time.time,
        idempotency_ttl: float = 300.0,
        idempotency_max: int = 1_000,
    ) -> None:
        self.metrics = metrics
        self.idempotency_ttl_ms = int(idempotency_ttl * 1000)
        self.idempotency_max = idempotency_max
        # the time the scripts are given (seconds): every channel rule (expiry, leases, waiting
        # tickets) compares only times taken from it, so tests may inject a virtual one
        self.clock = clock
        self.keys = Keys(prefix)
        self.prefix = prefix
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.replay_size = replay_size
        self.replay_bytes = replay_bytes
        self.ttl_ms = int(ttl * 1000)
        self.lease = lease
        self.lease_ms = int(lease * 1000)
        self.timeout = timeout  # one call or one pipeline: a hung Redis is a 503, not a hang
        self.agent_check = agent_check  # how often the agent keys are checked (and restored)
        # keys outlive their lifetime by a margin, so a channel is only ever removed by a sweep
        # (which fires the webhook) unless no node is left to sweep
        self.safety_ms = self.ttl_ms * 2 + self.lease_ms + 60_000
        address = RedisAddress.parse(url)
        self.client = RespClient(address, timeout)
        self._scripts = Pipeliner(self.client, self._spawn)
        # the write and the take, the calls of every event, are sent packed from pieces (see
        # pipeliner.py): their constant arguments are packed here, once
        scripts = self._scripts
        self._write_head = scripts.head("write", 4, 15)
        self._write_capacity = bulk(capacity)
        self._write_limits = bulks((self.safety_ms, capacity_bytes, EVENT_OVERHEAD))
        self._write_tail = bulks(
            (self.idempotency_ttl_ms, idempotency_max, replay_size, replay_bytes)
        )
        self._take_head = scripts.head("take", 2, 9)
        self._take_window = bulks((TAKE_BATCH, replay_size, replay_bytes, EVENT_OVERHEAD))
        self._take_lease = bulks((self.lease_ms, self.safety_ms))
        # every reader takes (or renews its lease) at every tick: at least twice per lease
        self.notifications = Notifications(address, min(poll, lease / 2))
        self._releasing: dict[str, asyncio.Future[None]] = {}
        self._retrying: set[asyncio.Future[None]] = set()  # releases retried until their lapse
        self.agents = AgentKeys(self.keys.agents, self._call)
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._started = False
        self._stopped: Exception | None = None  # shutting down: writes no longer wait

    # --- plumbing ---------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _call(self, *parts: str | bytes | int) -> Any:
        """One plain command, its failures translated once into ``StoreUnavailable``."""
        return (await self._pipeline([parts]))[0]

    async def _pipeline(self, commands: list[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Plain commands in one write; any failure (a refused command too) is a 503."""
        try:
            replies = await self.client.execute([pack(parts) for parts in commands])
        except OSError as exc:  # connection errors and TimeoutError
            raise unavailable(exc) from exc
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise unavailable(reply) from reply
        return replies

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts.call(name, keys, args)

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.notifications.start()
        self._keeper = asyncio.get_running_loop().create_task(self._keep_agents())

    async def ping(self) -> None:
        await self._call("PING")

    # --- agent keys -------------------------------------------------------------------------

    async def agent_keys(self, names: list[str]) -> dict[str, bytes]:
        """Each agent's key, shared by every node: the first node to start creates it. The
        store keeps them (see agents.py)."""
        return await self.agents.mint(names)

    async def agent_key(self, name: str) -> bytes | None:
        """Any node's agent key, as stored; kept from then on like this node's own."""
        return await self.agents.lookup(name)

    def on_agent_key(self, changed: Callable[[str, bytes], None]) -> None:
        """``changed(name, key)`` when a kept key is replaced by an older one (agents.py)."""
        self.agents.on_change = changed

    async def restore_agent_keys(self) -> list[str]:
        return await self.agents.restore()

    async def _keep_agents(self) -> None:
        while True:
            await asyncio.sleep(self.agent_check)
            # Redis away: the next check restores them once it is back
            with contextlib.suppress(StoreUnavailable):
                await self.restore_agent_keys()

    # --- ChannelStore -----------------------------------------------------------------------

    async def create(self, key: ChannelKey, consumer_address: str, limit: int) -> None:
        ids = self.keys.channel(key)
        # reserve a place first, so that concurrent creates on any node never overshoot the limit
        if await self._call("INCR", self.keys.count) > limit:
            await self._call("DECR", self.keys.count)
            raise ChannelLimit(f"the cluster holds its maximum of {limit} channels")
        now = self._now_ms()
        try:
            await self._script(
                "create", ids.keys, [consumer_address, now, self.ttl_ms, self.safety_ms]
            )
            await self._pipeline(
                [
                    ("ZADD", self.keys.expiry, now + self.ttl_ms, ids.id),
                    ("ZADD", self.keys.channels, now, ids.id),
                    ("INCR", self.keys.count_of(key.agent)),
                ]
            )
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):
                await self._call("DECR", self.keys.count)
            raise
        self.metrics.channel_created += 1

    async def exists(self, key: ChannelKey) -> bool:
        return bool(await self._call("EXISTS", self.keys.channel(key).meta))

    async def write(
        self, key: ChannelKey, event: Event, wait: float, idempotency_key: str | None = None
    ) -> None:
        ids = self.keys.channel(key)
        deadline = time.monotonic() + wait
        ticket = f"{self._now_ms() + int(wait * 1000)}:{os.urandom(6).hex()}"
        enqueue = "1" if wait > 0 else "0"
        delay = 0.005
        _, keys, notify = ids.packed()
        # the write script's ARGV: eid line capacity ticket now enqueue notify safety
        # capacity_bytes overhead idempotency_key idempotency_ttl idempotency_max window
        # window_bytes
        event_part = bulks((event.eid, event.line))
        idempotency = bulk(idempotency_key or "")
        while True:
            call = self._scripts.send(
                b"".join(
                    (
                        self._write_head,
                        keys,
                        event_part,
                        self._write_capacity,
                        bulks((ticket, self._now_ms(), enqueue)),
                        notify,
                        self._write_limits,
                        idempotency,
                        self._write_tail,
                    )
                )
            )
            if wait <= 0:
                written = await call  # (nothing is ever queued)
            else:
                try:
                    written = await asyncio.shield(call)
                except asyncio.CancelledError:
                    # this call may queue the ticket (or an earlier one did): once it is done,
                    # take the ticket out, or the writers behind it wait until it lapses
                    self._spawn(self._forget_ticket(ids, ticket, call))
                    raise
            if written == 1:
                self.metrics.messages_received += 1
                return
            if written == 2:  # applied before (a retry): answered as then, written once
                return
            if written == -1:
                self.metrics.messages_unroutable += 1
                raise NotFound("channel not found")
            enqueue = "0"  # queued once (FIFO); now wait for our turn and room
            remaining = deadline - time.monotonic()
            if self._stopped is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self._call("LREM", ids.waiting, 0, ticket)
                raise self._stopped
            if remaining <= 0:
                with contextlib.suppress(StoreUnavailable):
                    await self._call("LREM", ids.waiting, 0, ticket)
                raise WriteTimeout(
                    f"channel buffer stayed full ({self.capacity} events or "
                    f"{self.capacity_bytes} bytes)"
                )
            try:
                await asyncio.sleep(min(delay, remaining))
            except asyncio.CancelledError:
                self._spawn(self._forget_ticket(ids, ticket))
                raise
            delay = min(delay * 2, 0.05)

    async def _forget_ticket(
        self, ids: ChannelKeys, ticket: str, call: asyncio.Future[Any] | None = None
    ) -> None:
        """Take a cancelled writer's ticket out of the queue, after its last ``call`` (which may
        have queued it) is done."""
        with contextlib.suppress(StoreUnavailable):
            if call is not None:
                await call
            await self._call("LREM", ids.waiting, 0, ticket)

    def stop_waiting(self, error: Exception) -> None:
        self._stopped = error  # each waiting write sees it within its next poll (<= 50 ms)

    async def attach(self, key: ChannelKey, sink: ReadSink, after: str | None) -> Subscription:
        ids = self.keys.channel(key)
        releasing = self._releasing.get(ids.notify)
        if releasing is not None:
            # this node's last reader of the channel is still releasing its lease: a client
            # reconnects at once, so let the release finish instead of answering 409
            await asyncio.shield(releasing)
        token = os.urandom(12).hex()
        leased = time.monotonic()
        script = asyncio.ensure_future(
            self._script(
                "attach",
                ids.keys,
                [
                    token,
                    self._now_ms(),
                    self.lease_ms,
                    after or "",
                    self.safety_ms + self.lease_ms,
                    EVENT_OVERHEAD,
                ],
            )
        )
        try:
            code, start, *sent = await asyncio.shield(script)
        except asyncio.CancelledError:
            # the client left while we attached: the script may still take the lease, and no
            # subscription will ever release it, so release it once the script is done
            script.add_done_callback(
                lambda _: self._spawn(self._release(ids, token, leased + self.lease))
            )
            raise
        if code == -1:
            raise NotFound("channel not found")
        if code == -2:
            raise Busy("channel already has a reader")
        subscription = RedisSubscription(
            self, ids, sink, token, _text(start), STATUS[int(code)], leased, _text(sent[0])
        )
        self.notifications.watch(ids.notify, subscription)
        await self.start()
        return subscription

    # --- what a subscription needs (subscription.Reads) -------------------------------------

    async def take_events(
        self, keys: ChannelKeys, token: str, start: str
    ) -> tuple[int, list[tuple[str, bytes]], bool]:
        # the take script's ARGV: token from count window window_bytes overhead now lease safety
        reply = await self._scripts.send(
            b"".join(
                (
                    self._take_head,
                    keys.packed()[0],
                    bulks((token, start)),
                    self._take_window,
                    bulk(self._now_ms()),
                    self._take_lease,
                )
            )
        )
        code = int(reply[0])
        if code == -1:
            return -1, [], False
        items = reply[2:]
        events = [(_text(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        return int(reply[1]), events, code == 2

    async def renew_lease(self, keys: ChannelKeys, token: str) -> bool:
        renewed = await self._script(
            "renew", keys.keys[:2], [token, self._now_ms(), self.lease_ms, self.safety_ms]
        )
        return bool(renewed)

    def release_lease(
        self, keys: ChannelKeys, token: str, watcher: object, lapses: float
    ) -> asyncio.Future[None]:
        self.notifications.unwatch(keys.notify, watcher)  # type: ignore[arg-type]
        notify = keys.notify
        released = self._spawn(self._release(keys, token, lapses))
        self._releasing[notify] = released
        released.add_done_callback(
            lambda _: (
                self._releasing.pop(notify, None)
                if self._releasing.get(notify) is released
                else None
            )
        )
        return released

    async def _release(self, ids: ChannelKeys, token: str, lapses: float) -> None:
        """Release a reader's lease: a few quick tries (the read ends after them), then, if Redis
        is still away, retries in the background until the lease would have lapsed anyway
        (``lapses``, monotonic), so that a read cut by an outage frees its channel as soon as
        Redis is back, not a whole lease later."""
        # a lease left behind answers 409 until it lapses: worth a few tries through a blip
        for attempt in range(RELEASE_TRIES):
            with contextlib.suppress(StoreUnavailable):
                await self._release_once(ids, token)
                return
            if attempt + 1 < RELEASE_TRIES:
                await asyncio.sleep(0.05 * 2**attempt)
        if time.monotonic() < lapses and not self._closed:
            log.warning("could not release a reader lease yet (redis unavailable); retrying")
            later = self._spawn(self._release_later(ids, token, lapses))
            self._retrying.add(later)
            later.add_done_callback(self._retrying.discard)
        else:
            log.warning("could not release a reader lease (redis unavailable); it lapses")

    async def _release_once(self, ids: ChannelKeys, token: str) -> None:
        now = self._now_ms()
        released = await self._script(
            "release", ids.keys, [token, now, self.ttl_ms, self.safety_ms]
        )
        if released:
            await self._call("ZADD", self.keys.expiry, now + self.ttl_ms, ids.id)

    async def _release_later(self, ids: ChannelKeys, token: str, lapses: float) -> None:
        while time.monotonic() < lapses:
            await asyncio.sleep(RELEASE_RETRY)
            with contextlib.suppress(StoreUnavailable):
                await self._release_once(ids, token)
                log.info("reader lease released after the outage")
                return

    # --- deletion and expiry ----------------------------------------------------------------

    async def delete(self, key: ChannelKey) -> bool:
        ids = self.keys.channel(key)
        reply = await self._script("delete", ids.keys, [ids.notify])
        if int(reply[0]) == 0:
            return False
        await self._forget(ids)
        self.metrics.channel_disposed += 1
        self.metrics.messages_lost += int(reply[1])
        return True

    async def _forget(self, ids: ChannelKeys) -> None:
        """Drop a deleted channel from the index and the counts. Only the node whose ZREM removed
        the index entry decrements, so the counts stay exact whoever noticed the deletion (a
        sweep, a delete, or keys that lapsed by their safety TTL)."""
        removed, _ = await self._pipeline(
            [("ZREM", self.keys.expiry, ids.id), ("ZREM", self.keys.channels, ids.id)]
        )
        if removed:
            await self._pipeline(
                [("DECR", self.keys.count), ("DECR", self.keys.count_of(ids.agent))]
            )

    async def expire(self) -> list[str]:
        now = self._now_ms()
        due = [
            _text(raw)
            for raw in await self._call(
                "ZRANGEBYSCORE", self.keys.expiry, "-inf", now, "LIMIT", 0, 1000
            )
        ]
        # all at once: their scripts share pipelines, so a sweep costs round trips per batch
        replies = await asyncio.gather(
            *(self._expire_script(channel_id, now) for channel_id in due), return_exceptions=True
        )
        later: dict[str, int] = {}  # not due after all (read since, or being read): check again
        gone: list[str] = []  # deleted by our script, or already gone: forget them
        expired: list[str] = []
        failed: list[BaseException] = []
        for channel_id, reply in zip(due, replies, strict=True):
            if isinstance(reply, BaseException):
                failed.append(reply)  # still in the index: the next sweep tries it again
                continue
            code = int(reply[0])
            if code == 1:
                later[channel_id] = int(reply[1])
                continue
            gone.append(channel_id)
            if code == 2:
                self.metrics.channel_disposed += 1
                self.metrics.messages_lost += int(reply[3])
                self.metrics.channel_duration.observe((now - int(reply[2])) / 1000)
                expired.append(_text(reply[1]))
        if failed and not expired:
            raise failed[0]
        if failed:
            log.warning("expiry sweep incomplete", extra={"failed": len(failed)})
        try:
            await self._reindex(later, gone)
        except StoreUnavailable as exc:
            # the channels are deleted all the same (report them: their webhook must fire);
            # their index entries stay, and a later sweep finds them gone and forgets them
            log.warning("expiry bookkeeping deferred", extra={"detail": exc.message})
        return expired

    async def _expire_script(self, channel_id: str, now: int) -> Any:
        ids = self.keys.channel_by_id(channel_id)
        return await self._script("expire", ids.keys, [now, self.ttl_ms])

    async def _reindex(self, later: dict[str, int], gone: list[str]) -> None:
        """One sweep's bookkeeping in two pipelines: the next check of the channels not due yet,
        and the index and counts of the deleted ones (see _forget: only the node whose ZREM
        removed an entry decrements, so the counts stay exact)."""
        if not later and not gone:
            return
        commands: list[tuple[str | bytes | int, ...]] = []
        if later:
            scored = [part for channel_id, at in later.items() for part in (at, channel_id)]
            commands.append(("ZADD", self.keys.expiry, *scored))
        commands.extend(("ZREM", self.keys.expiry, channel_id) for channel_id in gone)
        if gone:
            commands.append(("ZREM", self.keys.channels, *gone))
        results = await self._pipeline(commands)
        removed = results[1 if later else 0 : len(results) - (1 if gone else 0)]
        per_agent = Counter(
            channel_id.split(".", 1)[0] for channel_id, n in zip(gone, removed, strict=True) if n
        )
        if per_agent:
            decrements: list[tuple[str | bytes | int, ...]] = [
                ("DECRBY", self.keys.count, sum(per_agent.values()))
            ]
            decrements.extend(
                ("DECRBY", self.keys.count_of(agent), count) for agent, count in per_agent.items()
            )
            await self._pipeline(decrements)

    async def list(self, skip: int, limit: int) -> list[ChannelInfo]:
        """A page in creation order (``Pchannels``), the addresses fetched in one pipeline."""
        ids = await self._call("ZRANGE", self.keys.channels, skip, skip + limit - 1)
        channels = [self.keys.channel_by_id(_text(raw)) for raw in ids]
        if not channels:
            return []
        addresses = await self._pipeline([("HGET", c.meta, "addr") for c in channels])
        return [
            ChannelInfo(_text(address), channel.agent)
            for channel, address in zip(channels, addresses, strict=True)
            if address is not None  # deleted meanwhile, its index entry not yet dropped
        ]

    async def count(self, agent: str | None = None) -> int:
        """Channels in the whole cluster (of one agent, or of all)."""
        value = await self._call("GET", self.keys.count_of(agent))
        return int(value or 0)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watcher in list(self.notifications.watchers.values()):
            if isinstance(watcher, RedisSubscription):
                watcher.close()
        for later in list(self._retrying):
            later.cancel()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._background:
            await asyncio.wait(set(self._background), timeout=2)
        self.client.close()
        await self.notifications.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
