"""The operator's figures of issue #12: gauges that move with the state (create, attach, detach,
expire, dispose), requests by endpoint and status, the write→deliver latency, the process
collector; and the access line at debug."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

from conftest import ServerFactory, base_url, create_channel, make_settings
from megaphone.metrics import LATENCY_SAMPLE
from megaphone.server import MegaphoneServer
from support import free_port


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(head):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{head!r} not in metrics")


async def scrape(http: httpx.AsyncClient) -> str:
    return (await http.get("/metrics")).text


async def until(http: httpx.AsyncClient, name: str, value: float, **labels: str) -> None:
    for _ in range(300):
        if sample(await scrape(http), name, **labels) == value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name}{labels} never reached {value}")


async def test_gauges_follow_the_state(server_factory: ServerFactory) -> None:
    node = await server_factory(
        channel_ttl_millis=1_000, sweep_interval_millis=50, poll_duration_millis=10_000
    )
    async with httpx.AsyncClient(base_url=base_url(node), timeout=10) as http:
        assert sample(await scrape(http), "megaphone_channels") == 0
        first = await create_channel(http)
        assert sample(await scrape(http), "megaphone_channels") == 1
        for transport in ("ndjson", "sse", "websocket", "long-poll"):
            assert (
                sample(await scrape(http), "megaphone_attached_readers", transport=transport) == 0
            )

        # attach (NDJSON, then SSE), detach
        async with http.stream("GET", f"/read/{first['consumerAddress']}"):
            await until(http, "megaphone_attached_readers", 1, transport="ndjson")
        await until(http, "megaphone_attached_readers", 0, transport="ndjson")
        async with http.stream(
            "GET", f"/read/{first['consumerAddress']}", headers={"accept": "text/event-stream"}
        ):
            await until(http, "megaphone_attached_readers", 1, transport="sse")
        await until(http, "megaphone_attached_readers", 0, transport="sse")

        # dispose (in-process, what the management API calls), then expire; created just
        # before, so that a busy machine cannot let it expire first
        second = await create_channel(http)
        assert sample(await scrape(http), "megaphone_channels") == 2
        assert await node.broker.dispose(second["producerAddress"])
        assert sample(await scrape(http), "megaphone_channels") == 1
        await until(http, "megaphone_channels", 0)  # `first` expires once its read ended


async def test_pending_and_blocked_on_the_memory_store(
    server_factory: ServerFactory, store_settings: dict[str, str]
) -> None:
    if store_settings.get("store") == "redis":
        pytest.skip("the memory store's gauges")
    node = await server_factory(channel_buffer_size=2, write_timeout_millis=5_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=10) as http:
        channel = await create_channel(http)
        for n in range(2):
            await http.post(f"/write/{channel['producerAddress']}/s", json=n)
        text = await scrape(http)
        assert sample(text, "megaphone_pending_events") == 2
        assert sample(text, "megaphone_blocked_writers") == 0
        blocked = asyncio.create_task(http.post(f"/write/{channel['producerAddress']}/s", json=2))
        await until(http, "megaphone_blocked_writers", 1)
        async with http.stream("GET", f"/read/{channel['consumerAddress']}") as reply:
            lines = reply.aiter_lines()
            for _ in range(3):
                await anext(lines)
            assert (await blocked).status_code == 201
            text = await scrape(http)
            assert sample(text, "megaphone_pending_events") == 0
            assert sample(text, "megaphone_blocked_writers") == 0


async def test_requests_latency_and_process(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=10) as http:
        channel = await create_channel(http)
        producer = channel["producerAddress"]
        async with http.stream("GET", f"/read/{channel['consumerAddress']}") as reply:
            lines = reply.aiter_lines()
            for n in range(LATENCY_SAMPLE * 2):
                await http.post(f"/write/{producer}/s", json=n)
                await anext(lines)  # one delivery per write
        await http.post(f"/write/{producer[:-3]}AAA/s", json=1)  # forged: 400
        await http.get("/nowhere")
        text = await scrape(http)
    assert sample(text, "megaphone_http_requests_total", endpoint="create", status="200") == 1
    assert (
        sample(text, "megaphone_http_requests_total", endpoint="write", status="201")
        == LATENCY_SAMPLE * 2
    )
    assert sample(text, "megaphone_http_requests_total", endpoint="write", status="400") == 1
    assert sample(text, "megaphone_http_requests_total", endpoint="read", status="200") == 1
    assert sample(text, "megaphone_http_requests_total", endpoint="other", status="404") == 1
    assert sample(text, "megaphone_delivery_latency_seconds_count") >= 1
    assert sample(text, "megaphone_process_cpu_seconds_total") > 0
    assert sample(text, "megaphone_process_resident_memory_bytes") > 0
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[0] != "#"}
    assert {n for n in names if n.endswith("_created")} == {"megaphone_channel_created"}


async def test_access_line_at_debug(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="megaphone.http")
    node = await server_factory()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await http.post(f"/write/{channel['producerAddress']}/greetings", json=1)
        await http.post(f"/write/{channel['consumerAddress']}/greetings", json=1)  # 400
    access = [r for r in caplog.records if r.getMessage() == "request"]
    write = next(r for r in access if r.path.startswith("/write/"))  # type: ignore[attr-defined]
    assert write.method == "POST"  # type: ignore[attr-defined]
    assert write.status == 201  # type: ignore[attr-defined]
    assert write.duration_ms >= 0  # type: ignore[attr-defined]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", write.client)  # type: ignore[attr-defined]
    assert "…" in write.path
    assert write.path.endswith("/greetings")
    rejected = next(r for r in caplog.records if r.getMessage() == "request rejected")
    assert rejected.levelno == logging.INFO
    assert rejected.path.startswith("/write/")  # type: ignore[attr-defined]
    assert rejected.client.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert rejected.exc_info is None  # never a traceback for a user's error


async def test_agent_ready_is_logged_after_its_warm_up(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="megaphone.server")
    node = await server_factory(agent_warmup_secs=0.3)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        assert (await http.post("/create")).status_code == 503  # warming up
        for _ in range(200):
            if any(r.getMessage() == "agent ready" for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        ready = next(r for r in caplog.records if r.getMessage() == "agent ready")
        assert ready.agent == "test-agent"  # type: ignore[attr-defined]
        assert (await http.post("/create")).status_code == 200


async def test_shutdown_finished_is_logged(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "megaphone", "--address", f"127.0.0.1:{free_port()}",
        "--mng-socket-path", "",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(20):
        while b"megaphone listening" not in await process.stderr.readline():
            pass
        process.send_signal(signal.SIGTERM)
        rest = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert 'msg="shutdown finished"' in rest


async def test_the_dashboard_uses_only_series_we_export() -> None:
    path = Path(__file__).parent.parent / "docs/grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"megaphone_[a-z_]+", e)}
    node = MegaphoneServer(make_settings())  # the memory store exports every series
    await node.start()
    try:
        async with httpx.AsyncClient(base_url=base_url(node)) as http:
            text = await scrape(http)
    finally:
        await node.aclose()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    exported |= {f"{name}_bucket" for name in exported} | {f"{name}_total" for name in exported}
    assert used <= exported, used - exported
