"""What the client's own HTTP/1.1 connection pools share: the origin, request bytes, errors.

The pools in ``_pool_async`` (asyncio protocol) and ``_pool_sync`` (blocking socket) speak
HTTP/1.1 through h11 (a dependency of httpcore, so it comes with httpx): h11 writes the requests
and parses the answers, chunked bodies included; nothing here parses HTTP by hand. They exist
because a write through httpx cost 0.75 to 1.1 ms of the client's CPU here (its URL and header
models, httpcore's pool, anyio), through these pools ~0.12 ms; an event read 24 µs against 16 µs
(``bench/runs/2026-12-02-client.md``, ``bench/client.py --cpu``). httpx is kept where it adds
something: a ``transport=`` given by the caller (tests, mocks) and a proxy named by the
environment (``HTTP_PROXY`` and friends, which httpx honours) go through ``_httpx``; TLS uses
httpx's own ``create_ssl_context()``, so ``https`` verifies exactly as httpx would.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from megaphone.client._base import Answer, Request
from megaphone.client._errors import TransportError

# A read's body bytes buffered before the pool stops reading the socket (back-pressure).
HIGH_WATER = 256 * 1024
# Idle keep-alive connections a pool keeps.
MAX_IDLE = 100
# The largest status line + headers accepted from the server.
MAX_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the requests go: scheme, host, port, the ``Host`` header and the base path."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    prefix: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        header = shown if port == default else f"{shown}:{port}"
        return cls(parts.scheme, host, port, header.encode("idna"), parts.path.rstrip("/"))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def through_proxy(base_url: str) -> bool:
    """Whether the environment names a proxy for ``base_url`` (then httpx carries the requests)."""
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.netloc)


def ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context: certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set."""
    import httpx

    context = httpx.create_ssl_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


def encode(
    conn: h11.Connection, origin: Origin, request: Request, defaults: list[tuple[bytes, bytes]]
) -> bytes:
    """The request's bytes, written by h11 on ``conn`` (which then expects its answer)."""
    headers = [(b"host", origin.host_header), *defaults]
    headers += [(name.encode(), value.encode()) for name, value in request.headers.items()]
    content = request.content
    if content is not None:
        headers.append((b"content-length", str(len(content)).encode()))
    elif request.method == "POST":
        headers.append((b"content-length", b"0"))
    target = (origin.prefix + request.path).encode()
    try:
        event = h11.Request(method=request.method, target=target, headers=headers)
    except h11.LocalProtocolError as exc:  # a token or cursor no header can carry: not retried
        raise ValueError(f"cannot send this request: {exc}") from exc
    out = conn.send(event) or b""
    if content:
        out += conn.send(h11.Data(data=content)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def head(response: h11.Response) -> tuple[int, Mapping[str, str]]:
    """Status and headers (lower-case names; repeated ones joined with ``", "``)."""
    headers: dict[str, str] = {}
    for name, value in response.headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return response.status_code, headers


def answer(status: int, headers: Mapping[str, str], parts: list[bytes]) -> Answer:
    return Answer(status, headers, parts[0] if len(parts) == 1 else b"".join(parts))


def reusable(conn: h11.Connection) -> bool:
    """Whether the exchange is over and the connection can carry the next one (then it does)."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False


class Closed(Exception):
    """The server closed the connection before the answer was complete."""


def wire_error(exc: BaseException) -> TransportError:
    """A socket, TLS, h11 or timeout error as the client's ``TransportError``."""
    if isinstance(exc, TimeoutError):
        name = "ReadTimeout"
    elif isinstance(exc, Closed):
        name = "RemoteProtocolError"
    else:
        name = type(exc).__name__
    text = str(exc)
    return TransportError(f"{name}: {text}" if text else name)


def connect_error(exc: BaseException) -> TransportError:
    if isinstance(exc, TimeoutError):
        return TransportError("ConnectTimeout")
    return TransportError(f"ConnectError: {exc}")


WIRE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ssl.SSLError, ConnectionError, socket.timeout (TimeoutError) included
    h11.ProtocolError,
    Closed,
)
