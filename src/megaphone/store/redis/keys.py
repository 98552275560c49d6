"""Every Redis key name of the store, built in one place.

With ``P`` the prefix and ``{id}`` a hash tag (the agent name and the hex channel digest), so
that Redis Cluster keeps one channel's keys on one shard:

* ``P{id}:m`` hash: ``addr`` consumer address, ``created`` and ``exp`` (ms), ``np``/``pb`` pending
  events and their bytes, ``ns``/``sb`` sent-but-unconfirmed events and their bytes, ``dl`` stream
  id of the last event handed to a reader, ``reader``/``lease`` the one-reader lease, ``wk`` the
  reader waits for a wake-up, ``confirmed`` the newest eid a cursor confirmed;
* ``P{id}:p`` stream: the channel's events, pre-serialised (``e`` eid, ``l`` NDJSON line).
  Entries up to ``dl`` are the replay window, entries after it are pending;
* ``P{id}:w`` list: tickets of writers waiting for room, in arrival order (FIFO across nodes);
* ``P{id}:i`` sorted set: idempotency keys of applied writes, scored by when they are forgotten;
* ``P{id}:n`` pub/sub channel: "new events" (``""``), "deleted" (``"d"``), or an event handed
  over (``token previous-dl id full line``, see write.lua) for the reading node;
* ``Pexpiry`` sorted set: channel ids by the time to check them for expiry; ``Pcount`` and
  ``Pcount:<agent>``: channels;
* ``Pchannels`` sorted set: channel ids by creation time (ms), the stable order of
  ``/channel/list`` (a page is a ``ZRANGE`` by rank);
* ``Pagents`` hash: the agents' AES keys (base64), shared by every node.
"""

from __future__ import annotations

from megaphone.core.addressing import ChannelKey
from megaphone.store.redis.connection import bulks


class ChannelKeys:
    """The keys of one channel."""

    __slots__ = ("_packed", "id", "idem", "keys", "meta", "notify", "stream", "waiting")

    def __init__(self, prefix: str, channel_id: str) -> None:
        self.id = channel_id
        base = f"{prefix}{{{channel_id}}}"
        self.meta = base + ":m"
        self.stream = base + ":p"
        self.waiting = base + ":w"
        self.idem = base + ":i"
        self.keys = [self.meta, self.stream, self.waiting, self.idem]  # a script's KEYS
        self.notify = base + ":n"
        self._packed: tuple[bytes, bytes, bytes] | None = None

    def packed(self) -> tuple[bytes, bytes, bytes]:
        """``m p``, ``m p w i`` and ``notify`` as RESP bulk strings, packed once: the KEYS of the
        take and of the write, and the write's notification channel."""
        if self._packed is None:
            meta, stream, waiting, idem = self.keys
            two = bulks((meta, stream))
            self._packed = (two, two + bulks((waiting, idem)), bulks((self.notify,)))
        return self._packed

    @property
    def agent(self) -> str:
        return self.id.split(".", 1)[0]


class Keys:
    """The key names under one prefix."""

    __slots__ = ("agents", "channels", "count", "expiry", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.expiry = prefix + "expiry"
        self.channels = prefix + "channels"
        self.count = prefix + "count"
        self.agents = prefix + "agents"

    def channel(self, key: ChannelKey) -> ChannelKeys:
        return ChannelKeys(self.prefix, f"{key.agent}.{key.digest.hex()}")

    def channel_by_id(self, channel_id: str) -> ChannelKeys:
        return ChannelKeys(self.prefix, channel_id)

    def count_of(self, agent: str | None) -> str:
        return self.count if agent is None else f"{self.count}:{agent}"
