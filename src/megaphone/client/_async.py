"""``AsyncMegaphone``: the asyncio client, a thin layer over ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any, Self, overload

import httpx

from megaphone.client import _base
from megaphone.client._base import Request
from megaphone.client._errors import HTTPStatusError, MegaphoneClientError, TransportError
from megaphone.client._models import Channel, Event, Failure, Gap

__all__ = ["AsyncMegaphone"]


class AsyncMegaphone:
    """A Megaphone client for asyncio: one keep-alive connection pool per client object.

    ``token`` is sent as ``Authorization: Bearer`` on the producer endpoints (create, write,
    write-batch, channelsExists), never on reads. ``timeout`` bounds every request; ``read_timeout``
    bounds the wait for the next bytes of a read (``None``: none, as a read may stay quiet for the
    whole poll window). ``transport`` is any ``httpx.AsyncBaseTransport`` (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        read_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._token = token
        self._timeout = httpx.Timeout(timeout)
        self._read_timeout = httpx.Timeout(timeout, read=read_timeout)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=self._timeout,
            transport=transport,
            headers=_base.base_headers(),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        )
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

    async def _send(self, request: Request) -> httpx.Response:
        self._check_open()
        try:
            return await self._http.request(
                request.method, request.path, headers=request.headers, content=request.content
            )
        except httpx.TransportError as exc:
            raise _base.transport_error(exc) from exc

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
        backoff = _base.Backoff()
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
        state = _base.ReadState(consumer_address, after=after, stream_ids=stream_ids, model=model)
        return self._read(state, on_gap)

    async def _read(
        self, state: _base.ReadState, on_gap: Callable[[Gap], Any] | None
    ) -> AsyncGenerator[Event | Gap, None]:
        while True:
            self._check_open()
            request = state.request()
            try:
                try:
                    async with self._http.stream(
                        request.method,
                        request.path,
                        headers=request.headers,
                        timeout=self._read_timeout,
                    ) as response:
                        if response.status_code != 200:
                            await response.aread()
                            raise _base.status_error(
                                response.status_code, response.content, response.headers
                            )
                        gap = state.opened(response.headers)
                        if gap is not None:
                            if on_gap is None:
                                yield gap
                            else:
                                result = on_gap(gap)
                                if inspect.isawaitable(result):
                                    await result
                        async for chunk in response.aiter_bytes():
                            for event in state.feed(chunk):
                                yield event
                    state.ended()
                    continue
                except httpx.TransportError as exc:
                    raise _base.transport_error(exc) from exc
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
