"""A Python client for Megaphone: producers and readers that never hand-write the resume loop.

::

    from megaphone.client import AsyncMegaphone

    async with AsyncMegaphone("http://localhost:3000", token=None) as mp:
        channel = await mp.create()
        await mp.write(channel.producer_address, "greetings", {"hello": "world"})
        async for item in mp.read(channel.consumer_address):
            print(item)            # Event(sid='greetings', eid='…', ts=datetime(…), body={…})

``Megaphone`` is the blocking twin, with the same methods (``read`` is a plain iterator,
``close()`` instead of ``aclose()``). Each client object holds one keep-alive connection pool;
share it. The pool is the client's own HTTP/1.1 one, with h11 as the parser (``_pool_async``,
``_pool_sync``: a fifth to a sixth of httpx's CPU per request); httpx carries the requests instead
when the caller passes an httpx ``transport=``, or when the environment names a proxy for the base
URL (see ``_http11``). This package imports no server code: only httpx (and h11, which comes with
it), orjson and the standard library (pydantic only when a read is given a ``model``).

**Reads.** ``read(consumer_address)`` is an endless stream across read windows: when a response
ends (the poll window is over, or the server delivered a full replay window) or the connection
drops, it reconnects with ``Last-Event-ID: <last eid>``, so nothing acknowledged is lost; events
are de-duplicated by eid (a replay); ``409 BUSY`` (the server has not yet noticed a dropped
connection), ``5xx`` and network errors are retried with exponential back-off and jitter (50 ms
doubling to 5 s by default: ``backoff_initial``, ``backoff_max``; reset by the next successful
response); ``404`` ends it with
``ChannelNotFoundError``; other ``4xx`` raise. NDJSON lines split across HTTP chunks are
reassembled. ``stream_ids`` keeps only those streams (several logical streams multiplexed on one
channel; the others are still consumed: one reader per channel). ``model`` decodes each body with
a pydantic ``TypeAdapter`` (``DecodingError`` when it does not fit). Leave a read early with
``contextlib.aclosing`` (or ``aclose()`` on the generator) so its connection is released at once.

**Gaps.** When the server does not find the cursor in its replay window (``megaphone-resume:
unknown-cursor``: the cursor was confirmed already, or from another channel), events may be
missing. That is never silent, in one of two ways chosen by the caller:

- ``on_gap=None`` (the default): the stream yields a ``Gap(after=cursor)`` item where the gap is,
  so the iterator yields ``Event | Gap`` (the type says so; mypy makes the caller look);
- ``on_gap=callback``: the callback (a function, or a coroutine function for the async client) is
  called with the ``Gap`` before the events that follow it, and the stream yields ``Event`` only.

Why: a gap is a position in the stream (events before it are complete, after it may not be), so
by default it is an item of the stream, in order, with nothing to forget to register; code that
prefers events only says so explicitly with a callback (typed overloads give it
``AsyncIterator[Event]``).

**Delayed response.** ``wait_for(consumer_address, stream_id, timeout=...)`` returns the first
event of that stream id (``TimeoutError`` after ``timeout``): the backend answers a long-running
request later on the channel whose consumer address it handed out at once.

**Writes.** ``write`` raises ``ChannelFullError`` when the channel stayed full for the server's
write timeout; ``write(..., retries=n)`` retries that, other 5xx and network errors with back-off
(a write retried after a network error may be written twice, with two eids). The bearer
``token`` goes on the producer endpoints only.

Exceptions (``_errors``)::

    MegaphoneClientError
    ├── TransportError
    ├── DecodingError
    └── HTTPStatusError (status, code, message)
        ├── BadRequestError 400, UnauthorizedError 401, ChannelNotFoundError 404, BusyError 409
        ├── ChannelFullError 503 TIMEOUT (retry_after), UnavailableError other 503
        └── ServerError other 5xx

A closed client raises ``RuntimeError`` when used (closing twice is harmless).
"""

from megaphone.client._async import AsyncMegaphone
from megaphone.client._errors import (
    BadRequestError,
    BusyError,
    ChannelFullError,
    ChannelNotFoundError,
    DecodingError,
    HTTPStatusError,
    MegaphoneClientError,
    ServerError,
    TransportError,
    UnauthorizedError,
    UnavailableError,
)
from megaphone.client._models import Channel, Event, Failure, Gap
from megaphone.client._sync import Megaphone

__all__ = [
    "AsyncMegaphone",
    "BadRequestError",
    "BusyError",
    "Channel",
    "ChannelFullError",
    "ChannelNotFoundError",
    "DecodingError",
    "Event",
    "Failure",
    "Gap",
    "HTTPStatusError",
    "Megaphone",
    "MegaphoneClientError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
]
