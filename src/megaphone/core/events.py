"""Events, serialised once at write time.

An event on the wire is one NDJSON line ``{"sid","eid","ts","body"}``. The broker builds that line
when the write is accepted; every later step (buffering, delivery, replay) only moves bytes.
"""

from __future__ import annotations

import os
import random
import string
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from megaphone.errors import BadRequest

EVENT_ID_LENGTH = 23
# what a buffered event costs besides its serialised line (the Event tuple, its eid, the bytes
# object's header, a queue slot): memory budgets count ``len(line) + EVENT_OVERHEAD`` per event
EVENT_OVERHEAD = 160
_ALNUM = (string.ascii_letters + string.digits).encode("ascii")
# bytes 0..247 map onto the 62 alphanumerics without bias (248 = 4 * 62); 248..255 are dropped.
_TABLE = bytes(_ALNUM[i % 62] for i in range(248)) + bytes(range(248, 256))
_DROP = bytes(range(248, 256))


def _alphanumerics(length: int, source: Any) -> str:
    out = b""
    while len(out) < length:
        out += source(length + 8).translate(_TABLE, _DROP)
    return out[:length].decode("ascii")


class _Pool:
    """Alphanumerics drawn from ``source`` a few KiB at a time and handed out in slices: one
    random call and one translation per ~170 identifiers, not per identifier."""

    __slots__ = ("_buffer", "_position", "_source")

    SIZE = 4096

    def __init__(self, source: Any) -> None:
        self._source = source
        self.reset()

    def reset(self) -> None:
        self._buffer = ""
        self._position = 0

    def take(self, length: int) -> str:
        start = self._position
        end = start + length
        if end > len(self._buffer):
            self._buffer = _alphanumerics(max(self.SIZE, length), self._source)
            start, end = 0, length
        self._position = end
        return self._buffer[start:end]


# a generator of our own: code that seeds the global ``random`` (tests, libraries) must not make
# two events share an id
_ids = random.Random(os.urandom(16))
_secure = _Pool(os.urandom)
_event_ids = _Pool(_ids.randbytes)


def _after_fork() -> None:
    # a forked child must not hand out the parent's buffered values again
    _ids.seed(os.urandom(16))
    _secure.reset()
    _event_ids.reset()


os.register_at_fork(after_in_child=_after_fork)


def secure_alphanumerics(length: int) -> str:
    """Random alphanumerics from the OS CSPRNG (capabilities: consumer addresses)."""
    return _secure.take(length)


def new_event_id() -> str:
    """23 random alphanumerics, as the original (an identifier, not a secret)."""
    return _event_ids.take(EVENT_ID_LENGTH)


class _Clock:
    """RFC 3339 UTC timestamps with microseconds, the per-second prefix cached."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time_ns()
        second = t // 1_000_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return "%s.%06dZ" % (self._prefix, t // 1000 % 1_000_000)  # noqa: UP031 - the fastest


_clock = _Clock()


class Event(NamedTuple):
    eid: str
    line: bytes  # the serialised NDJSON line, newline included


def make_event(stream_id: str, body: Any) -> Event:
    """Serialise one event; a body orjson cannot write back (nested deeper than 254) is 400."""
    eid = new_event_id()
    try:
        # orjson's result keeps a ~4 KiB allocation whatever its length; the concatenation makes
        # the exact-size copy we retain (in the buffer and the replay window), adding the newline
        line = (
            orjson.dumps({"sid": stream_id, "eid": eid, "ts": _clock.now(), "body": body}) + b"\n"
        )
    except orjson.JSONEncodeError as exc:
        raise BadRequest(f"event body cannot be serialised: {exc}") from None
    return Event(eid, line)
