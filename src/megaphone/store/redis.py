"""The Redis channel store: any node serves any channel, and a restart loses nothing.

The only module that imports redis. Layout, with ``P`` the key prefix and ``{id}`` a hash tag (the
agent name and the hex channel digest) so that Redis Cluster keeps one channel's keys on one shard:

* ``P{id}:m`` hash: ``addr`` consumer address, ``created`` and ``exp`` (ms), ``np``/``pb`` pending
  events and their bytes, ``ns``/``sb`` sent-but-unconfirmed events and their bytes, ``dl`` stream
  id of the last event handed to a reader, ``reader``/``lease`` the one-reader lease, ``confirmed``
  the newest eid a cursor confirmed;
* ``P{id}:p`` stream: the channel's events, pre-serialised (``e`` eid, ``l`` NDJSON line).
  Entries up to ``dl`` are the replay window (sent, kept until a read confirms them; a take hands
  out only what fits the window and then says it is full), entries after it are pending;
* ``P{id}:w`` list: tickets of writers waiting for room, in arrival order (FIFO across nodes);
* ``P{id}:n`` pub/sub channel: "new events" (``""``) or "deleted" (``"d"``) for the reading node;
* ``Pexpiry`` sorted set: channel ids by the time to check them for expiry; ``Pcount``: channels;
* ``Pagents`` hash: the agents' AES keys, shared by every node (first writer wins).

Each step that must be atomic is a Lua script on one channel's keys. A reader's lease lasts its
poll window plus a margin, so a crashed node cannot hold a channel forever. Expiry is a sweep on
every node: the delete script runs on one channel's keys and only the node whose script deleted it
reports it, so the ``on-channel-deleted`` webhook fires once per channel cluster-wide. Keys also
carry a safety TTL, so nothing leaks if no node is left to sweep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from megaphone.core.addressing import ChannelKey, new_agent_key
from megaphone.core.events import EVENT_OVERHEAD, Event
from megaphone.errors import Busy, ChannelLimit, NotFound, StoreUnavailable, WriteTimeout
from megaphone.metrics import Metrics
from megaphone.store.base import ChannelInfo, ChannelStore, ReadSink, ResumeStatus, Subscription
from megaphone.store.resp import RespClient, RespSubscriber, pack

log = logging.getLogger("megaphone.store.redis")
T = TypeVar("T")

_LUA_IDS = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function gt(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am > bm or (am == bm and as > bs)
end
local function after(id)
  local ms, seq = parse(id)
  return ms .. '-' .. (seq + 1)
end
local function expire_all(ms)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ms) end
end
"""

# KEYS m p w; ARGV addr now ttl safety
CREATE = """
redis.call('HSET', KEYS[1], 'addr', ARGV[1], 'created', ARGV[2], 'exp', ARGV[2] + ARGV[3],
           'np', 0, 'dl', '0-0')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS m p w; ARGV eid line capacity ticket now enqueue notify safety capacity_bytes overhead
WRITE = (
    _LUA_IDS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local now = tonumber(ARGV[5])
while true do
  local head = redis.call('LINDEX', KEYS[3], 0)
  if not head then break end
  if tonumber(string.match(head, '^(%d+):')) < now then redis.call('LPOP', KEYS[3]) else break end
end
local head = redis.call('LINDEX', KEYS[3], 0)
local queued_before = head and head ~= ARGV[4]
local np = tonumber(redis.call('HGET', KEYS[1], 'np'))
local size = #ARGV[2] + tonumber(ARGV[10])
local full = np >= tonumber(ARGV[3]) or
  (np > 0 and tonumber(redis.call('HGET', KEYS[1], 'pb') or '0') + size > tonumber(ARGV[9]))
if queued_before or full then
  if ARGV[6] == '1' then
    redis.call('RPUSH', KEYS[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
  return 0
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[1], 'l', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'np', 1)
redis.call('HINCRBY', KEYS[1], 'pb', size)
if head == ARGV[4] then redis.call('LPOP', KEYS[3]) end
-- wake the reader only if it waits: after each take it arms ``wk``, and one notification per
-- take is enough, whatever was written meanwhile
if redis.call('HGET', KEYS[1], 'wk') == '1' and redis.call('HEXISTS', KEYS[1], 'reader') == 1 then
  redis.call('HDEL', KEYS[1], 'wk')
  redis.call('PUBLISH', ARGV[7], '')
end
if redis.call('PTTL', KEYS[2]) < 0 then
  redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
end
return 1
"""
)

# KEYS m p w; ARGV token now lease after safety overhead → {status, start id}; status -1 gone,
# -2 busy, 0 no cursor, 1 resumed, 2 unknown cursor. A cursor confirms the sent events up to it; no
# cursor confirms them all (such a reader cannot resume).
ATTACH = (
    _LUA_IDS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local now = tonumber(ARGV[2])
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease') or '0')
if redis.call('HEXISTS', KEYS[1], 'reader') == 1 and lease > now then return {-2, ''} end
redis.call('HSET', KEYS[1], 'reader', ARGV[1], 'lease', now + tonumber(ARGV[3]))
expire_all(ARGV[5])
local dl = redis.call('HGET', KEYS[1], 'dl')
if ARGV[4] == '' then
  redis.call('XTRIM', KEYS[2], 'MINID', after(dl))
  redis.call('HSET', KEYS[1], 'ns', 0, 'sb', 0)
  return {0, dl}
end
local sent = redis.call('XRANGE', KEYS[2], '-', dl)
local bytes = 0
for i = 1, #sent do
  local id, fields = sent[i][1], sent[i][2]
  bytes = bytes + #fields[4] + tonumber(ARGV[6])
  if fields[2] == ARGV[4] then
    redis.call('XTRIM', KEYS[2], 'MINID', after(id))
    redis.call('HSET', KEYS[1], 'confirmed', ARGV[4])
    redis.call('HINCRBY', KEYS[1], 'ns', -i)
    redis.call('HINCRBY', KEYS[1], 'sb', -bytes)
    return {1, id}
  end
end
if redis.call('HGET', KEYS[1], 'confirmed') == ARGV[4] then return {1, '-'} end
return {2, '-'}
"""
)

# KEYS m p; ARGV token from count window window_bytes overhead now lease safety →
# {code, new, id1, line1, id2, line2, ...}; code -1 lease lost, 0 ok, 2 the replay window is full
# (the read must end so that the next one confirms it). Marks the returned events as sent; with
# the window off (size 0) sent events are trimmed at once. Renews the lease (and the keys' safety
# TTL when half of it has passed).
TAKE = (
    _LUA_IDS
    + """
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return {-1, 0} end
local start = ARGV[2]
if start ~= '-' then start = '(' .. start end
local entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[3])
local out = {0, 0}
redis.call('HSET', KEYS[1], 'wk', '1', 'lease', tonumber(ARGV[7]) + tonumber(ARGV[8]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[9]) / 2 then expire_all(ARGV[9]) end
local window, window_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local overhead = tonumber(ARGV[6])
local ns = tonumber(redis.call('HGET', KEYS[1], 'ns') or '0')
local sb = tonumber(redis.call('HGET', KEYS[1], 'sb') or '0')
local dl = redis.call('HGET', KEYS[1], 'dl')
local new, bytes, last = 0, 0, nil
for i = 1, #entries do
  local id, line = entries[i][1], entries[i][2][4]
  if gt(id, dl) then
    local size = #line + overhead
    if window > 0 and ns > 0 and (ns >= window or sb + size > window_bytes) then
      out[1] = 2
      break
    end
    new, bytes, last = new + 1, bytes + size, id
    if window > 0 then ns, sb = ns + 1, sb + size end
  end
  out[#out + 1] = id
  out[#out + 1] = line
end
if window > 0 and ns >= window then out[1] = 2 end
out[2] = new
if new > 0 then
  local pending = redis.call('HINCRBY', KEYS[1], 'np', -new)
  redis.call('HINCRBY', KEYS[1], 'pb', -bytes)
  redis.call('HSET', KEYS[1], 'dl', last)
  if window > 0 then
    redis.call('HSET', KEYS[1], 'ns', ns, 'sb', sb)
  else
    redis.call('XTRIM', KEYS[2], 'MAXLEN', pending)
  end
end
return out
"""
)

# KEYS m p; ARGV token now lease safety → 1 renewed, 0 not ours (lost): a reader whose sink
# cannot take events keeps its lease
RENEW = (
    _LUA_IDS
    + """
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', tonumber(ARGV[2]) + tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) / 2 then expire_all(ARGV[4]) end
return 1
"""
)

# KEYS m p w; ARGV token now ttl safety → 1 released, 0 not ours
RELEASE = (
    _LUA_IDS
    + """
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'reader', 'lease')
redis.call('HSET', KEYS[1], 'exp', tonumber(ARGV[2]) + tonumber(ARGV[3]))
expire_all(ARGV[4])
return 1
"""
)

# KEYS m p w; ARGV now ttl → {0} gone, {1, next check ms} not due, {2, addr, created, lost}
EXPIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local now = tonumber(ARGV[1])
local exp = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if redis.call('HEXISTS', KEYS[1], 'reader') == 1 then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease'))
  if lease > now then return {1, lease + tonumber(ARGV[2])} end
  exp = math.max(exp, lease + tonumber(ARGV[2]))
end
if exp > now then return {1, exp} end
local info = redis.call('HMGET', KEYS[1], 'addr', 'created', 'np')
local lost = tonumber(info[3]) + redis.call('LLEN', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {2, info[1], info[2], lost}
"""

# KEYS m p w; ARGV notify → {0} gone, {1, lost}
DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local lost = tonumber(redis.call('HGET', KEYS[1], 'np')) + redis.call('LLEN', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], 'd')
return {1, lost}
"""

STATUS = {0: ResumeStatus.NONE, 1: ResumeStatus.RESUMED, 2: ResumeStatus.UNKNOWN}
TAKE_BATCH = 256
RELEASE_TRIES = 6  # over ~1.6 s, before the read may end; then retried until the lease lapses
RELEASE_RETRY = 0.25  # seconds between the later retries of a release


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Keys:
    __slots__ = ("id", "keys", "meta", "notify")

    def __init__(self, prefix: str, key: ChannelKey) -> None:
        self.id = f"{key.agent}.{key.digest.hex()}"
        base = f"{prefix}{{{self.id}}}"
        self.meta = base + ":m"
        self.keys = [self.meta, base + ":p", base + ":w"]
        self.notify = base + ":n"


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
        lease: float = 25.0,
        poll: float = 5.0,
        max_connections: int = 256,
        timeout: float = 5.0,
        agent_check: float = 1.0,
    ) -> None:
        self.metrics = metrics
        self.agent_check = agent_check  # how often the agent keys are checked (and restored)
        self.prefix = prefix
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.replay_size = replay_size
        self.replay_bytes = replay_bytes
        self.ttl_ms = int(ttl * 1000)
        self.lease_ms = int(lease * 1000)
        self.lease = lease
        # every reader takes (or renews its lease) at every tick: at least twice per lease
        self.poll = min(poll, lease / 2)
        self.timeout = timeout  # one call or one pipeline: a hung Redis is a 503, not a hang
        # keys outlive their lifetime by a margin, so a channel is only ever removed by a sweep
        # (which fires the webhook) unless no node is left to sweep
        self.safety_ms = self.ttl_ms * 2 + self.lease_ms + 60_000
        # a pooled connection that predates a Redis restart fails its next command: retry it on
        # a fresh connection instead of answering 503 while Redis is back
        # a bounded pool that makes a command wait for a free connection (up to 5 s) instead of
        # failing at once when every connection is busy: a burst must queue, not answer 503
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,
            # no per-reply timer (redis-py arms one per reply, a pipeline's included): the store
            # bounds each call or pipeline as a whole with ``timeout`` instead
            socket_timeout=None,
            socket_keepalive=True,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._resp = RespClient(url, timeout) if RespClient.supports(url) else None
        self._scripts = _Pipeliner(
            self.redis,
            self._resp,
            {
                "create": CREATE,
                "write": WRITE,
                "attach": ATTACH,
                "take": TAKE,
                "renew": RENEW,
                "release": RELEASE,
                "expire": EXPIRE,
                "delete": DELETE,
            },
            self._spawn,
            timeout,
        )
        self._expiry = prefix + "expiry"
        self._count = prefix + "count"
        self._agents = prefix + "agents"
        self._pubsub = _PubSub(self.redis.connection_pool, on_connect=self._wake_all)
        # notifications on a lean connection of our own when the address allows (as the
        # scripts); else redis-py's PubSub and the _listen task
        self._subscriber = (
            RespSubscriber(url, self._on_message, self._wake_all) if self._resp else None
        )
        self._subscribing = asyncio.Lock()
        self._readers: dict[str, _RedisSubscription] = {}
        self._releasing: dict[str, asyncio.Future[None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._kept: dict[str, bytes] = {}  # agent keys this node uses: restored if Redis loses them
        self._background: set[asyncio.Task[Any]] = set()
        self._retrying: set[asyncio.Future[None]] = set()  # releases retried until their lapse
        self._closed = False
        self._started = False
        self._stopped: Exception | None = None  # shutting down: writes no longer wait

    # --- plumbing ---------------------------------------------------------------------------

    async def _call(self, what: Awaitable[T]) -> T:
        """Run one Redis call, translating its failures once into ``StoreUnavailable``."""
        try:
            async with asyncio.timeout(self.timeout):
                return await what
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            raise _unavailable(exc) from exc

    async def _notifications(self, change: Callable[[str], Awaitable[Any]], channel: str) -> None:
        """Subscribe or unsubscribe, one at a time: redis-py's PubSub connects lazily, and
        concurrent first calls would each take a connection of their own, the listener reading
        only the last (the others' notifications never read, their connections never returned)."""
        async with self._subscribing:
            await self._call(change(channel))

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
        loop = asyncio.get_running_loop()
        if self._subscriber is not None:
            self._subscriber.start()
        else:
            self._listener = loop.create_task(self._listen())
        self._ticker = loop.create_task(self._tick())
        self._keeper = loop.create_task(self._keep_agents())

    async def _subscribe(self, channel: str) -> None:
        if self._subscriber is not None:
            self._subscriber.subscribe(channel)
        else:
            await self._notifications(self._pubsub.subscribe, channel)

    async def _unsubscribe(self, channel: str) -> None:
        if self._subscriber is not None:
            self._subscriber.unsubscribe(channel)
        else:
            await self._notifications(self._pubsub.unsubscribe, channel)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        subscription = self._readers.get(channel.decode())
        if subscription is not None:
            subscription.notified(data.decode())

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    async def agent_keys(self, names: list[str]) -> dict[str, bytes]:
        """Each agent's key, shared by every node: the first node to start creates it (HSETNX,
        so two nodes starting together agree). The store keeps them (see _keep_agents)."""
        keys: dict[str, bytes] = {}
        for name in names:
            candidate = base64.b64encode(new_agent_key())
            await self._call(self.redis.hsetnx(self._agents, name, candidate))
            stored = await self._call(self.redis.hget(self._agents, name))
            assert stored is not None
            keys[name] = base64.b64decode(stored)
        self._kept.update(keys)
        return keys

    async def agent_key(self, name: str) -> bytes | None:
        """Any node's agent key, as stored; kept from then on like this node's own."""
        stored = await self._call(self.redis.hget(self._agents, name))
        if stored is None:
            return None
        key = base64.b64decode(stored)
        self._kept[name] = key
        return key

    async def restore_agent_keys(self) -> list[str]:
        """Write back the kept keys that Redis lost (``FLUSHALL``, a restart without
        persistence, eviction), each with HSETNX: whichever node restores a key first, every
        node restores the same one. The names restored by this call."""
        if not self._kept:
            return []
        names = list(self._kept)
        stored = await self._call(self.redis.hmget(self._agents, names))
        restored: list[str] = []
        for name, value in zip(names, stored, strict=True):
            if value is None:
                encoded = base64.b64encode(self._kept[name])
                if await self._call(self.redis.hsetnx(self._agents, name, encoded)):
                    restored.append(name)
            elif base64.b64decode(value) != self._kept[name]:
                # another key was minted meanwhile (a node started in the moment between the loss
                # and the restore): ours stays in use here; addresses of the other do not open
                log.error("agent key conflict: Redis holds another key", extra={"agent": name})
        if restored:
            log.warning("agent keys restored", extra={"agents": ",".join(restored)})
        return restored

    async def _keep_agents(self) -> None:
        while True:
            await asyncio.sleep(self.agent_check)
            # Redis away: the next check restores them once it is back
            with contextlib.suppress(StoreUnavailable):
                await self.restore_agent_keys()

    # --- ChannelStore -----------------------------------------------------------------------

    async def create(self, key: ChannelKey, consumer_address: str, limit: int) -> None:
        ids = _Keys(self.prefix, key)
        # reserve a place first, so that concurrent creates on any node never overshoot the limit
        if await self._call(self.redis.incr(self._count)) > limit:
            await self._call(self.redis.decr(self._count))
            raise ChannelLimit(f"the cluster holds its maximum of {limit} channels")
        now = _now_ms()
        try:
            await self._script(
                "create", ids.keys, [consumer_address, now, self.ttl_ms, self.safety_ms]
            )
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._expiry, {ids.id: now + self.ttl_ms})
                pipe.incr(self._count_key(key.agent))
                await self._call(pipe.execute())
        except StoreUnavailable:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.decr(self._count)
            raise
        self.metrics.channel_created += 1

    async def exists(self, key: ChannelKey) -> bool:
        return bool(await self._call(self.redis.exists(_Keys(self.prefix, key).meta)))

    async def write(self, key: ChannelKey, event: Event, wait: float) -> None:
        ids = _Keys(self.prefix, key)
        deadline = time.monotonic() + wait
        ticket = f"{_now_ms() + int(wait * 1000)}:{os.urandom(6).hex()}"
        enqueue = "1" if wait > 0 else "0"
        delay = 0.005
        while True:
            written = await self._script(
                "write",
                ids.keys,
                [
                    event.eid,
                    event.line,
                    self.capacity,
                    ticket,
                    _now_ms(),
                    enqueue,
                    ids.notify,
                    self.safety_ms,
                    self.capacity_bytes,
                    EVENT_OVERHEAD,
                ],
            )
            if written == 1:
                self.metrics.messages_received += 1
                return
            if written == -1:
                self.metrics.messages_unroutable += 1
                raise NotFound("channel not found")
            enqueue = "0"  # queued once (FIFO); now wait for our turn and room
            remaining = deadline - time.monotonic()
            if self._stopped is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self._call(self.redis.lrem(ids.keys[2], 0, ticket))
                raise self._stopped
            if remaining <= 0:
                with contextlib.suppress(StoreUnavailable):
                    await self._call(self.redis.lrem(ids.keys[2], 0, ticket))
                raise WriteTimeout(
                    f"channel buffer stayed full ({self.capacity} events or "
                    f"{self.capacity_bytes} bytes)"
                )
            try:
                await asyncio.sleep(min(delay, remaining))
            except asyncio.CancelledError:
                self._spawn(self.redis.lrem(ids.keys[2], 0, ticket))
                raise
            delay = min(delay * 2, 0.05)

    def stop_waiting(self, error: Exception) -> None:
        self._stopped = error  # each waiting write sees it within its next poll (<= 50 ms)

    async def attach(self, key: ChannelKey, sink: ReadSink, after: str | None) -> Subscription:
        ids = _Keys(self.prefix, key)
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
                    _now_ms(),
                    self.lease_ms,
                    after or "",
                    self.safety_ms + self.lease_ms,
                    EVENT_OVERHEAD,
                ],
            )
        )
        try:
            code, start = await asyncio.shield(script)
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
        subscription = _RedisSubscription(self, ids, sink, token, _text(start), STATUS[int(code)])
        subscription.renewed = leased
        self._readers[ids.notify] = subscription
        try:
            with contextlib.suppress(StoreUnavailable):  # the reader polls until notified again
                await self._subscribe(ids.notify)
            await self.start()
        except asyncio.CancelledError:
            subscription.close()
            raise
        return subscription

    async def _take(
        self, ids: _Keys, token: str, start: str
    ) -> tuple[int, list[tuple[str, bytes]], bool]:
        """(new events, events, window full); new is -1 when the lease is lost."""
        reply = await self._script(
            "take",
            ids.keys[:2],
            [
                token,
                start,
                TAKE_BATCH,
                self.replay_size,
                self.replay_bytes,
                EVENT_OVERHEAD,
                _now_ms(),
                self.lease_ms,
                self.safety_ms,
            ],
        )
        code = int(reply[0])
        if code == -1:
            return -1, [], False
        items = reply[2:]
        events = [(_text(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        return int(reply[1]), events, code == 2

    async def _renew(self, ids: _Keys, token: str) -> bool:
        """Renew a reader's lease; False when it is lost."""
        renewed = await self._script(
            "renew", ids.keys[:2], [token, _now_ms(), self.lease_ms, self.safety_ms]
        )
        return bool(renewed)

    async def _release(self, ids: _Keys, token: str, lapses: float | None = None) -> None:
        """Release a reader's lease: a few quick tries (the read ends after them), then, if Redis
        is still away, retries in the background until the lease would have lapsed anyway
        (``lapses``, monotonic), so that a read cut by an outage frees its channel as soon as
        Redis is back, not a whole lease later."""
        if lapses is None:
            lapses = time.monotonic() + self.lease
        if self._readers.get(ids.notify) is not None and self._readers[ids.notify].token == token:
            del self._readers[ids.notify]
        with contextlib.suppress(StoreUnavailable):
            await self._unsubscribe(ids.notify)
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

    async def _release_once(self, ids: _Keys, token: str) -> None:
        now = _now_ms()
        released = await self._script(
            "release", ids.keys, [token, now, self.ttl_ms, self.safety_ms]
        )
        if released:
            await self._call(self.redis.zadd(self._expiry, {ids.id: now + self.ttl_ms}))

    async def _release_later(self, ids: _Keys, token: str, lapses: float) -> None:
        while time.monotonic() < lapses:
            await asyncio.sleep(RELEASE_RETRY)
            with contextlib.suppress(StoreUnavailable):
                await self._release_once(ids, token)
                log.info("reader lease released after the outage")
                return

    async def delete(self, key: ChannelKey) -> bool:
        ids = _Keys(self.prefix, key)
        reply = await self._script("delete", ids.keys, [ids.notify])
        if int(reply[0]) == 0:
            return False
        await self._forget(ids.id)
        self.metrics.channel_disposed += 1
        self.metrics.messages_lost += int(reply[1])
        return True

    async def _forget(self, channel_id: str) -> None:
        """Drop a deleted channel from the index and the counts. Only the node whose ZREM removed
        the index entry decrements, so the counts stay exact whoever noticed the deletion (a
        sweep, a delete, or keys that lapsed by their safety TTL)."""
        if await self._call(self.redis.zrem(self._expiry, channel_id)):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.decr(self._count)
                pipe.decr(self._count_key(channel_id.split(".", 1)[0]))
                await self._call(pipe.execute())

    async def expire(self) -> list[str]:
        now = _now_ms()
        due = [
            _text(raw)
            for raw in await self._call(
                self.redis.zrangebyscore(self._expiry, "-inf", now, 0, 1000)
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
        base = f"{self.prefix}{{{channel_id}}}"
        return await self._script(
            "expire", [base + ":m", base + ":p", base + ":w"], [now, self.ttl_ms]
        )

    async def _reindex(self, later: dict[str, int], gone: list[str]) -> None:
        """One sweep's bookkeeping in two pipelines: the next check of the channels not due yet,
        and the index and counts of the deleted ones (see _forget: only the node whose ZREM
        removed an entry decrements, so the counts stay exact)."""
        if not later and not gone:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            if later:
                pipe.zadd(self._expiry, later)
            for channel_id in gone:
                pipe.zrem(self._expiry, channel_id)
            results = await self._call(pipe.execute())
        removed = results[1:] if later else results
        per_agent = Counter(
            channel_id.split(".", 1)[0] for channel_id, n in zip(gone, removed, strict=True) if n
        )
        if per_agent:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.decrby(self._count, sum(per_agent.values()))
                for agent, count in per_agent.items():
                    pipe.decrby(self._count_key(agent), count)
                await self._call(pipe.execute())

    async def list(self, skip: int, limit: int) -> list[ChannelInfo]:
        ids = await self._call(self.redis.zrange(self._expiry, skip, skip + limit - 1))
        out = []
        for raw in ids:
            channel_id = _text(raw)
            address = await self._call(self.redis.hget(f"{self.prefix}{{{channel_id}}}:m", "addr"))
            if address is not None:
                out.append(ChannelInfo(_text(address), channel_id.split(".", 1)[0]))
        return out

    async def count(self, agent: str | None = None) -> int:
        """Channels in the whole cluster (of one agent, or of all)."""
        value = await self._call(self.redis.get(self._count_key(agent)))
        return int(value or 0)

    def _count_key(self, agent: str | None) -> str:
        return self._count if agent is None else f"{self._count}:{agent}"

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._readers.values()):
            subscription.close()
        for later in list(self._retrying):
            later.cancel()
        for task in (self._listener, self._ticker, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._background:
            await asyncio.wait(set(self._background), timeout=2)
        if self._resp is not None:
            self._resp.close()
        if self._subscriber is not None:
            await self._subscriber.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    # --- notifications ----------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            try:
                if not self._pubsub.subscribed:
                    await asyncio.sleep(0.05)
                    continue
                # blocks until a message (a dead connection raises; the unsubscribe of the
                # node's last reader answers too, so an idle listener goes back to sleeping)
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=None
                )
                delay = 0.05
            except (RedisError, OSError, RuntimeError) as exc:
                log.warning("redis notifications interrupted", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if message is None or message.get("type") != "message":
                continue
            subscription = self._readers.get(_text(message["channel"]))
            if subscription is not None:
                subscription.notified(_text(message["data"]))

    async def _tick(self) -> None:
        """The safety net under the notifications: every reader looks again every ``poll``."""
        while True:
            await asyncio.sleep(self.poll)
            self._wake_all()

    def _wake_all(self) -> None:
        for subscription in list(self._readers.values()):
            subscription.resume()


class _PubSub(PubSub):
    """The notification connection; each (re)connect wakes every reader of the node, since what
    was published while it was down is lost (redis-py reconnects and resubscribes silently)."""

    def __init__(self, pool: aioredis.ConnectionPool, on_connect: Callable[[], None]) -> None:
        super().__init__(pool)
        self._woken = on_connect

    async def on_connect(self, connection: Connection) -> None:
        await super().on_connect(connection)
        self._woken()


# one script call waiting for its pipeline: name, keys, args, the caller's future
_Call = tuple[str, list[str], list[Any], asyncio.Future[Any]]


class _Pipeliner:
    """Auto-pipelining of the Lua scripts: the calls made in one turn of the event loop (the
    writes of every request that arrived together, the takes of every woken reader) go to Redis
    as one pipeline, so the round trip, the pool checkout and the system calls are paid once per
    batch instead of once per call. Each caller still gets its own reply, or ``StoreUnavailable``.

    Scripts run by SHA; a Redis that lost them (restart, ``SCRIPT FLUSH``) answers NOSCRIPT
    without running anything, so those calls are loaded and sent again.
    """

    MAX_BATCH = 512

    def __init__(
        self,
        redis: aioredis.Redis,
        resp: RespClient | None,
        sources: dict[str, str],
        spawn: Callable[[Awaitable[None]], asyncio.Future[None]],
        timeout: float,
    ) -> None:
        self.redis = redis
        self.resp = resp  # the lean script connection; None: redis-py pipelines (rediss://)
        self.timeout = timeout
        self.sources = sources
        self.shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in sources.items()}
        self.spawn = spawn
        self.pending: list[_Call] = []

    def call(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((name, keys, args, future))
        return future

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), self.MAX_BATCH):
            self.spawn(self._run(pending[start : start + self.MAX_BATCH]))

    async def _run(self, batch: list[_Call]) -> None:
        try:
            replies = await self._execute(batch)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                for name, source in self.sources.items():
                    self.shas[name] = await self.redis.script_load(source)
                again = await self._execute([batch[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except (RedisError, OSError) as exc:
            replies = [exc] * len(batch)
        for (_, _, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller was cancelled; the script ran all the same
                continue
            if isinstance(reply, Exception):
                error = _unavailable(reply)
                error.__cause__ = reply
                future.set_exception(error)
            else:
                future.set_result(reply)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        if self.resp is not None:
            shas = self.shas
            return await self.resp.execute(
                [
                    pack(("EVALSHA", shas[name], len(keys), *keys, *args))
                    for name, keys, args, _ in batch
                ]
            )
        pipe: Pipeline
        async with asyncio.timeout(self.timeout), self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args, _ in batch:
                pipe.evalsha(self.shas[name], len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


class _RedisSubscription:
    """A reader attached on this node: a task that takes events from the stream into the sink."""

    def __init__(
        self,
        store: RedisStore,
        ids: _Keys,
        sink: ReadSink,
        token: str,
        start: str,
        status: ResumeStatus,
    ) -> None:
        self.store = store
        self.ids = ids
        self.sink = sink
        self.token = token
        self.last = start
        self.status = status
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.released: asyncio.Future[None] | None = None
        self.closed = False
        self.renewed = time.monotonic()  # when the last call that renewed the lease was sent

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

    def notified(self, data: str) -> None:
        if data == "d":
            self._end()
        else:
            self.wake.set()

    def close(self) -> asyncio.Future[None] | None:
        if self.closed:
            return self.released
        self.closed = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        store, notify = self.store, self.ids.notify
        self.released = released = store._spawn(
            store._release(self.ids, self.token, self.renewed + store.lease)
        )
        store._releasing[notify] = released
        released.add_done_callback(
            lambda _: (
                store._releasing.pop(notify, None)
                if store._releasing.get(notify) is released
                else None
            )
        )
        return released

    def _end(self) -> None:
        if not self.closed:
            self.sink.end()

    async def _run(self) -> None:
        store, metrics = self.store, self.store.metrics
        backoff = 0.05
        while not self.closed:
            self.wake.clear()
            sent = time.monotonic()
            if self.sink.writable:
                try:
                    new, events, full = await store._take(self.ids, self.token, self.last)
                except StoreUnavailable:
                    await asyncio.sleep(backoff)  # Redis is away: try again soon, not at a tick
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                if new == -1:  # the lease is gone (channel deleted or lapsed)
                    self._end()
                    return
                self.renewed = sent
                if events:
                    self.last = events[-1][0]
                    metrics.messages_read += new
                    metrics.messages_replayed += len(events) - new
                    self.sink.deliver([line for _, line in events])
                if full:  # the client must reconnect and confirm before it gets more
                    if not self.closed:
                        self.sink.window_full()
                    return
                if events and len(events) == TAKE_BATCH:
                    continue  # there may be more already
                # the take armed the channel's notification: the next write wakes us
            else:  # the sink is full: no take, but the lease is kept (at every tick)
                try:
                    if not await store._renew(self.ids, self.token):
                        self._end()
                        return
                    self.renewed = sent
                except StoreUnavailable:
                    pass  # the next tick tries again
            await self.wake.wait()


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """The one translation of a Redis failure (a call's or a pipelined script's)."""
    return StoreUnavailable(f"redis unavailable: {type(exc).__name__}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
