"""``Megaphone``: the blocking client over ``httpx.Client``, twin of ``AsyncMegaphone``."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import closing
from types import TracebackType
from typing import Any, Self, overload

import httpx

from megaphone.client import _base
from megaphone.client._base import Request
from megaphone.client._errors import HTTPStatusError, MegaphoneClientError, TransportError
from megaphone.client._models import Channel, Event, Failure, Gap

__all__ = ["Megaphone"]


class Megaphone:
    """A blocking Megaphone client: the same methods as ``AsyncMegaphone``; ``read`` is an iterator.

    One keep-alive connection pool per client object (``httpx.Client``); see ``AsyncMegaphone``
    for the arguments.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        read_timeout: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._token = token
        self._timeout_value = timeout
        self._read_timeout_value = read_timeout
        self._http = httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers=_base.base_headers(),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        )
        self._closed = False

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool; closing twice is harmless, using the client after raises."""
        if self._closed:
            return
        self._closed = True
        self._http.close()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Megaphone client is closed")

    def _send(self, request: Request) -> httpx.Response:
        self._check_open()
        try:
            return self._http.request(
                request.method, request.path, headers=request.headers, content=request.content
            )
        except httpx.TransportError as exc:
            raise _base.transport_error(exc) from exc

    # -- producer side -------------------------------------------------------------------------

    def create(self, protocols: Sequence[str] | None = None) -> Channel:
        """``POST /create``: a new channel."""
        return _base.parse_create(self._send(_base.build_create(self._token, protocols)))

    def write(self, producer_address: str, stream_id: str, body: Any, *, retries: int = 0) -> None:
        """``POST /write``; see ``AsyncMegaphone.write``."""
        request = _base.build_write(self._token, producer_address, stream_id, body)
        backoff = _base.Backoff()
        for attempt in range(retries + 1):
            try:
                return _base.parse_write(self._send(request))
            except MegaphoneClientError as exc:
                if attempt >= retries or not _base.retryable_write_error(exc):
                    raise
            time.sleep(backoff.next_delay())

    def write_batch(
        self,
        producers: Iterable[str],
        messages: Iterable[tuple[str, Any] | Mapping[str, Any]],
    ) -> list[Failure]:
        """``POST /write-batch``; see ``AsyncMegaphone.write_batch``."""
        request = _base.build_write_batch(self._token, producers, messages)
        return _base.parse_write_batch(self._send(request))

    def channels_exist(self, addresses: Iterable[str]) -> dict[str, bool]:
        """``POST /channelsExists``: which of these (producer or consumer) addresses exist."""
        request = _base.build_channels_exist(self._token, addresses)
        return _base.parse_channels_exist(self._send(request))

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
    ) -> Generator[Event | Gap, None, None]: ...

    @overload
    def read(
        self,
        consumer_address: str,
        *,
        after: str | None = None,
        stream_ids: Iterable[str] | None = None,
        on_gap: Callable[[Gap], Any],
        model: Any = None,
    ) -> Generator[Event, None, None]: ...

    def read(
        self,
        consumer_address: str,
        *,
        after: str | None = None,
        stream_ids: Iterable[str] | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
        model: Any = None,
    ) -> Generator[Event | Gap, None, None] | Generator[Event, None, None]:
        """Every event of the channel, endlessly; see ``AsyncMegaphone.read``."""
        self._check_open()
        state = _base.ReadState(consumer_address, after=after, stream_ids=stream_ids, model=model)
        return self._read(state, on_gap, None)

    def _timeout(self, deadline: float | None) -> httpx.Timeout:
        read = self._read_timeout_value
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.001)
            read = left if read is None else min(read, left)
        return httpx.Timeout(self._timeout_value, read=read)

    def _read(
        self,
        state: _base.ReadState,
        on_gap: Callable[[Gap], Any] | None,
        deadline: float | None,
    ) -> Generator[Event | Gap, None, None]:
        while True:
            self._check_open()
            _check_deadline(deadline)
            request = state.request()
            try:
                try:
                    with self._http.stream(
                        request.method,
                        request.path,
                        headers=request.headers,
                        timeout=self._timeout(deadline),
                    ) as response:
                        if response.status_code != 200:
                            response.read()
                            raise _base.status_error(
                                response.status_code, response.content, response.headers
                            )
                        gap = state.opened(response.headers)
                        if gap is not None:
                            if on_gap is None:
                                yield gap
                            else:
                                on_gap(gap)
                        for chunk in response.iter_bytes():
                            yield from state.feed(chunk)
                            _check_deadline(deadline)
                    state.ended()
                    continue
                except httpx.TransportError as exc:
                    _check_deadline(deadline)
                    raise _base.transport_error(exc) from exc
            except (TransportError, HTTPStatusError) as exc:
                delay = state.failed(exc)
            if deadline is not None:
                delay = min(delay, max(deadline - time.monotonic(), 0.0))
            time.sleep(delay)

    def wait_for(
        self,
        consumer_address: str,
        stream_id: str,
        *,
        timeout: float | None = None,
        after: str | None = None,
    ) -> Event:
        """The first event of ``stream_id``; see ``AsyncMegaphone.wait_for``."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        state = _base.ReadState(consumer_address, after=after, stream_ids=[stream_id])
        with closing(self._read(state, _ignore_gap, deadline)) as stream:
            for event in stream:
                if isinstance(event, Event):
                    return event
        raise AssertionError("unreachable: read() never ends")


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError("no event of the stream before the timeout")


def _ignore_gap(gap: Gap) -> None:
    return None
