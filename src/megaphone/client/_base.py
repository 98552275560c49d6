"""Sans-I/O core shared by ``AsyncMegaphone`` and ``Megaphone``: no sockets, no sleeping.

Request building (paths, headers, bodies), answer parsing into models, error translation, the
NDJSON line splitter, the resume state of a read (cursor, recent eids, back-off) live here; the
twins in ``_async`` and ``_sync`` only move bytes and sleep.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson

from megaphone import __version__
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

USER_AGENT = f"megaphone-client/{__version__}"
RESUME_HEADER = "megaphone-resume"
UNKNOWN_CURSOR = "unknown-cursor"
# Recent eids remembered per read, to drop duplicates (a replay of events already seen). Larger
# than the server's default replay window (1,000), which is what an unknown cursor replays.
RECENT_EIDS = 4096

# Back-off of retried requests and reconnects: 50 ms doubling to 5 s, "equal jitter" (half the
# delay fixed, half random), so many clients cut at once do not come back in step. The clients
# take other values (``backoff_initial``, ``backoff_max``).
BACKOFF_INITIAL = 0.05
BACKOFF_CAP = 5.0


@dataclass(frozen=True, slots=True)
class Request:
    """What to send: method, path (already percent-encoded), extra headers, body."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: status, headers (lower-case names), body."""

    status: int
    headers: Mapping[str, str]
    content: bytes


def backoff_settings(initial: float, cap: float) -> tuple[float, float]:
    """The clients' ``backoff_initial`` and ``backoff_max``, checked."""
    if not initial > 0 or not cap >= initial:
        raise ValueError(f"back-off: need 0 < backoff_initial <= backoff_max, not {initial}, {cap}")
    return initial, cap


def segment(value: str) -> str:
    """One path segment, percent-encoded (``/`` included; dots too, so ``..`` stays a segment)."""
    return quote(value, safe="").replace(".", "%2E")


def address_segment(address: str) -> str:
    """An address as a path segment; its dots are kept (they are the agent separator)."""
    return quote(address, safe=".")


def base_headers() -> dict[str, str]:
    return {"user-agent": USER_AGENT}


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token is not None else {}


def _json(value: Any) -> tuple[dict[str, str], bytes]:
    return {"content-type": "application/json"}, orjson.dumps(value)


def build_create(token: str | None, protocols: Sequence[str] | None) -> Request:
    headers = auth_headers(token)
    if protocols is None:
        return Request("POST", "/create", headers)
    extra, content = _json({"protocols": list(protocols)})
    return Request("POST", "/create", {**headers, **extra}, content)


def build_write(token: str | None, producer_address: str, stream_id: str, body: Any) -> Request:
    extra, content = _json(body)
    path = f"/write/{address_segment(producer_address)}/{segment(stream_id)}"
    return Request("POST", path, {**auth_headers(token), **extra}, content)


def _message(message: tuple[str, Any] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, Mapping):
        stream_id = message.get("streamId", message.get("stream_id"))
        if not isinstance(stream_id, str) or "body" not in message:
            raise ValueError(f"a message needs 'streamId' (or 'stream_id') and 'body': {message!r}")
        return {"streamId": stream_id, "body": message["body"]}
    stream_id, body = message
    return {"streamId": stream_id, "body": body}


def build_write_batch(
    token: str | None,
    producers: Iterable[str],
    messages: Iterable[tuple[str, Any] | Mapping[str, Any]],
) -> Request:
    payload = {"channels": list(producers), "messages": [_message(m) for m in messages]}
    extra, content = _json(payload)
    return Request("POST", "/write-batch", {**auth_headers(token), **extra}, content)


def build_channels_exist(token: str | None, addresses: Iterable[str]) -> Request:
    extra, content = _json({"channels": list(addresses)})
    return Request("POST", "/channelsExists", {**auth_headers(token), **extra}, content)


def _decode_json(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise DecodingError(f"the server's answer is not JSON: {content[:200]!r}") from exc


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def status_error(status: int, content: bytes, headers: Mapping[str, str]) -> HTTPStatusError:
    """The exception for an error answer, from its status and ``{"code", "message"}`` body."""
    try:
        data = orjson.loads(content)
        code = str(data["code"])
        message = str(data.get("message", ""))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        code = "HTTP_" + str(status)
        message = content[:200].decode("utf-8", "replace")
    if status == 400:
        return BadRequestError(status, code, message)
    if status == 401:
        return UnauthorizedError(status, code, message)
    if status == 404:
        return ChannelNotFoundError(status, code, message)
    if status == 409:
        return BusyError(status, code, message)
    if status == 503 and code == "TIMEOUT":
        return ChannelFullError(status, code, message, _retry_after(headers))
    if status == 503:
        return UnavailableError(status, code, message)
    if status >= 500:
        return ServerError(status, code, message)
    return HTTPStatusError(status, code, message)


def transport_error(exc: BaseException) -> TransportError:
    """A lower-level network error as the client's ``TransportError`` (chain it: ``from exc``)."""
    return TransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def check(response: Answer, *expected: int) -> Any:
    """The decoded JSON of a successful answer, or the translated error raised."""
    if response.status not in expected:
        raise status_error(response.status, response.content, response.headers)
    return _decode_json(response.content)


def parse_create(response: Answer) -> Channel:
    data = check(response, 200)
    try:
        return Channel(
            channel_id=data["channelId"],
            producer_address=data["producerAddress"],
            consumer_address=data["consumerAddress"],
            agent_name=data["agentName"],
            protocols=list(data["protocols"]),
        )
    except (KeyError, TypeError) as exc:
        raise DecodingError(f"unexpected /create answer: {data!r}") from exc


def parse_write(response: Answer) -> None:
    check(response, 200, 201)


def parse_write_batch(response: Answer) -> list[Failure]:
    data = check(response, 200, 201)
    try:
        return [
            Failure(channel=f["channel"], index=int(f["index"]), reason=f["reason"])
            for f in data["failures"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodingError(f"unexpected /write-batch answer: {data!r}") from exc


def parse_channels_exist(response: Answer) -> dict[str, bool]:
    data = check(response, 200)
    try:
        return {str(k): bool(v) for k, v in data["channels"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise DecodingError(f"unexpected /channelsExists answer: {data!r}") from exc


def retryable_write_error(exc: MegaphoneClientError) -> bool:
    """Errors a write retries when asked to: a full channel, 5xx, the network."""
    return isinstance(exc, ChannelFullError | UnavailableError | ServerError | TransportError)


_RANDOM = random.Random()  # seeding one per back-off would cost more than a write


class Backoff:
    """Exponential back-off with jitter; ``reset()`` after a success."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        cap: float = BACKOFF_CAP,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.attempts = 0
        self._random = rng or _RANDOM

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (1 << min(self.attempts, 32)))
        self.attempts += 1
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0


class LineSplitter:
    """Splits a byte stream into NDJSON lines, whatever the chunk boundaries.

    ``feed(chunk)`` returns the complete lines the chunk finishes (without ``\\n``, blank lines
    dropped); the tail without its newline waits for the next chunk. ``reset()`` drops it (a
    connection that ended mid-line: the event is replayed after the resume).
    """

    def __init__(self) -> None:
        self._tail = b""

    @property
    def pending(self) -> bytes:
        return self._tail

    def feed(self, chunk: bytes) -> list[bytes]:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._tail += chunk
            return []
        data = self._tail + chunk[:end] if self._tail else chunk[:end]
        self._tail = chunk[end + 1 :]
        return [line for line in data.split(b"\n") if line.strip()]

    def reset(self) -> None:
        self._tail = b""


def decode_event(line: bytes) -> Event:
    try:
        data = orjson.loads(line)
        event = Event(
            sid=data["sid"],
            eid=data["eid"],
            ts=datetime.fromisoformat(data["ts"]),
            body=data["body"],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DecodingError(f"not an event: {line[:200]!r}") from exc
    return event


def apply_model(event: Event, decode_body: Callable[[Any], Any]) -> Event:
    try:
        body = decode_body(event.body)
    except Exception as exc:
        raise DecodingError(f"event {event.eid}: the body does not fit the model: {exc}") from exc
    return Event(event.sid, event.eid, event.ts, body)


def body_decoder(model: Any) -> Callable[[Any], Any] | None:
    """``model`` (a pydantic model or any type pydantic can validate) as a body decoder."""
    if model is None:
        return None
    from pydantic import TypeAdapter  # only when asked for: the client needs no pydantic

    adapter: TypeAdapter[Any] = TypeAdapter(model)
    return adapter.validate_python


class ReadState:
    """The resume loop of one ``read``: cursor, recent eids, splitter, back-off.

    The twins drive it: ``request()`` before each connection, ``opened(headers)`` on a ``200``
    (a ``Gap`` when the server did not find the cursor), ``feed(chunk)`` for each chunk (the new
    events, duplicates and other streams left out), ``ended()`` when a response ends, and
    ``failed(exc)`` on an error: the delay before the next attempt, or the error raised.
    """

    def __init__(
        self,
        consumer_address: str,
        *,
        after: str | None = None,
        stream_ids: Iterable[str] | None = None,
        model: Any = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.path = f"/read/{address_segment(consumer_address)}"
        self.last_eid = after or None
        self.stream_ids = frozenset(stream_ids) if stream_ids is not None else None
        self.backoff = backoff or Backoff()
        self.splitter = LineSplitter()
        self._decode_body = body_decoder(model)
        self._recent: deque[str] = deque()
        self._seen: set[str] = set()
        self.connections = 0

    def request(self) -> Request:
        headers = {"last-event-id": self.last_eid} if self.last_eid else {}
        return Request("GET", self.path, headers)

    def opened(self, headers: Mapping[str, str]) -> Gap | None:
        self.connections += 1
        self.backoff.reset()
        self.splitter.reset()
        if headers.get(RESUME_HEADER) == UNKNOWN_CURSOR and self.last_eid:
            return Gap(after=self.last_eid)
        return None

    def _remember(self, eid: str) -> bool:
        if eid in self._seen:
            return False
        self._seen.add(eid)
        self._recent.append(eid)
        if len(self._recent) > RECENT_EIDS:
            self._seen.discard(self._recent.popleft())
        return True

    def feed(self, chunk: bytes) -> list[Event]:
        events = []
        for line in self.splitter.feed(chunk):
            event = decode_event(line)
            if not self._remember(event.eid):
                continue
            self.last_eid = event.eid
            if self.stream_ids is not None and event.sid not in self.stream_ids:
                continue
            if self._decode_body is not None:
                event = apply_model(event, self._decode_body)
            events.append(event)
        return events

    def ended(self) -> None:
        self.splitter.reset()

    def failed(self, exc: MegaphoneClientError) -> float:
        """The delay before reconnecting after ``exc``; raises it when a retry cannot help."""
        self.splitter.reset()
        if isinstance(exc, BusyError | TransportError | UnavailableError | ServerError):
            return self.backoff.next_delay()
        if isinstance(exc, ChannelFullError):  # not a read's answer; a proxy's: retry anyway
            return self.backoff.next_delay()
        raise exc
