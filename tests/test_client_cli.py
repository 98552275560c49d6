"""megaphone-client as a subprocess, and the runnable examples, against the real server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson

from conftest import ServerFactory, base_url
from support import clean_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run(*args: str, url: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "megaphone.client.cli",
        "--url",
        url,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_create_write_read_across_windows(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=300, replay_window_size=2)
    url = base_url(node)
    code, out, err = await run("create", url=url)
    assert code == 0, err
    channel = orjson.loads(out)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    assert consumer == channel["channelId"]
    for n in range(3):
        code, _, err = await run(
            "write", producer, "greetings", orjson.dumps({"n": n}).decode(), url=url
        )
        assert code == 0, err
    code, _, err = await run("write", producer, "piped", url=url, stdin=b'{"from": "stdin"}')
    assert code == 0, err
    # five events over several windows (two per window): each once, in order, as NDJSON
    code, out, err = await run("read", consumer, "--count", "4", url=url)
    assert code == 0, err
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["body"] for line in lines] == [{"n": 0}, {"n": 1}, {"n": 2}, {"from": "stdin"}]
    assert lines[0]["sid"] == "greetings"
    assert lines[0]["ts"].endswith("Z")
    assert len({line["eid"] for line in lines}) == 4


async def test_errors_have_clear_messages_and_exit_codes(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=300)
    url = base_url(node)
    code, _, err = await run("write", "nonsense", "s", "1", url=url)
    assert code == 1
    assert b"megaphone-client:" in err
    assert b"Traceback" not in err
    code, _, err = await run("write", "x", "s", "{not json", url=url)
    assert code == 2
    assert b"not JSON" in err
    code, _, err = await run(
        "read", "gone.00000000000000000000000000000000000000000000000000.1", url=url
    )
    assert code == 1
    assert b"404" in err or b"not found" in err.lower()
    code, _, err = await run("create", url="http://127.0.0.1:9")  # nothing listens
    assert code == 1
    assert b"Traceback" not in err


async def test_examples_run(server_factory: ServerFactory) -> None:
    node = await server_factory()
    env = {**clean_env(), "MEGAPHONE_URL": base_url(node)}
    for name, expected in (
        ("delayed_response.py", b"result: {'square': 144}"),
        ("progress_stream.py", b"result: {'rows': 1234}"),
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / name),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert expected in out, out
        if name == "progress_stream.py":
            assert out.count(b"progress") == 6
    assert os.environ.get("MEGAPHONE_URL") is None  # the test's own environment untouched
