"""No event lost on a dropped connection: resume with Last-Event-ID / ?after= (SPEC Part B)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from typing import Any

import httpx
import orjson
import pytest

from conftest import ServerFactory, base_url, create_channel, read_events
from megaphone.server import MegaphoneServer


async def write_all(http: httpx.AsyncClient, producer: str, values: range) -> None:
    for n in values:
        reply = await http.post(f"/write/{producer}/s", json=n)
        assert reply.status_code == 201, reply.text


class Refused(Exception):
    pass


class RawReader:
    """A streaming reader on a raw socket, so the test decides exactly when and how it dies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.headers: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls, node: MegaphoneServer, consumer: str, after: str | None = None
    ) -> RawReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        cursor = f"Last-Event-ID: {after}\r\n" if after else ""
        writer.write(f"GET /read/{consumer} HTTP/1.1\r\nHost: x\r\n{cursor}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head.decode().split("\r\n")
        if not status.startswith("HTTP/1.1 200"):
            writer.close()
            await writer.wait_closed()
            raise Refused(status)
        self = cls(reader, writer)
        self.headers = {k.lower(): v for k, v in (x.split(": ", 1) for x in lines if x)}
        return self

    async def read_event(self) -> dict[str, Any]:
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            raise EOFError("the read window ended")
        data = await self.reader.readexactly(size + 2)
        for line in data[:-2].splitlines():
            self.events.append(orjson.loads(line))
        return self.events[-1]

    async def read_partial(self, nbytes: int) -> None:
        """Read the next chunk's size line and only part of its first line, then stop."""
        await self.reader.readuntil(b"\r\n")
        await self.reader.readexactly(nbytes)

    def kill(self) -> None:
        """Close with a reset, dropping whatever the kernel still holds for us."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def test_cut_reader_resumes_without_loss(server: MegaphoneServer) -> None:
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        channel = await create_channel(http)
        reader = await RawReader.open(server, channel["consumerAddress"])
        assert "megaphone-resume" not in reader.headers  # no cursor: Part A
        await write_all(http, channel["producerAddress"], range(5))
        while len(reader.events) < 2:  # one chunk may carry several events
            await reader.read_event()
        await write_all(http, channel["producerAddress"], range(5, 10))
        reader.kill()  # events 2..9 were sent (or are in flight) to a dead connection
        await write_all(http, channel["producerAddress"], range(10, 15))
        last = reader.events[-1]["eid"]
        resumed = await read_events(
            http,
            channel["consumerAddress"],
            15 - len(reader.events),
            headers={"Last-Event-ID": last},
        )
    received = reader.events + resumed
    unique = list({e["eid"]: e for e in received}.values())
    assert [e["body"] for e in unique] == list(range(15))  # every event once, in order


async def test_reader_that_read_half_a_line_resumes(server: MegaphoneServer) -> None:
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        channel = await create_channel(http)
        reader = await RawReader.open(server, channel["consumerAddress"])
        await write_all(http, channel["producerAddress"], range(1))
        await reader.read_event()
        await write_all(http, channel["producerAddress"], range(1, 2))
        await reader.read_partial(10)  # half of event 1's line
        reader.kill()
        after = reader.events[-1]["eid"]
        resumed = await read_events(http, channel["consumerAddress"], 1, params={"after": after})
    assert [e["body"] for e in resumed] == [1]


async def test_without_cursor_part_a_is_unchanged(server: MegaphoneServer) -> None:
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        channel = await create_channel(http)
        reader = await RawReader.open(server, channel["consumerAddress"])
        await write_all(http, channel["producerAddress"], range(3))
        await reader.read_event()
        reader.kill()
        await asyncio.sleep(0.05)
        await write_all(http, channel["producerAddress"], range(3, 4))
        async with http.stream("GET", f"/read/{channel['consumerAddress']}") as reply:
            assert "megaphone-resume" not in reply.headers
            line = await anext(reply.aiter_lines())
    assert orjson.loads(line)["body"] == 3  # what was sent to the dead reader is gone


async def test_header_wins_over_query(server: MegaphoneServer) -> None:
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        channel = await create_channel(http)
        await write_all(http, channel["producerAddress"], range(3))
        events = await read_events(http, channel["consumerAddress"], 3)
        # EventSource keeps the URL it started with but sends the newest id as a header
        resumed = await read_events(
            http,
            channel["consumerAddress"],
            1,
            params={"after": events[0]["eid"]},
            headers={"Last-Event-ID": events[1]["eid"]},
        )
    assert [e["body"] for e in resumed] == [2]


async def test_unknown_cursor_is_never_silent(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        consumer = channel["consumerAddress"]
        await write_all(http, channel["producerAddress"], range(2))
        events = await read_events(http, consumer, 2)
        reply = await http.get(f"/read/{consumer}", headers={"Last-Event-ID": "someone-elses"})
        assert reply.headers["megaphone-resume"] == "unknown-cursor"
        assert [orjson.loads(x)["body"] for x in reply.content.splitlines()] == [0, 1]
        found = await http.get(f"/read/{consumer}", params={"after": events[0]["eid"]})
        assert found.headers["megaphone-resume"] == "resumed"
        assert [orjson.loads(x)["body"] for x in found.content.splitlines()] == [1]
        # a read without a cursor confirmed the window: its events cannot be named any more
        await http.get(f"/read/{consumer}")
        gone = await http.get(f"/read/{consumer}", params={"after": events[1]["eid"]})
        assert gone.headers["megaphone-resume"] == "unknown-cursor"
        assert gone.content == b""


async def test_a_read_ends_after_a_full_window(server_factory: ServerFactory) -> None:
    node = await server_factory(replay_window_size=3, poll_duration_millis=10_000)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await write_all(http, channel["producerAddress"], range(5))
        # the read does not wait for its 10 s window: three unconfirmed events fill it
        first = await http.get(f"/read/{channel['consumerAddress']}")
        assert [orjson.loads(x)["body"] for x in first.content.splitlines()] == [0, 1, 2]
        last = orjson.loads(first.content.splitlines()[-1])["eid"]
        async with http.stream(
            "GET", f"/read/{channel['consumerAddress']}", headers={"Last-Event-ID": last}
        ) as reply:
            assert reply.headers["megaphone-resume"] == "resumed"
            line = await anext(reply.aiter_lines())
        assert orjson.loads(line)["body"] == 3


async def test_slow_reader_cut_and_resumed_loses_nothing(server_factory: ServerFactory) -> None:
    """The issue's scenario: a reader slower than the writer is cut (reset) several times and
    resumes from its last eid; every acknowledged event arrives, whatever its socket held."""
    node = await server_factory(poll_duration_millis=2000, write_timeout_millis=30_000)
    total, size = 3000, 2000
    async with httpx.AsyncClient(base_url=base_url(node), timeout=60) as http:
        channel = await create_channel(http)
        written: list[int] = []

        async def writer() -> None:
            for n in range(total):
                reply = await http.post(
                    f"/write/{channel['producerAddress']}/s", json={"n": n, "pad": "x" * size}
                )
                assert reply.status_code == 201, reply.text
                written.append(n)

        task = asyncio.create_task(writer())
        seen: list[int] = []
        last: str | None = None
        cuts = 0
        while len(seen) < total:
            try:
                raw = await RawReader.open(node, channel["consumerAddress"], after=last)
            except Refused:
                await asyncio.sleep(0.01)
                continue
            try:
                for _ in range(200):
                    await asyncio.sleep(0.001)  # slow: the kernel buffers fill up meanwhile
                    await asyncio.wait_for(raw.read_event(), 5)
                    for event in raw.events:
                        if not seen or event["body"]["n"] > seen[-1]:
                            seen.append(event["body"]["n"])
                        last = event["eid"]
                    raw.events.clear()
            except (EOFError, asyncio.IncompleteReadError):
                pass  # the window ended: reconnect
            raw.kill()
            cuts += 1
        await task
    assert cuts > 3
    assert seen == written  # every acknowledged event, once, in order


async def test_replay_window_is_a_setting_and_can_be_off(server_factory: ServerFactory) -> None:
    node = await server_factory(replay_window_size=0, poll_duration_millis=300)
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
        await write_all(http, channel["producerAddress"], range(2))
        events = await read_events(http, channel["consumerAddress"], 2)
        reply = await http.get(
            f"/read/{channel['consumerAddress']}", params={"after": events[0]["eid"]}
        )
        assert reply.headers["megaphone-resume"] == "unknown-cursor"
        assert reply.content == b""


SOAK_SECONDS = float(os.environ.get("MEGAPHONE_SOAK_SECONDS", "3"))


@pytest.mark.timeout(SOAK_SECONDS * 4 + 60)
async def test_soak_drop_and_resume(server_factory: ServerFactory) -> None:
    """Writers at full speed, readers that randomly die and resume: nothing lost, order kept."""
    node = await server_factory(poll_duration_millis=1000, write_timeout_millis=30_000)
    rng = random.Random(7)
    channels_count, stop = 20, asyncio.Event()
    counts = {"written": 0, "delivered": 0, "duplicates": 0, "reconnects": 0, "busy": 0, "5xx": 0}
    async with httpx.AsyncClient(
        base_url=base_url(node), timeout=60, limits=httpx.Limits(max_connections=200)
    ) as http:
        channels = [await create_channel(http) for _ in range(channels_count)]

        async def writer(channel: dict[str, Any], written: list[int]) -> None:
            n = 0
            while not stop.is_set():
                reply = await http.post(f"/write/{channel['producerAddress']}/s", json=n)
                if reply.status_code >= 500:
                    counts["5xx"] += 1
                    continue
                assert reply.status_code == 201
                written.append(n)
                counts["written"] += 1
                n += 1

        async def reader(channel: dict[str, Any], seen: list[int], done: asyncio.Event) -> None:
            last: str | None = None
            eids: set[str] = set()
            while not done.is_set():
                try:
                    raw = await RawReader.open(node, channel["consumerAddress"], after=last)
                except Refused as exc:  # 409: the server has not seen the last one die yet
                    refusals.append(str(exc))
                    counts["busy"] += 1
                    await asyncio.sleep(0.01)
                    continue
                try:
                    for _ in range(rng.randint(1, 40)):  # then die at a random point
                        await asyncio.wait_for(raw.read_event(), 1.5)
                        for event in raw.events:
                            if event["eid"] in eids:
                                counts["duplicates"] += 1
                            else:
                                eids.add(event["eid"])
                                seen.append(event["body"])
                                counts["delivered"] += 1
                            last = event["eid"]
                        raw.events.clear()
                except (TimeoutError, EOFError, asyncio.IncompleteReadError):
                    pass  # the window ended or nothing came: reconnect
                if rng.random() < 0.5:
                    await asyncio.sleep(rng.random() * 0.02)  # let events land unread
                    raw.kill()
                else:
                    raw.writer.close()
                    await raw.writer.wait_closed()
                counts["reconnects"] += 1

        refusals: list[str] = []
        written: list[list[int]] = [[] for _ in channels]
        seen: list[list[int]] = [[] for _ in channels]
        drained = [asyncio.Event() for _ in channels]
        writers = [
            asyncio.create_task(writer(c, w)) for c, w in zip(channels, written, strict=True)
        ]
        readers = [
            asyncio.create_task(reader(c, s, d))
            for c, s, d in zip(channels, seen, drained, strict=True)
        ]
        await asyncio.sleep(SOAK_SECONDS)
        stop.set()
        await asyncio.gather(*writers)
        # let the readers catch up with everything that was acknowledged
        for _ in range(200):
            if all(len(s) >= len(w) for s, w in zip(seen, written, strict=True)):
                break
            await asyncio.sleep(0.05)
        for d in drained:
            d.set()
        await asyncio.gather(*readers)
    counts["replayed"] = node.metrics.messages_replayed
    print(f"\nsoak {SOAK_SECONDS:g}s over {channels_count} channels: {counts}")
    assert counts["5xx"] == 0
    assert all(" 409 " in refusal for refusal in refusals)
    for w, s in zip(written, seen, strict=True):
        assert s == w  # every acknowledged event, once, in write order
