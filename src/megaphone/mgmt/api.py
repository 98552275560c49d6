"""The management API's endpoints (SPEC Part A), served on a Unix socket by the same HTTP/1
connection layer as the public API (:mod:`megaphone.http.connection`).

``GET /vagent/list``, ``POST /vagent/add {"name"}``, ``POST /vagent/pipe {"name","target"}``
(501 until agent piping lands), ``GET /channel/list?skip=&limit=`` and ``DELETE
/channel/{address}``. Access is the socket file's permissions (0600): there is no token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC
from typing import Any

import orjson
from pydantic import Field

from megaphone.config import AgentMode
from megaphone.core.agents import Agent
from megaphone.core.broker import Broker
from megaphone.errors import AlreadyExists, BadRequest, NotFound, NotImplementedHere
from megaphone.http.app import Cors, Router, _Strict, decode_segment, parse_model, query_params
from megaphone.http.types import Reply, Request, Result

log = logging.getLogger("megaphone.mgmt")
AGENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
OK = orjson.dumps({"status": "OK"})


class AddAgentBody(_Strict):
    name: str = Field(min_length=1)


class PipeAgentBody(_Strict):
    name: str = Field(min_length=1)
    target: str = Field(min_length=1)


def _bounded_int(params: dict[str, str], name: str, default: int, most: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 12:
        raise BadRequest(f"{name} must be a non-negative integer")
    value = int(raw)
    if value > most:
        raise BadRequest(f"{name} is at most {most}")
    return value


class MgmtApi(Router):
    def __init__(
        self, broker: Broker, *, warmup_secs: float, on_added: Callable[[Agent], None]
    ) -> None:
        super().__init__(broker, token=None, cors=Cors([]))
        self.warmup_secs = warmup_secs
        self.on_added = on_added  # e.g. log "agent ready" once its warm-up is over
        self.routes = {
            "vagent": ({b"GET": self.vagent_get, b"POST": self.vagent_post}, 1, False),
            "channel": ({b"GET": self.channel_get, b"DELETE": self.channel_delete}, 1, False),
        }

    async def vagent_get(self, request: Request, params: list[str]) -> Result:
        if params != ["list"]:
            raise NotFound("no such endpoint")
        registry = self.broker.registry
        now = registry.clock()
        agents: list[dict[str, Any]] = []
        for agent in list(registry.agents.values()):
            agents.append(
                {
                    "name": agent.name,
                    "since": agent.since.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                    "warmingUp": agent.warming_up(now),
                    "mode": agent.mode.value,
                    "channelsCount": await self.broker.store.count(agent.name),
                }
            )
        return Reply(200, orjson.dumps(agents))

    async def vagent_post(self, request: Request, params: list[str]) -> Result:
        if params == ["add"]:
            return await self.add_agent(request)
        if params == ["pipe"]:
            parse_model(PipeAgentBody, request.body)  # a clear 400 first
            raise NotImplementedHere("agent piping is not implemented yet (no sync service)")
        raise NotFound("no such endpoint")

    async def add_agent(self, request: Request) -> Result:
        name = parse_model(AddAgentBody, request.body).name
        if not AGENT_NAME.fullmatch(name):
            raise BadRequest("an agent name is 1 to 64 of A-Z, a-z, 0-9, _ and -")
        registry = self.broker.registry
        if name in registry.agents:
            raise AlreadyExists(f"agent {name!r} already exists on this node")
        shared = await self.broker.store.agent_keys([name])  # the cluster's key (Redis store)
        if name in registry.agents:  # added meanwhile
            raise AlreadyExists(f"agent {name!r} already exists on this node")
        key = shared[name] if shared is not None else None
        self.on_added(registry.add(name, AgentMode.MASTER, self.warmup_secs, key=key))
        log.info("agent added", extra={"agent": name})
        return Reply(201, OK)

    async def channel_get(self, request: Request, params: list[str]) -> Result:
        if params != ["list"]:
            raise NotFound("no such endpoint")
        query = query_params(request)
        skip = _bounded_int(query, "skip", 0, 10**12)
        limit = _bounded_int(query, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        channels = await self.broker.store.list(skip, limit)
        return Reply(
            200, orjson.dumps([{"address": c.address, "agentId": c.agent} for c in channels])
        )

    async def channel_delete(self, request: Request, params: list[str]) -> Result:
        address = decode_segment(params[0])
        if not await self.broker.dispose(address):  # 400 malformed, 404 unknown agent
            raise NotFound("channel not found")
        return Reply(200, OK)
