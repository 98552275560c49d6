"""The public API's endpoints: request → broker call → (status, JSON body).

Routing and bodies only; framing, keep-alive and streaming live in :mod:`megaphone.http.protocol`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from megaphone.core.broker import Broker
from megaphone.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    Unauthorized,
    Unavailable,
)
from megaphone.http.wire import NDJSON
from megaphone.metrics import CONTENT_TYPE as METRICS_TYPE
from megaphone.metrics import Metrics

log = logging.getLogger("megaphone.http")
M = TypeVar("M", bound=BaseModel)

JSON = b"application/json"
OK = orjson.dumps({"status": "OK"})
MAX_CURSOR_LENGTH = 256
ROUTE_CACHE_SIZE = 4_096
CORS_METHODS = b"GET, HEAD, POST, OPTIONS"
CORS_HEADERS = b"authorization, content-type, last-event-id"


class Request:
    __slots__ = ("body", "cors", "headers", "http10", "keep_alive", "method", "path", "query")

    def __init__(self) -> None:
        self.cors = b""  # CORS response headers for this request's origin
        self.method = b""
        self.path = b""
        self.query = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.http10 = False
        self.keep_alive = True


class ReadRequest:
    """A handler's answer meaning "stream this channel to the client"."""

    __slots__ = ("after", "consumer")

    def __init__(self, consumer: str, after: str | None) -> None:
        self.consumer = consumer
        self.after = after


Reply = tuple[int, bytes, bytes, bytes]  # status, body, content type, extra headers
Result = Reply | ReadRequest
WRITTEN: Reply = (201, OK, JSON, b"")  # an accepted write: the hot path's answer
# a handler is a coroutine function, or (the hot path) a function that answers at once with a
# Reply or hands back the coroutine that will
Handler = Callable[[Request, list[str]], Coroutine[Any, Any, Result] | Reply]


# --- request bodies ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class CreateBody(_Strict):
    protocols: list[str] = Field(default_factory=list)


class BatchMessage(_Strict):
    stream_id: str = Field(validation_alias=AliasChoices("streamId", "stream_id"))
    body: Any


class WriteBatchBody(_Strict):
    channels: list[str] = Field(validation_alias=AliasChoices("channels", "channelIds"))
    messages: list[BatchMessage]


class ChannelsExistsBody(_Strict):
    channels: list[str] = Field(validation_alias=AliasChoices("channels", "channelIds"))


def parse_json(body: bytes) -> Any:
    if not body:
        raise BadRequest("request body must be JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def parse_model(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate(parse_json(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"invalid request body: {where}: {first['msg']}") from None


def failures_size(channels: list[str], messages: int) -> int:
    """The size of a write-batch answer in which every write failed."""
    per_entry = len('{"channel":,"index":,"reason":"BAD_REQUEST"},') + len(str(messages))
    return sum((len(orjson.dumps(c)) + per_entry) * messages for c in dict.fromkeys(channels)) + 16


def decode_segment(raw: str) -> str:
    """Percent-decode one path segment; it must be valid UTF-8."""
    if "%" not in raw and raw.isascii():
        return raw  # nothing to decode (addresses and most stream ids)
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("path segment is not valid UTF-8") from None


# --- cross-cutting: CORS, auth, cursors --------------------------------------------------------


class Cors:
    """CORS for browser clients: ``cors_allowed_origins`` (``*`` = any origin, no credentials)."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = {o.encode() for o in origins if o != "*"}

    def headers(self, request: Request) -> bytes:
        origin = request.headers.get(b"origin")
        if origin is None:
            return b""
        if self.any:
            allowed = b"*"
        elif origin in self.origins:
            allowed = origin
        else:
            return b""
        return (
            b"access-control-allow-origin: %b\r\nvary: origin\r\n"
            b"access-control-expose-headers: megaphone-resume\r\n" % allowed
        )

    def preflight(self, request: Request) -> Reply:
        """The answer to ``OPTIONS``: a CORS preflight when the origin is allowed."""
        extra = b"allow: %b\r\n" % CORS_METHODS
        if request.cors and b"access-control-request-method" in request.headers:
            extra += (
                b"access-control-allow-methods: %b\r\naccess-control-allow-headers: %b\r\n"
                b"access-control-max-age: 86400\r\n" % (CORS_METHODS, CORS_HEADERS)
            )
        return 204, b"", JSON, extra


def check_bearer(request: Request, token: bytes) -> None:
    supplied = request.headers.get(b"authorization", b"")
    scheme, _, value = supplied.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token):
        raise Unauthorized("a valid bearer token is required for producer endpoints")


def read_cursor(request: Request) -> str | None:
    """The resume cursor: `Last-Event-ID` (what EventSource sends on reconnect), else `?after=`."""
    raw = request.headers.get(b"last-event-id")
    cursor: str | None = None
    try:
        if raw is not None:
            cursor = raw.decode("utf-8")
        elif request.query:
            pairs = parse_qsl(
                request.query.decode("latin-1"),
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
            )
            cursor = next((value for name, value in pairs if name == "after"), None)
    except UnicodeDecodeError:
        raise BadRequest("resume cursor is not valid UTF-8") from None
    if not cursor:
        return None
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise BadRequest(f"resume cursor longer than {MAX_CURSOR_LENGTH} characters")
    return cursor


# --- the endpoints ----------------------------------------------------------------------------


class Api:
    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        *,
        producer_token: str | None = None,
        cors_origins: list[str] | None = None,
    ) -> None:
        self.broker = broker
        self.metrics = metrics
        self.token = producer_token.encode() if producer_token else None
        self.cors = Cors(cors_origins if cors_origins is not None else ["*"])
        # path head → ({method: handler}, number of parameters, needs the producer token).
        # HEAD is answered by the GET handler (the protocol leaves the body out), except on
        # /read, where it must not attach a reader
        # the HTTP server's I/O budget for answers being built (see HttpServerState)
        self.room_for_answer: Callable[[int], bool] = lambda size: True
        self.release_answer: Callable[[int], None] = lambda size: None
        self.routes: dict[str, tuple[dict[bytes, Handler], int, bool]] = {
            "create": ({b"POST": self.create}, 0, True),
            "write": ({b"POST": self.write}, 2, True),
            "write-batch": ({b"POST": self.write_batch}, 0, True),
            "read": ({b"GET": self.read, b"HEAD": self.read_head}, 1, False),
            "channelsExists": ({b"POST": self.channels_exists}, 0, True),
            "metrics": ({b"GET": self.render_metrics, b"HEAD": self.render_metrics}, 0, False),
            "healthz": ({b"GET": self.healthz, b"HEAD": self.healthz}, 0, False),
            "readyz": ({b"GET": self.readyz, b"HEAD": self.readyz}, 0, False),
        }
        # (method, path) of a write → what _route found: a producer writes the same path again
        self._routed: dict[tuple[bytes, bytes], tuple[Handler, list[str], bool]] = {}

    def route(self, request: Request) -> tuple[Handler, list[str]]:
        """The handler and raw path parameters; 404 for an unknown path, 405 for a wrong method,
        401 for a producer endpoint without the configured bearer token."""
        known = self._routed.get((request.method, request.path))
        if known is not None:  # a producer writing again, a reader reconnecting
            handler, params, protected = known
            if protected and self.token is not None:
                check_bearer(request, self.token)
            return handler, params
        handler, params, protected = self._route(request)
        if protected and self.token is not None:
            check_bearer(request, self.token)
        if handler == self.write:  # reads come once per window: not worth their memory
            if len(self._routed) >= ROUTE_CACHE_SIZE:
                self._routed.clear()
            self._routed[(request.method, request.path)] = (handler, params, protected)
        return handler, params

    def _route(self, request: Request) -> tuple[Handler, list[str], bool]:
        path = request.path.decode("latin-1")
        if not path.startswith("/"):
            raise NotFound("no such endpoint")
        head, _, rest = path[1:].partition("/")
        entry = self.routes.get(head)
        if entry is None:
            raise NotFound("no such endpoint")
        methods, arity, protected = entry
        params = rest.split("/", arity - 1) if arity else ([rest] if rest else [])
        if (arity == 0 and params) or (arity and (len(params) != arity or "/" in params[-1])):
            raise NotFound("no such endpoint")
        handler = methods.get(request.method)
        if handler is None:
            if request.method == b"OPTIONS":
                return self.options, params, False
            raise MethodNotAllowed(
                f"{request.method.decode('latin-1')} is not allowed here",
                allow=", ".join(m.decode() for m in [*methods, b"OPTIONS"]),
            )
        return handler, params, protected

    async def options(self, request: Request, params: list[str]) -> Result:
        return self.cors.preflight(request)

    async def create(self, request: Request, params: list[str]) -> Result:
        body = parse_model(CreateBody, request.body) if request.body.strip() else CreateBody()
        created = await self.broker.create(body.protocols)
        return 200, orjson.dumps(created), JSON, b""

    def write(self, request: Request, params: list[str]) -> Coroutine[Any, Any, Result] | Reply:
        producer, stream = params
        stream_id = decode_segment(stream)
        body = parse_json(request.body)
        request.body = b""  # parsed: a write that waits for room holds its event, not this
        pending = self.broker.write_now(decode_segment(producer), stream_id, body)
        return WRITTEN if pending is None else self._written(pending)

    async def _written(self, pending: Coroutine[Any, Any, None]) -> Result:
        await pending
        return WRITTEN

    async def write_batch(self, request: Request, params: list[str]) -> Result:
        batch = parse_model(WriteBatchBody, request.body)
        request.body = b""  # parsed: what waits holds the events, not this
        messages = [(m.stream_id, m.body) for m in batch.messages]
        self.broker.check_batch(batch.channels, messages)  # a 4xx comes first
        # the answer's size at worst (every write failing) is reserved from the server's I/O
        # budget before any work, so that many batches to clients that do not read cannot
        # pile answers up (issue #9)
        worst = failures_size(batch.channels, len(batch.messages))
        if not self.room_for_answer(worst):
            raise Overloaded("the server's budget for buffered requests and answers is full")
        try:
            failures = await self.broker.write_batch(batch.channels, messages)
            return 201, orjson.dumps({"failures": failures}), JSON, b""
        finally:
            self.release_answer(worst)

    async def read(self, request: Request, params: list[str]) -> Result:
        return ReadRequest(decode_segment(params[0]), read_cursor(request))

    async def read_head(self, request: Request, params: list[str]) -> Result:
        """HEAD /read: what a read would start with (200, or its 400/404), without attaching a
        reader, taking the lease or settling a cursor."""
        consumer = decode_segment(params[0])
        self.broker.registry.addresses.consumer(consumer)  # 400 malformed, 404 unknown agent
        read_cursor(request)  # 400 for a cursor a read would refuse
        if not (await self.broker.exists([consumer])).get(consumer):
            raise NotFound("channel not found")
        return 200, b"", NDJSON, b""

    async def channels_exists(self, request: Request, params: list[str]) -> Result:
        body = parse_model(ChannelsExistsBody, request.body)
        exists = await self.broker.exists(body.channels)
        return 200, orjson.dumps({"channels": exists}), JSON, b""

    async def render_metrics(self, request: Request, params: list[str]) -> Result:
        return 200, self.metrics.render(), METRICS_TYPE.encode(), b""

    async def healthz(self, request: Request, params: list[str]) -> Result:
        return 200, OK, JSON, b""

    async def readyz(self, request: Request, params: list[str]) -> Result:
        reason = await self.broker.ready()
        if reason is not None:
            raise Unavailable(f"not ready: {reason}")
        return 200, OK, JSON, b""
