"""``AsyncMegaphone``: the asyncio client, a thin layer over a connection pool (``_pool_async``)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any, Self, overload

import httpx

from megaphone.client import _base, _http11
from megaphone.client._base import Answer, Request
from megaphone.client._errors import HTTPStatusError, MegaphoneClientError, TransportError
from megaphone.client._httpx import AsyncHttpxPool
from megaphone.client._models import Channel, Event, Failure, Gap
from megaphone.client._pool_async import AsyncPool

__all__ = ["AsyncMegaphone"]


class AsyncMegaphone:
    """A Megaphone client for asyncio: one keep-alive connection pool per client object.

    ``token`` is sent as ``Authorization: Bearer`` on the producer endpoints (create, write,
    write-batch, channelsExists), never on reads. ``timeout`` bounds the connect and each wait
    for the server of every request; ``read_timeout`` bounds the wait for the next bytes of a read
    (``None``: none, as a read may stay quiet for the whole poll window). ``backoff_initial`` and
    ``backoff_max`` (seconds) shape the back-off of read reconnects and write retries. The
    requests go through the client's own HTTP/1.1 pool (h11); ``transport``, any
    ``httpx.AsyncBaseTransport`` (tests, mocks), puts httpx in its place, as does a proxy named by
    the environment (``HTTP_PROXY``, ...).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        read_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = _base.BACKOFF_INITIAL,
        backoff_max: float = _base.BACKOFF_CAP,
    ) -> None:
        self.base_url = base_url
        self._token = token
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._backoff = _base.backoff_settings(backoff_initial, backoff_max)
        self._http: AsyncPool | AsyncHttpxPool
        if transport is None and not _http11.through_proxy(base_url):
            self._http = AsyncPool(base_url, _base.base_headers())
        else:
            self._http = AsyncHttpxPool(base_url, _base.base_headers(), transport, timeout)
        self._closed = False

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; closing twice is harmless, using the client after raises."""
        if self._closed:
            return
        self._closed = True
        await self._http.aclose()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Megaphone client is closed")

    async def _send(self, request: Request) -> Answer:
        self._check_open()
        return await self._http.send(request, self._timeout)

    # -- producer side -------------------------------------------------------------------------

    async def create(self, protocols: Sequence[str] | None = None) -> Channel:
        """``POST /create``: a new channel."""
        return _base.parse_create(await self._send(_base.build_create(self._token, protocols)))

    async def write(
        self, producer_address: str, stream_id: str, body: Any, *, retries: int = 0
    ) -> None:
        """``POST /write``: one event of ``stream_id`` (any string) with ``body`` (any JSON).

        With ``retries > 0`` a full channel (``ChannelFullError``), another 5xx or a network error
        is retried that many times with back-off, then raised. A retry after a network error may
        write the event twice (with two eids) if the first attempt did reach the server.
        """
        request = _base.build_write(self._token, producer_address, stream_id, body)
        backoff = _base.Backoff(*self._backoff)
        for attempt in range(retries + 1):
            try:
                return _base.parse_write(await self._send(request))
            except MegaphoneClientError as exc:
                if attempt >= retries or not _base.retryable_write_error(exc):
                    raise
            await asyncio.sleep(backoff.next_delay())

    async def write_batch(
        self,
        producers: Iterable[str],
        messages: Iterable[tuple[str, Any] | Mapping[str, Any]],
    ) -> list[Failure]:
        """``POST /write-batch``: every message to every producer address; the failures.

        ``messages`` are ``(stream_id, body)`` pairs or ``{"streamId": ..., "body": ...}`` dicts.
        """
        request = _base.build_write_batch(self._token, producers, messages)
        return _base.parse_write_batch(await self._send(request))

    async def channels_exist(self, addresses: Iterable[str]) -> dict[str, bool]:
        """``POST /channelsExists``: which of these (producer or consumer) addresses exist."""
        request = _base.build_channels_exist(self._token, addresses)
        return _base.parse_channels_exist(await self._send(request))

    # -- reader side ---------------------------------------------------------------------------

    @overload
    def read(
        self,
        consumer_address: str,
        *,
        after: str | None = None,
        stream_ids: Iterable[str] | None = None,
        on_gap: None = None,
        model: Any = None,
    ) -> AsyncGenerator[Event | Gap, None]: ...

    @overload
    def read(
        self,
        consumer_address: str,
        *,
        after: str | None = None,
        stream_ids: Iterable[str] | None = None,
        on_gap: Callable[[Gap], Any],
        model: Any = None,
    ) -> AsyncGenerator[Event, None]: ...

    def read(
        self,
        consumer_address: str,
        *,
        after: str | None = None,
        stream_ids: Iterable[str] | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
        model: Any = None,
    ) -> AsyncGenerator[Event | Gap, None] | AsyncGenerator[Event, None]:
        """Every event of the channel, endlessly, across read windows and dropped connections.

        See the package docstring: resumes with ``Last-Event-ID``, drops duplicates by eid,
        retries ``409`` / 5xx / the network with back-off, raises ``ChannelNotFoundError`` when the
        channel is gone. A gap (unknown cursor) goes to ``on_gap`` (a function or coroutine
        function) when given, else it is yielded as a ``Gap`` item. ``stream_ids`` keeps only
        those streams; ``model`` decodes each body (pydantic ``TypeAdapter``).
        """
        self._check_open()
        state = _base.ReadState(
            consumer_address,
            after=after,
            stream_ids=stream_ids,
            model=model,
            backoff=_base.Backoff(*self._backoff),
        )
        return self._read(state, on_gap)

    async def _read(
        self, state: _base.ReadState, on_gap: Callable[[Gap], Any] | None
    ) -> AsyncGenerator[Event | Gap, None]:
        while True:
            self._check_open()
            try:
                async with self._http.stream(
                    state.request(), self._timeout, self._read_timeout
                ) as response:
                    if response.status != 200:  # read to its end: the connection is reused
                        content = await response.read()
                        error = _base.status_error(response.status, content, response.headers)
                    else:
                        error = None
                        gap = state.opened(response.headers)
                        if gap is not None:
                            if on_gap is None:
                                yield gap
                            else:
                                result = on_gap(gap)
                                if inspect.isawaitable(result):
                                    await result
                        while (chunk := await response.next_chunk()) is not None:
                            for event in state.feed(chunk):
                                yield event
                if error is not None:
                    raise error
                state.ended()
                continue
            except (TransportError, HTTPStatusError) as exc:
                delay = state.failed(exc)
            await asyncio.sleep(delay)

    async def wait_for(
        self,
        consumer_address: str,
        stream_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the issue's name; asyncio.timeout inside)
        after: str | None = None,
    ) -> Event:
        """The first event of ``stream_id`` on the channel: the delayed-response pattern.

        Reads the channel (events of other streams are consumed and dropped) until an event of
        ``stream_id`` arrives; ``TimeoutError`` after ``timeout`` seconds. A gap is ignored: the
        wait goes on, and ``timeout`` bounds it.
        """
        async with asyncio.timeout(timeout):
            stream = self.read(
                consumer_address, after=after, stream_ids=[stream_id], on_gap=_ignore_gap
            )
            async with aclosing(stream):
                async for event in stream:
                    return event
        raise AssertionError("unreachable: read() never ends")


def _ignore_gap(gap: Gap) -> None:
    return None
