"""What the Python client costs on top of the wire (issue #10's benchmark).

One megaphone node (default settings, memory store, pinned to CPU 0); this process (pinned to
CPU 1) drives it two ways in the same run, one phase each, ``--duration`` seconds:

* **writes/s**: ``--concurrency`` closed-loop writers into 100 channels (each read by a raw
  reader, so no write waits for room), through one
  ``AsyncMegaphone`` (tasks sharing its connection pool), then through the raw load generator
  (``loadgen.closed_loop``: hand-made requests on as many keep-alive connections);
* **events/s one reader sustains**: the raw load generator writes into one channel as fast as it
  is answered, and one reader follows it: ``AsyncMegaphone.read`` (reconnects, resume,
  de-duplication, JSON decoding of every event), then the raw ``loadgen.StreamReader`` (dechunking
  and line splitting only).

The ratios (client ÷ raw) say what the client's convenience costs on this machine.

    python3 bench/client.py [--duration 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import limits
import loadgen
import run
from megaphone.client import AsyncMegaphone

HOST = limits.HOST


def write_request(producer: str, seq: int) -> bytes:
    return limits.request_bytes("POST", f"/write/{producer}/s", b'{"seq":%d}' % seq)


async def client_writes(url: str, producers: list[str], concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with AsyncMegaphone(url) as client:

        async def writer(number: int) -> None:
            nonlocal done
            seq = number
            while time.monotonic() < stop:
                await client.write(producers[seq % len(producers)], "s", {"seq": seq})
                done += 1
                seq += concurrency

        started = time.monotonic()
        await asyncio.gather(*(writer(n) for n in range(concurrency)))
        return done / (time.monotonic() - started)


async def raw_writes(port: int, producers: list[str], concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    seq = 0

    def source() -> loadgen.Request | None:
        nonlocal seq
        if time.monotonic() >= stop:
            return None
        seq += 1
        return write_request(producers[seq % len(producers)], seq), seq

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        nonlocal done
        done += status == 201

    started = time.monotonic()
    await loadgen.closed_loop(HOST, port, concurrency, source, sink)
    return done / (time.monotonic() - started)


async def one_reader(
    url: str, port: int, channel: dict[str, Any], seconds: float, raw: bool
) -> float:
    """Events/s one reader takes while the raw load generator writes as fast as it can."""
    producer, consumer = limits.producer_of(channel), channel["consumerAddress"]
    received = 0
    stop = time.monotonic() + seconds
    writing = asyncio.ensure_future(raw_writes(port, [producer], 8, seconds))
    started = time.monotonic()
    if raw:

        def on_lines(reader: loadgen.StreamReader, lines: list[bytes], t: float) -> None:
            nonlocal received
            received += len(lines)

        (reader,) = await loadgen.open_readers(
            HOST, port, [f"/read/{consumer}".encode()], on_lines, 1, read_again=True
        )
        await asyncio.sleep(max(0.0, stop - time.monotonic()))
        loadgen.close_all([reader])
    else:
        async with AsyncMegaphone(url) as client:
            reading = client.read(consumer)
            try:
                async for _ in reading:
                    received += 1
                    if time.monotonic() >= stop:
                        break
            finally:
                await reading.aclose()
    elapsed = time.monotonic() - started
    await writing
    return received / elapsed


async def measure(duration: float, concurrency: int) -> dict[str, Any]:
    with limits.fresh_node() as (node, problems):
        url = f"http://{HOST}:{node.port}"
        channels = await limits.create_channels(node.port, 100)
        producers = [limits.producer_of(c) for c in channels]
        # every written channel has a (raw) reader, so writes never wait for room
        paths = [f"/read/{c['consumerAddress']}".encode() for c in channels]
        readers = await loadgen.open_readers(
            HOST, node.port, paths, lambda r, lines, t: None, 100, read_again=True
        )
        out: dict[str, Any] = {}
        out["client_writes_per_s"] = await client_writes(url, producers, concurrency, duration)
        out["raw_writes_per_s"] = await raw_writes(node.port, producers, concurrency, duration)
        loadgen.close_all(readers)
        reads = await limits.create_channels(node.port, 2)
        out["client_reader_events_per_s"] = await one_reader(
            url, node.port, reads[0], duration, raw=False
        )
        out["raw_reader_events_per_s"] = await one_reader(
            url, node.port, reads[1], duration, raw=True
        )
    out["problems"] = problems
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    run.raise_nofile()
    if run.pinned(run.LOADGEN_CPU):
        os.sched_setaffinity(0, {run.LOADGEN_CPU})
    out = asyncio.run(measure(args.duration, args.concurrency))
    w, rw = out["client_writes_per_s"], out["raw_writes_per_s"]
    r, rr = out["client_reader_events_per_s"], out["raw_reader_events_per_s"]
    print("| figure | AsyncMegaphone | raw load generator | client ÷ raw |")
    print("|---|---|---|---|")
    writers = f"writes/s, {args.concurrency} writers, one client"
    print(f"| {writers} | {w:,.0f} | {rw:,.0f} | {w / rw:.2f} |")
    print(f"| events/s one reader takes | {r:,.0f} | {rr:,.0f} | {r / rr:.2f} |")
    for problem in out["problems"]:
        print(f"- {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
