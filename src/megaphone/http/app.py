"""The public API's endpoints: request → broker call → a :class:`~megaphone.http.types.Result`.

Routing, bodies and the choice of read transport only; framing, keep-alive and streaming live in
:mod:`megaphone.http.connection` and :mod:`megaphone.http.sinks`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from megaphone.core import transports
from megaphone.core.addressing import consumer_features
from megaphone.core.broker import Broker
from megaphone.core.transports import Transport
from megaphone.errors import (
    BadRequest,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    Overloaded,
    Unauthorized,
    Unavailable,
    UpgradeRequired,
)
from megaphone.http.types import Handler, ReadStream, Reply, Request, Result
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
CORS_HEADERS = b"authorization, content-type, last-event-id, idempotency-key"


WRITTEN = Reply(201, OK, JSON, prebuilt=True)  # an accepted write: the hot path's answer
# ?transport= values (WebSocket is chosen by its Upgrade, which a query cannot replace)
TRANSPORT_PARAMS = {
    "ndjson": Transport.NDJSON,
    "sse": Transport.SSE,
    "long-poll": Transport.LONG_POLL,
}
EVENT_STREAM = b"text/event-stream"


# --- request bodies ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class CreateBody(_Strict):
    protocols: list[str] = Field(default_factory=list)


class BatchMessage(_Strict):
    stream_id: str = Field(validation_alias=AliasChoices("streamId", "stream_id"))
    body: Any
    idempotency_key: str | None = Field(
        default=None, validation_alias=AliasChoices("idempotencyKey", "idempotency_key")
    )


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
        return Reply(204, b"", JSON, extra)


def check_bearer(request: Request, token: bytes) -> None:
    supplied = request.headers.get(b"authorization", b"")
    scheme, _, value = supplied.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token):
        raise Unauthorized("a valid bearer token is required for producer endpoints")


def query_params(request: Request) -> dict[str, str]:
    """The query's parameters (the first of each name); 400 when one is not valid UTF-8."""
    if not request.query:
        return {}
    try:
        pairs = parse_qsl(
            request.query.decode("latin-1"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
        )
    except UnicodeDecodeError:
        raise BadRequest("query parameter is not valid UTF-8") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)
    return params


def read_cursor(request: Request, params: dict[str, str] | None = None) -> str | None:
    """The resume cursor: `Last-Event-ID` (what EventSource sends on reconnect), else `?after=`."""
    raw = request.headers.get(b"last-event-id")
    cursor: str | None = None
    if raw is not None:
        try:
            cursor = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("resume cursor is not valid UTF-8") from None
    else:
        cursor = (query_params(request) if params is None else params).get("after")
    if not cursor:
        return None
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise BadRequest(f"resume cursor longer than {MAX_CURSOR_LENGTH} characters")
    return cursor


def idempotency_key(request: Request) -> str | None:
    """The optional ``Idempotency-Key`` of a write (checked by the broker)."""
    raw = request.headers.get(b"idempotency-key")
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Idempotency-Key is not valid UTF-8") from None


def read_transport(request: Request, params: dict[str, str]) -> Transport:
    """The transport a read asks for: a WebSocket upgrade, else ``?transport=``, else SSE when
    ``Accept`` names ``text/event-stream``, else the original NDJSON stream."""
    upgrade = request.headers.get(b"upgrade")
    if upgrade is not None and upgrade.strip().lower() == b"websocket":
        return Transport.WEBSOCKET
    named = params.get("transport")
    if named is not None:
        transport = TRANSPORT_PARAMS.get(named)
        if transport is None:
            raise BadRequest(
                f"unknown transport {named!r}; one of: {', '.join(TRANSPORT_PARAMS)} "
                "(WebSocket: an Upgrade request)"
            )
        return transport
    accept = request.headers.get(b"accept")
    if accept is not None and EVENT_STREAM in accept.lower():
        return Transport.SSE
    return Transport.NDJSON


def websocket_key(request: Request) -> bytes:
    """The ``Sec-WebSocket-Key`` of a valid upgrade request (RFC 6455 4.2.1); 4xx otherwise."""
    if request.method != b"GET" or request.http10:
        raise BadRequest("a WebSocket upgrade is an HTTP/1.1 GET")
    if not request.upgrade:
        raise BadRequest("a WebSocket upgrade needs Connection: Upgrade")
    if request.headers.get(b"sec-websocket-version", b"").strip() != b"13":
        raise UpgradeRequired("only WebSocket version 13 is supported")
    key = request.headers.get(b"sec-websocket-key", b"").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64")
    return key


# --- the endpoints ----------------------------------------------------------------------------


Routes = dict[str, tuple[dict[bytes, Handler], int, bool]]


class Router:
    """Routes requests to handlers: the public API and the management API are both routers on
    the same HTTP/1 connection layer."""

    def __init__(self, broker: Broker, *, token: str | None, cors: Cors) -> None:
        self.broker = broker
        self.token = token.encode() if token else None
        self.cors = cors
        # the HTTP server's I/O budget for answers being built (see HttpServerState)
        self.room_for_answer: Callable[[int], bool] = lambda size: True
        self.release_answer: Callable[[int], None] = lambda size: None
        # path head → ({method: handler}, number of parameters, needs the bearer token)
        self.routes: Routes = {}
        self.cached: Handler | None = None  # the handler whose routes are remembered
        # (method, path) of a write → what _route found: a producer writes the same path again
        self._routed: dict[tuple[bytes, bytes], tuple[Handler, list[str], bool, str]] = {}

    def route(self, request: Request) -> tuple[Handler, list[str]]:
        """The handler and raw path parameters; 404 for an unknown path, 405 for a wrong method,
        401 for a protected endpoint without the configured bearer token."""
        known = self._routed.get((request.method, request.path))
        if known is not None:  # a producer writing again
            handler, params, protected, request.endpoint = known
            if protected and self.token is not None:
                check_bearer(request, self.token)
            return handler, params
        handler, params, protected = self._route(request)
        if protected and self.token is not None:
            check_bearer(request, self.token)
        if handler == self.cached:  # reads come once per window: not worth their memory
            if len(self._routed) >= ROUTE_CACHE_SIZE:
                self._routed.clear()
            self._routed[(request.method, request.path)] = (
                handler,
                params,
                protected,
                request.endpoint,
            )
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
        request.endpoint = head
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


class Api(Router):
    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        *,
        producer_token: str | None = None,
        cors_origins: list[str] | None = None,
    ) -> None:
        super().__init__(
            broker,
            token=producer_token,
            cors=Cors(cors_origins if cors_origins is not None else ["*"]),
        )
        self.metrics = metrics
        # HEAD is answered by the GET handler (the protocol leaves the body out), except on
        # /read, where it must not attach a reader
        self.cached = self.write
        self.routes = {
            "create": ({b"POST": self.create}, 0, True),
            "write": ({b"POST": self.write}, 2, True),
            "write-batch": ({b"POST": self.write_batch}, 0, True),
            "read": ({b"GET": self.read, b"HEAD": self.read_head}, 1, False),
            "channelsExists": ({b"POST": self.channels_exists}, 0, True),
            "metrics": ({b"GET": self.render_metrics, b"HEAD": self.render_metrics}, 0, False),
            "healthz": ({b"GET": self.healthz, b"HEAD": self.healthz}, 0, False),
            "readyz": ({b"GET": self.readyz, b"HEAD": self.readyz}, 0, False),
        }

    async def create(self, request: Request, params: list[str]) -> Result:
        body = request.body
        protocols = parse_model(CreateBody, body).protocols if body.strip() else ()
        created = await self.broker.create(protocols)
        return Reply(200, orjson.dumps(created))

    def write(self, request: Request, params: list[str]) -> Coroutine[Any, Any, Result] | Result:
        producer, stream = params
        stream_id = decode_segment(stream)
        body = parse_json(request.body)
        request.body = b""  # parsed: a write that waits for room holds its event, not this
        pending = self.broker.write_now(
            decode_segment(producer), stream_id, body, idempotency_key(request)
        )
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
            keys = [m.idempotency_key for m in batch.messages]
            failures = await self.broker.write_batch(batch.channels, messages, keys)
            return Reply(201, orjson.dumps({"failures": failures}))
        finally:
            self.release_answer(worst)

    def read(self, request: Request, params: list[str]) -> Result:
        consumer = decode_segment(params[0])
        query = query_params(request)
        transport = read_transport(request, query)
        ws_key = websocket_key(request) if transport is Transport.WEBSOCKET else b""
        if not transports.allows(consumer_features(consumer), transport):
            raise NotAcceptable(
                f"this channel cannot be read with {transport.label} "
                f"({transport.protocol} was not among its protocols)"
            )
        heartbeat = query.get("heartbeat", "") in ("1", "true")
        return ReadStream(
            consumer, read_cursor(request, query), transport, heartbeat=heartbeat, ws_key=ws_key
        )

    async def read_head(self, request: Request, params: list[str]) -> Result:
        """HEAD /read: what a read would start with (200, or its 400/404), without attaching a
        reader, taking the lease or settling a cursor."""
        consumer = decode_segment(params[0])
        self.broker.registry.addresses.consumer(consumer)  # 400 malformed, 404 unknown agent
        read_cursor(request)  # 400 for a cursor a read would refuse
        if not (await self.broker.exists([consumer])).get(consumer):
            raise NotFound("channel not found")
        return Reply(200, b"", NDJSON)

    async def channels_exists(self, request: Request, params: list[str]) -> Result:
        body = parse_model(ChannelsExistsBody, request.body)
        exists = await self.broker.exists(body.channels)
        return Reply(200, orjson.dumps({"channels": exists}))

    async def render_metrics(self, request: Request, params: list[str]) -> Result:
        return Reply(200, await self.metrics.exposition(), METRICS_TYPE.encode())

    async def healthz(self, request: Request, params: list[str]) -> Result:
        return Reply(200, OK)

    async def readyz(self, request: Request, params: list[str]) -> Result:
        reason = await self.broker.ready()
        if reason is not None:
            raise Unavailable(f"not ready: {reason}")
        return Reply(200, OK)
