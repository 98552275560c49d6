"""megaphone.client against the real server (both stores), plus its sans-I/O pieces."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from contextlib import aclosing
from datetime import datetime
from typing import Any

import httpx
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ServerFactory, base_url
from megaphone.client import (
    AsyncMegaphone,
    BadRequestError,
    BusyError,
    Channel,
    ChannelFullError,
    ChannelNotFoundError,
    Event,
    Failure,
    Gap,
    HTTPStatusError,
    Megaphone,
    MegaphoneClientError,
    TransportError,
    UnauthorizedError,
)
from megaphone.client._base import Backoff, LineSplitter
from megaphone.server import MegaphoneServer

FORGED_CONSUMER = "test-agent." + "a" * 50 + ".1"


class Recording(httpx.AsyncBaseTransport):
    """A real transport that records every request's method, path, headers and status."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.log: list[tuple[str, str, httpx.Headers, int]] = []
        self.busy = asyncio.Event()  # a read was answered 409

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.log.append((request.method, request.url.path, request.headers, response.status_code))
        if response.status_code == 409:
            self.busy.set()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def reads(self) -> list[int]:
        return [status for method, path, _, status in self.log if path.startswith("/read/")]


class CuttingProxy:
    """A TCP forwarder that hands the server's bytes on in small pieces (so lines arrive split
    across reads) and cuts its first connection, both ways, after ``cut_after`` bytes."""

    def __init__(self, port: int, cut_after: int) -> None:
        self.port = port
        self.cut_after = cut_after
        self.connections = 0
        self.cuts = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [cwriter, swriter]
        self.connections += 1
        limit = self.cut_after if self.connections == 1 else None
        up = asyncio.create_task(self._copy(creader, swriter, None))
        down = asyncio.create_task(self._copy(sreader, cwriter, limit))
        self._tasks |= {up, down}
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for writer in (cwriter, swriter):
            writer.transport.abort()

    async def _copy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None
    ) -> None:
        sent = 0
        while data := await reader.read(65536):
            if limit is not None and sent + len(data) >= limit:
                writer.write(data[: limit - sent])
                await writer.drain()
                self.cuts += 1
                return
            for start in range(0, len(data), 37):
                writer.write(data[start : start + 37])
                await writer.drain()
            sent += len(data)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def take(stream: Any, count: int) -> list[Any]:
    """The first ``count`` items of a read, then the read is closed."""
    items: list[Any] = []
    async with aclosing(stream):
        async for item in stream:
            items.append(item)
            if len(items) == count:
                break
    return items


# -- no server ---------------------------------------------------------------------------------


def test_import_loads_no_server_code() -> None:
    code = (
        "import sys, megaphone.client\n"
        "bad = [m for m in ('megaphone.server', 'megaphone.http', 'megaphone.store',"
        " 'megaphone.core', 'uvloop', 'httptools', 'redis', 'pydantic') if m in sys.modules]\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@given(
    lines=st.lists(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"x"))),
    cuts=st.lists(st.integers(min_value=0, max_value=2000)),
)
def test_splitter_reassembles_lines_whatever_the_chunks(
    lines: list[bytes], cuts: list[int]
) -> None:
    lines = [line for line in lines if line.strip()]
    data = b"".join(line + b"\n" for line in lines)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    splitter = LineSplitter()
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        out += splitter.feed(data[start:end])
    assert out == lines
    assert splitter.pending == b""


def test_splitter_keeps_a_partial_line_until_reset() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.pending == b'{"b"'
    splitter.reset()
    assert splitter.feed(b'{"c":3}\n\n') == [b'{"c":3}']


def test_backoff_grows_with_jitter_to_a_cap_and_resets() -> None:
    backoff = Backoff(initial=0.1, cap=1.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(0.5 <= d <= 1.0 for d in delays[5:])
    backoff.reset()
    assert backoff.next_delay() <= 0.1


async def test_closed_client() -> None:
    mp = AsyncMegaphone("http://127.0.0.1:9")
    await mp.aclose()
    await mp.aclose()  # harmless
    with pytest.raises(RuntimeError):
        await mp.create()
    with pytest.raises(RuntimeError):
        mp.read("x")
    sync = Megaphone("http://127.0.0.1:9")
    with sync:
        pass
    sync.close()
    with pytest.raises(RuntimeError):
        sync.create()


async def test_network_error_is_translated() -> None:
    async with AsyncMegaphone("http://127.0.0.1:9", timeout=2) as mp:  # the client's own pool
        with pytest.raises(TransportError) as info:
            await mp.create()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    with Megaphone("http://127.0.0.1:9", timeout=2) as sync, pytest.raises(TransportError) as info:
        sync.create()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    transport = httpx.AsyncHTTPTransport()  # through httpx: its error, translated
    async with AsyncMegaphone("http://127.0.0.1:9", timeout=2, transport=transport) as mp:
        with pytest.raises(TransportError) as info:
            await mp.create()
    assert isinstance(info.value.__cause__, httpx.TransportError)


# -- against the server ------------------------------------------------------------------------


async def test_every_producer_method(server: MegaphoneServer) -> None:
    async with AsyncMegaphone(base_url(server)) as mp:
        channel = await mp.create()
        assert isinstance(channel, Channel)
        assert channel.agent_name == "test-agent"
        assert channel.consumer_address == channel.channel_id
        assert "HTTP_STREAM_NDJSON_V1" in channel.protocols  # other transports may follow
        assert (await mp.create(protocols=["HTTP_STREAM_NDJSON_V1"])).protocols
        with pytest.raises(BadRequestError):
            await mp.create(protocols=["NOPE"])

        odd = ["a/b ?#%", "..", ".", "ünï code"]
        for n, sid in enumerate(odd):
            await mp.write(channel.producer_address, sid, {"n": n})
        failures = await mp.write_batch(
            [channel.producer_address, "test-agent.nope"],
            [("s", 1), {"streamId": "s", "body": [2]}, {"stream_id": "t", "body": None}],
        )
        assert failures
        assert all(isinstance(f, Failure) for f in failures)
        assert {f.channel for f in failures} == {"test-agent.nope"}
        assert sorted(f.index for f in failures) == [0, 1, 2]

        with pytest.raises(BadRequestError) as info:  # a consumer address cannot write
            await mp.write(channel.consumer_address, "s", 1)
        assert info.value.status == 400
        assert info.value.code == "BAD_REQUEST"

        exists = await mp.channels_exist([channel.consumer_address, FORGED_CONSUMER, "junk"])
        assert exists == {channel.consumer_address: True, FORGED_CONSUMER: False, "junk": False}

        events = await take(mp.read(channel.consumer_address), 7)
    assert all(isinstance(e, Event) for e in events)
    assert [e.sid for e in events] == [*odd, "s", "s", "t"]
    assert [e.body for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}, 1, [2], None]
    assert all(isinstance(e.ts, datetime) and e.ts.tzinfo is not None for e in events)
    assert len({e.eid for e in events}) == 7


async def test_read_spans_windows_without_loss_or_duplicate(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(poll_duration_millis=300, replay_window_size=4)
    transport = Recording()
    async with AsyncMegaphone(base_url(node), transport=transport) as mp:
        channel = await mp.create()
        for n in range(20):  # more than several replay windows at once
            await mp.write(channel.producer_address, "s", n)

        async def later() -> None:
            for n in range(20, 30):  # and some while reads come and go
                await asyncio.sleep(0.05)
                await mp.write(channel.producer_address, "s", n)

        writer = asyncio.create_task(later())
        events = await take(mp.read(channel.consumer_address), 30)
        await writer
    assert [e.body for e in events] == list(range(30))
    assert len({e.eid for e in events}) == 30
    assert len(transport.reads()) >= 5  # 20 events in windows of 4
    cursors = [h.get("last-event-id") for _, p, h, _ in transport.log if p.startswith("/read/")]
    assert cursors[0] is None
    assert all(cursors[1:])


async def test_cut_mid_stream_resumes_with_nothing_lost(server: MegaphoneServer) -> None:
    proxy = CuttingProxy(server.port, cut_after=1777)
    url = await proxy.start()
    try:
        async with AsyncMegaphone(base_url(server)) as mp, AsyncMegaphone(url) as reader:
            channel = await mp.create()
            for n in range(40):
                await mp.write(channel.producer_address, "s", {"n": n, "pad": "x" * 60})
            events = await take(reader.read(channel.consumer_address), 40)
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    assert proxy.connections >= 2  # the cut read and its resume
    assert [e.body["n"] for e in events] == list(range(40))
    assert len({e.eid for e in events}) == 40


async def test_sync_cut_mid_stream_resumes_with_nothing_lost(server: MegaphoneServer) -> None:
    proxy = CuttingProxy(server.port, cut_after=1777)
    url = await proxy.start()

    def read(consumer: str) -> list[Event | Gap]:
        with Megaphone(url) as reader:
            stream = reader.read(consumer)
            items = [next(stream) for _ in range(40)]
            stream.close()
            return items

    try:
        async with AsyncMegaphone(base_url(server)) as mp:
            channel = await mp.create()
            for n in range(40):
                await mp.write(channel.producer_address, "s", {"n": n, "pad": "x" * 60})
            items = await asyncio.to_thread(read, channel.consumer_address)
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    assert proxy.connections >= 2  # the cut read and its resume
    events = [item for item in items if isinstance(item, Event)]
    assert [e.body["n"] for e in events] == list(range(40))
    assert len({e.eid for e in events}) == 40


async def test_busy_is_retried_until_the_other_reader_leaves(server: MegaphoneServer) -> None:
    transport = Recording()
    async with (
        AsyncMegaphone(base_url(server), transport=transport) as mp,
        httpx.AsyncClient(base_url=base_url(server)) as http,
    ):
        channel = await mp.create()
        async with http.stream("GET", f"/read/{channel.consumer_address}") as other:
            assert other.status_code == 200
            reading = asyncio.create_task(take(mp.read(channel.consumer_address), 1))
            await transport.busy.wait()
            assert not reading.done()
        await mp.write(channel.producer_address, "s", "after")
        events = await reading
    assert [e.body for e in events] == ["after"]


async def test_busy_error_type(server: MegaphoneServer) -> None:
    assert issubclass(BusyError, HTTPStatusError)
    assert issubclass(HTTPStatusError, MegaphoneClientError)


async def test_gone_channel_ends_the_read(server: MegaphoneServer) -> None:
    async with AsyncMegaphone(base_url(server)) as mp:
        with pytest.raises(ChannelNotFoundError) as info:
            await take(mp.read(FORGED_CONSUMER), 1)
        with pytest.raises(BadRequestError):  # a producer address cannot read
            await take(mp.read((await mp.create()).producer_address), 1)
    assert info.value.status == 404


async def test_unknown_cursor_is_signalled(server: MegaphoneServer) -> None:
    async with AsyncMegaphone(base_url(server)) as mp:
        channel = await mp.create()
        for n in range(3):
            await mp.write(channel.producer_address, "s", n)
        items = await take(mp.read(channel.consumer_address, after="bogus"), 4)
        assert items[0] == Gap(after="bogus")
        assert [e.body for e in items[1:]] == [0, 1, 2]

        await mp.write(channel.producer_address, "s", 3)
        gaps: list[Gap] = []

        async def on_gap(gap: Gap) -> None:
            gaps.append(gap)

        events = await take(mp.read(channel.consumer_address, after="bogus2", on_gap=on_gap), 4)
    assert gaps == [Gap(after="bogus2")]
    assert [e.body for e in events] == [0, 1, 2, 3]  # the whole window again, then the new one


async def test_full_channel_and_opt_in_retries(server_factory: ServerFactory) -> None:
    node = await server_factory(channel_buffer_size=1, write_timeout_millis=100)
    transport = Recording()
    async with AsyncMegaphone(base_url(node), transport=transport) as mp:
        channel = await mp.create()
        await mp.write(channel.producer_address, "s", 0)
        with pytest.raises(ChannelFullError) as info:
            await mp.write(channel.producer_address, "s", 1)
        assert (info.value.status, info.value.code) == (503, "TIMEOUT")
        assert info.value.retry_after is None
        writes = sum(1 for m, p, _, _ in transport.log if p.startswith("/write/"))
        with pytest.raises(ChannelFullError):
            await mp.write(channel.producer_address, "s", 1, retries=2)
        assert sum(1 for m, p, _, _ in transport.log if p.startswith("/write/")) == writes + 3

        # a retry that succeeds once a reader drains the channel
        reading = asyncio.create_task(take(mp.read(channel.consumer_address), 2))
        await mp.write(channel.producer_address, "s", 1, retries=50)
        events = await reading
    assert [e.body for e in events] == [0, 1]


async def test_token_on_producer_endpoints_only(server_factory: ServerFactory) -> None:
    node = await server_factory(producer_token="s3cret")
    async with AsyncMegaphone(base_url(node)) as anonymous:
        with pytest.raises(UnauthorizedError):
            await anonymous.create()
    transport = Recording()
    async with AsyncMegaphone(base_url(node), token="s3cret", transport=transport) as mp:
        channel = await mp.create()
        await mp.write(channel.producer_address, "s", 1)
        assert await mp.write_batch([channel.producer_address], [("s", 2)]) == []
        assert await mp.channels_exist([channel.consumer_address]) == {
            channel.consumer_address: True
        }
        events = await take(mp.read(channel.consumer_address), 2)
    assert [e.body for e in events] == [1, 2]
    for _, path, headers, _ in transport.log:
        expected = None if path.startswith("/read/") else "Bearer s3cret"
        assert headers.get("authorization") == expected, path


async def test_delayed_response_and_multiplexed_streams(server: MegaphoneServer) -> None:
    async with AsyncMegaphone(base_url(server)) as mp:
        channel = await mp.create()
        waiting = asyncio.create_task(mp.wait_for(channel.consumer_address, "job-1", timeout=20))
        await mp.write(channel.producer_address, "progress", 50)
        await mp.write(channel.producer_address, "job-1", {"result": 42})
        event = await waiting
        assert (event.sid, event.body) == ("job-1", {"result": 42})
        with pytest.raises(TimeoutError):
            await mp.wait_for(channel.consumer_address, "job-2", timeout=0.2)

        for n in range(6):
            await mp.write(channel.producer_address, "ab"[n % 2], n)
        only_b = await take(mp.read(channel.consumer_address, stream_ids=["b"]), 3)
    assert [(e.sid, e.body) for e in only_b] == [("b", 1), ("b", 3), ("b", 5)]


class Job(pydantic.BaseModel):
    id: int
    name: str


async def test_model_decodes_bodies(server: MegaphoneServer) -> None:
    async with AsyncMegaphone(base_url(server)) as mp:
        channel = await mp.create()
        await mp.write(channel.producer_address, "s", {"id": 1, "name": "a"})
        events = await take(mp.read(channel.consumer_address, model=Job), 1)
        await mp.write(channel.producer_address, "s", {"id": "x"})
        with pytest.raises(MegaphoneClientError):
            await take(mp.read(channel.consumer_address, model=Job), 1)
    assert events[0].body == Job(id=1, name="a")


async def test_sync_twin(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=300, replay_window_size=3)

    def run() -> tuple[list[Any], Event, list[Any]]:
        with Megaphone(base_url(node)) as mp:
            channel = mp.create()
            for n in range(10):
                mp.write(channel.producer_address, "s", n, retries=1)
            assert mp.write_batch([channel.producer_address], [("s", 10)]) == []
            assert mp.channels_exist([channel.producer_address]) == {channel.producer_address: True}
            stream = mp.read(channel.consumer_address)
            items = [next(stream) for _ in range(11)]
            stream.close()
            mp.write(channel.producer_address, "job", "done")
            delayed = mp.wait_for(channel.consumer_address, "job", timeout=20)
            try:
                mp.wait_for(channel.consumer_address, "job", timeout=0.2)
            except TimeoutError:
                pass
            else:
                raise AssertionError("wait_for did not time out")
            mp.write(channel.producer_address, "s", "z")
            gap = mp.read(channel.consumer_address, after="bogus")
            signalled = [next(gap), next(gap)]
            gap.close()
            try:
                next(mp.read(FORGED_CONSUMER))
            except ChannelNotFoundError:
                pass
            else:
                raise AssertionError("no ChannelNotFoundError")
            return items, delayed, signalled

    items, delayed, signalled = await asyncio.to_thread(run)
    assert [e.body for e in items] == list(range(11))
    assert len({e.eid for e in items}) == 11
    assert (delayed.sid, delayed.body) == ("job", "done")
    assert signalled[0] == Gap(after="bogus")
    assert signalled[1].body == "z"


async def test_read_retries_server_errors_then_ends_on_404() -> None:
    line = b'{"sid":"s","eid":"e1","ts":"2026-12-02T10:00:00.000001Z","body":1}\n'
    answers = [
        httpx.Response(500, json={"code": "INTERNAL_SERVER_ERROR", "message": "x"}),
        httpx.Response(503, json={"code": "STORE_UNAVAILABLE", "message": "x"}),
        httpx.Response(200, content=line * 2),  # a duplicate, dropped
        httpx.Response(200, content=line, headers={"megaphone-resume": "resumed"}),
        httpx.Response(404, json={"code": "NOT_FOUND", "message": "gone"}),
    ]
    cursors: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        cursors.append(request.headers.get("last-event-id"))
        return answers.pop(0)

    async with AsyncMegaphone("http://megaphone.test", transport=httpx.MockTransport(answer)) as mp:
        events: list[Any] = []

        async def drain() -> None:
            async for item in mp.read("agent.c.1"):
                events.append(item)

        with pytest.raises(ChannelNotFoundError) as info:
            await drain()
    assert info.value.message == "gone"
    assert [(e.eid, e.body) for e in events] == [("e1", 1)]
    assert cursors == [None, None, None, "e1", "e1"]


async def test_client_across_two_nodes_on_one_redis(
    server_factory: ServerFactory, store_settings: dict[str, Any]
) -> None:
    if store_settings["store"] != "redis":
        pytest.skip("two nodes share channels on the Redis store only")
    first = await server_factory(poll_duration_millis=300, replay_window_size=3)
    second = await server_factory(poll_duration_millis=300, replay_window_size=3)
    async with AsyncMegaphone(base_url(first)) as a, AsyncMegaphone(base_url(second)) as b:
        channel = await a.create()
        for n in range(8):
            await (a if n % 2 else b).write(channel.producer_address, "s", n)
        events = await take(b.read(channel.consumer_address), 8)
    assert [e.body for e in events] == list(range(8))
