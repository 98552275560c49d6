"""``Megaphone``: the blocking client over a connection pool (``_pool_sync``), twin of
``AsyncMegaphone``."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import closing
from types import TracebackType
from typing import Any, Self, overload

import httpx

from megaphone.client import _base, _http11
from megaphone.client._base import Answer, Request
from megaphone.client._errors import HTTPStatusError, MegaphoneClientError, TransportError
from megaphone.client._httpx import HttpxPool
from megaphone.client._models import Channel, Event, Failure, Gap
from megaphone.client._pool_sync import SyncPool

__all__ = ["Megaphone"]


class Megaphone:
    """A blocking Megaphone client: the same methods as ``AsyncMegaphone``; ``read`` is an iterator.

    One keep-alive connection pool per client object, which threads may share; see
    ``AsyncMegaphone`` for the arguments (``transport``: any ``httpx.BaseTransport``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        read_timeout: float | None = None,
        transport: httpx.BaseTransport | None = None,
        backoff_initial: float = _base.BACKOFF_INITIAL,
        backoff_max: float = _base.BACKOFF_CAP,
    ) -> None:
        self.base_url = base_url
        self._token = token
        self._timeout_value = timeout
        self._read_timeout_value = read_timeout
        self._backoff = _base.backoff_settings(backoff_initial, backoff_max)
        self._http: SyncPool | HttpxPool
        if transport is None and not _http11.through_proxy(base_url):
            self._http = SyncPool(base_url, _base.base_headers())
        else:
            self._http = HttpxPool(base_url, _base.base_headers(), transport, timeout)
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

    def _send(self, request: Request) -> Answer:
        self._check_open()
        return self._http.send(request, self._timeout_value)

    # -- producer side -------------------------------------------------------------------------

    def create(self, protocols: Sequence[str] | None = None) -> Channel:
        """``POST /create``: a new channel."""
        return _base.parse_create(self._send(_base.build_create(self._token, protocols)))

    def write(self, producer_address: str, stream_id: str, body: Any, *, retries: int = 0) -> None:
        """``POST /write``; see ``AsyncMegaphone.write``."""
        request = _base.build_write(self._token, producer_address, stream_id, body)
        backoff = _base.Backoff(*self._backoff)
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
        state = _base.ReadState(
            consumer_address,
            after=after,
            stream_ids=stream_ids,
            model=model,
            backoff=_base.Backoff(*self._backoff),
        )
        return self._read(state, on_gap, None)

    def _read_timeout(self, deadline: float | None) -> float | None:
        read = self._read_timeout_value
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.001)
            read = left if read is None else min(read, left)
        return read

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
                        request, self._timeout_value, self._read_timeout(deadline)
                    ) as response:
                        if response.status != 200:  # read to its end: the connection is reused
                            content = response.read()
                            error = _base.status_error(response.status, content, response.headers)
                        else:
                            error = None
                            gap = state.opened(response.headers)
                            if gap is not None:
                                if on_gap is None:
                                    yield gap
                                else:
                                    on_gap(gap)
                            while (chunk := response.next_chunk()) is not None:
                                yield from state.feed(chunk)
                                _check_deadline(deadline)
                    if error is not None:
                        raise error
                    state.ended()
                    continue
                except TransportError:
                    _check_deadline(deadline)
                    raise
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
        state = _base.ReadState(
            consumer_address,
            after=after,
            stream_ids=[stream_id],
            backoff=_base.Backoff(*self._backoff),
        )
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
