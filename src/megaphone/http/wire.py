"""HTTP/1.x response framing: status lines, headers, chunks. Bytes only, no I/O."""

from __future__ import annotations

from http import HTTPStatus

from megaphone.errors import MegaphoneError

JSON = b"application/json"
NDJSON = b"application/x-ndjson"

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
NO_STORE = b"cache-control: no-store\r\n"
STREAM_HEADERS = NO_STORE + b"x-accel-buffering: no\r\n"


def response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = JSON,
    keep_alive: bool = True,
    http10: bool = False,
    extra: bytes = b"",
    head: bool = False,
) -> bytes:
    """A complete response with a Content-Length body (only the headers if ``head``: the answer
    to a HEAD request announces the body's length but must not carry it). A HEAD on a stream
    (``content_type`` NDJSON) gets the headers its GET would start with: chunked for HTTP/1.1, no
    length (RFC 9110 8.6: a Content-Length must be the GET's), and the connection as asked."""
    connection = b""
    if not keep_alive:
        connection = b"connection: close\r\n"
    elif http10:
        connection = b"connection: keep-alive\r\n"
    if status == 204:  # no body, and no Content-Length either (RFC 9110 8.6)
        return b"%b%b%b\r\n" % (_STATUS_LINES[status], connection, extra)
    if head and content_type == NDJSON:
        return b"%bcontent-type: %b\r\n%b%b%b%b\r\n" % (
            _STATUS_LINES[status],
            content_type,
            b"" if http10 else b"transfer-encoding: chunked\r\n",
            STREAM_HEADERS,
            connection,
            extra,
        )
    return b"%bcontent-type: %b\r\ncontent-length: %d\r\n%b%b\r\n%b" % (
        _STATUS_LINES[status],
        content_type,
        len(body),
        connection,
        extra,
        b"" if head else body,
    )


def error_response(
    error: MegaphoneError,
    *,
    keep_alive: bool,
    http10: bool = False,
    head: bool = False,
    extra: bytes = b"",
) -> bytes:
    return response(
        error.status,
        error.body(),
        keep_alive=keep_alive,
        http10=http10,
        extra=error.headers() + extra,
        head=head,
    )


def stream_head(*, chunked: bool, content_type: bytes = NDJSON, extra: bytes = b"") -> bytes:
    """Headers of a streamed 200: chunked for HTTP/1.1, close-delimited for HTTP/1.0."""
    framing = b"transfer-encoding: chunked\r\n" if chunked else b"connection: close\r\n"
    return b"%bcontent-type: %b\r\n%b%b%b\r\n" % (
        _STATUS_LINES[200],
        content_type,
        framing,
        STREAM_HEADERS,
        extra,
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)
