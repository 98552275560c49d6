"""The same pool interface as ``_pool_async`` / ``_pool_sync``, carried by httpx.

Used when the caller hands the client an httpx ``transport=`` (tests, mocks, custom transports)
or when the environment names a proxy for the base URL (httpx honours ``HTTP_PROXY``,
``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``). httpx's errors are translated here, once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType

import httpx

from megaphone.client._base import Answer, Request, transport_error

__all__ = ["AsyncHttpxPool", "HttpxPool"]

LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=100)


class AsyncHttpxStream:
    def __init__(self, client: httpx.AsyncClient, request: Request, timeout: httpx.Timeout) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._context: AbstractAsyncContextManager[httpx.Response] | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._response: httpx.Response | None = None
        self.status = 0
        self.headers: Mapping[str, str] = {}

    async def __aenter__(self) -> AsyncHttpxStream:
        request = self._request
        self._context = self._client.stream(
            request.method, request.path, headers=request.headers, timeout=self._timeout
        )
        try:
            self._response = await self._context.__aenter__()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        self.status, self.headers = self._response.status_code, self._response.headers
        return self

    async def next_chunk(self) -> bytes | None:
        assert self._response is not None
        if self._chunks is None:
            self._chunks = self._response.aiter_bytes()
        try:
            return await anext(self._chunks, None)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc

    async def read(self) -> bytes:
        assert self._response is not None
        try:
            return await self._response.aread()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(self._chunks, AsyncGenerator):
            await self._chunks.aclose()
        if self._context is not None:
            await self._context.__aexit__(exc_type, exc, tb)


class AsyncHttpxPool:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        transport: httpx.AsyncBaseTransport | None,
        timeout: float | None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers=headers,
            limits=LIMITS,
        )

    async def send(self, request: Request, limit: float | None) -> Answer:
        try:
            response = await self._client.request(
                request.method,
                request.path,
                headers=request.headers,
                content=request.content,
                timeout=httpx.Timeout(limit),
            )
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        return Answer(response.status_code, response.headers, response.content)

    def stream(
        self, request: Request, timeout: float | None, read: float | None
    ) -> AsyncHttpxStream:
        return AsyncHttpxStream(self._client, request, httpx.Timeout(timeout, read=read))

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxStream:
    def __init__(self, client: httpx.Client, request: Request, timeout: httpx.Timeout) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._context: AbstractContextManager[httpx.Response] | None = None
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self.status = 0
        self.headers: Mapping[str, str] = {}

    def __enter__(self) -> HttpxStream:
        request = self._request
        self._context = self._client.stream(
            request.method, request.path, headers=request.headers, timeout=self._timeout
        )
        try:
            self._response = self._context.__enter__()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        self.status, self.headers = self._response.status_code, self._response.headers
        return self

    def next_chunk(self) -> bytes | None:
        assert self._response is not None
        if self._chunks is None:
            self._chunks = self._response.iter_bytes()
        try:
            return next(self._chunks, None)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc

    def read(self) -> bytes:
        assert self._response is not None
        try:
            return self._response.read()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(self._chunks, Generator):
            self._chunks.close()
        if self._context is not None:
            self._context.__exit__(exc_type, exc, tb)


class HttpxPool:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        transport: httpx.BaseTransport | None,
        timeout: float | None,
    ) -> None:
        self._client = httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers=headers,
            limits=LIMITS,
        )

    def send(self, request: Request, timeout: float | None) -> Answer:
        try:
            response = self._client.request(
                request.method,
                request.path,
                headers=request.headers,
                content=request.content,
                timeout=httpx.Timeout(timeout),
            )
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        return Answer(response.status_code, response.headers, response.content)

    def stream(self, request: Request, timeout: float | None, read: float | None) -> HttpxStream:
        return HttpxStream(self._client, request, httpx.Timeout(timeout, read=read))

    def close(self) -> None:
        self._client.close()
