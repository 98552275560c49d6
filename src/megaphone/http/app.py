"""The public API's endpoints: request → broker call → (status, JSON body).

Routing and bodies only; framing, keep-alive and streaming live in :mod:`megaphone.http.protocol`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from megaphone.core.broker import Broker
from megaphone.errors import BadRequest, MethodNotAllowed, NotFound
from megaphone.metrics import Metrics

log = logging.getLogger("megaphone.http")
M = TypeVar("M", bound=BaseModel)

OK = orjson.dumps({"status": "OK"})


class Request:
    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "path", "query")

    def __init__(self) -> None:
        self.method = b""
        self.path = b""
        self.query = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.http10 = False
        self.keep_alive = True


class ReadRequest:
    """A handler's answer meaning "stream this channel to the client"."""

    __slots__ = ("consumer",)

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer


Reply = tuple[int, bytes, bytes]  # status, body, content type
Result = Reply | ReadRequest
Handler = Callable[[Request, list[str]], Coroutine[Any, Any, Result]]


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


def decode_segment(raw: str) -> str:
    """Percent-decode one path segment; it must be valid UTF-8."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("path segment is not valid UTF-8") from None


# --- the endpoints ----------------------------------------------------------------------------


class Api:
    def __init__(self, broker: Broker, metrics: Metrics) -> None:
        self.broker = broker
        self.metrics = metrics
        # path head → ({method: handler}, number of parameters)
        self.routes: dict[str, tuple[dict[bytes, Handler], int]] = {
            "create": ({b"POST": self.create}, 0),
            "write": ({b"POST": self.write}, 2),
            "write-batch": ({b"POST": self.write_batch}, 0),
            "read": ({b"GET": self.read}, 1),
            "channelsExists": ({b"POST": self.channels_exists}, 0),
            "metrics": ({b"GET": self.render_metrics}, 0),
        }

    def route(self, request: Request) -> tuple[Handler, list[str]]:
        """The handler and raw path parameters; 404 for an unknown path, 405 for a wrong method."""
        path = request.path.decode("latin-1")
        if not path.startswith("/"):
            raise NotFound("no such endpoint")
        head, _, rest = path[1:].partition("/")
        entry = self.routes.get(head)
        if entry is None:
            raise NotFound("no such endpoint")
        methods, arity = entry
        params = rest.split("/", arity - 1) if arity else ([rest] if rest else [])
        if (arity == 0 and params) or (arity and (len(params) != arity or "/" in params[-1])):
            raise NotFound("no such endpoint")
        handler = methods.get(request.method)
        if handler is None:
            raise MethodNotAllowed(
                f"{request.method.decode('latin-1')} is not allowed here",
                allow=", ".join(m.decode() for m in methods),
            )
        return handler, params

    async def create(self, request: Request, params: list[str]) -> Result:
        body = parse_model(CreateBody, request.body) if request.body.strip() else CreateBody()
        created = await self.broker.create(body.protocols)
        return 200, orjson.dumps(created), b"application/json"

    async def write(self, request: Request, params: list[str]) -> Result:
        producer, stream = params
        stream_id = decode_segment(stream)
        body = parse_json(request.body)
        await self.broker.write(decode_segment(producer), stream_id, body)
        return 201, OK, b"application/json"

    async def write_batch(self, request: Request, params: list[str]) -> Result:
        batch = parse_model(WriteBatchBody, request.body)
        failures = await self.broker.write_batch(
            batch.channels, [(m.stream_id, m.body) for m in batch.messages]
        )
        return 201, orjson.dumps({"failures": failures}), b"application/json"

    async def read(self, request: Request, params: list[str]) -> Result:
        return ReadRequest(decode_segment(params[0]))

    async def channels_exists(self, request: Request, params: list[str]) -> Result:
        body = parse_model(ChannelsExistsBody, request.body)
        exists = await self.broker.exists(body.channels)
        return 200, orjson.dumps({"channels": exists}), b"application/json"

    async def render_metrics(self, request: Request, params: list[str]) -> Result:
        return 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
