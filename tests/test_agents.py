"""Virtual agents from config: MASTER/REPLICA map, warm-up, random choice among ready masters."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from conftest import ServerFactory, base_url


async def test_creates_use_ready_masters_only(server_factory: ServerFactory) -> None:
    node = await server_factory(
        agent={"virtual": {"m1": "MASTER", "m2": "MASTER", "r1": "REPLICA"}}
    )
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        agents = Counter()
        for _ in range(60):
            reply = await http.post("/create")
            channel = reply.json()
            assert channel["consumerAddress"].startswith(channel["agentName"] + ".")
            assert channel["producerAddress"].startswith(channel["agentName"] + ".")
            agents[channel["agentName"]] += 1
    assert set(agents) == {"m1", "m2"}  # random among masters; never the replica
    assert await node.store.count("m1") == agents["m1"]


async def test_warm_up_is_honoured(server_factory: ServerFactory) -> None:
    node = await server_factory(agent_warmup_secs=0.4)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        early = await http.post("/create")
        assert early.status_code == 503
        assert early.json()["code"] == "UNAVAILABLE"
        await asyncio.sleep(0.5)
        assert (await http.post("/create")).status_code == 200


async def test_addresses_of_another_node(
    server_factory: ServerFactory, store_settings: dict[str, str]
) -> None:
    first = await server_factory(agent="same-name", poll_duration_millis=300)
    second = await server_factory(agent="same-name", poll_duration_millis=300)
    async with httpx.AsyncClient() as http:
        channel = (await http.post(f"{base_url(first)}/create")).json()
        write = await http.post(f"{base_url(second)}/write/{channel['producerAddress']}/s", json=1)
        read = await http.get(f"{base_url(second)}/read/{channel['consumerAddress']}")
    if store_settings["store"] == "memory":
        # same agent name, a key of its own: the producer address does not open on the other node
        assert write.status_code == 400
        assert read.status_code == 404
    else:
        # the agent key lives in Redis: any node accepts any node's addresses
        assert write.status_code == 201
        assert read.status_code == 200
        assert b'"body":1' in read.content
