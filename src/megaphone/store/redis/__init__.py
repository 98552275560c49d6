"""The Redis channel store (``store = "redis"``): any node serves any channel and any agent, and a
restart loses nothing. See ``docs/redis.md``.

* ``store.py`` — :class:`RedisStore`, the :class:`~megaphone.store.base.ChannelStore`;
* ``lua/`` — the channel rules, one script per atomic step, loaded by ``pipeliner.py``, which
  also batches the script calls of one event-loop turn;
* ``keys.py`` — every key name; ``url.py`` — ``redis://``, ``rediss://`` (TLS), ``unix://``;
* ``connection.py`` — the one transport (hand-packed RESP, hiredis replies, TLS by ``ssl``);
* ``notifications.py`` — wake-ups for the readers of this node; ``subscription.py`` — a reader.
"""

from megaphone.store.redis.store import RedisStore

__all__ = ["RedisStore"]
