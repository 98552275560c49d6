"""Limits, producer token, CORS, health endpoints and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import weakref

import httpx
import orjson
import pytest

from conftest import ServerFactory, base_url, create_channel
from megaphone.core.broker import MAX_ADDRESS_LENGTH
from megaphone.errors import MethodNotAllowed
from megaphone.gcpolicy import GcPolicy
from megaphone.http.app import ROUTE_CACHE_SIZE, failures_size
from megaphone.http.types import Request
from megaphone.server import MegaphoneServer


async def test_channel_limit(server_factory: ServerFactory) -> None:
    node = await server_factory(max_channels=3)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        for _ in range(3):
            await create_channel(http)
        assert (await http.get("/readyz")).status_code == 503
        full = await http.post("/create")
        assert full.status_code == 503
        assert full.json()["code"] == "CHANNEL_LIMIT"
        assert await node.store.count() == 3
        assert (await http.get("/healthz")).status_code == 200  # alive, just full


async def test_batch_limits(server_factory: ServerFactory) -> None:
    node = await server_factory(
        max_batch_messages=3, max_batch_channels=2, poll_duration_millis=300
    )
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        producer = channel["producerAddress"]
        messages = [{"streamId": "s", "body": n} for n in range(4)]
        too_many = await http.post(
            "/write-batch", json={"channels": [producer], "messages": messages}
        )
        assert too_many.status_code == 413
        assert too_many.json()["code"] == "BATCH_TOO_LARGE"
        wide = await http.post(
            "/write-batch", json={"channels": [producer] * 3, "messages": messages[:1]}
        )
        assert wide.status_code == 413
        assert wide.json()["code"] == "BATCH_TOO_LARGE"
        ok = await http.post(
            "/write-batch", json={"channels": [producer], "messages": messages[:3]}
        )
        assert ok.status_code == 201
        reply = await http.get(f"/read/{channel['consumerAddress']}", timeout=30)
        assert len(reply.content.splitlines()) == 3  # only the accepted batch was written


async def test_producer_token(server_factory: ServerFactory) -> None:
    node = await server_factory(producer_token="s3cret", poll_duration_millis=200)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        anonymous = await http.post("/create")
        assert anonymous.status_code == 401
        assert anonymous.json()["code"] == "UNAUTHORIZED"
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        wrong = await http.post("/create", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = await http.post("/create", headers={"Authorization": "Basic czNjcmV0"})
        assert basic.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        channel = (await http.post("/create", headers=auth)).json()
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        assert (await http.post(f"/write/{producer}/s", json=1)).status_code == 401
        assert (await http.post(f"/write/{producer}/s", json=1, headers=auth)).status_code == 201
        batch = {"channels": [producer], "messages": [{"streamId": "s", "body": 2}]}
        assert (await http.post("/write-batch", json=batch)).status_code == 401
        assert (await http.post("/write-batch", json=batch, headers=auth)).status_code == 201
        exists = {"channels": [consumer]}
        assert (await http.post("/channelsExists", json=exists)).status_code == 401
        assert (await http.post("/channelsExists", json=exists, headers=auth)).status_code == 200
        # reads stay capability-based: the consumer address is the secret
        read = await http.get(f"/read/{consumer}")
        assert read.status_code == 200
        assert len(read.content.splitlines()) == 2
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        # a path already routed (the route is remembered) still needs the token every time
        for _ in range(3):
            assert (await http.post(f"/write/{producer}/s", json=3)).status_code == 401
            assert (
                await http.post(f"/write/{producer}/s", json=3, headers=auth)
            ).status_code == 201
            assert (await http.post("/create")).status_code == 401


def test_remembered_routes_stay_bounded(server: MegaphoneServer) -> None:
    """Each write path is routed once and remembered; many distinct paths do not grow that
    memory without bound, and what is remembered answers as routing again would."""
    api = server.http.api
    for n in range(ROUTE_CACHE_SIZE * 2 + 10):
        request = Request()
        request.method, request.path = b"POST", b"/write/agent.%d/s" % n
        for _ in range(2):  # routed, then remembered
            handler, params = api.route(request)
            assert handler == api.write
            assert params == [f"agent.{n}", "s"]
        assert len(api._routed) <= ROUTE_CACHE_SIZE
    request = Request()
    request.method, request.path = b"GET", b"/write/agent.0/s"
    with pytest.raises(MethodNotAllowed):
        api.route(request)  # the same path with another method is routed on its own
    request.method, request.path = b"GET", b"/read/agent.x.1"
    assert api.route(request) == (api.read, ["agent.x.1"])
    assert (b"GET", b"/read/agent.x.1") not in api._routed  # reads are not remembered


async def test_cors_preflight_and_headers(server: object, client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    path = f"/read/{channel['consumerAddress']}"
    preflight = await client.options(
        path,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "GET" in preflight.headers["access-control-allow-methods"]
    assert "last-event-id" in preflight.headers["access-control-allow-headers"]
    assert "content-length" not in preflight.headers
    async with client.stream("GET", path, headers={"Origin": "https://app.example"}) as reply:
        assert reply.headers["access-control-allow-origin"] == "*"
        assert reply.headers["access-control-expose-headers"] == "megaphone-resume"
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["x-accel-buffering"] == "no"
    error = await client.get("/read/nope", headers={"Origin": "https://app.example"})
    assert error.headers["access-control-allow-origin"] == "*"
    plain = await client.post("/create")
    assert "access-control-allow-origin" not in plain.headers  # no Origin, no CORS headers


async def test_cors_allow_list(server_factory: ServerFactory) -> None:
    node = await server_factory(cors_allowed_origins=["https://good.example"])
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        good = await http.options(
            "/create",
            headers={"Origin": "https://good.example", "Access-Control-Request-Method": "POST"},
        )
        assert good.headers["access-control-allow-origin"] == "https://good.example"
        assert good.headers["vary"] == "origin"
        bad = await http.options(
            "/create",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert bad.status_code == 204
        assert "access-control-allow-origin" not in bad.headers
        assert "access-control-allow-methods" not in bad.headers


async def test_health_during_warm_up(server_factory: ServerFactory) -> None:
    node = await server_factory(agent_warmup_secs=0.3)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        assert (await http.get("/healthz")).json() == {"status": "OK"}
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["code"] == "UNAVAILABLE"
        await asyncio.sleep(0.4)
        assert (await http.get("/readyz")).status_code == 200


async def test_shutdown_ends_reads_and_answers_inflight_writes(
    server_factory: ServerFactory,
) -> None:
    # the waiting writes would otherwise wait a minute, past the 20 s grace: they must be
    # answered when the shutdown starts (issue #9), not cut without an answer
    node = await server_factory(channel_buffer_size=1, write_timeout_millis=60_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        busy = await create_channel(http)
        producer = busy["producerAddress"]
        await http.post(f"/write/{producer}/s", json=0)
        blocked = asyncio.create_task(http.post(f"/write/{producer}/s", json=1))
        batch = asyncio.create_task(
            http.post(
                "/write-batch",
                json={"channels": [producer], "messages": [{"streamId": "s", "body": 2}] * 2},
            )
        )
        reading = await create_channel(http)
        async with http.stream("GET", f"/read/{reading['consumerAddress']}") as stream:
            await asyncio.sleep(0.05)
            closing = asyncio.create_task(node.aclose(grace=20))
            body = [chunk async for chunk in stream.aiter_raw()]
        assert body == []  # ended cleanly with the last chunk, no error
        reply = await blocked  # the in-flight write got its answer before the close
        assert reply.status_code == 503
        assert reply.json()["code"] == "SHUTTING_DOWN"
        answered = await batch
        assert answered.status_code == 201
        reasons = [f["reason"] for f in answered.json()["failures"]]
        assert reasons == ["SHUTTING_DOWN", "SKIPPED"]
        await closing
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as again:
            await again.post(f"{base_url(node)}/create")


async def test_gc_freezes_long_lived_objects_and_they_are_still_freed(
    server_factory: ServerFactory,
) -> None:
    """Full collections skip what was frozen; what the server keeps is cycle-free, so a
    connection and a read that were frozen while alive are freed once done, without the GC."""
    node = await server_factory(gc_freeze_interval_millis=20, poll_duration_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        channel = await create_channel(http)
        async with http.stream("GET", f"/read/{channel['consumerAddress']}") as stream:
            await http.post(f"/write/{channel['producerAddress']}/s", json=1)
            lines = stream.aiter_lines()
            assert orjson.loads(await anext(lines))["body"] == 1
            (reader,) = [c for c in node.http.connections if c.stream is not None]
            read = reader.stream
            frozen = gc.get_freeze_count()
            for _ in range(100):  # a tick or two of the policy
                await asyncio.sleep(0.02)
                if gc.get_freeze_count() != frozen:
                    break
            assert gc.get_freeze_count() != frozen
        await http.aclose()
        # once done, nothing but this test holds them: reference counting frees them, frozen
        # or not (getrefcount counts its own argument too)
        for _ in range(100):
            if sys.getrefcount(reader) == 3 and sys.getrefcount(read) == 2:
                break
            await asyncio.sleep(0.02)
        assert sys.getrefcount(read) == 2
        del read  # it held the connection
        assert sys.getrefcount(reader) == 2


async def test_write_batch_answer_is_bounded_before_any_work(server: MegaphoneServer) -> None:
    """Issue #9's amplification: 1,000 made-up channels x 1,000 messages (under 1 MB) once got a
    ~1 GB failure list. Now the product of channels and messages is checked first."""
    channels = [f"made-up-{n:06d}.{'x' * 50}" for n in range(1000)]
    messages = [{"streamId": "s", "body": n} for n in range(1000)]
    async with httpx.AsyncClient(base_url=base_url(server), timeout=30) as http:
        reply = await http.post("/write-batch", json={"channels": channels, "messages": messages})
        assert reply.status_code == 413
        assert reply.json()["code"] == "BATCH_TOO_LARGE"
        assert "1000000 writes" in reply.json()["message"]
        assert server.metrics.messages_unroutable == 0  # refused before any work
        long = await http.post(
            "/write-batch", json={"channels": ["a." + "x" * 300], "messages": messages[:1]}
        )
        assert long.status_code == 400
        assert "longer than" in long.json()["message"]
        # the largest batch allowed: its answer stays within the documented few MiB
        request = {"channels": channels[:100], "messages": messages[:100]}
        allowed = await http.post("/write-batch", json=request)
        assert allowed.status_code == 201
        assert len(allowed.json()["failures"]) == 10_000
        assert len(allowed.content) < 10_000 * (MAX_ADDRESS_LENGTH + 64)
        assert (await http.get("/healthz")).status_code == 200


async def test_batch_writes_limit_is_a_setting(server_factory: ServerFactory) -> None:
    node = await server_factory(max_batch_writes=6, poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        a, b, c = [(await create_channel(http))["producerAddress"] for _ in range(3)]
        messages = [{"streamId": "s", "body": n} for n in range(3)]
        wide = await http.post("/write-batch", json={"channels": [a, b, c], "messages": messages})
        assert wide.status_code == 413
        # duplicates are written once, so they do not count twice
        ok = await http.post("/write-batch", json={"channels": [a, b, a], "messages": messages})
        assert ok.status_code == 201
        assert ok.json() == {"failures": []}


async def test_answers_held_for_clients_that_do_not_read_are_budgeted(
    server_factory: ServerFactory,
) -> None:
    """A write-batch reserves its worst-case answer from the I/O budget before any work; the
    output of a client that stops reading stays counted until it goes."""
    budget = 3_000_000
    node = await server_factory(max_buffered_request_bytes=budget, poll_duration_millis=300)
    channels = [f"made-up-{n:04d}.{'x' * 50}" for n in range(250)]
    messages = [{"streamId": "s", "body": n} for n in range(40)]
    big = orjson.dumps({"channels": channels, "messages": messages})
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        assert failures_size(channels, 40) > 1_000_000  # failures per batch, at worst
        # a client that sends batches and never reads their answers
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
        head = b"POST /write-batch HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
        sock.sendall((head + big) * 12)
        # until the kernel's buffers are full too and the connection's output stays paused
        held, steady = -1, 0
        for _ in range(500):
            await asyncio.sleep(0.02)
            now = node.http.held_output_bytes
            steady = steady + 1 if now == held and now > 0 else 0
            held = now
            if steady == 10:
                break
        assert held > 0
        # what is left of the budget decides: a batch whose answer could exceed it is refused
        room = budget - held - node.http.buffered_request_bytes
        wide = [f"other-{n:03d}.{'y' * 240}" for n in range(100)]
        probes = [{"streamId": "s", "body": n} for n in range(100)]
        fits = max(m for m in range(101) if failures_size(wide, m) <= room)
        assert fits < 100
        refused = await http.post(
            "/write-batch", json={"channels": wide, "messages": probes[: fits + 1]}
        )
        assert refused.status_code == 503
        assert refused.json()["code"] == "OVERLOADED"
        accepted = await http.post(
            "/write-batch", json={"channels": wide, "messages": probes[:fits]}
        )
        assert accepted.status_code == 201
        sock.close()
        for _ in range(200):
            if node.http.held_output_bytes == 0:
                break
            await asyncio.sleep(0.02)
        assert node.http.held_output_bytes == 0
        assert node.http.buffered_request_bytes == 0
        assert (await http.post("/write-batch", content=big)).status_code == 201


async def test_byte_budgets_answer_clearly_and_others_keep_going(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(
        channel_buffer_bytes=50_000,
        max_pending_bytes=120_000,
        write_timeout_millis=200,
        poll_duration_millis=300,
    )
    big = {"pad": "x" * 30_000}
    async with httpx.AsyncClient(base_url=base_url(node), timeout=30) as http:
        a, b, c, d = [await create_channel(http) for _ in range(4)]
        # one event always fits an empty buffer; the second is over the channel's bytes
        assert (await http.post(f"/write/{a['producerAddress']}/s", json=big)).status_code == 201
        full = await http.post(f"/write/{a['producerAddress']}/s", json=big)
        assert full.status_code == 503
        assert full.json()["code"] == "TIMEOUT"
        assert "bytes" in full.json()["message"]
        assert (await http.post(f"/write/{b['producerAddress']}/s", json=big)).status_code == 201
        assert (await http.post(f"/write/{c['producerAddress']}/s", json=big)).status_code == 201
        over = await http.post(f"/write/{d['producerAddress']}/s", json={"pad": "y" * 40_000})
        if node.settings.store == "memory":
            # three events of ~30 KB fill most of the node's 120 KB: refused at once
            assert over.status_code == 503
            assert over.json()["code"] == "TIMEOUT"
            assert "budget" in over.json()["message"]
            # reading and confirming gives the bytes back
            events = (await http.get(f"/read/{a['consumerAddress']}")).content.splitlines()
            last = orjson.loads(events[-1])["eid"]
            await http.get(f"/read/{a['consumerAddress']}", headers={"Last-Event-ID": last})
            again = await http.post(f"/write/{d['producerAddress']}/s", json={"pad": "y" * 40_000})
            assert again.status_code == 201
        else:  # the events live in Redis: only the channel's own bounds apply
            assert over.status_code == 201
        assert (await http.get("/healthz")).status_code == 200


async def test_gc_policy_reclaims_a_cycle_frozen_while_alive() -> None:
    """The policy's periodic reclaim: a cycle that became garbage after it was frozen is
    collected once everything is thawed (here at the first tick: reclaim_interval 0)."""

    class Node:
        other: Node | None = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.freeze()
    del a, b  # garbage now, but frozen: no collection can see it
    gc.collect()
    assert gone() is not None
    policy = GcPolicy(interval=0.01, reclaim_interval=0, reclaim_below=10**9)
    policy.start()
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if gone() is None:
                break
    finally:
        policy.close()
        policy.close()  # harmless twice
    assert gone() is None
