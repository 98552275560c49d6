"""The write → deliver hot path in one process, without sockets: what an event costs in Python.

    python3 bench/hotpath.py                      # µs per event, warm, and after idle gaps
    python3 bench/hotpath.py --gaps 0,0.5 --events 5000
    valgrind --tool=callgrind python3.11 bench/hotpath.py --count 500     # then --count 2500:
                                                  # the difference ÷ 2,000 = instructions per event

A megaphone node (memory store, the default settings but a replay window too large to fill) runs
in this process; one connection reads a channel and another writes to it, both
:class:`megaphone.http.connection.HttpProtocol` on transports that only count their sends. Each
event is one ``POST /write`` fed to the writer's ``data_received`` and one turn of the loop (the
turn's flush sends the answer and the event). No kernel, no uvloop I/O: the interpreter's and the
C extensions' part of an event, which ``bench/profile.py`` shows as ``libpython`` & co. With
``--gaps`` the loop's thread sleeps that many milliseconds before each event, as a server paced
at a low rate does between wake-ups; the time then counts only the event's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from typing import Any

import orjson
import uvloop

from megaphone.config import Settings
from megaphone.http.connection import HttpProtocol
from megaphone.server import MegaphoneServer


class CountingTransport(asyncio.Transport):
    """Takes the bytes, keeps the last send (the create answer is read from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.sends = 0
        self.last = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        self.last = bytes(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def request(method: bytes, path: bytes, body: bytes = b"") -> bytes:
    return b"%b %b HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" % (
        method,
        path,
    ) + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


async def turn() -> None:
    await asyncio.sleep(0)


async def setup(node: MegaphoneServer) -> tuple[HttpProtocol, bytes]:
    """A reading connection on a new channel, and the writer's connection and request."""
    creator, out = HttpProtocol(node.http), CountingTransport()
    creator.connection_made(out)
    creator.data_received(request(b"POST", b"/create"))
    for _ in range(100):
        await turn()
        if out.sends:
            break
    created = orjson.loads(out.last.split(b"\r\n\r\n", 1)[1])
    reader = HttpProtocol(node.http)
    reader.connection_made(CountingTransport())
    consumer = created["consumerAddress"].encode()
    reader.data_received(b"GET /read/%b HTTP/1.1\r\nHost: bench\r\n\r\n" % consumer)
    await turn()
    writer = HttpProtocol(node.http)
    writer.connection_made(CountingTransport())
    body = orjson.dumps({"n": 1, "pad": "x" * 160})  # ~200 bytes, as the benchmark's
    producer = created["producerAddress"].encode()
    return writer, request(b"POST", b"/write/%b/s" % producer, body)


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings(
        address="127.0.0.1:0",
        agent="bench",
        log_level="warning",
        mng_socket_path="",
        replay_window_size=10**9,
        replay_window_bytes=2**50,
        max_pending_bytes=2**50,
    )
    node = MegaphoneServer(settings)
    await node.start()
    try:
        writer, write = await setup(node)
        if args.count is not None:  # for callgrind: just the events
            for _ in range(args.count):
                writer.data_received(write)
                await turn()
            return
        for _ in range(2_000):  # warm-up
            writer.data_received(write)
            await turn()
        print("| gap before each event | µs per event (its own work) | CPU µs per event |")
        print("|---|---|---|")
        for gap in args.gaps:
            busy = 0.0
            before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(args.events):
                if gap:
                    time.sleep(gap / 1000)  # noqa: ASYNC251 - the loop idles, as between wake-ups
                started = time.perf_counter()
                writer.data_received(write)
                await turn()
                busy += time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(
                f"| {gap:g} ms | {1e6 * busy / args.events:.1f} | "
                f"{1e6 * cpu / args.events:.1f} (sleeping included) |"
            )
    finally:
        await node.aclose(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000, help="events per measurement")
    parser.add_argument(
        "--gaps",
        type=lambda text: [float(g) for g in text.split(",")],
        default=[0.0, 0.2, 0.5, 2.0],
        help="milliseconds of sleep before each event, comma-separated",
    )
    parser.add_argument("--count", type=int, help="only run this many events (for callgrind)")
    args = parser.parse_args(argv)
    uvloop.run(main_async(args))
    sys.stdout.flush()
    if args.count is not None:
        os._exit(0)  # no teardown in the instruction count
    return 0


if __name__ == "__main__":
    sys.exit(main())
