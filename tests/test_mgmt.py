"""The management API on its Unix socket and ``megactl`` as a subprocess, on both stores: every
subcommand in both output formats, the error paths, the socket file's lifecycle."""

from __future__ import annotations

import asyncio
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import ServerFactory, base_url, create_channel, make_settings
from megaphone.mgmt.listener import SocketPathError
from megaphone.server import MegaphoneServer

MEGACTL = [sys.executable, "-m", "megaphone.mgmt.cli"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mng", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def megactl(path: Path, *args: str, out: str = "plain") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *MEGACTL,
        "-p",
        str(path),
        "-o",
        out,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def ctl_json(path: Path, *args: str) -> Any:
    code, out, err = await megactl(path, *args, out="json")
    assert code == 0, err
    return orjson.loads(out)


async def metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


async def test_every_subcommand_in_both_formats(
    server_factory: ServerFactory, sock_dir: Path
) -> None:
    path = sock_dir / "m.sock"
    node = await server_factory(mng_socket_path=str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channels = [await create_channel(http) for _ in range(5)]

        code, out, _ = await megactl(path, "list-agents")
        assert code == 0
        header, row = out.splitlines()
        assert header.split() == ["NAME", "MODE", "SINCE", "WARMING", "UP", "CHANNELS"]
        assert row.split()[0:2] == ["test-agent", "MASTER"]
        assert row.split()[-1] == "5"
        agents = await ctl_json(path, "list-agents")
        assert [(a["name"], a["mode"], a["channelsCount"], a["warmingUp"]) for a in agents] == [
            ("test-agent", "MASTER", 5, False)
        ]
        assert agents[0]["since"].endswith("Z")

        code, out, _ = await megactl(path, "add-agent", "-n", "extra")
        assert (code, out.strip()) == (0, "agent extra added")
        assert await ctl_json(path, "add-agent", "-n", "more") == {"status": "OK"}
        names = [a["name"] for a in await ctl_json(path, "list-agents")]
        assert names == ["test-agent", "extra", "more"]

        # pages: every channel exactly once, in a stable order
        seen: list[str] = []
        for skip in (0, 2, 4):
            page = await ctl_json(path, "list-channels", "-s", str(skip), "-l", "2")
            assert all(c["agentId"] == "test-agent" for c in page)
            seen += [c["address"] for c in page]
        assert sorted(seen) == sorted(c["consumerAddress"] for c in channels)
        code, out, _ = await megactl(path, "list-channels", "-l", "3")
        lines = out.splitlines()
        assert lines[0].split() == ["ADDRESS", "AGENT"]
        assert len(lines) == 4

        # dispose: pending events count as lost; by consumer or producer address
        target = channels[0]
        for n in range(2):
            await http.post(f"/write/{target['producerAddress']}/s", json=n)
        lost = await metric(http, "megaphone_messages_lost")
        code, out, _ = await megactl(path, "dispose-channel", "-n", target["consumerAddress"])
        assert (code, out.strip()) == (0, f"channel {target['consumerAddress']} disposed")
        assert await metric(http, "megaphone_messages_lost") == lost + 2
        assert (await http.post(f"/write/{target['producerAddress']}/s", json=1)).status_code == 404
        by_producer = await ctl_json(path, "dispose-channel", "-n", channels[1]["producerAddress"])
        assert by_producer == {"status": "OK"}
        assert len(await ctl_json(path, "list-channels", "-l", "100")) == 3


async def test_dispose_ends_an_attached_read_cleanly(
    server_factory: ServerFactory, sock_dir: Path
) -> None:
    path = sock_dir / "m.sock"
    node = await server_factory(mng_socket_path=str(path), poll_duration_millis=30_000)
    async with httpx.AsyncClient(base_url=base_url(node), timeout=10) as http:
        channel = await create_channel(http)
        await http.post(f"/write/{channel['producerAddress']}/s", json="first")
        async with http.stream("GET", f"/read/{channel['consumerAddress']}") as reply:
            lines = reply.aiter_lines()
            assert orjson.loads(await anext(lines))["body"] == "first"
            code, _, err = await megactl(path, "dispose-channel", "-n", channel["consumerAddress"])
            assert code == 0, err
            rest = [line async for line in lines]  # the stream ends (last chunk), no error
        assert rest == []
        again = await http.get(f"/read/{channel['consumerAddress']}")
        assert again.status_code == 404


async def test_the_server_says_no(server_factory: ServerFactory, sock_dir: Path) -> None:
    path = sock_dir / "m.sock"
    node = await server_factory(mng_socket_path=str(path))
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        channel = await create_channel(http)
    cases = [
        (["add-agent", "-n", "test-agent"], "ALREADY_EXISTS (409)"),
        (["add-agent", "-n", "bad name!"], "BAD_REQUEST (400)"),
        (["pipe-agent", "-n", "test-agent", "-t", "http://b:3001"], "NOT_IMPLEMENTED (501)"),
        (["dispose-channel", "-n", "nonsense"], "BAD_REQUEST (400)"),
        (["dispose-channel", "-n", channel["consumerAddress"][:-12] + "abcdefghij.f"], "NOT_FOUND"),
        (["dispose-channel", "-n", "other." + "a" * 50 + ".1"], "NOT_FOUND (404)"),
    ]
    for args, expected in cases:
        code, out, err = await megactl(path, *args)
        assert code == 1, (args, out, err)
        assert err.startswith("megactl: "), (args, err)
        assert expected in err, (args, err)
        assert "Traceback" not in err
    code, _, err = await megactl(path, "list-channels", "-l", "0")
    assert code == 2
    assert "Invalid value" in err
    # the API itself answers bad input with the documented JSON errors
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as mng:
        assert (await mng.get("/channel/list?limit=x")).json()["code"] == "BAD_REQUEST"
        assert (await mng.get("/channel/list?limit=100000")).status_code == 400
        assert (await mng.post("/vagent/add", content=b"{")).status_code == 400
        assert (await mng.get("/vagent/nope")).status_code == 404
        assert (await mng.put("/vagent/list")).status_code == 405
        assert (await mng.get("/create")).status_code == 404  # not the public API


async def test_socket_missing_or_stale(sock_dir: Path) -> None:
    code, _, err = await megactl(sock_dir / "none.sock", "list-agents")
    assert code == 2
    assert "no management socket at" in err
    stale = sock_dir / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # the file stays, nobody listens: what a crash leaves
    code, _, err = await megactl(stale, "list-agents")
    assert code == 2
    assert "connection refused" in err
    regular = sock_dir / "file"
    regular.write_text("x")
    code, _, err = await megactl(regular, "list-agents")
    assert code == 2
    assert "is not a socket" in err


async def test_socket_file_lifecycle(sock_dir: Path) -> None:
    # a stale socket file from a crash is replaced
    path = sock_dir / "m.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()
    first = MegaphoneServer(make_settings(mng_socket_path=str(path)))
    await first.start()
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert (await ctl_json(path, "list-agents"))[0]["name"] == "test-agent"
        # a second server on the same path: refused at start, the first keeps its socket
        second = MegaphoneServer(make_settings(mng_socket_path=str(path)))
        with pytest.raises(SocketPathError, match="in use by a running server"):
            await second.start()
        assert (await ctl_json(path, "list-agents"))[0]["name"] == "test-agent"
    finally:
        await first.aclose()
    assert not path.exists()  # removed on exit
    # a path that is not a socket is never removed; a missing directory is a clear error
    regular = sock_dir / "file"
    regular.write_text("keep me")
    for bad, message in [
        (regular, "exists and is not a socket"),
        (sock_dir / "no" / "m.sock", "does not exist"),
    ]:
        node = MegaphoneServer(make_settings(mng_socket_path=str(bad)))
        with pytest.raises(SocketPathError, match=message):
            await node.start()
    assert regular.read_text() == "keep me"


async def test_management_off_and_default_skipped(sock_dir: Path) -> None:
    off = MegaphoneServer(make_settings(mng_socket_path=""))
    await off.start()
    await off.aclose()
    assert off.mgmt_path is None
    # the built-in default (not set explicitly) is skipped with a warning when unusable
    settings = make_settings()
    settings = settings.model_copy(update={"mng_socket_path": str(sock_dir / "no" / "m.sock")})
    settings.model_fields_set.discard("mng_socket_path")
    node = MegaphoneServer(settings)
    await node.start()
    try:
        assert node.mgmt_path is None
    finally:
        await node.aclose()
